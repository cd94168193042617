"""Preprocessing: working grids, anti-aliased resampling (SimpleITK), intensity normalization, masks.

Each image is resampled onto a *working grid* that covers its own field of view with the working
voxel size (isotropic, in mm) and keeps its direction, so no part of either image is cut away before
the transform is known. Intensities are mapped to [0, 1] by robust percentiles.
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


def resample(image: Image, grid: Grid, interpolator: str = "linear", antialias: bool = True) -> Image:
    """Resamples ``image`` onto ``grid`` (identity transform) with SimpleITK.

    Args:
        image: Source image.
        grid: Target grid (LPS).
        interpolator: ``"linear"`` or ``"nearest"`` (labels, masks).
        antialias: Gaussian-smooth first where the target voxels are larger than the source ones
            (sigma² = (s_new² − s_old²) / 4 per axis, in mm).

    Returns:
        Image on ``grid``, float32 for linear, the source dtype for nearest; 0 outside the source.
    """
    src = image_to_sitk(image)
    if interpolator == "linear":
        src = sitk.Cast(src, sitk.sitkFloat32)
        if antialias:
            target = min(grid.spacing)
            var = [max(target ** 2 - s ** 2, 0.0) / 4.0 for s in image.grid.spacing]
            if max(var) > 0:
                src = sitk.DiscreteGaussian(src, var, 32, 0.01, True)
        interp = sitk.sitkLinear
    elif interpolator == "nearest":
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
    lo, hi = np.percentile(values, percentiles)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        raise InputError("the image is constant inside its mask; nothing to register.")
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


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
