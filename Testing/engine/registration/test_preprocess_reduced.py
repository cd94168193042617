"""Preprocessing of parallel grids reads only what SimpleITK's linear resampling reads: the anti-aliasing passes run
on the kept rows and the interpolation is ITK's, and the working image is SimpleITK's (cast, DiscreteGaussian,
linear Resample) bit for bit, for odd shapes, anisotropic voxels, flipped, permuted and oblique directions,
origins off the grid and working voxels of 2 and 3 mm."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk
from DeepRegistrationLib.registration import preprocess as P
from test_preprocess import _old_resample as _sitk_resample  # the plain SimpleITK pipeline


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTIONS = {"identity": np.eye(3), "flipped": np.diag([-1.0, -1.0, 1.0]),
              "permuted": np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]]), "oblique": _rotation((0.3, -0.2, 0.5))}
CASES = [((23, 37, 41), (0.7, 0.9, 3.0), 2.0), ((31, 29, 17), (0.75, 0.75, 0.75), 2.0),
         ((19, 43, 26), (1.0, 0.6, 1.3), 3.0), ((12, 25, 33), (2.5, 3.2, 0.8), 2.0), ((9, 14, 50), (1.1, 1.1, 0.5), 3.0)]


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("shape, spacing, working", CASES)
def test_working_image_is_simpleitks_bit_for_bit(shape, spacing, working, direction):
    rng = np.random.default_rng(sum(shape) + len(direction))
    arr = (rng.normal(size=shape) * 300 + 40).astype(np.float32)
    arr[:3, :4] = -0.0  # negative zeros: their sums are +0.0 in ITK
    origin = tuple(rng.uniform(-80, 80, 3))  # off any grid
    grid = Grid(shape, spacing, origin, tuple(DIRECTIONS[direction].ravel()))
    image = Image(arr, grid, "image")
    target = P.working_grid(grid, working)
    if direction != "oblique":
        assert P._linear_plan(grid, target) is not None  # these take the reduced path
    out = P.resample(image, target)
    ref = _sitk_resample(image, target)
    assert out.grid == target and out.array.dtype == np.float32
    assert np.array_equal(out.array.view(np.uint32), ref.view(np.uint32))
    w = P.prepare(image, working)
    lo, hi = np.percentile(ref, (0.5, 99.5))
    assert np.array_equal(w.array, np.clip((ref - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (13.3, -7.1, 4.4), (200.0, 0.0, 0.0)])
def test_other_parallel_grids_and_the_border(shift):
    """A target that overhangs the source (0 outside, the edge half-voxel inside), one shifted by whole source voxels
    (distances exactly 0) and one outside it entirely."""
    rng = np.random.default_rng(3)
    src = Grid((21, 18, 27), (0.8, 0.9, 1.1), (-3.2, 5.5, 1.25), tuple(np.diag([1.0, -1.0, -1.0]).ravel()))
    arr = rng.uniform(-1000, 1000, src.shape).astype(np.int16)
    image = Image(arr, src, "image")
    d = src.direction_matrix
    for target in (Grid((9, 11, 13), (2.0, 2.0, 2.0), tuple(np.asarray(src.origin) + d @ np.array(shift) - 4.0),
                        src.direction),
                   Grid((7, 8, 9), (1.6, 1.8, 2.2), tuple(np.asarray(src.origin) + d @ np.array([0.8, 1.8, 3.3])),
                        src.direction)):
        assert P._linear_plan(src, target) is not None
        for antialias in (True, False):
            out = P.resample(image, target, antialias=antialias).array
            ref = _sitk_resample(image, target) if antialias else sitk.GetArrayFromImage(sitk.Resample(
                sitk.Cast(image_to_sitk(image), sitk.sitkFloat32), _ref(target), sitk.Transform(), sitk.sitkLinear, 0.0,
                sitk.sitkFloat32))
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


def _ref(grid: Grid) -> sitk.Image:
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to_sitk(ref)
    return ref


@pytest.mark.parametrize("var", [[0.8, 0.0, 0.6], [0.8, 0.5, 0.6], [0.0, 0.5, 0.0]])
def test_kept_smoothing_is_the_full_smoothing_cut(var):
    rng = np.random.default_rng(5)
    arr = (rng.normal(size=(15, 22, 19)) * 100).astype(np.float32)
    spacing = (0.7, 1.9, 0.8)
    keep = [np.array([0, 2, 3, 7, 18]), np.array([1, 5, 21]), np.array([0, 14])]
    full = P.smooth_like_sitk(arr, spacing, var)
    cut = P.smooth_like_sitk(arr, spacing, var, keep)
    assert np.array_equal(cut.view(np.uint32), full[np.ix_(keep[2], keep[1], keep[0])].view(np.uint32))


def test_itk_floor_is_floor():
    x = np.array([-0.5, -0.25, 0.0, 0.999, 1.0, 2.5, np.nextafter(3.0, 0.0), np.nextafter(1024.0, 0.0), 7.75])
    x = np.concatenate([x, np.random.default_rng(0).uniform(-600, 600, 1000)])
    assert np.array_equal(P._itk_floor(x), np.floor(x).astype(np.int64))


@pytest.mark.parametrize("threads", [1, 2])
def test_kept_slices_are_the_full_pass_cut(threads):
    rng = np.random.default_rng(7)
    arr = (rng.normal(size=(11, 130, 300)) * 50).astype(np.float32)  # slices of more than one column block
    kernel = P.gaussian_kernel(0.9, 0.75)
    rows = np.array([0, 1, 4, 5, 6, 10])
    full = P._correlate_axis(arr, kernel, 0)
    assert np.array_equal(P._correlate_slices(arr, kernel, rows, threads).view(np.uint32), full[rows].view(np.uint32))


def test_prepare_pair_is_prepare_of_each():
    rng = np.random.default_rng(11)
    grids = [Grid((30, 34, 28), (0.8, 0.8, 1.2), (1.5, -2.0, 3.0), tuple(DIRECTIONS["flipped"].ravel())),
             Grid((26, 30, 33), (0.9, 0.7, 1.0), (-4.0, 1.0, 0.5), tuple(DIRECTIONS["oblique"].ravel()))]
    images = [Image((rng.normal(size=g.shape) * 100).astype(np.float32), g, n) for g, n in zip(grids, "fm")]
    masks = [None, Image(images[1].array > 0, grids[1], "mask")]
    alone = [P.prepare(im, 2.0, mk) for im, mk in zip(images, masks)]
    for concurrent in (True, False):
        pair = P.prepare_pair(images[0], images[1], 2.0, masks[0], masks[1], concurrent=concurrent)
        for a, b in zip(pair, alone):
            assert a.grid == b.grid and np.array_equal(a.array.view(np.uint32), b.array.view(np.uint32))
            assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)
    empty = Image(np.zeros(grids[1].shape, bool), grids[1], "moving mask")
    with pytest.raises(InputError, match="moving mask"):
        P.prepare_pair(images[0], images[1], 2.0, None, empty)


def test_simpleitk_path_where_its_arithmetic_is_not_reproduced(monkeypatch):
    rng = np.random.default_rng(2)
    grid = Grid((14, 17, 19), (0.7, 0.8, 1.3), (2.0, 3.0, -1.0), tuple(DIRECTIONS["flipped"].ravel()))
    image = Image((rng.normal(size=grid.shape) * 10).astype(np.float32), grid, "image")
    target = P.working_grid(grid, 2.0)
    reduced = P.resample(image, target).array
    monkeypatch.setattr(P, "_SAME_ARITHMETIC", False)
    monkeypatch.setattr(P, "_linear_plan", lambda *a: pytest.fail("the reduced path was taken"))
    assert np.array_equal(P.resample(image, target).array.view(np.uint32), reduced.view(np.uint32))


@pytest.mark.parametrize("chunk, threads", [(1, 1), (3, 2), (1000, 1)])
def test_working_image_in_chunks_of_slices_is_simpleitks(monkeypatch, chunk, threads):
    """The working image made in tasks of a few working slices (one, three on two threads, all at once) is the
    SimpleITK pipeline's, with the target overhanging the source (working slices outside it are 0)."""
    rng = np.random.default_rng(13)
    src = Grid((40, 21, 26), (0.8, 0.7, 0.75), (1.0, -2.0, 3.5), tuple(DIRECTIONS["flipped"].ravel()))
    image = Image((rng.normal(size=src.shape) * 200).astype(np.float32), src, "image")
    d = src.direction_matrix
    target = Grid((17, 9, 12), (2.0, 2.0, 2.0), tuple(np.asarray(src.origin) + d @ np.array([-3.1, 1.7, -7.3])),
                  src.direction)
    assert P._linear_plan(src, target) is not None
    monkeypatch.setattr(P, "_CHUNK_SLICES", chunk)
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        out = P.resample(image, target).array
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)
    ref = _sitk_resample(image, target)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)) and not ref[:2].any()


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8])
@pytest.mark.parametrize("spacing, working", [((0.7, 0.8, 0.75), 2.0), ((0.7, 0.8, 2.5), 2.0), ((2.0, 2.5, 3.0), 2.0)])
def test_small_integer_input_is_its_float32_copy_bit_for_bit(dtype, spacing, working):
    """Integers of up to 16 bits go into the passes as they are (no float32 copy of the input): the working image is
    the one made from their float32 copy, with smoothing along every axis, in-plane only, and none."""
    rng = np.random.default_rng(17)
    grid = Grid((25, 22, 27), spacing, (4.0, -1.0, 2.5), tuple(DIRECTIONS["permuted"].ravel()))
    info = np.iinfo(dtype)
    arr = rng.integers(info.min, info.max, grid.shape, endpoint=True).astype(dtype)
    target = P.working_grid(grid, working)
    assert P._linear_plan(grid, target) is not None
    ours = P.resample(Image(arr, grid, "image"), target).array
    ref = P.resample(Image(arr.astype(np.float32), grid, "image"), target).array
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(ours.view(np.uint32), _sitk_resample(Image(arr, grid, "image"), target).view(np.uint32))
