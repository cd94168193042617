"""warp_image's separable path (target axes parallel to the field grid's): the same points as the general
``warp.map_points`` (ITK's border rule included: a target reaching beyond half a voxel outside the field grid
gets no displacement there), and the general path where the axes are not parallel."""
from __future__ import annotations

import numpy as np
import torch

from conftest import random_smooth_field
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.spatial import resampling as R
from DeepRegistrationLib.spatial import warp as W
from DeepRegistrationLib.spatial.transforms import SpatialTransform


def _transform(rng, grid: Grid) -> SpatialTransform:
    a = np.eye(4)
    a[:3, :3] += rng.normal(scale=0.03, size=(3, 3))
    a[:3, 3] = rng.normal(scale=3.0, size=3)
    return SpatialTransform(a, random_smooth_field(grid.shape, rng, max_mm=4.0), grid)


def _general(transform: SpatialTransform, target: Grid, k0: int, k1: int) -> torch.Tensor:
    return W.map_points(W.grid_points(R.slab_grid(target, k0, k1)),
                        torch.as_tensor(transform.affine, dtype=torch.float32),
                        torch.as_tensor(transform.field, dtype=torch.float32)[None], transform.field_grid)


def test_separable_points_equal_the_general_map_also_beyond_the_field_grid():
    rng = np.random.default_rng(0)
    flip = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    field_grid = Grid((12, 14, 16), (3.0, 3.0, 3.0), (40.0, 30.0, -20.0), flip)
    t = _transform(rng, field_grid)
    # finer, shifted, and reaching 4 mm (more than half a field voxel) past the field grid on every side
    target = Grid((46, 54, 62), (0.9, 0.95, 1.0), (44.0, 34.0, -24.0), flip)
    sep = R._SeparablePoints.make(t, target)
    assert sep is not None
    for k0, k1 in ((0, 7), (20, 46)):
        np.testing.assert_allclose(sep.points(k0, k1).numpy(), _general(t, target, k0, k1).numpy(), atol=2e-4)
    # an affine-only transform takes the same path
    lin = SpatialTransform(t.affine)
    pts = R._SeparablePoints.make(lin, target).points(3, 9)
    want = W.apply_affine(W.grid_points(R.slab_grid(target, 3, 9)), torch.as_tensor(t.affine, dtype=torch.float32))
    np.testing.assert_allclose(pts.numpy(), want.numpy(), atol=2e-4)


def test_warp_image_agrees_with_the_general_path_and_falls_back_for_oblique_targets():
    rng = np.random.default_rng(1)
    field_grid = Grid((10, 12, 11), (4.0, 4.0, 4.0), (-20.0, -24.0, -22.0))
    t = _transform(rng, field_grid)
    moving = Image(rng.normal(size=(30, 32, 31)).astype(np.float32), Grid((30, 32, 31), (1.5, 1.5, 1.5),
                                                                          (-22.0, -24.0, -23.0)), "m")
    target = Grid((25, 27, 26), (1.7, 1.7, 1.7), (-19.0, -22.0, -21.0))
    got = R.warp_image(moving, target, t, "linear", slab_voxels=5000).array
    pts = _general(t, target, 0, target.shape[0])
    want = W.sample(torch.as_tensor(moving.array)[None, None], moving.grid, pts, padding_mode="itk")[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = Grid(target.shape, target.spacing, target.origin, (c, -s, 0, s, c, 0, 0, 0, 1))
    assert R._SeparablePoints.make(t, oblique) is None
    got = R.warp_image(moving, oblique, t, "nearest").array
    pts = _general(t, oblique, 0, oblique.shape[0])
    want = W.sample(torch.as_tensor(moving.array, dtype=torch.float64)[None, None], moving.grid, pts.double(),
                    mode="nearest", padding_mode="itk")[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_slabs_beyond_a_partial_view_are_zero_and_integer_output_is_the_rounded_float_result():
    """A moving image covering the middle of the fixed range: slabs that map wholly beyond it are 0 without
    being sampled, the same as sampling them (one slab of the whole grid); an integer ``dtype`` gives the
    float result rounded and clipped."""
    rng = np.random.default_rng(5)
    fixed = Grid((40, 20, 22), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    moving = Image((rng.normal(size=(14, 20, 22)) * 30000).astype(np.float32),
                   Grid((14, 20, 22), (2.0, 2.0, 2.0), (0.0, 0.0, 26.0)))
    t = _transform(rng, fixed)
    one_slab = R.warp_image(moving, fixed, t, slab_voxels=10 ** 9).array
    slabs = R.warp_image(moving, fixed, t, slab_voxels=2 * 20 * 22).array
    np.testing.assert_array_equal(slabs, one_slab)
    assert (slabs[:8] == 0).all() and (slabs[-8:] == 0).all() and (slabs[18] != 0).any()
    assert R._box_position(W.grid_points(R.slab_grid(fixed, 0, 2)), moving.grid)[0]
    assert not R._box_position(W.grid_points(R.slab_grid(fixed, 12, 14)), moving.grid)[0]
    as_int = R.warp_image(moving, fixed, t, dtype=np.int16, slab_voxels=2 * 20 * 22).array
    assert as_int.dtype == np.int16
    np.testing.assert_array_equal(as_int, np.clip(np.rint(one_slab), -32768, 32767).astype(np.int16))
    assert as_int.max() == 32767  # some values clipped


def test_sample_on_grid_separable_equals_grid_sample_beyond_the_source_and_with_a_flipped_axis():
    """A scalar map resampled onto a finer grid with parallel axes (one of them reversed), reaching past the
    source on every side (border values repeat): the separable path gives grid_sample's values; an oblique
    target takes grid_sample itself."""
    rng = np.random.default_rng(8)
    source = Grid((9, 11, 13), (3.0, 3.0, 3.0), (40.0, 30.0, -20.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    values = rng.normal(size=source.shape).astype(np.float32)
    target = Grid((31, 37, 45), (1.0, 1.0, 1.0), (-6.0, 34.0, -24.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))

    def general(tgt):
        vol = torch.as_tensor(values)[None, None]
        return W.sample(vol, source, W.grid_points(tgt), padding_mode="border")[0, 0].numpy()

    out = R.sample_on_grid(values, source, target)
    assert out.dtype == np.float32 and out.shape == target.shape
    np.testing.assert_allclose(out, general(target), atol=1e-5)
    assert np.isclose(out[0, 0, 0], values[0, 0, -1], atol=1e-5)  # beyond a corner: the border voxel's value
    angle = np.deg2rad(20.0)
    oblique = Grid((12, 12, 12), (2.0, 2.0, 2.0), (0.0, 30.0, -20.0),
                   (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1.0))
    np.testing.assert_allclose(R.sample_on_grid(values, source, oblique), general(oblique), atol=1e-6)


def test_slabs_within_the_image_skip_the_itk_mask_with_the_same_bits_and_field_rows_are_reused_exactly():
    """A slab whose points all lie within the moving image's half-voxel border is sampled without ITK's mask
    (it would be 1 everywhere): the same bits as the masked sampling at the same points, for a target partly
    within and partly beyond the image; the separable points of consecutive slabs (field rows interpolated once,
    kept for the next slab) are those of a fresh computation, bit for bit."""
    rng = np.random.default_rng(11)
    field_grid = Grid((10, 12, 11), (4.0, 4.0, 4.0), (-20.0, -24.0, -22.0))
    t = _transform(rng, field_grid)
    moving = Image(rng.normal(size=(30, 40, 38)).astype(np.float32),
                   Grid((30, 40, 38), (1.5, 1.5, 1.5), (-40.0, -42.0, -40.0)))
    target = Grid((44, 20, 20), (1.1, 1.1, 1.1), (-20.0, -22.0, -12.0))  # z reaches past the moving image
    step = 4
    got = R.warp_image(moving, target, t, "linear", slab_voxels=step * 20 * 20).array
    vol = torch.as_tensor(moving.array)[None, None]
    fresh = lambda k0, k1: R._SeparablePoints.make(t, target).points(k0, k1)
    kept = R._SeparablePoints.make(t, target)
    positions = set()
    for k0 in range(0, target.shape[0], step):
        k1 = min(target.shape[0], k0 + step)
        pts = kept.points(k0, k1)
        assert torch.equal(pts, fresh(k0, k1))
        beyond, inside = R._box_position(pts, moving.grid)
        positions.add((beyond, inside))
        # the box bounded without reading the points holds them all, and settles 'beyond' as the points' box does
        lo, hi = kept.box(k0, k1)
        flat = pts.reshape(-1, 3).double().numpy()
        assert (flat >= lo).all() and (flat <= hi).all() and np.abs(np.concatenate([lo - flat.min(0), hi - flat.max(0)])).max() < 12.0
        slab_beyond, slab_inside, ready = R._slab_position(moving.grid, kept, k0, k1,
                                                           torch.empty((k1 - k0) * 20 * 20 * 3))
        assert slab_beyond == beyond and (inside or not slab_inside)
        # the slab's points, computed into the buffer, unless the bounded box settled 'beyond' (not computed)
        assert torch.equal(ready, pts) if ready is not None else slab_beyond
        want = W.sample(vol, moving.grid, pts, padding_mode="itk")[0, 0].numpy()
        if beyond:
            want = np.zeros_like(want)
        np.testing.assert_array_equal(got[k0:k1], want)
    assert {(False, True), (False, False)} <= positions  # both sampling paths were taken


def test_sample_on_grid_onto_a_coarser_grid_interpolates_only_the_used_source_slices_with_the_same_bits():
    """A coarser target (every source slice and row is not used): the values are those of interpolating the whole
    source along x, then y, then z (the same float32 steps), bit for bit, and grid_sample's to rounding."""
    rng = np.random.default_rng(12)
    source = Grid((40, 36, 34), (0.75, 0.75, 0.75), (10.0, -5.0, 3.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    values = rng.normal(size=source.shape).astype(np.float32)
    target = Grid((13, 12, 11), (2.0, 2.0, 2.0), (11.0, -5.5, 4.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    m = source.world_to_index @ target.index_to_world
    v = torch.as_tensor(values)
    steps = []
    for a, n, g in ((0, 11, 34), (1, 12, 36), (2, 13, 40)):
        c = np.clip(m[a, 3] + m[a, a] * np.arange(n, dtype=np.float64), 0.0, g - 1.0)
        i0 = np.clip(np.floor(c), 0, g - 2).astype(np.int64)
        t = torch.as_tensor(np.clip(c - i0, 0.0, 1.0))
        steps.append((torch.as_tensor(i0), torch.as_tensor(i0 + 1), (1.0 - t).float(), t.float()))
    (x0, x1, wx0, wx1), (y0, y1, wy0, wy1), (z0, z1, wz0, wz1) = steps
    assert len(torch.unique(torch.cat([z0, z1]))) < 40 and len(torch.unique(torch.cat([y0, y1]))) < 36
    v = v.index_select(2, x0) * wx0 + v.index_select(2, x1) * wx1
    v = v.index_select(1, y0) * wy0[:, None] + v.index_select(1, y1) * wy1[:, None]
    want = (v.index_select(0, z0) * wz0[:, None, None] + v.index_select(0, z1) * wz1[:, None, None]).numpy()
    got = R.sample_on_grid(values, source, target)
    np.testing.assert_array_equal(got, want)
    general = W.sample(torch.as_tensor(values)[None, None], source, W.grid_points(target), padding_mode="border")
    np.testing.assert_allclose(got, general[0, 0].numpy(), atol=5e-5)


def test_warp_image_is_the_same_bits_on_one_thread_and_several_with_a_batch_per_thread():
    rng = np.random.default_rng(4)
    flip = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    field_grid = Grid((10, 12, 14), (3.0, 3.0, 3.0), (40.0, 30.0, -20.0), flip)
    t = _transform(rng, field_grid)
    # the moving image covers part of the target (masked slabs and in-plane rims, slabs beyond it) and is int16
    moving = Image((rng.normal(0, 400, (20, 30, 34))).astype(np.int16),
                   Grid((20, 30, 34), (1.0, 1.0, 1.0), (30.0, 22.0, -10.0), flip), "m")
    target = Grid((37, 33, 41), (0.9, 0.95, 1.0), (44.0, 34.0, -24.0), flip)  # 33 * 41 odd: some slabs not split
    oblique = Grid(target.shape, target.spacing, target.origin,
                   tuple(np.linalg.qr(rng.normal(size=(3, 3)))[0].ravel()))
    saved = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for name, grid in (("parallel", target), ("oblique", oblique)):
                for interpolation, dtype in (("linear", np.int16), ("linear", np.float32), ("nearest", None)):
                    w = R.warp_image(moving, grid, t, interpolation, slab_voxels=4 * 33 * 41, dtype=dtype).array
                    results.setdefault((name, interpolation, dtype), []).append(w)
    finally:
        torch.set_num_threads(saved)
    for key, (one, *more) in results.items():
        assert np.any(one != 0) and np.any(one == 0), key  # partly inside, partly beyond
        for other in more:
            assert one.dtype == other.dtype and one.tobytes() == other.tobytes(), key


def test_mask_only_outside_the_inner_rectangle_gives_the_bits_of_the_plain_itk_sampling():
    """A target with the moving image's in-plane extent (the points reach its border in every row and column, as
    for a CT and its crop): ITK's mask is computed only outside each slab's inner rectangle, whose points all lie
    within the border; the result is that of sampling every slab's points with the "itk" padding, bit for bit
    (linear into float32 and int16, nearest), also with an oblique moving image (normalized by the product)."""
    rng = np.random.default_rng(21)
    flip = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    field_grid = Grid((12, 14, 16), (3.0, 3.0, 3.0), (45.0, 39.0, -20.0), flip)
    t = _transform(rng, field_grid)
    t = SpatialTransform(np.eye(4), t.field, t.field_grid)  # the field only: in-plane edges near the border
    grid = Grid((24, 40, 46), (1.0, 1.0, 1.0), (44.0, 38.0, -12.0), flip)
    moving = Image((rng.normal(0, 500, grid.shape)).astype(np.float32), grid, "m")
    target = Grid((36, 40, 46), (1.0, 1.0, 1.0), (44.0, 38.0, -18.0), flip)  # z reaches past the moving image
    sep = R._SeparablePoints.make(t, target)
    rects = []
    for k0 in range(0, target.shape[0], 4):
        k1 = min(target.shape[0], k0 + 4)
        beyond, inside, _ = R._slab_position(moving.grid, sep, k0, k1)
        rect = None if beyond or inside else R._inner_rectangle(moving.grid, sep, k0, k1)
        if rect is not None:
            j0, j1, i0, i1 = rect
            rects.append(rect)
            idx = W.apply_affine(sep.points(k0, k1)[0, :, j0:j1, i0:i1].double(),
                                 torch.as_tensor(moving.grid.world_to_index))
            size = torch.as_tensor(moving.grid.size, dtype=torch.float64)
            assert ((idx >= -0.5 + 0.01) & (idx <= size - 0.5 - 0.01)).all()
    assert any(r != (0, 40, 0, 46) for r in rects) and len(rects) >= 3
    oblique_grid = Grid(grid.shape, grid.spacing, grid.origin,
                        tuple((np.array(flip).reshape(3, 3) @ np.linalg.qr(np.eye(3) + rng.normal(scale=0.05, size=(3, 3)))[0]).ravel()))
    for mov in (moving, Image(moving.array, oblique_grid, "o")):
        for interpolation, dtype in (("linear", np.float32), ("linear", np.int16), ("nearest", None)):
            got = R.warp_image(mov, target, t, interpolation, slab_voxels=4 * 40 * 46, dtype=dtype).array
            vol = torch.as_tensor(mov.array, dtype=torch.float64 if interpolation == "nearest" else torch.float32)
            mode = "bilinear" if interpolation == "linear" else "nearest"
            for k0 in range(0, target.shape[0], 4):
                k1 = min(target.shape[0], k0 + 4)
                pts = sep.points(k0, k1).to(vol.dtype)
                want = W.sample(vol[None, None], mov.grid, pts, mode=mode, padding_mode="itk")[0, 0]
                if R._box_position(pts, mov.grid)[0]:
                    want = torch.zeros_like(want)
                if dtype == np.int16:
                    want = want.round().clamp(-32768, 32767)
                want = want.numpy().astype(got.dtype)
                assert got[k0:k1].tobytes() == want.tobytes(), (interpolation, dtype, k0)


def test_diagonal_normalizing_is_world_to_normalized_bit_for_bit():
    rng = np.random.default_rng(22)
    pts = torch.as_tensor(rng.normal(scale=200.0, size=(1000, 3)), dtype=torch.float32)
    for direction in ((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
                      (-1.0, -0.0, 0, 0, 1.0, -0.0, 0, 0, -1.0)):
        grid = Grid((40, 51, 7), (0.7, 1.3, 2.0), (10.0, -20.0, 30.0), direction)
        for dtype in (torch.float32, torch.float64):
            scale, offset = R._diagonal_normalizing(grid, dtype, None)
            p = pts.to(dtype)
            assert torch.equal(p.clone().mul_(scale).add_(offset), W.world_to_normalized(p, grid))
    c, s = np.cos(0.2), np.sin(0.2)
    assert R._diagonal_normalizing(Grid((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (c, -s, 0, s, c, 0, 0, 0, 1)),
                                   torch.float32, None) is None
