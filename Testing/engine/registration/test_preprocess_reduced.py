"""The working image as one linear map per axis (``preprocess._axis_matrix``/``_resample_axes``) is SimpleITK's
pipeline (cast, DiscreteGaussian, linear Resample) up to float32 rounding, for odd shapes, anisotropic voxels,
flipped, permuted and oblique directions, origins off the grid, working voxels of 2 and 3 mm, targets overhanging
the source or outside it; the same bits from integers and from their float32 copy, from one thread and two; other
grids take SimpleITK's own filters."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk
from DeepRegistrationLib.registration import preprocess as P
from test_preprocess import _old_resample as _sitk_resample  # the plain SimpleITK pipeline
from test_preprocess import assert_close


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
def test_working_image_is_simpleitks_up_to_rounding(shape, spacing, working, direction):
    rng = np.random.default_rng(sum(shape) + len(direction))
    arr = (rng.normal(size=shape) * 300 + 40).astype(np.float32)
    origin = tuple(rng.uniform(-80, 80, 3))  # off any grid
    grid = Grid(shape, spacing, origin, tuple(DIRECTIONS[direction].ravel()))
    image = Image(arr, grid, "image")
    target = P.working_grid(grid, working)
    assert P._axis_plans(grid, target) is not None  # every working grid takes the map
    out = P.resample(image, target)
    ref = _sitk_resample(image, target)
    assert out.grid == target
    assert_close(out.array, ref, arr)
    w = P.prepare(image, working)
    lo, hi = np.percentile(out.array, (0.5, 99.5))
    assert np.array_equal(w.array, np.clip((out.array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))


def test_a_wrong_kernel_or_edge_is_caught(monkeypatch):
    """The tolerance of :func:`assert_close` is tight enough to catch a shifted or wider kernel and an interpolation
    a tenth of a voxel off (the edge rule: :func:`test_axis_matrix_rows`)."""
    rng = np.random.default_rng(4)
    grid = Grid((21, 24, 26), (0.75, 0.75, 0.75), (3.0, -5.0, 2.0), tuple(DIRECTIONS["flipped"].ravel()))
    arr = (rng.normal(size=grid.shape) * 300 + 400).astype(np.float32)
    image = Image(arr, grid, "image")
    target = P.working_grid(grid, 2.0)
    ref = _sitk_resample(image, target)
    real = P.gaussian_kernel
    for wrong in (lambda v, s: np.roll(real(v, s), 1), lambda v, s: real(v * 1.3, s)):
        monkeypatch.setattr(P, "gaussian_kernel", wrong)
        with pytest.raises(AssertionError):
            assert_close(P.resample(image, target).array, ref, arr)
    monkeypatch.setattr(P, "gaussian_kernel", real)
    real_plans = P._axis_plans

    def shifted(source, target):  # every continuous index a tenth of a voxel off
        plans = real_plans(source, target)
        for p in plans:
            p.dist = np.where(p.lerp, np.minimum(p.dist + 0.1, 1.0), p.dist)
        return plans
    monkeypatch.setattr(P, "_axis_plans", shifted)
    with pytest.raises(AssertionError):
        assert_close(P.resample(image, target).array, ref, arr)


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (13.3, -7.1, 4.4), (200.0, 0.0, 0.0)])
def test_other_parallel_grids_and_the_border(shift):
    """A target that overhangs the source (0 outside, the edge half-voxel inside), one shifted by whole source voxels
    (distances exactly 0) and one outside it entirely, with and without anti-aliasing."""
    rng = np.random.default_rng(3)
    src = Grid((21, 18, 27), (0.8, 0.9, 1.1), (-3.2, 5.5, 1.25), tuple(np.diag([1.0, -1.0, -1.0]).ravel()))
    arr = rng.uniform(-1000, 1000, src.shape).astype(np.int16)
    image = Image(arr, src, "image")
    d = src.direction_matrix
    for target in (Grid((9, 11, 13), (2.0, 2.0, 2.0), tuple(np.asarray(src.origin) + d @ np.array(shift) - 4.0),
                        src.direction),
                   Grid((7, 8, 9), (1.6, 1.8, 2.2), tuple(np.asarray(src.origin) + d @ np.array([0.8, 1.8, 3.3])),
                        src.direction)):
        for antialias in (True, False):
            out = P.resample(image, target, antialias=antialias).array
            ref = _sitk_resample(image, target) if antialias else sitk.GetArrayFromImage(sitk.Resample(
                sitk.Cast(image_to_sitk(image), sitk.sitkFloat32), _ref(target), sitk.Transform(), sitk.sitkLinear, 0.0,
                sitk.sitkFloat32))
            assert_close(out, ref, arr)
            assert np.array_equal(out == 0, ref == 0)  # the outside rule: the same voxels are 0


def _ref(grid: Grid) -> sitk.Image:
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to_sitk(ref)
    return ref


def test_axis_matrix_rows():
    """Each row of the map is the interpolation of the repeated-edge Gaussian: its weights sum to 1 inside the source
    and to 0 outside, and a row between two source indices is their weights' linear mix."""
    src = Grid((5, 6, 40), (0.75, 0.75, 0.75), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    target = Grid((5, 6, 17), (2.0, 0.75, 0.75), (-1.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    plan = P._axis_plans(src, target)[0]
    kernel = P.gaussian_kernel(P.antialias_variance((0.75,), 2.0)[0], 0.75)
    w = P._axis_matrix(plan, kernel, 40)
    np.testing.assert_allclose(w.sum(axis=1), np.where(plan.inside, 1.0, 0.0), atol=1e-12)
    g = P._axis_matrix(P._AxisPlan(np.arange(40), np.zeros(40), np.zeros(40, bool), np.ones(40, bool)), kernel, 40)
    for t in np.flatnonzero(plan.inside & plan.lerp):
        b, d = plan.base[t], plan.dist[t]
        np.testing.assert_allclose(w[t], (1 - d) * g[b] + d * g[b + 1], atol=1e-12)
    r = len(kernel) // 2  # the edge rows: the taps past the edge weigh the edge voxel (repeated, not zero)
    np.testing.assert_allclose(g[0, :r + 1], np.r_[kernel[:r + 1].sum(), kernel[r + 1:]], atol=1e-15)
    np.testing.assert_allclose(g[-1, -(r + 1):], np.r_[kernel[:r], kernel[r:].sum()], atol=1e-15)


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


def test_other_directions_take_simpleitks_filters():
    """A target grid of another direction than the source's is SimpleITK's DiscreteGaussian and Resample, bit for
    bit."""
    rng = np.random.default_rng(2)
    grid = Grid((14, 17, 19), (0.7, 0.8, 1.3), (2.0, 3.0, -1.0), tuple(DIRECTIONS["flipped"].ravel()))
    image = Image((rng.normal(size=grid.shape) * 10).astype(np.float32), grid, "image")
    target = P.working_grid(grid, 2.0)
    target = Grid(target.shape, target.spacing, target.origin, tuple(DIRECTIONS["oblique"].ravel()))
    assert P._axis_plans(grid, target) is None
    out = P.resample(image, target).array
    assert np.array_equal(out.view(np.uint32), _sitk_resample(image, target).view(np.uint32))


@pytest.mark.parametrize("chunk, slab_bytes", [(1, None), (3, None), (1000, None), (8, 1)])
def test_working_image_in_products_of_any_size(monkeypatch, chunk, slab_bytes):
    """The map applied in products of one, three, all working slices, or one slice per product (a slab budget below
    one slice) is SimpleITK's pipeline, with the target overhanging the source (working slices outside it are 0)."""
    rng = np.random.default_rng(13)
    src = Grid((40, 21, 26), (0.8, 0.7, 0.75), (1.0, -2.0, 3.5), tuple(DIRECTIONS["flipped"].ravel()))
    arr = (rng.normal(size=src.shape) * 200).astype(np.float32)
    image = Image(arr, src, "image")
    d = src.direction_matrix
    target = Grid((17, 9, 12), (2.0, 2.0, 2.0), tuple(np.asarray(src.origin) + d @ np.array([-3.1, 1.7, -7.3])),
                  src.direction)
    monkeypatch.setattr(P, "_CHUNK_SLICES", chunk)
    if slab_bytes is not None:
        monkeypatch.setattr(P, "_SLAB_BYTES", slab_bytes)
    out = P.resample(image, target).array
    ref = _sitk_resample(image, target)
    assert_close(out, ref, arr)
    assert not ref[:2].any() and not out[:2].any()


@pytest.mark.parametrize("threads", [1, 2])
def test_same_bits_from_one_thread_or_two(threads):
    rng = np.random.default_rng(19)
    grid = Grid((60, 70, 80), (0.75, 0.75, 0.75), (1.0, 2.0, 3.0), tuple(DIRECTIONS["permuted"].ravel()))
    image = Image(rng.integers(-1000, 2000, grid.shape).astype(np.int16), grid, "image")
    target = P.working_grid(grid, 2.0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = P.resample(image, target).array
        torch.set_num_threads(threads)
        assert np.array_equal(P.resample(image, target).array.view(np.uint32), one.view(np.uint32))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.float64])
@pytest.mark.parametrize("spacing, working", [((0.7, 0.8, 0.75), 2.0), ((0.7, 0.8, 2.5), 2.0), ((2.0, 2.5, 3.0), 2.0)])
def test_any_input_type_is_its_float32_copy_bit_for_bit(dtype, spacing, working):
    """Integers and float64 are converted slab by slab where read (no float32 copy of the whole input): the working
    image is the one made from their float32 copy, with smoothing along every axis, in-plane only, and none."""
    rng = np.random.default_rng(17)
    grid = Grid((25, 22, 27), spacing, (4.0, -1.0, 2.5), tuple(DIRECTIONS["permuted"].ravel()))
    if dtype == np.float64:
        arr = rng.normal(size=grid.shape) * 1e3
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, grid.shape, endpoint=True).astype(dtype)
    target = P.working_grid(grid, working)
    ours = P.resample(Image(arr, grid, "image"), target).array
    ref = P.resample(Image(arr.astype(np.float32), grid, "image"), target).array
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert_close(ours, _sitk_resample(Image(arr, grid, "image"), target), arr.astype(np.float32))


def test_any_memory_layout_and_read_only_input():
    """A source reversed along z (negative strides), in Fortran order, big-endian or read-only gives the working image
    of its C-ordered float32 copy, bit for bit (each slab is copied into the products' own buffer)."""
    rng = np.random.default_rng(23)
    grid = Grid((22, 19, 24), (0.8, 0.75, 0.9), (1.0, -3.0, 2.0), tuple(DIRECTIONS["flipped"].ravel()))
    base = (rng.normal(size=grid.shape) * 100).astype(np.float32)
    target = P.working_grid(grid, 2.0)
    ref = P.resample(Image(base, grid, "image"), target).array
    frozen = base.copy()
    frozen.flags.writeable = False
    for arr in (np.ascontiguousarray(base[::-1])[::-1], np.asfortranarray(base), base.astype(">f4"), frozen):
        out = P.resample(Image(arr, grid, "image"), target).array
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])
def test_non_finite_input_is_refused(bad):
    """NaN, Inf and float64 values beyond float32's range (Inf once converted) in an image built in memory: one
    InputError naming the image (read_image refuses such files already)."""
    grid = Grid((20, 21, 22), (0.75, 0.75, 0.75), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    arr = np.random.default_rng(1).normal(size=grid.shape)
    arr[10, 10, 10] = bad
    with pytest.raises(InputError, match="moving image: the image holds NaN or infinite voxels"):
        P.prepare(Image(arr, grid, "moving image"), 2.0)
