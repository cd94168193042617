"""Sampling images and fields at world points: the engine's one place that speaks ``grid_sample``.

Everything upstream works with LPS world coordinates in mm (see :mod:`DeepRegistrationLib.core.grid`);
here they become the normalized ``[-1, 1]`` coordinates of :func:`torch.nn.functional.grid_sample`
(``align_corners=True``: -1 and +1 are the centres of the first and last voxels; the last axis of
the sampling grid is ordered (i, j, k) = (x, y, z) while tensors are ``(B, C, Z, Y, X)``).

Out-of-grid behaviour follows ITK so results match SimpleITK/ANTs/Slicer applying our transforms:
images are zero outside their field of view; displacement fields repeat their border values up to
half a voxel outside the grid and are zero beyond (``itk::DisplacementFieldTransform``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.grid import Grid


def as_tensor_matrix(m: np.ndarray | torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """A numpy or torch matrix as a tensor on ``device``."""
    if isinstance(m, torch.Tensor):
        return m.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(m), device=device, dtype=dtype)


def grid_points(grid: Grid, device=None, dtype=torch.float32) -> torch.Tensor:
    """LPS coordinates (mm) of all voxel centres of ``grid``, shape ``(1, Z, Y, X, 3)``, last axis (x, y, z).

    Computed in float64 (``ijk @ M.T + t``, then cast). When each world axis follows one index axis (the
    direction's rows have one non-zero entry: axis-aligned grids, flips, permutations), each coordinate is
    ``i·m + t`` of one index, computed per line and broadcast: the same bits, without four float64 arrays of
    the grid's size (a 4.6 M-voxel grid: ~0.25 s less)."""
    lines = _separable_lines(grid, device)
    if lines is not None:
        out = torch.empty((1, *grid.shape, 3), device=device, dtype=dtype)
        for axis, line in enumerate(lines):
            out[..., axis].copy_(line)
        return out
    m = torch.as_tensor(grid.index_to_world, device=device, dtype=torch.float64)
    k, j, i = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float64) for n in grid.shape],
                             indexing="ij")
    ijk = torch.stack([i, j, k], dim=-1)
    pts = ijk @ m[:3, :3].T + m[:3, 3]
    return pts.to(dtype).unsqueeze(0)


def _separable_lines(grid: Grid, device=None) -> list[torch.Tensor] | None:
    """For :func:`grid_points`: per world axis (x, y, z) its float64 coordinates along the one index axis it
    follows, shaped to broadcast over ``(1, Z, Y, X)``; None unless every row of the direction part has exactly
    one non-zero entry and its zeros are +0.0. Each value is ``(n·m + 0.0) + t``: what the product ``ijk @ M.T``
    gives there (the other two products are +0.0, whatever the order or fusing of the sum) plus ``t``."""
    m = np.asarray(grid.index_to_world, dtype=np.float64)
    lin = m[:3, :3]
    nonzero = lin != 0
    if not (nonzero.sum(axis=1) == 1).all() or np.signbit(lin[~nonzero]).any():
        return None
    lines = []
    for r in range(3):
        c = int(np.flatnonzero(nonzero[r])[0])  # index axis i (c = 0, along X), j (1, Y) or k (2, Z)
        n = grid.shape[2 - c]
        idx = torch.arange(n, device=device, dtype=torch.float64)
        value = (idx * float(lin[r, c]) + 0.0) + float(m[r, 3])
        shape = [1, 1, 1, 1]
        shape[3 - c] = n
        lines.append(value.view(shape))
    return lines


def _normalizing_map(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` (float64) with ``normalized = a @ world + b`` for ``grid`` (see :func:`world_to_normalized`)."""
    w2i = grid.world_to_index
    size = np.asarray(grid.size, dtype=np.float64)
    scale = np.where(size > 1, 2.0 / np.maximum(size - 1, 1), 0.0)
    # normalized = scale * (W ijk) - 1, folded into one affine map
    return scale[:, None] * w2i[:3, :3], scale * w2i[:3, 3] - np.where(size > 1, 1.0, 0.0)


def world_to_normalized(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Converts LPS points (mm), shape ``(..., 3)``, to ``grid_sample`` coordinates of ``grid``.

    Returns:
        Tensor ``(..., 3)`` ordered (x, y, z) = (i, j, k), -1/+1 at the first/last voxel centre.
    """
    a, b = _normalizing_map(grid)
    a_t = torch.as_tensor(a, device=points.device, dtype=points.dtype)
    b_t = torch.as_tensor(b, device=points.device, dtype=points.dtype)
    return (points @ a_t.T).add_(b_t)  # in place into the product: the bits of ``points @ a.T + b``


def normalized_affine(matrix: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The 4×4 map ``N · matrix`` from LPS points (mm) to ``grid_sample`` coordinates of ``grid``, where ``N`` is
    :func:`world_to_normalized` as a matrix (composed in float64, differentiable in ``matrix``).

    ``apply_affine(points, normalized_affine(M, grid))`` equals ``world_to_normalized(apply_affine(points, M),
    grid)`` up to float rounding, with one point-wise matrix product instead of two (forward and backward): for
    loops that map every grid point through ``M`` at each step. Pass the result to :func:`sample_normalized_in_view`.
    """
    a, b = _normalizing_map(grid)
    a_t = torch.as_tensor(a, device=matrix.device, dtype=torch.float64)
    offset = torch.zeros((3, 4), device=matrix.device, dtype=torch.float64)
    offset[:, 3] = torch.as_tensor(b, device=matrix.device, dtype=torch.float64)
    top = a_t @ matrix[:3].to(torch.float64) + offset  # like apply_affine, the bottom row of ``matrix`` is unused
    last = torch.tensor([[0.0, 0.0, 0.0, 1.0]], device=matrix.device, dtype=torch.float64)
    return torch.cat([top, last]).to(matrix.dtype)


def sample(volume: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Samples ``volume`` (living on ``grid``) at LPS world points.

    Args:
        volume: ``(B, C, Z, Y, X)`` values on ``grid``.
        grid: The grid of ``volume``.
        points: ``(B, Z', Y', X', 3)`` LPS mm, last axis (x, y, z).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"`` (0 beyond the outer voxel centres, blended at the edge),
            ``"border"`` (border values repeat) or ``"itk"`` (as ITK resampling: border values up to
            half a voxel outside the grid, 0 beyond).

    Returns:
        ``(B, C, Z', Y', X')`` sampled values.
    """
    return sample_normalized(volume, grid, world_to_normalized(points, grid), mode, padding_mode)


def sample_normalized(volume: torch.Tensor, grid: Grid, norm: torch.Tensor, mode: str = "bilinear",
                      padding_mode: str = "zeros") -> torch.Tensor:
    """:func:`sample` at points already in ``grid_sample`` coordinates of ``grid`` (:func:`world_to_normalized`),
    ``norm`` ``(B, Z', Y', X', 3)``: :func:`sample`'s step after the conversion (the padding modes as there)."""
    if norm.shape[0] != volume.shape[0]:
        norm = norm.expand(volume.shape[0], *norm.shape[1:])
    if padding_mode == "itk":
        vals = grid_sample(volume, norm.to(volume.dtype), mode, "border")
        return vals * _inside_half_voxel(norm, grid).unsqueeze(1).to(vals.dtype)
    return grid_sample(volume, norm.to(volume.dtype), mode, padding_mode)


def grid_sample(volume: torch.Tensor, norm: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample(volume, norm, align_corners=True)`` (``volume`` ``(B, C, Z, Y, X)``, ``norm``
    ``(B, Z', Y', X', 3)`` of its dtype): the one call of it in the engine.

    On the CPU, PyTorch's 3D ``grid_sample`` (forward and backward) runs only its batch entries in parallel, so
    one volume sampled at one batch of points ran on one thread whatever the thread count. There, a single
    batch entry is split into one part per torch thread (the points reshaped, the volume expanded without a
    copy) and put back together: every point is computed by the same code, so the values and the gradient
    with respect to the points are the same bits (the last ``points mod parts`` points, if any, are sampled by one
    more call). Not split: a volume that needs a gradient (its gradient would be summed over the parts in another
    order), a GPU, one thread, or fewer points than threads.
    """
    parts = torch.get_num_threads() if volume.device.type == "cpu" and volume.shape[0] == 1 == norm.shape[0] else 1
    if parts > 1 and volume.requires_grad and torch.is_grad_enabled():
        parts = 1
    points = norm[0, ..., 0].numel()
    each = points // parts
    if parts < 2 or each == 0:
        return F.grid_sample(volume, norm, mode=mode, padding_mode=padding_mode, align_corners=True)
    channels = volume.shape[1]
    shape = (1, channels, *norm.shape[1:4])
    flat = norm.reshape(points, 3)
    split = parts * each

    def sampled(pts: torch.Tensor, batch: int) -> torch.Tensor:  # (C, n) in point order
        vals = F.grid_sample(volume.expand(batch, *volume.shape[1:]), pts.reshape(batch, -1, 1, 1, 3), mode=mode,
                             padding_mode=padding_mode, align_corners=True)  # (batch, C, n / batch, 1, 1)
        return vals.reshape(channels, -1) if channels == 1 else vals.transpose(0, 1).reshape(channels, -1)

    if split == points:
        return sampled(flat, parts).view(shape)
    # split, not two slices: its backward joins the two gradients as they are (two slices' gradients would be
    # added over zero fills, turning a -0.0 into +0.0)
    head, tail = flat.split([split, points - split])
    return torch.cat([sampled(head, parts), sampled(tail, 1)], 1).view(shape)


def sample_in_view(volume: torch.Tensor, grid: Grid, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``volume`` at LPS points (trilinear, 0 outside) and says which points lie in its field of view.

    Args:
        volume: ``(1 or B, C, Z, Y, X)`` values on ``grid``.
        grid: The grid of ``volume``.
        points: ``(B, Z', Y', X', 3)`` LPS mm, last axis (x, y, z).

    Returns:
        ``values`` ``(B, C, Z', Y', X')`` and ``inside`` ``(B, 1, Z', Y', X')`` bool: True where the point
        lies within the outermost voxel centres of ``grid`` (where trilinear interpolation uses no padding).
    """
    return sample_normalized_in_view(volume, world_to_normalized(points, grid))


def sample_normalized_in_view(volume: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_in_view` at points already in ``grid_sample`` coordinates of the volume's grid.

    Args:
        volume: ``(1 or B, C, Z, Y, X)``.
        norm: ``(B, Z', Y', X', 3)`` normalized (x, y, z) = (i, j, k) coordinates, ±1 at the outer voxel centres
            (:func:`world_to_normalized`, or :func:`apply_affine` with a :func:`normalized_affine`).

    Returns:
        ``values`` ``(B, C, Z', Y', X')`` and ``inside`` ``(B, 1, Z', Y', X')`` bool, as :func:`sample_in_view`.
    """
    norm = norm.to(volume.dtype)
    if volume.shape[0] != norm.shape[0]:
        volume = volume.expand(norm.shape[0], *volume.shape[1:])
    vals = grid_sample(volume, norm, "bilinear", "zeros")
    inside = (norm.detach().abs().amax(dim=-1) <= 1.0 + 1e-6).unsqueeze(1)  # all three axes within ±1
    return vals, inside


def _inside_half_voxel(norm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """True where normalized points lie within half a voxel of the grid (continuous index in [-0.5, n-0.5])."""
    return _inside_limits(norm, _half_voxel_limits(grid, norm.dtype))


def _half_voxel_limits(grid: Grid, dtype) -> tuple[float, float, float]:
    """The limits of :func:`_inside_half_voxel` on ``|norm|`` per axis (x, y, z), computed in ``dtype``."""
    # the limits on the CPU (the same rounding as on a GPU), read as numbers without waiting for the device
    size = torch.as_tensor(grid.size, dtype=dtype)
    half = torch.where(size > 1, 1.0 / torch.clamp(size - 1, min=1), torch.full_like(size, 0.5))
    return tuple((1 + half + 1e-6).tolist())


def _inside_limits(norm: torch.Tensor, limits: tuple[float, float, float]) -> torch.Tensor:
    """``|norm| <= limits`` on all three axes (:func:`_half_voxel_limits`)."""
    # one axis at a time: the same comparisons as ``(norm.abs() <= limit).all(dim=-1)`` (the limits computed in
    # norm's dtype as before), without the (..., 3) bool temporary and the reduction over it
    t0, t1, t2 = limits
    inside = norm[..., 0].abs() <= t0
    inside &= norm[..., 1].abs() <= t1
    inside &= norm[..., 2].abs() <= t2
    return inside


def sample_field(field: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Samples a displacement field at LPS points with ITK's border rule.

    Args:
        field: ``(B, 3, Z, Y, X)`` displacement in LPS mm on ``grid``.
        grid: The grid of ``field``.
        points: ``(B, Z', Y', X', 3)`` LPS mm.

    Returns:
        ``(B, 3, Z', Y', X')`` displacement: trilinear inside, border value up to half a voxel
        outside the grid, 0 beyond (as ``itk::DisplacementFieldTransform`` does).
    """
    norm = world_to_normalized(points, grid)
    inside = _inside_half_voxel(norm, grid)
    vals = grid_sample(field, norm.to(field.dtype), "bilinear", "border")
    return vals * inside.unsqueeze(1).to(vals.dtype)


def apply_affine(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Applies a 4×4 LPS affine to points ``(..., 3)``."""
    return (points @ matrix[:3, :3].T).add_(matrix[:3, 3])  # the bits of ``points @ M.T + t``, one temporary less


def map_points(points: torch.Tensor, affine: torch.Tensor | None, field: torch.Tensor | None,
               field_grid: Grid | None) -> torch.Tensor:
    """The engine's transform ``T(x) = A (x + u(x))`` (fixed → moving, LPS mm) at points ``(B, ..., 3)``.

    Args:
        points: LPS points; for a field the shape must be ``(B, Z', Y', X', 3)`` (use ``view`` for lists).
        affine: 4×4 LPS matrix A or None (identity).
        field: ``(B, 3, Z, Y, X)`` displacement u in LPS mm on ``field_grid``, or None (zero).
        field_grid: Grid of ``field``.
    """
    out = points
    if field is not None:
        u = sample_field(field, field_grid, points)  # (B,3,...)
        out = out + torch.movedim(u, 1, -1)
    if affine is not None:
        out = apply_affine(out, affine)
    return out


def resample_field(field: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Resamples a displacement field ``(B, 3, Z, Y, X)`` from grid ``src`` to grid ``dst`` (values in mm)."""
    pts = grid_points(dst, field.device, field.dtype)
    return sample_field(field, src, pts)


def compose_fields(outer: torch.Tensor, inner: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of ``x -> y + outer(y)`` with ``y = x + inner(x)``, both ``(B, 3, Z, Y, X)`` on ``grid``."""
    pts = grid_points(grid, inner.device, inner.dtype) + torch.movedim(inner, 1, -1)
    return inner + sample_field(outer, grid, pts)


def points_to_tensor(points: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(N, 3)`` LPS points as a ``(1, N, 1, 1, 3)`` tensor usable with :func:`sample` / :func:`map_points`."""
    return torch.as_tensor(np.asarray(points, dtype=np.float64), device=device).to(dtype).view(1, -1, 1, 1, 3)
