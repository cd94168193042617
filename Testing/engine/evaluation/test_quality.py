"""Quality control of a registration: the verdict (pure rules and on real registrations), the explainability
maps' geometry in any orientation, and the restart spread's meaning (larger where the images are blank)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.evaluation import explain, quality
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk, read_image, sitk_to_image
from DeepRegistrationLib.registration.pipeline import register
from DeepRegistrationLib.spatial.resampling import sample_on_grid
from DeepRegistrationLib.spatial.transforms import SpatialTransform
from DeepRegistrationLib.evaluation.uncertainty import restart_spread


def rotation(axis, degrees: float) -> np.ndarray:
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def rotated(image: Image, axis, degrees: float) -> Image:
    """The same voxels placed rotated about the field-of-view centre (a new header, no resampling)."""
    rot = rotation(axis, degrees)
    g = image.grid
    c = g.center()
    origin = c + rot @ (np.asarray(g.origin) - c)
    return Image(image.array, Grid(g.shape, g.spacing, tuple(origin), tuple((rot @ g.direction_matrix).ravel())),
                 image.name)


@pytest.fixture(scope="module")
def pair(sample_dir):
    return (read_image(sample_dir / "fixed.nii.gz", "fixed image"),
            read_image(sample_dir / "moving.nii.gz", "moving image"))


GOOD = {"similarity": "lncc", "loss_before": 0.7, "loss_after": 0.05, "ncc_before": 0.8, "ncc_after": 0.99,
        "local_cc2": 0.95, "overlap_fraction": 1.0, "foreground_dice": 0.97, "folding_percent": 0.0,
        "extreme_jacobian_percent": 0.0, "rotation_deg": 8.0, "scale_min": 0.94, "scale_max": 1.05,
        "reflection": False}


def test_rules_name_each_reason_and_skip_missing_signals():
    assert quality.assess(GOOD)["verdict"] == "ok" and quality.assess(GOOD)["reasons"] == []
    assert quality.assess({})["verdict"] == "ok"  # nothing measured: nothing to flag
    q = quality.assess({**GOOD, "rotation_deg": 120.0})
    assert q["verdict"] == "suspect" and "rotation" in q["reasons"][0]
    q = quality.assess({**GOOD, "local_cc2": 0.2, "foreground_dice": 0.6, "folding_percent": float("nan")})
    assert q["verdict"] == "failed" and len(q["reasons"]) == 2
    # multi-modal: intensity correlation says nothing, only the geometric criteria count
    assert quality.assess({**GOOD, "similarity": "mi", "ncc_after": -0.3, "local_cc2": 0.1})["verdict"] == "ok"
    assert quality.assess({**GOOD, "scale_max": 2.5})["verdict"] == "failed"
    assert quality.assess({**GOOD, "landmark_residual_mm": 8.0})["verdict"] == "suspect"
    q = quality.assess({**GOOD, "uncertainty_median_mm": 3.0, "uncertainty_perturbation_mm": 4.5})
    assert q["verdict"] == "suspect" and "restarts disagree" in q["reasons"][0]
    assert quality.summary_line(q).startswith("quality: suspect (restarts disagree")


def test_linear_part_measures_rotation_scale_and_reflection():
    a = np.eye(4)
    a[:3, :3] = rotation((1, 2, 0.5), 120) @ np.diag([1.1, 0.9, 1.0])
    lp = explain.linear_part(a)
    assert lp["rotation_deg"] == pytest.approx(120, abs=1e-6)
    assert (lp["scale_min"], lp["scale_max"]) == (pytest.approx(0.9), pytest.approx(1.1))
    assert not lp["reflection"] and explain.linear_part(np.diag([-1.0, 1, 1, 1]))["reflection"]


def test_failed_registration_is_flagged_and_the_bundled_pair_is_ok(pair):
    """A 120° rotation with the initialization search off ends in a wrong optimum: ``failed``; the bundled
    pair with the same settings: ``ok``."""
    fixed, moving = pair
    cfg = RegistrationConfig(spacing=4.0, threads=2, initialization="moments")
    good = register(fixed, moving, cfg)
    q = quality.assess(quality.signals_from_result(good, fixed, moving))
    assert q["verdict"] == "ok", q["reasons"]
    turned = rotated(moving, (1, 0, 0), 120)
    bad = register(fixed, turned, cfg)
    assert bad.ncc_after > bad.ncc_before  # "NCC went up": not a sign of success by itself
    q = quality.assess(quality.signals_from_result(bad, fixed, turned))
    assert q["verdict"] == "failed", q


def _reoriented(image: Image, code: str) -> Image:
    """The same physical image stored in another axis order / direction (SimpleITK DICOMOrient), then tilted."""
    return sitk_to_image(sitk.DICOMOrient(image_to_sitk(image), code), image.name)


@pytest.mark.parametrize("code", ["LPS", "ASL", "RIA"])
def test_maps_lie_on_the_fixed_grid_in_any_orientation(pair, code):
    """Every map has exactly the fixed image's geometry, and the maps of one physical fixed image stored in
    different axis orders agree at the same physical points (displacement exactly, the others closely)."""
    fixed, moving = pair
    a = np.eye(4)
    a[:3, :3] = rotation((0.3, 1, 0.2), 6)
    a[:3, 3] = (4.0, -3.0, 2.0)
    t = SpatialTransform(a)
    cfg = RegistrationConfig(spacing=4.0)
    ref = explain.explanation_maps(fixed, moving, t, cfg)
    f2 = rotated(_reoriented(fixed, code), (0, 0, 1), 0.0) if code != "LPS" else fixed
    maps = explain.explanation_maps(f2, moving, t, cfg)
    assert set(maps) == {"residual", "local_similarity", "displacement"}
    inner = (slice(3, -3),) * 3
    for name, img in maps.items():
        assert img.grid.same_as(f2.grid) and img.array.shape == f2.grid.shape and img.array.dtype == np.float32
        back = sample_on_grid(img.array, f2.grid, fixed.grid)[inner]
        tol = {"displacement": 1e-3, "residual": 0.02, "local_similarity": 0.05}[name]
        assert np.median(np.abs(back - ref[name].array[inner])) < tol, name
    # |T(x) - x| for a rigid map is known in closed form at every voxel centre
    pts = f2.grid.world_points()
    expected = np.linalg.norm(pts @ a[:3, :3].T + a[:3, 3] - pts, axis=-1)
    assert np.allclose(maps["displacement"].array, expected, atol=1e-3)


def test_identical_images_have_no_residual_and_full_local_similarity(pair):
    fixed, _ = pair
    maps = explain.explanation_maps(fixed, fixed, SpatialTransform.identity(), RegistrationConfig())
    assert float(np.abs(maps["residual"].array).max()) < 1e-4
    local = maps["local_similarity"].array
    assert np.median(local[fixed.array > np.percentile(fixed.array, 60)]) > 0.99
    assert float(np.abs(maps["displacement"].array).max()) < 1e-4


def test_uncertainty_is_larger_in_a_blank_region_than_in_the_anatomy(pair):
    """Identical images (identity is the optimum) with a cube blanked inside the brain in both: the restarts'
    spread inside the cube is several times its spread in the textured anatomy."""
    fixed, _ = pair
    arr = fixed.array.copy()
    z, y, x = (n // 2 for n in arr.shape)
    h = 12  # voxels (a 72 mm cube at 3 mm)
    arr[z - h:z + h, y - h:y + h, x - h:x + h] = float(np.median(arr[arr > arr.mean()]))
    img = Image(arr, fixed.grid, "blanked")
    cfg = RegistrationConfig(spacing=4.5, lncc_radius=2, threads=2)  # a coarse grid keeps the test short
    unc = restart_spread(img, img, SpatialTransform.identity(), cfg)
    spread = unc.on_grid(fixed.grid)
    assert spread.grid.same_as(fixed.grid)
    m = 2 * (cfg.lncc_radius + 1)  # fine voxels from the cube's faces to windows that see no edge
    cube = spread.array[z - h + m:z + h - m, y - h + m:y + h - m, x - h + m:x + h - m]
    outside_cube = np.ones(arr.shape, bool)
    outside_cube[z - h - 3:z + h + 3, y - h - 3:y + h + 3, x - h - 3:x + h + 3] = False
    anatomy = outside_cube & (sample_on_grid(unc.anatomy.astype(np.float32), unc.grid, fixed.grid) > 0.99)
    blank, textured = float(np.median(cube)), float(np.median(spread.array[anatomy]))
    assert blank > 2.0 * textured, (blank, textured)
    s = unc.summary()
    assert 0 < s["median_mm"] < s["perturbation_mm"] and s["p95_mm"] >= s["median_mm"]


def test_fail_on_sets_the_exit_status_from_the_verdict():
    from DeepRegistrationLib.apps.cli import build_parser
    from DeepRegistrationLib.apps.register_command import verdict_status as _verdict_status

    assert build_parser().parse_args(["register", "f", "m", "-o", "o", "--fail-on", "suspect"]).fail_on == "suspect"
    report = {"quality": {"verdict": "suspect", "reasons": ["local similarity low"]}}
    assert _verdict_status(report, None) == 0
    assert _verdict_status(report, "failed") == 0
    assert _verdict_status(report, "suspect") == 3
    assert _verdict_status({"quality": {"verdict": "failed"}}, "suspect") == 3
    assert _verdict_status({"quality": {"verdict": "ok"}}, "suspect") == 0
    assert _verdict_status({}, "suspect") == 0  # no verdict (e.g. an older report): nothing to fail on


def test_local_mi_map_for_mi_registrations_is_invariant_to_a_contrast_inversion(pair):
    """With ``similarity="mi"`` the local similarity map is the local MI: the same for the image against
    itself and against its inverted contrast (MI ignores a one-to-one intensity change), and several times
    higher there than against an unrelated image (smooth noise)."""
    fixed, _ = pair
    cfg = RegistrationConfig(spacing=4.0, similarity="mi")
    inverted = Image(fixed.array.max() - fixed.array, fixed.grid, "inverted")
    rng = np.random.default_rng(0)
    noise = Image(sample_on_grid(rng.random((12, 14, 12)).astype(np.float32),
                                 Grid((12, 14, 12), tuple(np.asarray(fixed.grid.spacing) * np.asarray(fixed.grid.shape)
                                                          / (12, 14, 12)), fixed.grid.origin,
                                      fixed.grid.direction), fixed.grid), fixed.grid, "noise")
    anatomy = fixed.array > np.percentile(fixed.array, 60)
    med = {}
    for name, moving in (("same", fixed), ("inverted", inverted), ("noise", noise)):
        local = explain.explanation_maps(fixed, moving, SpatialTransform.identity(), cfg)["local_similarity"]
        assert local.grid.same_as(fixed.grid)
        med[name] = float(np.median(local.array[anatomy]))
    assert med["inverted"] == pytest.approx(med["same"], rel=0.1), med
    assert med["same"] > 0.5 and med["noise"] < 0.25 * med["same"], med
