"""Applying a :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform` to whole images at full resolution.

``warp_image(moving, fixed_grid, T)`` returns ``moving(T(x))`` for every voxel centre ``x`` of
``fixed_grid`` — what ITK/SimpleITK ``Resample`` does with our ``transform.h5`` (linear or
nearest-neighbour interpolation, border values up to half a voxel outside the moving image, 0 beyond). Work is done in slabs so a
181×217×181 image needs well under 1 GB.
"""
from __future__ import annotations

import numpy as np
import torch

from . import warp as W
from ..core.grid import Grid
from ..core.image import Image
from .transforms import SpatialTransform


#: Voxels per slab of :func:`warp_image` (its ``slab_voxels`` default): ~24 MB of float32 points, ~100 MB in all
#: with the sampling's temporaries.
SLAB_VOXELS = 2_000_000


def slab_grid(grid: Grid, k0: int, k1: int) -> Grid:
    """The sub-grid of slices ``k0 <= k < k1`` of ``grid`` (same voxels, same positions)."""
    origin = grid.index_to_world @ np.array([0.0, 0.0, k0, 1.0])
    return Grid((k1 - k0, grid.shape[1], grid.shape[2]), grid.spacing, tuple(origin[:3]), grid.direction)


def warp_image(image: Image, target: Grid, transform: SpatialTransform, interpolation: str = "linear",
               device=None, slab_voxels: int = SLAB_VOXELS, dtype=None) -> Image:
    """Resamples ``image`` (on its own grid) onto ``target`` through ``transform`` (target → image space).

    Args:
        image: The moving image, any dtype (labels: use ``interpolation="nearest"``).
        target: Grid to fill (usually the fixed image's full-resolution grid).
        transform: Fixed → moving map.
        interpolation: ``"linear"`` or ``"nearest"``.
        device: torch device (default CPU).
        slab_voxels: Voxels per processed slab (memory bound).
        dtype: Pixel type of the result (default ``image``'s). An integer type gets the interpolated values
            rounded (half to even) and clipped into its range, slab by slab: the same values as rounding and
            clipping a float32 result, without the full-size float32 copy (a 0.75 mm CT warped into int16:
            1.4 CPU s and 350 MB less).

    A slab (of ``slab_voxels``) that maps wholly beyond the image is 0 without being sampled; one that maps wholly
    within its half-voxel border is sampled without computing ITK's mask (1 at every point there); where the
    target's axes are parallel to the field grid's, the mask is computed only outside the slab's rectangle of rows
    and columns within the border, and each slab's points are made and normalized in one reused buffer
    (:func:`_warp_separable`). The same bits either way.

    Returns:
        Image on ``target`` with ``dtype``, or ``image``'s dtype (float32 stays float32; labels stay integer).
    """
    mode = {"linear": "bilinear", "nearest": "nearest"}[interpolation]
    vol = torch.as_tensor(np.ascontiguousarray(image.array), device=device)
    vol = vol.to(torch.float64 if interpolation == "nearest" else torch.float32)[None, None]
    if dtype is None:
        dtype = image.array.dtype if image.array.dtype != bool else np.uint8
    out = np.empty(target.shape, dtype=dtype)
    limits = np.iinfo(out.dtype) if np.issubdtype(out.dtype, np.integer) else None
    step = max(1, slab_voxels // max(1, target.shape[1] * target.shape[2]))
    write = slab_writer(out, limits)
    separable = _SeparablePoints.make(transform, target, device)
    with torch.no_grad():
        if separable is not None:
            _warp_separable(vol, image.grid, separable, mode, step, out, write)
            return Image(out, target, image.name)
        field = None
        if transform.field is not None:
            field = torch.as_tensor(transform.field, dtype=torch.float32, device=device)[None]
        affine = torch.as_tensor(transform.affine, dtype=torch.float32, device=device)
        for k0 in range(0, target.shape[0], step):
            k1 = min(target.shape[0], k0 + step)
            sub = slab_grid(target, k0, k1)
            pts = W.map_points(W.grid_points(sub, device), affine, field, transform.field_grid)
            beyond, inside = _box_position(pts, image.grid)
            if beyond:  # the whole slab maps beyond the image: 0, as ITK (a partial view)
                out[k0:k1] = 0
                continue
            # a slab wholly within the image's half-voxel border: ITK's mask would be 1 at every point (the
            # border values are what "itk" padding keeps), so it is not computed
            vals = W.sample(vol, image.grid, pts.to(vol.dtype), mode=mode,
                            padding_mode="border" if inside else "itk")[0, 0]
            write(k0, k1, vals)
    return Image(out, target, image.name)


def slab_writer(out: np.ndarray, limits):
    """``write(k0, k1, vals)``: sampled values ``(k1 - k0, Y, X)`` (float) into slices ``k0 <= k < k1`` of ``out``,
    rounded (half to even) and clipped into ``limits`` (an integer type's ``iinfo``) first, by numpy's cast on
    assignment."""
    def write(k0: int, k1: int, vals: torch.Tensor) -> None:
        if limits is not None:
            vals = vals.round_().clamp_(float(limits.min), float(limits.max))  # in place: a fresh tensor
        out[k0:k1] = vals.cpu().numpy()  # cast on assignment
    return write


def _warp_separable(vol: torch.Tensor, grid: Grid, separable: "_SeparablePoints", mode: str, step: int,
                    out: np.ndarray, write) -> None:
    """:func:`warp_image` where the points are separable sums: each slab of ``step`` slices is placed relative to
    the image (:func:`_slab_position`: 0 beyond it, its points not computed; no mask within its border; else the
    mask only outside the slab's inner rectangle, :func:`_inner_rectangle`), its points computed once into one
    buffer reused by every slab, normalized there in place, sampled and written.

    The values are those of sampling each slab's points (:meth:`_SeparablePoints.points`) with ``"itk"`` padding,
    bit for bit: every step is elementwise or per point, with the same operations in the same order; the
    normalization is ``world_to_normalized``'s (as one product and one sum per coordinate where its matrix is
    diagonal, :func:`_diagonal_normalizing`)."""
    nz, ny, nx = out.shape
    buffer = torch.empty(min(step, nz) * ny * nx * 3, dtype=torch.float32, device=vol.device)
    scale = _diagonal_normalizing(grid, vol.dtype, vol.device)
    if scale is not None:  # as whole slices: contiguous operands (the same products and sums)
        scale = tuple(v.expand(ny, nx, 3).contiguous() for v in scale)
    limits = W._half_voxel_limits(grid, vol.dtype)
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        beyond, inside, pts = _slab_position(grid, separable, k0, k1, buffer)
        if beyond:  # the whole slab maps beyond the image: 0, as ITK (a partial view)
            out[k0:k1] = 0
            continue
        pts = pts.to(vol.dtype)  # float64 for nearest: a copy
        norm = pts.mul_(scale[0]).add_(scale[1]) if scale is not None else W.world_to_normalized(pts, grid)
        vals = W.grid_sample(vol, norm, mode, "border")
        # within the image's half-voxel border ITK's mask is 1 (the border values are what "itk" padding keeps):
        # computed only where it can be 0
        if not inside:
            _mask_outside(vals[0, 0], norm[0], limits, _inner_rectangle(grid, separable, k0, k1))
        write(k0, k1, vals[0, 0])


def _diagonal_normalizing(grid: Grid, dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, offset)`` (3,) tensors of ``dtype`` with ``world_to_normalized(p) = p * scale + offset`` bit for
    bit, when the normalizing matrix of ``grid`` is diagonal (its other entries exactly 0: axis-aligned grids,
    flips): each coordinate of the matrix product is then one product plus exact zeros; else None."""
    a, b = W._normalizing_map(grid)
    if np.any(a[~np.eye(3, dtype=bool)] != 0):
        return None
    as_t = lambda v: torch.as_tensor(np.ascontiguousarray(v), dtype=dtype, device=device)
    return as_t(np.diag(a)), as_t(b)


def _mask_outside(vals: torch.Tensor, norm: torch.Tensor, limits: tuple[float, float, float],
                  rect: tuple[int, int, int, int] | None) -> None:
    """ITK's half-voxel mask (``limits``: ``warp._half_voxel_limits`` of the image's grid) applied in place to
    ``vals`` ``(K, Y, X)`` sampled at ``norm`` ``(K, Y, X, 3)``: everywhere (``rect`` None) or outside the rows
    ``j0 <= j < j1`` x columns ``i0 <= i < i1`` of ``rect = (j0, j1, i0, i1)``, where every point lies within the
    border (the mask is 1 there). The same bits as ``vals * mask``."""
    if rect is None:
        parts = [(slice(None),)]
    else:
        j0, j1, i0, i1 = rect
        rows, inner = (slice(None), slice(0, j0)), (slice(None), slice(j0, j1))
        parts = [rows, (slice(None), slice(j1, None)), (*inner, slice(0, i0)), (*inner, slice(i1, None))]
    for part in parts:
        v = vals[part]
        if v.numel():
            v.mul_(W._inside_limits(norm[part], limits).to(vals.dtype))


def _inner_rectangle(grid: Grid, separable: "_SeparablePoints", k0: int, k1: int,
                     margin: float = 0.01) -> tuple[int, int, int, int] | None:
    """Target rows ``j0 <= j < j1`` and columns ``i0 <= i < i1`` whose separable points, in slices ``k0 <= k < k1``,
    all lie at least ``margin`` voxel within ``grid``'s half-voxel border (ITK's mask is 1 there), as
    ``(j0, j1, i0, i1)``; None when no such rectangle is found (the mask is then computed everywhere).

    A point's continuous index is the sum of index-space terms of its slice, row and column and of its field part
    (bounded over the slab as in :meth:`_SeparablePoints.box`, widened by the same float32 rounding): each axis
    of the index is tested on a (Y, X) table of the row and column terms, not on the points. The rows kept
    are those with at least 90 % of the most columns within the border (a convex region: consecutive rows),
    the columns those within it on every kept row."""
    m = grid.world_to_index
    lin, off = m[:3, :3], m[:3, 3]
    terms = [t.double().cpu().numpy() for t in (separable.bz[k0:k1], separable.by, separable.bx)]
    zq, yq, xq = (t @ lin.T for t in terms)  # (n, 3) index-space terms of slices, rows, columns
    lo, hi = zq.min(axis=0) + off, zq.max(axis=0) + off
    big = sum(np.abs(t).max() for t in terms)
    if separable.field is not None:
        f_lo, f_hi = (t.double().cpu().numpy() for t in separable.field_bounds(k0, k1))
        big += max(np.abs(f_lo).max(), np.abs(f_hi).max())
        lo = lo + np.minimum(lin * f_lo, lin * f_hi).sum(axis=1)
        hi = hi + np.maximum(lin * f_lo, lin * f_hi).sum(axis=1)
    pad = (1e-3 + 1e-6 * big) * np.abs(lin).sum(axis=1)
    lo, hi = lo - pad, hi + pad
    size = np.asarray(grid.size, dtype=np.float64)
    good = np.ones((len(yq), len(xq)), dtype=bool)
    for q in range(3):
        if size[q] > 1:
            s = yq[:, q, None] + xq[None, :, q]
            good &= (s >= -0.5 + margin - lo[q]) & (s <= size[q] - 0.5 - margin - hi[q])
    count = good.sum(axis=1)
    if count.max() == 0:
        return None
    rows = np.flatnonzero(count >= 0.9 * count.max())
    j0, j1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(good[j0:j1].all(axis=0))
    if len(cols) == 0:
        return None
    i0, i1 = int(cols[0]), int(cols[-1]) + 1
    return (j0, j1, i0, i1) if good[j0:j1, i0:i1].all() else None


def _box_position(points: torch.Tensor, grid: Grid, margin: float = 0.01) -> tuple[bool, bool]:
    """Where ``points`` (``(..., 3)`` LPS mm) lie relative to ``grid``'s half-voxel border (continuous index
    ``-0.5 .. n - 0.5``), from the index-space box of the corners of the points' world bounding box (it contains
    every point's continuous index): ``(beyond, inside)``.

    ``beyond``: all points lie more than half a voxel + ``margin`` voxel beyond ``grid`` along one of its axes,
    where ITK's resampling gives 0: a slab of a fixed grid that reaches past a moving image covering part of its
    range (a CT of another scan range) is then not sampled at all. ``inside``: all points lie at least
    ``margin`` voxel within the border on every axis (of more than one voxel), where ITK's mask is 1 everywhere
    (float32 positions err by ~1e-4 voxel at most)."""
    lo, hi = points.reshape(-1, 3).aminmax(dim=0)
    return _index_box_position(lo.double().cpu().numpy(), hi.double().cpu().numpy(), grid, margin)


def _index_box_position(lo: np.ndarray, hi: np.ndarray, grid: Grid, margin: float = 0.01) -> tuple[bool, bool]:
    """:func:`_box_position` of the points in the world box ``lo .. hi`` (LPS mm, float64)."""
    corners = np.array([[(hi if (c >> a) & 1 else lo)[a] for a in range(3)] for c in range(8)])
    m = grid.world_to_index
    idx = corners @ m[:3, :3].T + m[:3, 3]  # (8, 3) continuous (i, j, k)
    size = np.asarray(grid.size, dtype=np.float64)
    first, last = idx.min(axis=0), idx.max(axis=0)
    beyond = bool(np.any(last < -0.5 - margin) or np.any(first > size - 0.5 + margin))
    inside = bool(np.all((size == 1) | ((first >= -0.5 + margin) & (last <= size - 0.5 - margin))))
    return beyond, inside


def _slab_position(grid: Grid, separable: "_SeparablePoints", k0: int, k1: int, buffer: torch.Tensor | None = None,
                   margin: float = 0.01) -> tuple[bool, bool, torch.Tensor | None]:
    """:func:`_box_position` of the separable points of slices ``k0 <= k < k1``, with those points:
    ``(beyond, inside, points (1, k1 - k0, Y, X, 3) in buffer, or None)``; the same ``beyond``, an ``inside`` that
    may be False where that of the points' own box is True (then the mask is computed: the same values).

    The box is first bounded without reading the points (:meth:`_SeparablePoints.box`, a box around every
    point): beyond by that box, the points are too, and they are not computed (``None``: the slab is 0); inside
    by it, they are too. Otherwise a point of the slab, its centre, within reach of the grid (not beyond on any
    axis) means the slab is not beyond (the box of the corners' indices contains that point's); only where
    neither settles it is the points' box taken (for a 0.75 mm CT: a whole pass over the points, 1 CPU s, saved
    in most slabs)."""
    lo, hi = separable.box(k0, k1)
    beyond, inside = _index_box_position(lo, hi, grid, margin)
    if beyond:
        return True, False, None
    points = separable.points(k0, k1, buffer)
    if inside:
        return False, True, points
    _, k, ny, nx, _ = points.shape
    centre = points[0, k // 2, ny // 2, nx // 2].double().cpu().numpy()
    # the centre's own box, with a margin short of the rounding of the corners' indices (well below a
    # millionth of a voxel): not beyond by it, the points' box is not beyond either
    if not _index_box_position(centre, centre, grid, margin - 1e-6)[0]:
        return False, False, points
    return (*_box_position(points, grid, margin), points)


class _SeparablePoints:
    """``T(x)`` at the voxel centres of a target grid whose axes are parallel to the field grid's (the fixed grid
    and its working grid): the field's trilinear interpolation is then separable, three 1D interpolations (one
    per axis) instead of a 3D ``grid_sample`` per target voxel, and the target's points are sums of per-axis
    terms instead of a mesh. The same values as :func:`~DeepRegistrationLib.spatial.warp.map_points` (ITK's
    border rule: border values up to half a voxel outside the field grid, 0 beyond), about twice as fast."""

    def __init__(self, transform: SpatialTransform, target: Grid, m: np.ndarray | None, device=None):
        a = np.asarray(transform.affine, dtype=np.float64)
        base = a @ target.index_to_world  # index (i, j, k, 1) -> A x
        self.dev = device
        as_t = lambda v: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device)
        ar = lambda n: torch.arange(n, dtype=torch.float64, device=device)
        nz, ny, nx = target.shape
        self.bx = (ar(nx)[:, None] * torch.as_tensor(base[:3, 0], device=device)).to(torch.float32)
        self.by = (ar(ny)[:, None] * torch.as_tensor(base[:3, 1], device=device)).to(torch.float32)
        self.bz = (ar(nz)[:, None] * torch.as_tensor(base[:3, 2], device=device)
                   + torch.as_tensor(base[:3, 3], device=device)).to(torch.float32)
        self.field = None
        self._cache = {}  # field rows interpolated for the previous slab (see _rows)
        self._bounds = (None, None)  # the last slab's field_bounds: ((k0, k1), (lo, hi))
        if m is not None:
            # A u, channels last (Z, Y, X, 3): interpolating it is interpolating u then applying A (linear)
            u = torch.as_tensor(transform.field, dtype=torch.float32, device=device)
            self.field = torch.einsum("cd,dzyx->zyxc", as_t(a[:3, :3]), u).contiguous()
            gz, gy, gx = transform.field_grid.shape
            self.wx = self._axis(m[0, 0], m[0, 3], nx, gx)
            self.wy = self._axis(m[1, 1], m[1, 3], ny, gy)
            self.wz = self._axis(m[2, 2], m[2, 3], nz, gz)

    @classmethod
    def make(cls, transform: SpatialTransform, target: Grid, device=None) -> "_SeparablePoints | None":
        if transform.field is None:
            return cls(transform, target, None, device)
        m = _parallel_index_map(transform.field_grid, target)  # target index -> field index
        return None if m is None else cls(transform, target, m, device)

    def _axis(self, scale: float, offset: float, n: int, n_field: int):
        c = offset + scale * torch.arange(n, dtype=torch.float64, device=self.dev)
        inside = ((c >= -0.5 - 1e-6) & (c <= n_field - 0.5 + 1e-6)).to(torch.float32)
        if n_field == 1:
            i0 = torch.zeros(n, dtype=torch.long, device=self.dev)
            return i0, i0, inside, torch.zeros_like(inside)
        i0 = c.floor().clamp(0, n_field - 2)
        t = (c - i0).clamp(0, 1).to(torch.float32)
        i0 = i0.long()
        return i0, i0 + 1, (1 - t) * inside, t * inside

    def points(self, k0: int, k1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``T(x)`` ``(1, k1 - k0, Y, X, 3)`` (LPS mm, float32) for target slices ``k0 <= k < k1``, written into
        ``out`` (a contiguous float32 buffer of at least ``(k1 - k0) * Y * X * 3`` elements) when given."""
        shape = (k1 - k0, len(self.by), len(self.bx), 3)
        if out is not None:
            out = out.view(-1)[:int(np.prod(shape))].view(shape)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32, device=self.bx.device)
        # (slice + row term) + column term, one component at a time (the same sums as broadcasting the (..., 3)
        # terms, without an inner loop of 3)
        zy = self.bz[k0:k1, None, :] + self.by[None, :, :]  # (K, Y, 3)
        for c in range(3):
            torch.add(zy[:, :, c, None], self.bx[None, None, :, c], out=out[..., c])
        pts = out
        if self.field is None:
            return pts[None]
        z0, z1, wz0, wz1 = (v[k0:k1] for v in self.wz)
        u = self._rows(int(z0.min()), int(z1.max()) + 1)
        for n, (a, b, wa, wb) in enumerate(zip(z0.tolist(), z1.tolist(), wz0.tolist(), wz1.tolist())):
            pts[n].add_(u[a], alpha=wa).add_(u[b], alpha=wb)  # in place, slice by slice
        return pts[None]

    def box(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray]:
        """A world box ``(lo, hi)`` (LPS mm, float64) around every point :meth:`points` gives for slices ``k0 <= k < k1``,
        from the per-axis terms and the field rows the slab uses (no pass over the points): a point is the sum of its
        three axis terms and an interpolation of ``A u`` whose weights are >= 0 and sum to 0 or 1, so its field part
        lies between min(0, the rows' smallest value) and max(0, their largest), per component. Widened by the
        float32 rounding of those sums (a thousandth of a mm at 1 m from the origin)."""
        terms = [self.bz[k0:k1], self.by, self.bx]
        if self.field is not None:
            terms.append(torch.stack(self.field_bounds(k0, k1)))
        lo = sum(t.amin(dim=0).double() for t in terms).cpu().numpy()
        hi = sum(t.amax(dim=0).double() for t in terms).cpu().numpy()
        pad = 1e-3 + 1e-6 * np.abs(np.concatenate([lo, hi])).max()
        return lo - pad, hi + pad

    def field_bounds(self, k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per component (x, y, z), bounds ``(lo <= 0, hi >= 0)`` (float32, LPS mm) of the field part ``A u`` of every
        point of slices ``k0 <= k < k1``: the smallest and largest value of the field rows the slab uses, with 0
        (the interpolation weights are >= 0 and sum to 0 or 1). Those of the last slab asked for are kept
        (:meth:`box` and then :func:`_inner_rectangle` ask for the same slab)."""
        if self._bounds[0] != (k0, k1):
            z0, z1 = self.wz[0][k0:k1], self.wz[1][k0:k1]
            rows = self.field[int(z0.min()):int(z1.max()) + 1].reshape(-1, 3)
            f_lo, f_hi = rows.aminmax(dim=0)
            self._bounds = ((k0, k1), (f_lo.clamp(max=0.0), f_hi.clamp(min=0.0)))
        return self._bounds[1]

    def _rows(self, lo: int, hi: int) -> dict:
        """Field rows ``lo <= r < hi`` interpolated in-plane onto the target's (Y, X): ``{r: (Y, X, 3)}``. Rows the
        previous slab interpolated are kept (consecutive slabs share a field row where they meet: at 0.75 mm on a
        2 mm field a quarter of the rows), the others computed (elementwise: the same values either way)."""
        rows = {r: v for r, v in self._cache.items() if lo <= r < hi}
        new = [r for r in range(lo, hi) if r not in rows]
        if new:
            # the rows kept lie at one end of the range (the slabs run one way through the field rows, up or
            # down): the missing ones are consecutive (were they not, those between would be recomputed, to the
            # same values)
            r0, r1 = new[0], new[-1] + 1
            u = self.field[r0:r1]  # (z, Y, X, 3) field rows to interpolate
            x0, x1, wx0, wx1 = self.wx
            u = u.index_select(2, x0).mul_(wx0[:, None]).add_(u.index_select(2, x1).mul_(wx1[:, None]))
            y0, y1, wy0, wy1 = self.wy
            u = u.index_select(1, y0).mul_(wy0[:, None, None]).add_(u.index_select(1, y1).mul_(wy1[:, None, None]))
            rows.update(zip(range(r0, r1), u.unbind(0)))
        self._cache = rows
        return rows


def _parallel_index_map(source: Grid, target: Grid) -> np.ndarray | None:
    """The 4×4 map from target (i, j, k) to source (i, j, k) when the target's axes are parallel to the source's
    (its 3×3 part diagonal within 1e-6 of its largest entry: each axis can be interpolated on its own), else None."""
    m = source.world_to_index @ target.index_to_world
    off = m[:3, :3] - np.diag(np.diag(m[:3, :3]))
    return m if np.abs(off).max() <= 1e-6 * np.abs(np.diag(m[:3, :3])).max() else None


def sample_on_grid(values: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Linearly resamples a scalar map ``(Z, Y, X)`` on ``source`` onto ``target`` (border values repeat).

    Where the target's axes are parallel to the source's (a working grid and its fixed grid) the trilinear
    interpolation is done as three 1D interpolations (float32, the same values as ``grid_sample`` to float32
    rounding; 7 M target voxels: ~2× faster; onto a coarser grid only the source slices and rows it uses are
    interpolated); otherwise by ``grid_sample`` at every target voxel."""
    m = _parallel_index_map(source, target)  # target index -> source index
    if m is not None:
        return _sample_separable(values, source.shape, target.shape, m)
    vol = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)[None, None]
    out = np.empty(target.shape, dtype=np.float32)
    step = max(1, 2_000_000 // max(1, target.shape[1] * target.shape[2]))
    with torch.no_grad():
        for k0 in range(0, target.shape[0], step):
            k1 = min(target.shape[0], k0 + step)
            pts = W.grid_points(slab_grid(target, k0, k1))
            out[k0:k1] = W.sample(vol, source, pts, padding_mode="border")[0, 0].numpy()
    return out


def _sample_separable(values: np.ndarray, source_shape, target_shape, m: np.ndarray) -> np.ndarray:
    """:func:`sample_on_grid` for parallel axes: ``m`` maps target (i, j, k) to source (i, j, k) (diagonal)."""

    def axis(scale: float, offset: float, n: int, n_source: int):
        c = np.clip(offset + scale * np.arange(n, dtype=np.float64), 0.0, n_source - 1.0)  # border values repeat
        i0 = np.clip(np.floor(c), 0, max(n_source - 2, 0)).astype(np.int64)
        t = np.clip(c - i0, 0.0, 1.0) if n_source > 1 else np.zeros(n)
        i1 = np.minimum(i0 + 1, n_source - 1)
        return torch.as_tensor(i0), torch.as_tensor(i1), torch.as_tensor(1.0 - t, dtype=torch.float32), \
            torch.as_tensor(t, dtype=torch.float32)

    def used(i0, i1, n_source):
        """The source indices the target uses (sorted) and ``i0``, ``i1`` as positions among them; None when
        the target uses every source index."""
        keep = torch.unique(torch.cat([i0, i1]))
        if len(keep) == n_source:
            return None, i0, i1
        pos = torch.full((n_source,), -1, dtype=torch.int64)
        pos[keep] = torch.arange(len(keep))
        return keep, pos[i0], pos[i1]

    nz, ny, nx = target_shape
    gz, gy, gx = source_shape
    v = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)
    x0, x1, wx0, wx1 = axis(m[0, 0], m[0, 3], nx, gx)
    y0, y1, wy0, wy1 = axis(m[1, 1], m[1, 3], ny, gy)
    z0, z1, wz0, wz1 = axis(m[2, 2], m[2, 3], nz, gz)
    # only the source slices and rows the target uses are interpolated (a coarser target: about 3/4 of each at
    # 0.75 -> 2 mm); every value is computed as from the whole source
    zs, z0, z1 = used(z0, z1, gz)
    ys, y0, y1 = used(y0, y1, gy)
    if zs is not None:
        v = v.index_select(0, zs)
    if ys is not None:
        v = v.index_select(1, ys)
    v = v.index_select(2, x0) * wx0 + v.index_select(2, x1) * wx1  # (z used, y used, nx)
    v = v.index_select(1, y0) * wy0[:, None] + v.index_select(1, y1) * wy1[:, None]  # (z used, ny, nx)
    out = np.empty(target_shape, dtype=np.float32)
    step = max(1, 2_000_000 // max(1, ny * nx))
    with torch.no_grad():
        for k0 in range(0, nz, step):
            k1 = min(nz, k0 + step)
            sl = slice(k0, k1)
            out[k0:k1] = (v.index_select(0, z0[sl]) * wz0[sl, None, None]
                          + v.index_select(0, z1[sl]) * wz1[sl, None, None]).numpy()
    return out
