"""The bundled sample pair through the command line: outputs, metrics, and interoperability with SimpleITK."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.apps.cli import main
from DeepRegistrationLib.core.errors import Cancelled
from DeepRegistrationLib.io.landmarks import match_landmarks, read_landmarks
from DeepRegistrationLib.registration.run import OUTPUT_FILES, run_registration
from DeepRegistrationLib.spatial.transforms import SpatialTransform


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("e2e") / "out"
    code = main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--fixed-labels", str(sample_dir / "fixed_labels.nii.gz"),
                 "--moving-labels", str(sample_dir / "moving_labels.nii.gz"),
                 "--fixed-landmarks", str(sample_dir / "fixed_landmarks.csv"),
                 "--moving-landmarks", str(sample_dir / "moving_landmarks.mrk.json"), "--quiet"])
    assert code == 0
    return out


def test_outputs_and_report(run_dir):
    for name in OUTPUT_FILES + ("warped_labels.nii.gz",):
        assert (run_dir / name).stat().st_size > 0, name
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("similarity", "deformation", "metrics", "timings_s", "parameters", "versions", "device"):
        assert key in report
    assert report["similarity"]["ncc_after"] > report["similarity"]["ncc_before"]
    assert report["deformation"]["folding_percent"] < 0.05
    assert set(report["timings_s"]) >= {"read", "preprocess", "linear", "deformable"}


def test_dice_and_tre_improve(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    labels = report["metrics"]["labels"]
    before, after = labels["before"]["dice_mean"], labels["after"]["dice_mean"]
    # 3 mm labels: even the ground-truth transform reaches only Dice 0.863 (two nearest-neighbour steps,
    # see SampleData/README.md); no registration gives 0.109.
    assert before < 0.2 and after > 0.82, (before, after)
    assert labels["after"]["hd95_mean_mm"] < labels["before"]["hd95_mean_mm"]
    tre = report["metrics"]["landmarks"]
    assert tre["after"]["mean"] < 0.3 * tre["before"]["mean"], tre


def test_simpleitk_applies_our_transform_identically(run_dir, sample_dir):
    """SimpleITK resampling the moving image with transform.h5 reproduces warped.nii.gz."""
    fixed = sitk.ReadImage(str(sample_dir / "fixed.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(sample_dir / "moving.nii.gz"), sitk.sitkFloat32)
    tx = sitk.ReadTransform(str(run_dir / "transform.h5"))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
    ours_img = sitk.ReadImage(str(run_dir / "warped.nii.gz"))
    assert ours_img.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(ours_img.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    ours = sitk.GetArrayFromImage(ours_img)
    scale = np.percentile(np.abs(theirs), 99)
    diff = np.abs(ours - theirs) / scale
    assert np.percentile(diff, 99.9) < 1e-3 and diff.max() < 0.05, (np.percentile(diff, 99.9), diff.max())
    # labels too (nearest neighbour): identical except at rare ties
    lab = sitk.ReadImage(str(sample_dir / "moving_labels.nii.gz"))
    theirs_lab = sitk.GetArrayFromImage(sitk.Resample(lab, fixed, tx, sitk.sitkNearestNeighbor, 0))
    ours_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(run_dir / "warped_labels.nii.gz")))
    assert (theirs_lab == ours_lab).mean() > 0.999


def test_landmark_mapping_agrees_with_simpleitk(run_dir, sample_dir):
    fixed_pts, moving_pts, _ = match_landmarks(read_landmarks(sample_dir / "fixed_landmarks.csv"),
                                               read_landmarks(sample_dir / "moving_landmarks.csv"))
    tx = sitk.ReadTransform(str(run_dir / "transform.h5"))
    ours = SpatialTransform.from_sitk(tx).map_points(fixed_pts)
    theirs = np.array([tx.TransformPoint(tuple(p)) for p in fixed_pts])
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_jacobian_map(run_dir, sample_dir):
    jac = sitk.ReadImage(str(run_dir / "jacobian.nii.gz"))
    fixed = sitk.ReadImage(str(sample_dir / "fixed.nii.gz"))
    assert jac.GetSize() == fixed.GetSize()
    arr = sitk.GetArrayFromImage(jac)
    assert 0.5 < np.median(arr) < 1.5 and (arr > 0).mean() > 0.999


def test_cancel_leaves_nothing(tmp_path, sample_dir):
    out = tmp_path / "cancelled"
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        return fraction < 0.5

    with pytest.raises(Cancelled):
        run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", out, progress=progress)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert max(seen) < 0.6 and seen == sorted(seen)


def test_overwrite_replaces_only_when_complete(tmp_path, sample_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code = main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--overwrite", "--mode", "rigid", "--quiet", "--no-png"])
    assert code == 0
    assert not (out / "old.txt").exists() and (out / "transform.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

