"""Preprocessing: working grids, anti-aliased resampling, intensity normalization, masks.

Each image is resampled onto a *working grid* that covers its own field of view with the working
voxel size (isotropic, in mm) and keeps its direction, so no part of either image is cut away before
the transform is known. Intensities are mapped to [0, 1] by robust percentiles.

The working image is SimpleITK's ``DiscreteGaussian`` anti-aliasing followed by its linear ``Resample`` (the same
kernels, the same edge rule, the same interpolation and outside rule, the latter up to the rounding of a continuous
index that falls exactly on the half-voxel border, which a working grid never reaches), computed as one linear map per axis: both
steps are linear and act along each axis separately, so along axis ``a`` their composition is one matrix
``W_a = L_a G_a`` (``G_a``: the Gaussian with edges repeated, ``n × n``; ``L_a``: the linear interpolation at the
working voxels' continuous indices, 0 outside, ``m × n``), and the working image is ``W_z``, ``W_y`` and ``W_x``
applied in turn (:func:`_resample_axes`). The first product only makes the working slices (not the ~3/4 of the
source slices the interpolation reads), each from the few source slices its row of ``W_z`` reaches, so the work
follows the working grid: at 0.75 → 2 mm about a third of the arithmetic of smoothing then interpolating, ~4× less
CPU for the 0.75 mm CT and ~2.4× for 1 mm brains. The products are
float32 matrix products (torch, on its thread count) on slabs of source slices copied into one reused float32
buffer where read, so an integer input is never copied whole. The values are SimpleITK's up to float32 rounding (a few units in the last place:
``Testing/engine/registration/test_preprocess_reduced.py``), not the same bits: ITK rounds to float32 between its
passes, the products round once per sum. Measured in docs/ENGINE.md (*Speed notes*, "Anti-aliasing and
interpolation as one map per axis").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from ..io.background import run_parallel
from ..io.images import image_to_sitk, sitk_to_image

logger = logging.getLogger(__name__)


def working_grid(grid: Grid, spacing: float) -> Grid:
    """Isotropic grid over ``grid``'s field of view: voxel size ``max(spacing, finest input spacing)`` mm."""
    s = max(float(spacing), min(grid.spacing))
    return grid.with_spacing(s)


#: SimpleITK ``DiscreteGaussian`` settings of the anti-aliasing: maximum kernel width (voxels), maximum error.
GAUSSIAN_MAX_WIDTH = 32
GAUSSIAN_MAX_ERROR = 0.01
#: Elements per block of :func:`normalize_intensity` (its float64 buffer stays in the CPU caches).
_BLOCK = 1 << 15
#: Bytes of float32 source slab one product of :func:`_resample_axes` reads at most (about; at least one slice).
_SLAB_BYTES = 32 << 20
#: Working-grid slices per product of :func:`_resample_axes` at most.
_CHUNK_SLICES = 8


def gaussian_kernel(variance_mm2: float, spacing_mm: float) -> np.ndarray:
    """The 1-D kernel (float64, odd length, symmetric) of SimpleITK's ``DiscreteGaussian`` for this variance (mm²)
    and voxel size (mm) along one axis: read from SimpleITK's own filter applied to an impulse, so it is its
    ``GaussianOperator`` to the last bit."""
    n = 4 * GAUSSIAN_MAX_WIDTH + 1
    impulse = np.zeros((1, 1, n))
    impulse[0, 0, n // 2] = 1.0
    img = sitk.GetImageFromArray(impulse)
    img.SetSpacing((float(spacing_mm), 1.0, 1.0))
    out = sitk.GetArrayFromImage(sitk.DiscreteGaussian(img, [float(variance_mm2), 0.0, 0.0], GAUSSIAN_MAX_WIDTH,
                                                       GAUSSIAN_MAX_ERROR, True))[0, 0]
    nz = np.flatnonzero(out)
    return out[nz[0]:nz[-1] + 1].copy()


def antialias_variance(source_spacing, target_spacing: float) -> list[float]:
    """Gaussian variance (mm²) along ``(x, y, z)`` of the anti-aliasing from voxels ``source_spacing`` (mm, x, y, z)
    to ``target_spacing`` mm: ``(t² − s²) / 4`` where the target voxel is larger, else 0."""
    return [max(float(target_spacing) ** 2 - float(s) ** 2, 0.0) / 4.0 for s in source_spacing]


@dataclass
class _AxisPlan:
    """One axis of :func:`_axis_plans`: per target index its source base index, distance and flags (the terms of
    ITK's ``LinearInterpolateImageFunction`` and ``ResampleImageFilter``'s inside test)."""

    base: np.ndarray  # int64, the source index the interpolation starts from (>= 0)
    dist: np.ndarray  # float64, continuous index - base
    lerp: np.ndarray  # bool, interpolated with base + 1 (else base's value alone)
    inside: np.ndarray  # bool, inside the source's buffer (else the target voxel is 0)


def _axis_plans(source: Grid, target: Grid) -> list[_AxisPlan] | None:
    """Per axis ``(x, y, z)`` where each target voxel lies in the source's continuous index, when the two grids share
    their direction (a working grid keeps its image's): then the index along source axis ``a`` depends on the target
    index along ``a`` only, ``c = (D⁻¹ (o_t − o_s))_a / s_a + i · t_a / s_a``. None for grids of other directions."""
    ds, dt = source.direction_matrix, target.direction_matrix
    if not np.allclose(ds, dt, rtol=0.0, atol=1e-9):
        return None
    offset = np.linalg.solve(ds, np.asarray(target.origin, float) - np.asarray(source.origin, float))
    plans = []
    for a in range(3):
        n = int(source.size[a])
        c = (offset[a] + np.arange(int(target.size[a]), dtype=np.float64) * target.spacing[a]) / source.spacing[a]
        base = np.maximum(np.floor(c), 0.0).astype(np.int64)
        dist = c - base
        plans.append(_AxisPlan(base, dist, (dist > 0) & (base + 1 <= n - 1), (c >= -0.5) & (c < n - 0.5)))
    return plans


def _axis_matrix(plan: _AxisPlan, kernel: np.ndarray | None, n: int) -> np.ndarray:
    """``W = L G`` of one axis, ``(m, n)`` float64: ``G`` the correlation with ``kernel`` (edges repeated: ITK's
    zero-flux Neumann boundary; the identity without a kernel), ``L`` the linear interpolation rows of ``plan``
    (``1 - d`` at the base index and ``d`` at the next where it interpolates, 1 at the base where not, a zero row
    outside the source). Built row by row from the kernel (``m × len(kernel)`` terms, no ``n × n`` matrix)."""
    m = len(plan.base)
    w = np.zeros((m, n))
    rows = np.flatnonzero(plan.inside)
    lerp = plan.lerp[rows]
    base = plan.base[rows]
    near = np.where(lerp, 1.0 - plan.dist[rows], 1.0)  # the base index's weight
    far = np.where(lerp, plan.dist[rows], 0.0)  # the next index's (0 where it does not interpolate)
    taps = [(0, 1.0)] if kernel is None else [(k - len(kernel) // 2, float(c)) for k, c in enumerate(kernel)]
    for shift, c in taps:
        np.add.at(w, (rows, np.clip(base + shift, 0, n - 1)), near * c)
        np.add.at(w, (rows, np.clip(base + 1 + shift, 0, n - 1)), far * c)
    return w


def _resample_axes(arr: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """``W_z``, ``W_y`` and ``W_x`` (:func:`_axis_matrix`, along ``(x, y, z)`` in ``weights``) applied to the
    ``(Z, Y, X)`` source ``arr`` (any real dtype and memory layout; a value is converted to float32 where it is
    read): ``(Z', Y', X')`` float32. In products of at most :data:`_CHUNK_SLICES` working slices (fewer where their
    slab would exceed :data:`_SLAB_BYTES`), each from the slab of source slices its rows of ``W_z`` reach, copied into
    one reused float32 buffer of at most :data:`_SLAB_BYTES` (a slab larger than that, as one working slice of a very
    fine plane reaches, goes through it in blocks of plane columns), then along y and x on those working slices (dense
    products: their cost grows with the plane, Y'·Y·X per working slice). float32 matrix products on torch's threads
    (the same bits from 1 or 2 threads, and from an integer input and its float32 copy: tested). A non-finite value
    spreads along the lines and planes of the dense products: :func:`prepare` refuses it."""
    wx, wy, wz = (torch.as_tensor(w, dtype=torch.float32) for w in weights)
    wxt = wx.T.contiguous()
    nz, ny, nx = arr.shape
    plane = ny * nx
    out = np.empty((wz.shape[0], wy.shape[0], wx.shape[0]), np.float32)
    reach = np.abs(weights[2]) > 0  # (Z', Z): the source slices each working slice reads
    buf = np.empty(0, np.float32)
    k0 = 0
    while k0 < out.shape[0]:
        k1 = min(out.shape[0], k0 + _CHUNK_SLICES)
        while True:  # fewer working slices where their slab would be large (fine in-plane grids)
            cols = np.flatnonzero(reach[k0:k1].any(axis=0))
            if k1 - k0 == 1 or cols.size == 0 or (cols[-1] + 1 - cols[0]) * 4 * plane <= _SLAB_BYTES:
                break
            k1 = k0 + max(1, (k1 - k0) // 2)
        if cols.size == 0:  # these working slices lie outside the source
            out[k0:k1] = 0.0
            k0 = k1
            continue
        a, b = int(cols[0]), int(cols[-1]) + 1
        src = arr[a:b].reshape(b - a, plane)  # a view of a C-ordered input (else NumPy's copy of the slab)
        step = min(plane, max(1, _SLAB_BYTES // (4 * (b - a))))  # plane columns per block of the buffer
        if buf.size < (b - a) * step:
            buf = np.empty((b - a) * step, np.float32)
        rows = wz[k0:k1, a:b]
        part = torch.empty((k1 - k0, plane))
        for c0 in range(0, plane, step):
            c1 = min(plane, c0 + step)
            block = buf[:(b - a) * (c1 - c0)].reshape(b - a, c1 - c0)
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf (prepare refuses it)
                block[...] = src[:, c0:c1]  # converted here: any dtype, stride or byte order
            if c1 - c0 == plane:
                part = rows @ torch.from_numpy(block)
            else:
                part[:, c0:c1] = rows @ torch.from_numpy(block)
        out[k0:k1] = torch.matmul(torch.matmul(wy, part.reshape(k1 - k0, ny, nx)), wxt).numpy()
        k0 = k1
    return out


def resample(image: Image, grid: Grid, interpolator: str = "linear", antialias: bool = True) -> Image:
    """Resamples ``image`` onto ``grid`` (identity transform): anti-aliasing, then SimpleITK's ``Resample``.

    Args:
        image: Source image.
        grid: Target grid (LPS).
        interpolator: ``"linear"`` or ``"nearest"`` (labels, masks).
        antialias: Gaussian-smooth first where the target voxels are larger than the source ones
            (:func:`antialias_variance`: sigma² = (s_new² − s_old²) / 4 per axis, in mm).

    Returns:
        Image on ``grid``, float32 for linear, the source dtype for nearest; 0 outside the source. Linear onto a grid
        of the source's direction (a working grid) is the module's one map per axis (SimpleITK's values up to float32
        rounding); onto other grids it is SimpleITK's ``DiscreteGaussian`` and ``Resample`` themselves.
    """
    if interpolator == "linear":
        var = antialias_variance(image.grid.spacing, min(grid.spacing)) if antialias else [0.0, 0.0, 0.0]
        plans = _axis_plans(image.grid, grid)
        if plans is not None:
            weights = [_axis_matrix(p, gaussian_kernel(var[a], image.grid.spacing[a]) if var[a] > 0 else None, n)
                       for a, (p, n) in enumerate(zip(plans, image.grid.size))]
            return Image(_resample_axes(np.asarray(image.array), weights), grid, image.name)
        src = image_to_sitk(Image(np.asarray(image.array, dtype=np.float32), image.grid, image.name))
        if max(var) > 0:
            src = sitk.DiscreteGaussian(src, var, GAUSSIAN_MAX_WIDTH, GAUSSIAN_MAX_ERROR, True)
        interp = sitk.sitkLinear
    elif interpolator == "nearest":
        src = image_to_sitk(image)
        interp = sitk.sitkNearestNeighbor
    else:
        raise ValueError(f"unknown interpolator {interpolator!r}")
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to_sitk(ref)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, src.GetPixelID())
    dtype = np.float32 if interpolator == "linear" else image.array.dtype
    return sitk_to_image(out, image.name, dtype=dtype)


def normalize_intensity(array: np.ndarray, mask: np.ndarray | None = None,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Maps intensities to [0, 1]: the low/high percentiles (within ``mask`` if given) go to 0/1, clipped.

    Raises:
        InputError: when the percentile range is empty (a constant image inside the mask).
    """
    values = array[mask] if mask is not None else array
    if values.size == 0:
        raise InputError("the mask selects no voxel of the image; give a mask that overlaps the image.")
    # a masked selection is already a copy: the percentiles may partition it in place (same values, same
    # minimum and maximum)
    lo, hi = np.percentile(values, percentiles, overwrite_input=mask is not None)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        raise InputError("the image is constant inside its mask; nothing to register.")
    # (array - lo) / (hi - lo) clipped to [0, 1] in the dtype NumPy's subtraction gives (float64: lo is), then
    # rounded to float32: computed in blocks of _BLOCK values through one small buffer (cache-sized, no fresh
    # full-size float64 array), each value by the same operations
    src = np.ascontiguousarray(array).reshape(-1)
    res = np.empty(src.shape, np.float32)
    buf = np.empty(min(src.size, _BLOCK), np.subtract(src[:1], lo).dtype)
    for a in range(0, src.size, _BLOCK):
        b = min(src.size, a + _BLOCK)
        t = buf[:b - a]
        np.subtract(src[a:b], lo, out=t)
        np.divide(t, hi - lo, out=t)
        np.clip(t, 0.0, 1.0, out=t)
        res[a:b] = t
    return res.reshape(np.shape(array))


@dataclass
class WorkingImage:
    """An image prepared for optimization.

    Attributes:
        array: ``(Z, Y, X)`` float32 intensities in [0, 1] on ``grid``.
        grid: Working grid (isotropic, same field of view and direction as the input).
        mask: ``(Z, Y, X)`` bool on ``grid`` or None (everything counts).
    """

    array: np.ndarray
    grid: Grid
    mask: np.ndarray | None = None


def prepare(image: Image, spacing: float, mask: Image | None = None,
            percentiles: tuple[float, float] = (0.5, 99.5)) -> WorkingImage:
    """Resamples an image (and its optional mask) onto its working grid and normalizes intensities.

    Raises:
        InputError: non-finite values in the image, an empty mask on the working grid, a constant image.
    """
    grid = working_grid(image.grid, spacing)
    resampled = resample(image, grid, "linear")
    if not np.isfinite(resampled.array).all():  # read_image refuses such files; an Image built in memory may hold them
        raise InputError(f"{image.name}: the image holds NaN or infinite voxels (or values beyond float32's range). "
                         "Replace them (e.g. with 0 or the background value) before registering.")
    m = None
    if mask is not None:
        m = resample(Image(mask.array.astype(np.uint8), mask.grid, mask.name), grid, "nearest").array > 0
        if not m.any():
            raise InputError(f"{mask.name}: after resampling onto the image's working grid the mask is empty; "
                             "it does not overlap its image. Check that the mask belongs to this image.")
    arr = normalize_intensity(resampled.array, m, percentiles)
    logger.info("%s: working grid %s", image.name, grid)
    return WorkingImage(arr, grid, m)


def prepare_pair(fixed: Image, moving: Image, spacing: float, fixed_mask: Image | None = None,
                 moving_mask: Image | None = None, percentiles: tuple[float, float] = (0.5, 99.5),
                 concurrent: bool = True) -> tuple[WorkingImage, WorkingImage]:
    """:func:`prepare` of the fixed and of the moving image (each with its optional mask), the two in two threads
    when ``concurrent`` (the matrix products and NumPy's passes release the GIL; each result is the same bits as
    alone: tested).

    Raises:
        InputError: as :func:`prepare`; the fixed image's error first when both fail.
    """
    fw, mw = run_parallel([lambda _: prepare(fixed, spacing, fixed_mask, percentiles),
                           lambda _: prepare(moving, spacing, moving_mask, percentiles)], 2, concurrent)
    return fw, mw


def check_overlap(fixed: Grid, moving: Grid) -> None:
    """Raises InputError when the two fields of view do not intersect in LPS space."""
    if fixed.overlap_fraction(moving) <= 0.0:
        c_f, c_m = fixed.center(), moving.center()
        raise InputError(
            "the fixed and moving images do not overlap in physical space (fixed centre "
            f"{np.round(c_f, 1).tolist()} mm, moving centre {np.round(c_m, 1).tolist()} mm, LPS). Their "
            "origins or orientations disagree: correct the image headers (e.g. Slicer's Volumes > "
            "Volume Information > Center volume on both) and run again.")


def center_of_mass(array: np.ndarray, grid: Grid, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensity-weighted centre of mass in LPS mm, shape ``(3,)``."""
    w = array if mask is None else array * mask
    total = float(w.sum())
    if total <= 0:
        return grid.center()
    idx = [np.arange(n, dtype=np.float64) for n in grid.shape]
    kz = (w.sum(axis=(1, 2)) * idx[0]).sum() / total
    jy = (w.sum(axis=(0, 2)) * idx[1]).sum() / total
    ix = (w.sum(axis=(0, 1)) * idx[2]).sum() / total
    m = grid.index_to_world
    return m[:3, :3] @ np.array([ix, jy, kz]) + m[:3, 3]
