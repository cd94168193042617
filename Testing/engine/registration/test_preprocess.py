"""Preprocessing: the resampled working image is that of the SimpleITK pipeline (DiscreteGaussian, linear Resample)
up to float32 rounding, the normalized one is the plain formula applied to it, and normalization keeps its errors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.registration import preprocess as P


def assert_close(ours: np.ndarray, ref: np.ndarray, source: np.ndarray) -> None:
    """Equal up to float32 rounding: every weight is positive and a working voxel's weights sum to at most 1, so a
    value is within a few float32 units of the source's largest magnitude (ITK rounds between its passes, the map
    once per sum). A wrong weight, edge or outside rule moves values by a sizeable part of the source's range."""
    assert ours.shape == ref.shape and ours.dtype == np.float32
    tol = 16 * np.finfo(np.float32).eps * float(np.abs(source).max())
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    assert err <= tol, (err, tol)


def _old_resample(image: Image, grid: Grid) -> np.ndarray:
    """The SimpleITK pipeline the working images were made with (cast, DiscreteGaussian, linear Resample)."""
    src = sitk.GetImageFromArray(np.ascontiguousarray(image.array))
    image.grid.apply_to_sitk(src)
    src = sitk.Cast(src, sitk.sitkFloat32)
    target = min(grid.spacing)
    var = [max(target ** 2 - s ** 2, 0.0) / 4.0 for s in image.grid.spacing]
    if max(var) > 0:
        src = sitk.DiscreteGaussian(src, var, 32, 0.01, True)
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to_sitk(ref)
    return sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_working_image_is_the_sitk_pipelines(sample_dir, dtype):
    img = sitk.ReadImage(str(sample_dir / "fixed.nii.gz"))
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    arr = (arr / arr.max() * 1000 - 200).astype(dtype)
    d = np.asarray(img.GetDirection()).reshape(3, 3) @ np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], float)
    grid = Grid(arr.shape, (1.2, 1.1, 1.4), img.GetOrigin(), tuple(d.ravel()))  # oblique-free but permuted
    image = Image(arr, grid, "fixed")
    w = P.prepare(image, 2.0)
    ref = P.resample(image, w.grid).array
    assert_close(ref, _old_resample(image, w.grid), arr.astype(np.float32))
    lo, hi = np.percentile(ref, (0.5, 99.5))
    expected = np.clip((ref - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    assert w.array.dtype == np.float32 and np.array_equal(w.array, expected)
    mask = Image(arr > np.percentile(arr, 60), grid, "mask")
    wm = P.prepare(image, 2.0, mask)
    m = wm.mask
    lo, hi = np.percentile(ref[m], (0.5, 99.5))
    assert np.array_equal(wm.array, np.clip((ref - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))


def test_normalization_errors_are_kept():
    arr = np.full((4, 5, 6), 3.0, np.float32)
    with pytest.raises(InputError, match="constant"):
        P.normalize_intensity(arr)
    with pytest.raises(InputError, match="selects no voxel"):
        P.normalize_intensity(arr, np.zeros(arr.shape, bool))
    arr[0, 0, 0] = 5.0  # percentiles equal: falls back to min/max inside the mask
    out = P.normalize_intensity(arr, np.ones(arr.shape, bool))
    assert out[0, 0, 0] == 1.0 and out[1, 1, 1] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_normalization_is_the_plain_formula_bit_for_bit(dtype):
    """Normalized in blocks, the values are those of the whole-array formula, with and without a mask, and where
    the percentiles coincide (the minimum and maximum, Python floats, are used)."""
    rng = np.random.default_rng(4)
    arr = (rng.normal(size=(23, 41, 77)) * 300).astype(dtype)  # several blocks of _BLOCK values, the last one short
    mask = arr > np.percentile(arr, 30)

    def plain(lo, hi):
        return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    for m in (None, mask):
        lo, hi = np.percentile(arr if m is None else arr[m], (0.5, 99.5))
        out = P.normalize_intensity(arr, m)
        assert out.dtype == np.float32 and np.array_equal(out.view(np.uint32), plain(lo, hi).view(np.uint32))
    flat = np.zeros((40, 30, 30), dtype)
    flat[0, 0, :3] = (5, 6, 7)
    arr = flat
    out = P.normalize_intensity(flat)
    assert np.array_equal(out.view(np.uint32), plain(float(flat.min()), float(flat.max())).view(np.uint32))
