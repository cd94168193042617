"""Preprocessing: working grids, anti-aliased resampling, intensity normalization, masks.

Each image is resampled onto a *working grid* that covers its own field of view with the working
voxel size (isotropic, in mm) and keeps its direction, so no part of either image is cut away before
the transform is known. Intensities are mapped to [0, 1] by robust percentiles.

The anti-aliasing is SimpleITK's ``DiscreteGaussian`` computed bit for bit in NumPy (:func:`smooth_like_sitk`:
its own kernels, its order of passes and arithmetic, on as many threads as SimpleITK's filter; about half its CPU:
``prepare`` on a 0.75 mm CT of 86 M voxels 2.7-3.3 s instead of 6.1-7.4 s per image, on the 1 mm pairs 0.17-0.28 s
instead of 0.39-0.66 s, one thread, loaded machine), then SimpleITK's linear ``Resample``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from ..io.images import image_to_sitk, sitk_to_image

logger = logging.getLogger(__name__)


def working_grid(grid: Grid, spacing: float) -> Grid:
    """Isotropic grid over ``grid``'s field of view: voxel size ``max(spacing, finest input spacing)`` mm."""
    s = max(float(spacing), min(grid.spacing))
    return grid.with_spacing(s)


#: SimpleITK ``DiscreteGaussian`` settings of the anti-aliasing: maximum kernel width (voxels), maximum error.
GAUSSIAN_MAX_WIDTH = 32
GAUSSIAN_MAX_ERROR = 0.01
#: Elements per block of :func:`_correlate_axis` (its float64 sums stay in the CPU caches).
_BLOCK = 1 << 15


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


def _correlate_block(src: np.ndarray, dst: np.ndarray, kernel: np.ndarray, idx: np.ndarray, along: int) -> None:
    """One block of :func:`_correlate_axis`: ``src``/``dst`` 2-D float32, correlated along axis ``along``."""
    n = src.shape[along]
    padded = np.take(src, idx, axis=along).astype(np.float64)
    acc = tmp = None
    for k, c in enumerate(kernel):
        part = padded[k:k + n] if along == 0 else padded[:, k:k + n]
        if acc is None:
            acc = np.multiply(part, c)
            tmp = np.empty_like(acc)
            continue
        np.multiply(part, c, out=tmp)
        acc += tmp
    acc += 0.0  # ITK's sum starts at +0.0: a sum of -0.0 terms is +0.0 there
    dst[...] = acc


def _correlate_axis(x: np.ndarray, kernel: np.ndarray, axis: int, threads: int = 1) -> np.ndarray:
    """``out[i] = float32(sum_k kernel[k] * x[i - r + k])`` along ``axis`` of a C-contiguous float32 ``(Z, Y, X)``
    array, edges repeated, the sum in float64 accumulated from ``k = 0``: what ITK's
    ``NeighborhoodOperatorImageFilter`` computes (zero-flux Neumann boundary). Computed in small 2-D blocks, on
    ``threads`` threads (NumPy releases the GIL; every block is computed the same way whatever the threads)."""
    r, n = len(kernel) // 2, x.shape[axis]
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    idx = np.clip(np.arange(-r, n + r), 0, n - 1)
    blocks = []
    if axis == 2:  # rows of the last axis
        src, dst = x.reshape(-1, n), out.reshape(-1, n)
        step = max(1, _BLOCK // n)
        blocks = [(src[a:a + step], dst[a:a + step], 1) for a in range(0, src.shape[0], step)]
    else:  # columns of 2-D (n, m) views: the whole volume (axis 0) or each z slice (axis 1)
        views = [(x.reshape(n, -1), out.reshape(n, -1))] if axis == 0 else list(zip(x, out))
        step = max(1, _BLOCK // n)
        for src, dst in views:
            blocks += [(src[:, a:a + step], dst[:, a:a + step], 0) for a in range(0, src.shape[1], step)]
    run = lambda b: _correlate_block(b[0], b[1], kernel, idx, b[2])
    if threads > 1 and x.size > 4 * _BLOCK:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, blocks))
    else:
        for b in blocks:
            run(b)
    return out


def smooth_like_sitk(array: np.ndarray, spacing: tuple[float, float, float],
                     variance: list[float]) -> np.ndarray:
    """SimpleITK's ``DiscreteGaussian(img, variance, GAUSSIAN_MAX_WIDTH, GAUSSIAN_MAX_ERROR, useImageSpacing=True)``
    of a float32 image, bit for bit, in about half its CPU time: the same kernels (:func:`gaussian_kernel`) applied
    in the same order (z, then y, then x) with the same arithmetic (float64 sums, float32 between the passes).

    Args:
        array: ``(Z, Y, X)`` float32.
        spacing: voxel size (mm) along ``(x, y, z)``.
        variance: Gaussian variance (mm²) along ``(x, y, z)``; 0 leaves that axis alone.

    Returns:
        ``(Z, Y, X)`` float32.
    """
    x = np.asarray(array, dtype=np.float32)
    threads = max(1, int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))  # what the SimpleITK filter uses
    for d in (2, 1, 0):  # ITK index axis k, j, i = array axis 0, 1, 2
        if variance[d] > 0:
            x = _correlate_axis(x, gaussian_kernel(variance[d], spacing[d]), 2 - d, threads)
    return x


def resample(image: Image, grid: Grid, interpolator: str = "linear", antialias: bool = True) -> Image:
    """Resamples ``image`` onto ``grid`` (identity transform): anti-aliasing, then SimpleITK's ``Resample``.

    Args:
        image: Source image.
        grid: Target grid (LPS).
        interpolator: ``"linear"`` or ``"nearest"`` (labels, masks).
        antialias: Gaussian-smooth first where the target voxels are larger than the source ones
            (sigma² = (s_new² − s_old²) / 4 per axis, in mm).

    Returns:
        Image on ``grid``, float32 for linear, the source dtype for nearest; 0 outside the source.
    """
    if interpolator == "linear":
        arr = np.asarray(image.array, dtype=np.float32)
        if antialias:
            target = min(grid.spacing)
            var = [max(target ** 2 - s ** 2, 0.0) / 4.0 for s in image.grid.spacing]
            if max(var) > 0:
                arr = smooth_like_sitk(arr, image.grid.spacing, var)
        src = image_to_sitk(Image(arr, image.grid, image.name))
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
    out = np.subtract(array, lo)  # float64 (lo is), one buffer for the whole computation
    np.divide(out, hi - lo, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32)


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
    """Resamples an image (and its optional mask) onto its working grid and normalizes intensities."""
    grid = working_grid(image.grid, spacing)
    resampled = resample(image, grid, "linear")
    m = None
    if mask is not None:
        m = resample(Image(mask.array.astype(np.uint8), mask.grid, mask.name), grid, "nearest").array > 0
        if not m.any():
            raise InputError(f"{mask.name}: after resampling onto the image's working grid the mask is empty; "
                             "it does not overlap its image. Check that the mask belongs to this image.")
    arr = normalize_intensity(resampled.array, m, percentiles)
    logger.info("%s: working grid %s", image.name, grid)
    return WorkingImage(arr, grid, m)


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
