"""Quality outputs of a registration run, end to end: ``explain/`` maps and ``uncertainty.nii.gz`` with the
exact geometry of an oblique fixed image (and values that agree with the written transform), report.json
entries and report.png's extra rows; the CLI summary line and ``--fail-on`` for a deliberately failed
registration; the guide landmarks' residual in the verdict. CI-sized: 6 mm grids, a few iterations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.io.landmarks import Landmarks, match_landmarks, read_landmarks, write_landmarks_csv
from DeepRegistrationLib.registration.run import EXPLAIN_FILES, run_registration

CFG = RegistrationConfig(spacing=6.0, levels=2, iterations=5, affine_iterations=10, initialization="moments",
                         threads=1)


def _rotation(axis, degrees: float) -> np.ndarray:
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _small(path: Path, tilt: np.ndarray | None = None) -> sitk.Image:
    """The bundled 3 mm image at 6 mm; with ``tilt`` the same voxels placed rotated about the centre
    (an oblique header, direction not a permutation)."""
    img = sitk.ReadImage(str(path))
    img = sitk.Resample(img, [s // 2 for s in img.GetSize()], sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        [6.0] * 3, img.GetDirection())
    if tilt is not None:
        d = np.asarray(img.GetDirection()).reshape(3, 3)
        c = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))
        img.SetOrigin(tuple(c + tilt @ (np.asarray(img.GetOrigin()) - c)))
        img.SetDirection(tuple((tilt @ d).ravel()))
    return img


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run_quality")
    sitk.WriteImage(_small(SAMPLE / "fixed.nii.gz"), str(d / "fixed.nii.gz"))
    sitk.WriteImage(_small(SAMPLE / "fixed.nii.gz", _rotation((0.3, 1.0, 0.4), 25)), str(d / "fixed_oblique.nii.gz"))
    sitk.WriteImage(_small(SAMPLE / "moving.nii.gz"), str(d / "moving.nii.gz"))
    turned = _small(SAMPLE / "moving.nii.gz", _rotation((1, 0, 0), 120))
    sitk.WriteImage(turned, str(d / "moving_turned.nii.gz"))
    return d


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def test_maps_and_uncertainty_have_the_oblique_fixed_grid(tmp_path, data):
    fixed_path = data / "fixed_oblique.nii.gz"
    fixed = sitk.ReadImage(str(fixed_path))
    assert not np.allclose(np.abs(np.asarray(fixed.GetDirection())), np.eye(3).ravel())  # truly oblique
    seen = []
    run = run_registration(fixed_path, data / "moving.nii.gz", tmp_path / "out", CFG, explain=True,
                           uncertainty=True, progress=lambda f, m: seen.append((f, m)) or True)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # monotonic with the extra stages
    assert any(m.startswith("uncertainty") for _, m in seen) and any(m == "explainability maps" for _, m in seen)
    out = run.out_dir
    maps = {n: sitk.ReadImage(str(out / "explain" / f"{n}.nii.gz")) for n in EXPLAIN_FILES}
    maps["uncertainty"] = sitk.ReadImage(str(out / "uncertainty.nii.gz"))
    for name, img in maps.items():
        assert _same_geometry(img, fixed), name
    arr = {n: sitk.GetArrayFromImage(m) for n, m in maps.items()}
    assert 0 <= arr["residual"].min() and arr["residual"].max() <= 1
    assert 0 <= arr["local_similarity"].min() and arr["local_similarity"].max() <= 1 + 1e-6
    assert arr["uncertainty"].min() >= 0 and np.isfinite(arr["uncertainty"]).all()
    # the displacement map is |T(x) - x| of the written transform at each voxel centre of the fixed file
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    rng = np.random.default_rng(0)
    size = fixed.GetSize()
    for idx in rng.integers(2, np.asarray(size) - 2, size=(15, 3)):
        p = np.asarray(fixed.TransformIndexToPhysicalPoint([int(i) for i in idx]))
        expected = np.linalg.norm(np.asarray(tx.TransformPoint(tuple(p))) - p)
        assert arr["displacement"][idx[2], idx[1], idx[0]] == pytest.approx(expected, abs=0.05)
    report = json.loads((out / "report.json").read_text())
    assert set(report["explain"]["files"].values()) == {f"explain/{n}.nii.gz" for n in EXPLAIN_FILES}
    u = report["uncertainty"]
    assert u["file"] == "uncertainty.nii.gz" and 0 <= u["median_mm"] <= u["p95_mm"]
    signals = report["quality"]["signals"]
    assert signals["uncertainty_median_mm"] == u["median_mm"] and signals["uncertainty_perturbation_mm"] > 0
    assert "uncertainty" in report["timings_s"]
    import matplotlib.image

    png = matplotlib.image.imread(str(out / "report.png"))
    assert png.shape[0] > png.shape[1]  # six rows of panels (three without the maps: wider than tall)


def test_default_run_writes_no_maps(tmp_path, data):
    run = run_registration(data / "fixed.nii.gz", data / "moving.nii.gz", tmp_path / "out",
                           RegistrationConfig(mode="rigid", spacing=6.0, levels=1, affine_iterations=10,
                                              initialization="moments", threads=1), write_png=False)
    names = {p.name for p in run.out_dir.iterdir()}
    assert "explain" not in names and "uncertainty.nii.gz" not in names
    assert "explain" not in run.report and "uncertainty" not in run.report and "quality" in run.report


def test_cli_says_failed_for_a_120_degree_rotation_without_the_search(tmp_path, data, capsys):
    from DeepRegistrationLib.apps.cli import main

    args = ["register", str(data / "fixed.nii.gz"), str(data / "moving_turned.nii.gz"), "--spacing", "6",
            "--levels", "2", "--iterations", "5", "--affine-iterations", "20", "--init", "none",
            "--threads", "1", "-q", "--no-png"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0  # the verdict alone does not change the status
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["quality"]["verdict"] == "failed", report["quality"]
    assert "quality: failed (" in text
    assert main(args + ["-o", str(tmp_path / "b"), "--fail-on", "failed"]) == 3
    assert (tmp_path / "b" / "report.json").is_file()  # written either way


def test_wrong_guide_landmarks_fail_the_verdict(tmp_path, data):
    """Guide landmarks paired wrongly (each fixed point with another point's partner) leave a residual of
    centimetres after any rigid registration: the verdict names it."""
    fixed_pts, moving_pts, _ = match_landmarks(read_landmarks(SAMPLE / "fixed_landmarks.csv"),
                                            read_landmarks(SAMPLE / "moving_landmarks.csv"))
    chosen = np.arange(0, len(fixed_pts), max(1, len(fixed_pts) // 6))[:6]  # spread over the list
    labels = [f"p{i}" for i in range(len(chosen))]
    write_landmarks_csv(Landmarks(labels, fixed_pts[chosen]), tmp_path / "gf.csv")
    write_landmarks_csv(Landmarks(labels, np.roll(moving_pts[chosen], 2, axis=0)), tmp_path / "gm.csv")
    run = run_registration(data / "fixed.nii.gz", data / "moving.nii.gz", tmp_path / "out",
                           RegistrationConfig(mode="rigid", spacing=6.0, levels=1, affine_iterations=10,
                                              initialization="moments", threads=1), write_png=False,
                           guide_fixed_landmarks=tmp_path / "gf.csv", guide_moving_landmarks=tmp_path / "gm.csv")
    q = run.report["quality"]
    assert q["signals"]["landmark_residual_mm"] == pytest.approx(run.report["guidance"]["distance_after_mm"]["mean"])
    assert q["signals"]["landmark_residual_mm"] > 15
    assert q["verdict"] == "failed" and any("landmark residual" in r for r in q["reasons"])


def test_working_pair_maps_the_field_nodes_with_the_field_values():
    """The quality signals' working grid lies on the field grid's nodes (one voxel inside it): T there is the
    field's values, the same points as sampling the field (float32 rounding); a grid off the nodes samples."""
    import torch

    from conftest import random_smooth_field
    from DeepRegistrationLib.core.grid import Grid
    from DeepRegistrationLib.evaluation import explain as E
    from DeepRegistrationLib.spatial import warp as W
    from DeepRegistrationLib.spatial.transforms import SpatialTransform

    rng = np.random.default_rng(7)
    flip = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    field_grid = Grid((12, 14, 16), (2.0, 2.0, 2.0), (40.0, 30.0, -20.0), flip)
    working = Grid((10, 12, 14), (2.0, 2.0, 2.0), (38.0, 28.0, -18.0), flip)
    a = np.eye(4)
    a[:3, 3] = (3.0, -2.0, 1.0)
    t = SpatialTransform(a, random_smooth_field(field_grid.shape, rng, max_mm=4.0), field_grid)
    assert E._node_slices(working, field_grid) == (slice(1, 11), slice(1, 13), slice(1, 15))
    pts = W.grid_points(working)
    sampled = W.map_points(pts, torch.as_tensor(a, dtype=torch.float32),
                           torch.as_tensor(t.field, dtype=torch.float32)[None], field_grid)
    np.testing.assert_allclose(E._map(t, pts, grid=working).numpy(), sampled.numpy(), atol=1e-4)
    half = Grid(working.shape, working.spacing, (37.0, 28.0, -18.0), flip)
    beyond = Grid((12, 14, 16), (2.0, 2.0, 2.0), (38.0, 28.0, -18.0), flip)
    assert E._node_slices(half, field_grid) is None and E._node_slices(beyond, field_grid) is None
