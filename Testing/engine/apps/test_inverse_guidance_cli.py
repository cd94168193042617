"""``register`` writes ``inverse.h5`` with its consistency error, takes ``--guide-landmarks``, and refuses bad
guide input with one clear error and nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.apps.cli import main
from DeepRegistrationLib.spatial.inverse import foreground_points
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.io.landmarks import Landmarks, match_landmarks, read_landmarks, write_landmarks_csv

FAST = ["--quiet", "--no-png", "--iterations", "5", "--affine-iterations", "10", "--levels", "2",
        "--threads", "2", "--device", "cpu"]
#: The guide points (indices into the bundled pair's matched landmarks); the others are held out.
GUIDE_PICK = [0, 9, 18, 27, 36, 45]


@pytest.fixture(scope="module")
def guided(tmp_path_factory, sample_dir):
    tmp = tmp_path_factory.mktemp("guided")
    f, m, labels = match_landmarks(read_landmarks(sample_dir / "fixed_landmarks.csv"),
                                   read_landmarks(sample_dir / "moving_landmarks.csv"))
    pick = GUIDE_PICK
    write_landmarks_csv(Landmarks([labels[n] for n in pick], f[pick]), tmp / "gf.csv")
    write_landmarks_csv(Landmarks([labels[n] for n in pick], m[pick]), tmp / "gm.csv")
    out = tmp / "out"
    code = main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--guide-landmarks", str(tmp / "gf.csv"), str(tmp / "gm.csv"),
                 "--fixed-labels", str(sample_dir / "fixed_labels.nii.gz"),
                 "--moving-labels", str(sample_dir / "moving_labels.nii.gz"), *FAST])
    assert code == 0
    return out


def test_inverse_h5_composed_with_transform_is_identity_within_the_reported_error(guided, sample_dir):
    report = json.loads((guided / "report.json").read_text())
    inv = report["inverse"]
    assert inv["method"] == "fixed-point" and inv["consistency_mm"]["n"] > 1000
    fwd_tx = sitk.ReadTransform(str(guided / "transform.h5"))
    inv_tx = sitk.ReadTransform(str(guided / "inverse.h5"))
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    y = foreground_points(moving.array, moving.grid, max_points=2000)
    back = np.array([fwd_tx.TransformPoint(inv_tx.TransformPoint(tuple(p))) for p in y])
    err = np.linalg.norm(back - y, axis=1)
    assert np.percentile(err, 95) <= inv["consistency_mm"]["p95_mm"] + 0.05, (np.percentile(err, 95), inv)
    assert inv["consistency_mm"]["p95_mm"] < 0.5, inv  # well below the 3 mm voxel
    # and the inverse really is the other direction (not the identity)
    assert np.linalg.norm(np.array([inv_tx.TransformPoint(tuple(p)) for p in y]) - y, axis=1).mean() > 1.0


def test_symmetric_register_writes_the_exact_velocity_inverse(tmp_path, sample_dir):
    """``register --symmetric`` (midpoint frame): ``inverse.h5`` is the negated velocity, and composed with
    ``transform.h5`` in SimpleITK it is the identity to well under a tenth of a millimetre (6 mm grid)."""
    out = tmp_path / "sym"
    assert main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--symmetric", "--spacing", "6", *FAST]) == 0
    inv = json.loads((out / "report.json").read_text())["inverse"]
    assert inv["method"] == "velocity" and inv["consistency_mm"]["p95_mm"] < 0.1, inv
    fwd_tx = sitk.ReadTransform(str(out / "transform.h5"))
    inv_tx = sitk.ReadTransform(str(out / "inverse.h5"))
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    y = foreground_points(moving.array, moving.grid, max_points=2000)
    back = np.array([fwd_tx.TransformPoint(inv_tx.TransformPoint(tuple(p))) for p in y])
    assert np.percentile(np.linalg.norm(back - y, axis=1), 95) < 0.1


def test_guide_landmarks_are_reported(guided):
    g = json.loads((guided / "report.json").read_text())["guidance"]
    assert g["n"] == 6 and g["start"].startswith("rigid least-squares")
    assert g["distance_after_mm"]["mean"] < 3.0, g


def test_guide_landmarks_do_not_make_the_easy_pair_worse(guided, tmp_path, sample_dir):
    """Same settings without guide points: the held-out landmarks' TRE and the Dice are no better."""
    f, m, labels = match_landmarks(read_landmarks(sample_dir / "fixed_landmarks.csv"),
                                   read_landmarks(sample_dir / "moving_landmarks.csv"))
    held = [n for n in range(len(f)) if n not in GUIDE_PICK]
    out = tmp_path / "plain"
    assert main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 "--fixed-labels", str(sample_dir / "fixed_labels.nii.gz"),
                 "--moving-labels", str(sample_dir / "moving_labels.nii.gz"), *FAST]) == 0
    result = {}
    for name, folder in (("plain", out), ("guided", guided)):
        tx = sitk.ReadTransform(str(folder / "transform.h5"))
        mapped = np.array([tx.TransformPoint(tuple(p)) for p in f[held]])
        dice = json.loads((folder / "report.json").read_text())["metrics"]["labels"]["after"]["dice_mean"]
        result[name] = (np.linalg.norm(mapped - m[held], axis=1).mean(), dice)
    assert result["guided"][0] < result["plain"][0] + 0.25, result
    assert result["guided"][1] > result["plain"][1] - 0.01, result


def _refused(capsys, out, code, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("deepregistration: error:"), err
    for w in words:
        assert w.lower() in err[0].lower(), (w, err[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_guide_landmarks_write_nothing(tmp_path, sample_dir, capsys):
    pair = [str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz")]
    good = sample_dir / "fixed_landmarks.csv"
    out = tmp_path / "out"
    code = main(["register", *pair, "-o", str(out), "--guide-landmarks", str(good), str(tmp_path / "no.csv"), *FAST])
    _refused(capsys, out, code, "does not exist")
    write_landmarks_csv(Landmarks(["a", "b"], np.zeros((2, 3))), tmp_path / "two.csv")
    code = main(["register", *pair, "-o", str(out), "--guide-landmarks", str(tmp_path / "two.csv"),
                 str(tmp_path / "two.csv"), *FAST])
    _refused(capsys, out, code, "at least 3")
    write_landmarks_csv(Landmarks(["a", "b", "c"], [[0, 0, 0], [900, 0, 0], [0, 10, 0]]), tmp_path / "far.csv")
    code = main(["register", *pair, "-o", str(out), "--guide-landmarks", str(tmp_path / "far.csv"),
                 str(tmp_path / "far.csv"), *FAST])
    _refused(capsys, out, code, "outside the fixed image")
