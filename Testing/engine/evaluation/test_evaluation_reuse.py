"""The evaluation after a registration reuses what the registration computed, bit for bit: LNCC's similarity after
hands its per-voxel cc² map to the quality signals and the explainability maps (the plain six-channel formula it
replaces, with and without a cut field of view and a fixed mask; never a map of cached statistics of an earlier
view), and the exported field is padded without a float64 copy first (``np.pad`` of the float64 field)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.evaluation import explain
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration.pipeline import _padded_field, register
from DeepRegistrationLib.registration.similarity import LNCC, Similarity
from DeepRegistrationLib.spatial.filters import box_filter


def _plain_local_cc2(fixed, warped, radius, view):
    """The six-channel local cc² of explain.local_cc2 before it took LNCC's own statistics."""
    v = torch.ones_like(fixed) if view is None else view.to(fixed.dtype)
    stats = box_filter(torch.cat([v, v * fixed, v * warped, v * fixed * fixed, v * warped * warped,
                                  v * fixed * warped], 1), radius)
    mv, mf, mw, mff, mww, mfw = torch.split(stats, 1, 1)
    inv = 1.0 / mv.clamp_min(1e-6)
    mf, mw = mf * inv, mw * inv
    var_f = (mff * inv - mf * mf).clamp_min(0)
    var_w = (mww * inv - mw * mw).clamp_min(0)
    cross = mfw * inv - mf * mw
    cc2 = (cross * cross / (var_f * var_w + 1e-12)).clamp(0, 1)
    structured = (var_f > explain.FLAT) & (v > 0.5)
    return cc2 * structured, structured


def _plain_lncc_loss(fixed, warped, radius, valid, region, view, flat=1e-4, eps=1e-12):
    """LNCC's loss over a cut view written out (the temporaries of 7ebca63's per_sample and _view_fixed_stats)."""
    v = view.to(fixed.dtype)
    mv, mf, mff = torch.split(box_filter(torch.cat([v, v * fixed, v * fixed * fixed], 1), radius), 1, 1)
    inv = 1.0 / mv.clamp_min(1e-6)
    mf = mf * inv
    var_f = (mff * inv - mf * mf).clamp_min(0)
    structure = (var_f > flat).to(fixed.dtype) * v
    if region is not None:
        structure = structure * region.to(fixed.dtype)
    mw, mww, mfw = torch.split(box_filter(torch.cat([v * warped, v * warped * warped, v * fixed * warped], 1),
                                          radius), 1, 1)
    mw, mww, mfw = mw * inv, mww * inv, mfw * inv
    cross = mfw - mf * mw
    cc2 = cross * cross / (var_f * (mww - mw * mw).clamp_min(0) + eps)
    weight = (structure if valid is None else structure * valid.to(cc2.dtype)).expand_as(cc2)
    return 1.0 - (cc2 * weight).sum((1, 2, 3, 4)) / weight.sum((1, 2, 3, 4)).clamp_min(1.0)


def _images():
    g = torch.Generator().manual_seed(5)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (19, 23, 21)], indexing="ij")
    fixed = (torch.sin(3 * x) * torch.cos(2 * y) * 0.4 + 0.5 + 0.1 * z)[None, None].contiguous()
    fixed[..., :10, :] = 0.2  # a flat band: no structure in its first 7 rows
    warped = (0.8 * fixed + 0.1 * torch.rand(fixed.shape, generator=g)).contiguous()
    cut = torch.ones(fixed.shape, dtype=torch.bool)
    cut[:, :, :6] = False  # the moving field of view misses six slices
    region = torch.rand(fixed.shape, generator=g) > 0.3
    return fixed, warped, cut, region


@pytest.mark.parametrize("view_kind", ["none", "whole", "cut"])
@pytest.mark.parametrize("masked", [False, True])
def test_lncc_evaluate_is_the_loss_and_the_plain_local_cc2(view_kind, masked):
    fixed, warped, cut, region = _images()
    view = {"none": None, "whole": torch.ones_like(cut), "cut": cut}[view_kind]
    valid = None if view is None else view & (warped > 0.45)  # a moving mask inside the view
    region = region if masked else None
    loss, local = LNCC(3).evaluate(fixed, warped, valid, region, view)
    assert torch.equal(loss, LNCC(3).per_sample(fixed, warped, valid, region, view))
    if view_kind == "cut":
        assert torch.equal(loss, _plain_lncc_loss(fixed, warped, 3, valid, region, view))
    want_cc2, want_structured = _plain_local_cc2(fixed, warped, 3, view)
    assert local.radius == 3 and torch.equal(local.structured, want_structured)
    assert local.cc2.dtype == want_cc2.dtype and torch.equal(local.cc2, want_cc2)
    assert 0.2 < float(want_structured.float().mean()) < 0.9  # flat voxels and the cut view left out
    got = explain.local_cc2(fixed, warped, 3, view)
    assert torch.equal(got[0], want_cc2) and torch.equal(got[1], want_structured)
    # the Similarity wrapper: the loss of its __call__, the same map
    sim = Similarity("lncc", 3)
    s_loss, s_local = sim.evaluate(fixed, warped, valid, region, view)
    assert torch.equal(s_loss, Similarity("lncc", 3)(fixed, warped, valid, region, view))
    assert torch.equal(s_local.cc2, want_cc2)
    assert Similarity("mse").evaluate(fixed, warped, valid, region, view)[1] is None


def test_no_map_from_statistics_cached_for_an_earlier_view():
    fixed, warped, cut, _ = _images()
    lncc = LNCC(2)
    lncc(fixed, warped, cut, None, cut)  # caches the fixed statistics over this view
    moved = cut.clone()
    moved[:, :, 6, :2, :5] = False  # 10 voxels: within VIEW_REFRESH, the cached statistics stay in use
    loss, local = lncc.evaluate(fixed, warped, moved, None, moved)
    assert local is None
    assert torch.equal(loss, lncc.per_sample(fixed, warped, moved, None, moved))
    _, again = lncc.evaluate(fixed, warped, cut, None, cut)  # the very view of the cache: its map
    assert torch.equal(again.cc2, _plain_local_cc2(fixed, warped, 2, cut)[0])


def _slab(image, k0, k1):
    from DeepRegistrationLib.core.image import Image

    g = image.grid
    origin = np.asarray(g.origin) + g.direction_matrix @ (np.asarray(g.spacing) * np.array([0.0, 0.0, k0]))
    return Image(image.array[k0:k1].copy(), Grid((k1 - k0,) + tuple(g.shape[1:]), g.spacing, tuple(origin),
                                                 g.direction), image.name)


def test_measure_and_maps_with_the_handed_over_map_are_those_computed_anew(sample_dir):
    fixed = read_image(sample_dir / "fixed.nii.gz", "fixed")
    moving = _slab(read_image(sample_dir / "moving.nii.gz", "moving"), 6, 40)
    # a cap far below the grid: the finest level is not optimized, so the similarity after computes fresh statistics
    cfg = RegistrationConfig(initialization="moments", affine_iterations=6, iterations=6, levels=2, spacing=6.0,
                             device="cpu", threads=2, large_grid_voxels=0.0005)
    result = register(fixed, moving, cfg)
    images = result.working_images
    assert images.local is not None and images.local.radius == cfg.lncc_radius
    handed = explain.working_pair(fixed, moving, result.transform, cfg, prepared=images)
    assert handed.local is images.local
    anew = explain.working_pair(fixed, moving, result.transform, cfg, prepared=tuple(images))
    assert anew.local is None and 0.2 < float(anew.view.float().mean()) < 0.95  # a cut view
    assert explain.measure(handed, cfg.lncc_radius) == explain.measure(anew, cfg.lncc_radius)
    a = explain.explanation_maps(fixed, moving, result.transform, cfg, pair=handed)["local_similarity"]
    b = explain.explanation_maps(fixed, moving, result.transform, cfg, pair=anew)["local_similarity"]
    assert a.array.tobytes() == b.array.tobytes()
    # another window is computed anew
    assert explain.measure(handed, 1) == explain.measure(anew, 1)


def test_padded_field_is_numpys_edge_padding_of_the_float64_field():
    rng = np.random.default_rng(2)
    grid = Grid((4, 5, 6), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))
    u = rng.normal(size=(3, *grid.shape)).astype(np.float32)
    want = np.pad(u.astype(np.float64), ((0, 0), (1, 1), (1, 1), (1, 1)), mode="edge")
    for given in (torch.from_numpy(u), u, u.astype(np.float64)):
        padded, pgrid = _padded_field(given, grid)
        assert padded.dtype == np.float64 and padded.tobytes() == want.tobytes()
        assert pgrid.shape == (6, 7, 8)
        np.testing.assert_allclose(pgrid.index_to_world @ [1, 1, 1, 1], grid.index_to_world @ [0, 0, 0, 1])
    assert _padded_field(None, grid) == (None, None)


def test_jacobian_signals_and_sdlogj_are_the_plain_float64_formulas():
    from DeepRegistrationLib.evaluation import metrics

    def plain_signals(detj):
        d = np.asarray(detj, dtype=np.float64)
        d = d[np.isfinite(d)]
        return {"jacobian_min": float(d.min()), "jacobian_max": float(d.max()),
                "folding_percent": float(100.0 * np.count_nonzero(d <= 0) / d.size),
                "extreme_jacobian_percent": float(100.0 * np.count_nonzero((d < 0.2) | (d > 5.0)) / d.size)}

    def plain_sdlogj(detj, crop=2):
        d = np.asarray(detj, dtype=np.float64)[crop:-crop, crop:-crop, crop:-crop].ravel()
        d = d[np.isfinite(d)]
        return {"sdlogj_l2r": float(np.std(np.log(np.clip(d + 3.0, 1e-9, 1e9)))),
                "sdlogj": float(np.std(np.log(d[d > 0])))}

    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 0.4, size=(14, 15, 16))
    a[3, 4, 5], a[7, 7, 7] = 0.0, -0.2
    b = a.copy()
    b[5, 5, 5], b[6, 6, 6] = np.nan, np.inf
    for arr in (a, b):
        f32 = arr.astype(np.float32)
        # float32 values at the bounds: float32(0.2) is above 0.2, the one below it under; 5 and the one above it
        f32[1, 1, 1], f32[1, 1, 2] = np.float32(0.2), np.nextafter(np.float32(0.2), np.float32(0))
        f32[2, 2, 2], f32[2, 2, 3] = 5.0, np.nextafter(np.float32(5), np.float32(9))
        for d in (arr, f32):
            assert explain.jacobian_signals(d) == plain_signals(d)
            assert metrics.sdlogj(d) == plain_sdlogj(d)
    assert explain.jacobian_signals(f32)["extreme_jacobian_percent"] > 0
