"""Explainability maps and the ground-truth-free signals of a registration, on the fixed image's grid.

Given the fixed and moving images and a fixed → moving :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform`
``T(x) = A (x + u(x))`` (LPS mm), this module computes

- on the fixed *working* grid (what the optimizer saw: :func:`~DeepRegistrationLib.registration.preprocess.prepare`,
  intensities in [0, 1]): the warped moving image, where it was sampled inside the moving field of view,
  the local similarity map (LNCC's ``cc²`` per voxel with the similarity's own box filter) and the signals
  that :mod:`~DeepRegistrationLib.evaluation.quality` turns into a verdict (:func:`measure`);
- on the fixed image's *full* grid (any orientation, the geometry of ``fixed.grid``): the maps written as
  optional outputs (:func:`explanation_maps`):

  ``residual``: ``|fixed − warped|`` after each image's robust intensity normalization to [0, 1]
  (:func:`~DeepRegistrationLib.registration.preprocess.normalize_intensity`), 0 where the warped moving image has no
  data (outside its field of view); ``local_similarity``: the optimizer's similarity locally — for LNCC and
  MSE the LNCC ``cc²`` in [0, 1] (1 = locally identical up to a linear intensity change), for MI the local
  mean of the pointwise mutual information (:func:`local_mi`, nats) — 0 where the fixed window is flat
  (background: no information) or outside the overlap; ``displacement``: ``|T(x) − x|`` in mm (the full
  map, linear part included).

Arrays are ``(Z, Y, X)`` (see :mod:`~DeepRegistrationLib.core.grid`); tensors ``(B, C, Z, Y, X)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..spatial import warp as W
from ..core.config import RegistrationConfig
from ..core.grid import Grid
from ..core.image import Image
from ..registration.preprocess import normalize_intensity, prepare_pair
from ..spatial.resampling import sample_on_grid, slab_grid, warp_image
from ..registration.similarity import LNCC, LocalCC2, MutualInformation, joint_histogram
from ..spatial.filters import box_filter
from ..spatial.transforms import SpatialTransform

logger = logging.getLogger(__name__)

#: A working-grid voxel is "foreground" (anatomy) when its normalized intensity exceeds this value
#: (normalization maps the 0.5th percentile to 0 and the 99.5th to 1; MR/CT air lies below 0.05).
FOREGROUND = 0.1
#: LNCC windows whose fixed-image variance is below this carry no information (the similarity's own
#: ``flat`` default in :class:`~DeepRegistrationLib.registration.similarity.LNCC`).
FLAT = 1e-4


@dataclass
class WorkingPair:
    """The fixed image and the warped moving image on the fixed working grid.

    Attributes:
        fixed / warped: ``(1, 1, Z, Y, X)`` float32 in [0, 1] (warped is 0 outside the moving field of view).
        view: ``(1, 1, Z, Y, X)`` bool, True where the mapped point lies inside the moving field of view.
        grid: The fixed working grid.
        fixed_mask: ``(1, 1, Z, Y, X)`` bool or None.
        local: The registration's similarity after as its per-voxel LNCC map, when it computed one for this very
            pair (:meth:`~DeepRegistrationLib.registration.similarity.LNCC.evaluate`): :func:`measure` and
            :func:`explanation_maps` take it instead of computing :func:`local_cc2` again (the same bits).
    """

    fixed: torch.Tensor
    warped: torch.Tensor
    view: torch.Tensor
    grid: Grid
    fixed_mask: torch.Tensor | None = None
    local: LocalCC2 | None = None


def working_pair(fixed: Image, moving: Image, transform: SpatialTransform, config: RegistrationConfig,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None, device=None,
                 prepared: tuple | None = None) -> WorkingPair:
    """Both images prepared as the registration prepared them, the moving one warped by ``transform``.

    ``prepared``: the registration's own ``(fixed, moving)``
    :class:`~DeepRegistrationLib.registration.preprocess.WorkingImage` pair, when it kept them (preparing a 0.75 mm
    CT again, its anti-aliasing included, took a sixth of the writing and evaluating stage); else both are
    prepared here. When it is the registration's
    :class:`~DeepRegistrationLib.registration.pipeline.WorkingImages` and ``transform`` its very result (on
    ``device``), the moving image it warped for the similarity after is taken as it is (the same computation:
    the same bits, ~0.3 s less on a 4.6 M-voxel working grid), with the similarity's local LNCC map when it has one
    (:attr:`WorkingPair.local`)."""
    handed = getattr(prepared, "warped_for", None)
    handed = None if handed is None else handed(transform, device)
    if handed is not None:
        f_t, fmask, warped, view = handed
        return WorkingPair(f_t, warped, view, prepared.fixed.grid, fmask, getattr(prepared, "local", None))
    if prepared is not None:
        fw, mw = prepared
    else:
        fw, mw = prepare_pair(fixed, moving, config.spacing, fixed_mask, moving_mask, config.intensity_percentiles,
                              concurrent=config.threads != 1)
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)[None, None]
    f_t, m_t = to_t(fw.array), to_t(mw.array)
    with torch.no_grad():
        pts = W.grid_points(fw.grid, device)
        mapped = _map(transform, pts, device, fw.grid)
        warped, view = W.sample_in_view(m_t, mw.grid, mapped)
    fmask = None if fw.mask is None else to_t(fw.mask) > 0.5
    return WorkingPair(f_t, warped, view, fw.grid, fmask)


def _map(transform: SpatialTransform, pts: torch.Tensor, device=None, grid: Grid | None = None) -> torch.Tensor:
    """``T(x)`` at ``pts``; when ``pts`` are the voxel centres of ``grid`` and those are nodes of the field's grid
    (the working grid inside the field's grid, which is one voxel larger on each side), the field's values there
    are used as they are (interpolating a field at its own nodes returns them: one trilinear sampling of the
    whole field less, ~0.6 CPU s on a 4.7 M-voxel working grid)."""
    field = None if transform.field is None else torch.as_tensor(transform.field, dtype=torch.float32,
                                                                 device=device)[None]
    affine = torch.as_tensor(transform.affine, dtype=torch.float32, device=device)
    nodes = None if field is None or grid is None else _node_slices(grid, transform.field_grid)
    if nodes is not None:
        return W.apply_affine(pts + torch.movedim(field[(slice(None), slice(None)) + nodes], 1, -1), affine)
    return W.map_points(pts, affine, field, transform.field_grid)


def _node_slices(grid: Grid, field_grid: Grid) -> tuple[slice, slice, slice] | None:
    """The ``(z, y, x)`` slices of ``field_grid`` whose nodes are ``grid``'s voxel centres, or None when they are
    not nodes of it (another spacing or direction, a fractional offset, or reaching beyond it)."""
    m = field_grid.world_to_index @ grid.index_to_world  # grid index -> field index
    offset = np.rint(m[:3, 3])
    if np.abs(m[:3, :3] - np.eye(3)).max() > 1e-6 or np.abs(m[:3, 3] - offset).max() > 1e-4:
        return None
    lo = offset.astype(int)[::-1]  # (k, j, i)
    hi = lo + np.asarray(grid.shape)
    if (lo < 0).any() or (hi > np.asarray(field_grid.shape)).any():
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def local_cc2(fixed: torch.Tensor, warped: torch.Tensor, radius: int,
              view: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel LNCC ``cc²`` of two ``(1, 1, Z, Y, X)`` images over ``(2r+1)³`` windows, and where it is defined.

    The window statistics use only the samples inside ``view`` (bool, same shape; None = everywhere): they are
    :class:`~DeepRegistrationLib.registration.similarity.LNCC`'s own (:meth:`~DeepRegistrationLib.registration.
    similarity.LNCC.evaluate`, the map :class:`~DeepRegistrationLib.registration.similarity.LocalCC2`).

    Returns:
        ``(cc2, structured)``: ``cc2`` in [0, 1]; ``structured`` bool, True where the fixed window has
        structure (variance above :data:`FLAT`) and the voxel lies in ``view``. ``cc2`` is 0 elsewhere.
    """
    with torch.no_grad():
        local = LNCC(radius, flat=FLAT).evaluate(fixed, warped, view=view)[1]  # a new LNCC: never a cached view
        return local.cc2, local.structured


def _local_cc2(pair: WorkingPair, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_cc2` of ``pair``: the registration's own map when it handed one over with this window."""
    local = pair.local
    if local is not None and local.radius == radius and local.flat == FLAT:
        return local.cc2, local.structured
    cc2, structured = local_cc2(pair.fixed, pair.warped, radius, pair.view)
    pair.local = LocalCC2(cc2, structured, radius, FLAT)  # the next caller of the same pair takes it over
    return cc2, structured


def local_mi(fixed: torch.Tensor, warped: torch.Tensor, radius: int, view: torch.Tensor | None = None,
             bins: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mutual information (nats) of two ``(1, 1, Z, Y, X)`` images in [0, 1] over ``(2r+1)³`` windows.

    The joint distribution is the one :class:`~DeepRegistrationLib.registration.similarity.MutualInformation`
    optimizes (bilinear Parzen histogram of ``bins`` bins over ``view``, Gaussian-smoothed); each voxel gets
    its pointwise mutual information ``log p(f, w) / (p(f) p(w))`` (looked up with the same bilinear
    weights), averaged over the window's voxels in ``view``. The mean of this map over the overlap is the
    global MI; it is high where the intensity pairs are the typical ones (any monotonic or non-monotonic
    intensity relation), low or negative where they are rare (misaligned structures).

    Returns:
        ``(mi, structured)`` as :func:`local_cc2`: ``mi`` float (nats), 0 where ``structured`` is False.
    """
    with torch.no_grad():
        v = torch.ones_like(fixed) if view is None else view.to(fixed.dtype)
        mi = MutualInformation(bins)
        p = mi._smooth(joint_histogram(fixed, warped, bins, v > 0.5))
        p = p / p.sum().clamp_min(1e-12)
        eps = 1e-10
        pmi = torch.log(p + eps) - torch.log(p.sum(1, keepdim=True) * p.sum(0, keepdim=True) + eps)
        cf = fixed.reshape(-1).clamp(0, 1) * (bins - 1)
        cw = warped.reshape(-1).clamp(0, 1) * (bins - 1)
        i_f = cf.floor().clamp(0, bins - 2)
        i_w = cw.floor().clamp(0, bins - 2)
        t_f, t_w = cf - i_f, cw - i_w
        i_f, i_w = i_f.long(), i_w.long()
        point = sum(wf * ww * pmi[i_f + df, i_w + dw] for df, wf in ((0, 1 - t_f), (1, t_f))
                    for dw, ww in ((0, 1 - t_w), (1, t_w))).view_as(fixed)
        stats = box_filter(torch.cat([v, v * point, v * fixed, v * fixed * fixed], 1), radius)
        mv, mp, mf, mff = torch.split(stats, 1, 1)
        inv = 1.0 / mv.clamp_min(1e-6)
        var_f = (mff * inv - (mf * inv) ** 2).clamp_min(0)
        structured = (var_f > FLAT) & (v > 0.5)
        return mp * inv * structured, structured


def linear_part(affine: np.ndarray) -> dict:
    """Rotation angle (degrees), scales and reflection of a 4×4 affine's linear part (polar decomposition).

    ``M = R S`` with ``R`` orthogonal and ``S`` symmetric positive: ``rotation_deg`` is the angle of ``R``
    (of ``R`` times a reflection when ``det M < 0``), ``scales`` the singular values of ``M`` (ascending).
    """
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, s, vt = np.linalg.svd(m)
    r = u @ vt
    reflection = bool(np.linalg.det(r) < 0)
    if reflection:
        r = r @ np.diag([1.0, 1.0, -1.0])
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))
    return {"rotation_deg": angle, "scale_min": float(s.min()), "scale_max": float(s.max()), "reflection": reflection}


def measure(pair: WorkingPair, radius: int) -> dict:
    """Ground-truth-free signals on the fixed working grid (see :func:`DeepRegistrationLib.evaluation.quality.assess`).

    Returns:
        ``{"local_cc2": mean cc² over the structured overlap, "overlap_fraction": fraction of the fixed
        foreground (intensity > FOREGROUND, inside the fixed mask) whose mapped point lies in the moving
        field of view, "foreground_dice": Dice of the fixed and warped-moving foregrounds inside that
        overlap}`` as floats (NaN when undefined).
    """
    count = lambda t: int(torch.count_nonzero(t))  # a bool tensor's sum (~15x faster than .sum(): no int64 copy)
    with torch.no_grad():
        region = pair.view if pair.fixed_mask is None else pair.view & pair.fixed_mask
        cc2, structured = _local_cc2(pair, radius)
        if pair.fixed_mask is not None:
            structured = structured & pair.fixed_mask
        n = float(count(structured))
        fg_f = pair.fixed > FOREGROUND
        if pair.fixed_mask is not None:
            fg_f = fg_f & pair.fixed_mask
        n_fg = float(count(fg_f))
        overlap = float(count(fg_f & pair.view)) / n_fg if n_fg else float("nan")
        fg_w = (pair.warped > FOREGROUND) & region
        a, b = fg_f & region, fg_w
        denom = float(count(a) + count(b))
        dice = 2.0 * float(count(a & b)) / denom if denom else float("nan")
        return {"local_cc2": float((cc2 * structured).sum()) / n if n else float("nan"),
                "overlap_fraction": overlap, "foreground_dice": dice}


def jacobian_signals(detj: np.ndarray) -> dict:
    """Extremes of the Jacobian determinant ``(Z, Y, X)``: min, max, % folded (≤ 0), % outside [1/5, 5]."""
    d = np.asarray(detj)
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    finite = np.isfinite(d)
    if not finite.all():
        d = d[finite]
    if d.size == 0:
        nan = float("nan")
        return {"jacobian_min": nan, "jacobian_max": nan, "folding_percent": nan, "extreme_jacobian_percent": nan}
    # float32 values compared as they are: the bounds 0 and 5 are float32 numbers, and below 0.2 lie exactly the
    # float32 values below float32(0.2) (which rounds up): the counts of the float64 comparison, without its copy
    low = np.float32(0.2) if d.dtype == np.float32 else 0.2  # float(np.float32(0.2)) = 0.20000000298...
    return {"jacobian_min": float(d.min()), "jacobian_max": float(d.max()),
            "folding_percent": float(100.0 * np.count_nonzero(d <= 0) / d.size),
            "extreme_jacobian_percent": float(100.0 * np.count_nonzero((d < low) | (d > 5.0)) / d.size)}


def displacement_magnitude(transform: SpatialTransform, grid: Grid, slab_voxels: int = 2_000_000) -> np.ndarray:
    """``|T(x) − x|`` in mm at every voxel centre of ``grid``, shape ``(Z, Y, X)`` float32."""
    out = np.empty(grid.shape, dtype=np.float32)
    step = max(1, slab_voxels // max(1, grid.shape[1] * grid.shape[2]))
    with torch.no_grad():
        for k0 in range(0, grid.shape[0], step):
            k1 = min(grid.shape[0], k0 + step)
            d = transform.total_displacement(slab_grid(grid, k0, k1))
            out[k0:k1] = d[0].norm(dim=0).numpy()
    return out


def residual_map(fixed: Image, warped: Image, inside: np.ndarray,
                 percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """``|norm(fixed) − norm(warped)|`` ``(Z, Y, X)`` float32 on the fixed grid; 0 where ``inside`` is False.

    Each image is normalized to [0, 1] by its own robust percentiles (the warped one over ``inside`` only,
    so the zeros beyond the moving image do not shift its range).
    """
    f = normalize_intensity(fixed.array.astype(np.float32), None, percentiles)
    sel = inside if inside.any() else None
    w = normalize_intensity(warped.array.astype(np.float32), sel, percentiles)
    return (np.abs(f - w) * inside).astype(np.float32)


def explanation_maps(fixed: Image, moving: Image, transform: SpatialTransform, config: RegistrationConfig,
                     pair: WorkingPair | None = None, warped: Image | None = None) -> dict[str, Image]:
    """The explainability maps on ``fixed.grid``: ``{"residual", "local_similarity", "displacement"}``.

    Args:
        fixed / moving: The images as registered.
        transform: Fixed → moving map.
        config: The registration's settings (working spacing, intensity percentiles, the similarity — ``mi``
            gives the local MI map, the others LNCC ``cc²`` — and the LNCC radius, the window of the local map).
        pair: :func:`working_pair` of these images, if already computed.
        warped: ``moving`` warped onto ``fixed.grid`` (linear), if already computed.

    Returns:
        Images on exactly ``fixed.grid`` (float32); see the module docstring for their meaning.
    """
    pair = pair or working_pair(fixed, moving, transform, config)
    # float32 whatever ``moving``'s type (an int16 CT kept as read is not rounded: the float32 image's warp)
    warped = warped if warped is not None else warp_image(moving, fixed.grid, transform, "linear", dtype=np.float32)
    ones = Image(np.ones(moving.grid.shape, np.float32), moving.grid, "support")
    inside = warp_image(ones, fixed.grid, transform, "linear").array > 0.5
    if config.similarity == "mi":
        sim, _ = local_mi(pair.fixed, pair.warped, config.lncc_radius, pair.view)
    else:
        sim, _ = _local_cc2(pair, config.lncc_radius)
    local = sample_on_grid(sim[0, 0].cpu().numpy(), pair.grid, fixed.grid)
    return {"residual": Image(residual_map(fixed, warped, inside, config.intensity_percentiles), fixed.grid,
                              "residual"),
            "local_similarity": Image(local.astype(np.float32), fixed.grid, "local_similarity"),
            "displacement": Image(displacement_magnitude(transform, fixed.grid), fixed.grid, "displacement")}
