"""Learn2Reg-definition metrics on hand-made cases with known answers (CPU, NumPy + SimpleITK)."""
from __future__ import annotations

import numpy as np
import pytest

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.evaluation.metrics import (_hd95_masks, dice_per_label, folding_percent, hd95_per_label,
    jacobian_determinant, label_scores, mean_dice, sdlogj, summarize, tre_mm)


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# ---------------------------------------------------------------------------------------------- Dice
def test_dice_of_overlapping_boxes_is_exact():
    fixed = np.zeros((10, 10, 10), np.int16)
    warped = np.zeros_like(fixed)
    fixed[2:6, 2:6, 2:6] = 1          # 64 voxels
    warped[3:7, 2:6, 2:6] = 1         # 64 voxels, 48 shared
    fixed[8, 8, 8] = 2                # only in fixed
    warped[0, 0, 0] = 5               # only in warped: not a default label
    d = dice_per_label(fixed, warped)
    assert set(d) == {1, 2}
    assert d[1] == pytest.approx(2 * 48 / 128)
    assert d[2] == 0.0
    d = dice_per_label(fixed, warped, labels=[1, 3, 5])
    assert np.isnan(d[3]) and d[5] == 0.0
    assert mean_dice(fixed, warped, labels=[1, 2, 3]) == pytest.approx(0.375)  # nanmean of 0.75, 0
    assert dice_per_label(fixed, fixed) == {1: 1.0, 2: 1.0}


# ---------------------------------------------------------------------------------------------- HD95
def _sphere(shape_zyx, spacing_xyz, centre_xyz, radius) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_zyx], indexing="ij")
    x, y, z = i * spacing_xyz[0], j * spacing_xyz[1], k * spacing_xyz[2]
    c = centre_xyz
    return (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= radius ** 2


def _continuous_hd95(radius: float, shift: float) -> float:
    """p95 of the distance from points of a sphere to the same sphere shifted by ``shift`` (dense sampling)."""
    n = 200_000
    t = np.arange(n) + 0.5
    zc = 1 - 2 * t / n
    phi = np.pi * (1 + 5 ** 0.5) * t
    rho = np.sqrt(1 - zc ** 2)
    p = radius * np.stack([rho * np.cos(phi), rho * np.sin(phi), zc], 1)
    d = np.abs(np.linalg.norm(p - [0, 0, shift], axis=1) - radius)
    return float(np.percentile(d, 95))


@pytest.mark.parametrize("axis", [0, 2])  # shift along x (1 mm voxels) and along z (2.5 mm voxels)
def test_hd95_of_shifted_spheres_on_anisotropic_grid(axis):
    spacing = (1.0, 1.6, 2.5)                  # (x, y, z) mm
    shape = (24, 36, 56)                       # (Z, Y, X): 60 x 57.6 x 56 mm
    centre = np.array([28.0, 28.8, 27.5])
    radius, shift = 14.0, 7.5
    moved = centre.copy()
    moved[axis] += shift
    a = _sphere(shape, spacing, centre, radius).astype(np.int32) * 4
    b = _sphere(shape, spacing, moved, radius).astype(np.int32) * 4
    hd = hd95_per_label(a, b, spacing)
    assert list(hd) == [4]
    assert hd[4] == pytest.approx(_continuous_hd95(radius, shift), abs=max(spacing))
    assert hd95_per_label(a, a, spacing)[4] == 0.0


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    def surface_points(m):
        p = np.pad(m, 1)
        inner = np.ones_like(m)
        for axis in range(3):
            for s in (-1, 1):
                inner &= np.roll(p, s, axis)[1:-1, 1:-1, 1:-1]
        k, j, i = np.nonzero(m & ~inner)
        return np.stack([i, j, k], 1) * np.asarray(spacing)
    pa, pb = surface_points(a), surface_points(b)
    d = np.linalg.norm(pa[:, None] - pb[None], axis=2)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force_definition():
    rng = np.random.default_rng(3)
    spacing = (0.7, 1.9, 1.3)
    a = np.zeros((12, 14, 16), np.uint8)
    b = np.zeros_like(a)
    a[2:9, 3:12, 0:10] = 7           # touches the image border: border voxels are surface
    b[4:12, 1:9, 5:15] = 7
    a[rng.random(a.shape) < 0.05] = 7
    b[rng.random(b.shape) < 0.05] = 0
    a[0:3, 0:3, 13:16] = 2           # label 2: absent from b -> nan
    got = hd95_per_label(a, b, spacing)
    assert got[7] == pytest.approx(_brute_force_hd95(a == 7, b == 7, spacing), rel=1e-5)
    assert np.isnan(got[2])
    assert np.isnan(hd95_per_label(a, b, spacing, labels=[9])[9])


def test_hd95_per_label_on_an_atlas_sized_label_map_equals_the_whole_grid_computation():
    # 116 labels on a 73 x 87 x 73 grid: each label is scored on its own bounding box; that must give what the
    # same masks give on the whole grid (checked for a corner, a border and an inner block)
    shape = (73, 87, 73)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    fixed = (k // 15) * 30 + (j // 15) * 5 + (i // 15) + 1     # 5 x 6 x 5 blocks
    fixed[fixed > 116] = 0
    warped = np.roll(fixed, 2, axis=1)
    spacing = (2.0, 1.5, 2.5)                                   # (x, y, z): a shift of 2 voxels along y = 3 mm
    hd = hd95_per_label(fixed, warped, spacing)
    assert len(hd) == 116 and all(np.isfinite(v) for v in hd.values())
    assert np.median(list(hd.values())) == pytest.approx(3.0)
    for lab in (1, 30, 37):
        whole = _hd95_masks(np.pad(fixed == lab, 1), np.pad(warped == lab, 1), spacing, 95.0)
        assert hd[lab] == pytest.approx(whole, abs=1e-9)


def test_label_scores_summarize_dice_and_hd95_per_label():
    fixed = np.zeros((12, 12, 12), np.int16)
    fixed[2:6, 2:6, 2:6], fixed[7:11, 7:11, 7:11], fixed[0, 11, 0] = 1, 2, 4
    warped = np.zeros_like(fixed)
    warped[3:7, 2:6, 2:6], warped[7:11, 7:11, 7:11] = 1, 2   # label 1 shifted one voxel along z, 2 identical
    s = label_scores(fixed, warped, (1.0, 1.0, 2.0))
    assert s["dice_per_label"] == {1: pytest.approx(0.75), 2: 1.0, 4: 0.0}
    assert s["dice_mean"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert s["dice_p30"] == pytest.approx(np.percentile([0.75, 1.0, 0.0], 30))
    assert s["hd95_per_label_mm"][1] == pytest.approx(2.0) and s["hd95_per_label_mm"][2] == 0.0
    assert np.isnan(s["hd95_per_label_mm"][4])                 # missing from the warped map
    assert s["hd95_mean_mm"] == pytest.approx(1.0)             # over the labels present in both
    dice_only = label_scores(fixed, warped, None, labels=[2, 9])
    assert "hd95_mean_mm" not in dice_only and np.isnan(dice_only["dice_per_label"][9])  # absent from both
    assert dice_only["dice_mean"] == dice_only["dice_p30"] == 1.0


# ---------------------------------------------------------------------------------------------- Jacobian
def _oblique_grid() -> Grid:
    direction = _rotation([1.0, 2.0, -0.5], 0.7) @ np.diag([1.0, -1.0, 1.0])   # oblique and flipped
    return Grid(shape=(6, 7, 9), spacing=(0.8, 1.3, 2.1), origin=(-10.0, 4.0, 30.0),
                direction=tuple(direction.ravel()))


def test_jacobian_of_linear_field_on_oblique_anisotropic_grid():
    grid = _oblique_grid()
    rng = np.random.default_rng(0)
    m = rng.normal(scale=0.2, size=(3, 3))                      # non-symmetric
    world = grid.world_points()                                 # (Z, Y, X, 3)
    u = np.moveaxis(world @ m.T + [1.0, -2.0, 0.5], -1, 0)      # (3, Z, Y, X), u = M x + t
    a = np.eye(4)
    a[:3, :3] = _rotation([0, 1, 1], 0.3) @ np.diag([1.1, 0.9, 1.3])
    a[:3, 3] = [5.0, 6.0, 7.0]
    det = jacobian_determinant(u, grid, affine=a)
    assert det.shape == grid.shape and det.dtype == np.float64
    np.testing.assert_allclose(det, np.linalg.det(a[:3, :3]) * np.linalg.det(np.eye(3) + m), rtol=1e-10)
    # processing in slabs of Z slices gives the same answer
    np.testing.assert_allclose(jacobian_determinant(u, grid, affine=a, slab=2), det, rtol=1e-12)


@pytest.mark.parametrize("direction", ["identity", "flipped", "oblique"])
def test_jacobian_of_a_nonlinear_float32_field_equals_the_whole_volume_definition(direction):
    d = {"identity": np.eye(3), "flipped": np.diag([-1.0, 1.0, -1.0]),
         "oblique": _rotation([1, 2, 3], 0.4)}[direction]
    grid = Grid(shape=(9, 11, 13), spacing=(1.5, 2.0, 2.5), origin=(3.0, -4.0, 5.0), direction=tuple(d.ravel()))
    rng = np.random.default_rng(3)
    u = rng.normal(scale=0.8, size=(3, *grid.shape)).astype(np.float32)  # rough: folds in places
    # reference: J = I + (du/d index) @ inv(D diag(spacing)) on the whole volume, det by numpy
    g = np.stack([np.gradient(u.astype(np.float64), axis=ax) for ax in (3, 2, 1)], axis=-1)  # (3, Z, Y, X, a)
    jac = np.moveaxis(g, 0, -2) @ np.linalg.inv(grid.voxel_to_mm) + np.eye(3)  # (Z, Y, X, c, d)
    a = np.diag([1.1, 0.9, -1.2, 1.0])
    expected = np.linalg.det(jac) * np.linalg.det(a[:3, :3])
    det = jacobian_determinant(u, grid, affine=a, slab=4)
    np.testing.assert_allclose(det, expected, rtol=1e-9, atol=1e-12)
    assert 0 < folding_percent(det) < 100


def test_jacobian_of_identity_and_of_affine_only():
    grid = _oblique_grid()
    zero = np.zeros((3, *grid.shape))
    np.testing.assert_array_equal(jacobian_determinant(zero, grid), 1.0)
    a = np.diag([2.0, 1.5, -1.0, 1.0])
    np.testing.assert_allclose(jacobian_determinant(zero, grid, affine=a), -3.0)
    with pytest.raises(ValueError, match="shape"):
        jacobian_determinant(np.zeros((3, 6, 7, 8)), grid)


def test_folding_of_a_field_with_a_fold():
    grid = Grid(shape=(4, 5, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    u = np.zeros((3, *grid.shape))
    u[0, :, :, 5] = 3.0      # one slab pushed 3 mm along +x: det = 1 + 1.5 before it, 1 - 1.5 after it
    det = jacobian_determinant(u, grid)
    np.testing.assert_allclose(det[:, :, 4], 2.5)
    np.testing.assert_allclose(det[:, :, 6], -0.5)
    assert np.count_nonzero(det <= 0) == 4 * 5
    assert folding_percent(det) == pytest.approx(10.0)
    assert folding_percent(np.ones((3, 3))) == 0.0


# ---------------------------------------------------------------------------------------------- SDlogJ
def test_sdlogj_identity_and_known_values():
    assert sdlogj(np.ones((8, 8, 8))) == {"sdlogj_l2r": 0.0, "sdlogj": 0.0}
    det = np.ones((8, 8, 8))
    det[:2] = 50.0                          # inside the 2-voxel border: cropped away
    det[2:6, 2:6, 2:4] = 2.0                # half of the 4x4x4 interior
    det[2:6, 2:6, 4:6] = 0.5
    out = sdlogj(det)
    assert out["sdlogj"] == pytest.approx(np.log(2.0))                     # std of ±log 2
    assert out["sdlogj_l2r"] == pytest.approx(0.5 * (np.log(5.0) - np.log(3.5)))
    det[2, 2, 2] = -1.0                     # folded voxel: excluded from sdlogj, kept (clipped log) in l2r
    out = sdlogj(det)
    assert np.isfinite(out["sdlogj_l2r"]) and np.isfinite(out["sdlogj"])
    assert sdlogj(det, crop=0)["sdlogj"] > out["sdlogj"]
    assert np.isnan(sdlogj(-np.ones((5, 5, 5)))["sdlogj"])


# ---------------------------------------------------------------------------------------------- TRE / summary
def test_tre_and_summary():
    d = tre_mm([[0, 0, 0], [1, 2, 2]], [[3, 4, 0], [1, 2, 2]])
    np.testing.assert_allclose(d, [5.0, 0.0])
    with pytest.raises(ValueError):
        tre_mm(np.zeros((2, 3)), np.zeros((3, 3)))
    s = summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s == pytest.approx({"mean": 2.5, "std": np.std([1, 2, 3, 4]), "median": 2.5, "p30": 1.9, "max": 4.0,
                               "n": 4})
    empty = summarize([])
    assert empty["n"] == 0 and all(np.isnan(empty[k]) for k in ("mean", "std", "median", "p30", "max"))
