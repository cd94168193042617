"""``deepregistration apply``: the command line over :func:`~DeepRegistrationLib.workflows.apply.apply_transform`
(exit 0 with what was done on stdout, exit 2 with one message and nothing written, listed in the help)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from DeepRegistrationLib.apps.cli import main
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.io.landmarks import read_landmarks
from DeepRegistrationLib.registration.run import run_registration

CFG = dict(mode="affine", initialization="moments", affine_iterations=10, levels=2, spacing=6.0, device="cpu",
           threads=2)


@pytest.fixture(scope="module")
def result(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("apply_cli") / "out"
    return run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", out, RegistrationConfig(**CFG),
                            write_png=False, warped="full").out_dir


def test_apply_writes_registers_warped_image(result, sample_dir, tmp_path, capsys):
    out = tmp_path / "w.nii.gz"
    rc = main(["apply", str(sample_dir / "moving.nii.gz"), "-t", str(result), "-o", str(out), "-q", "--threads", "1"])
    stdout = capsys.readouterr().out
    assert rc == 0 and f"output: {out}" in stdout and "linear interpolation, float32" in stdout
    assert out.read_bytes() == (result / "warped.nii.gz").read_bytes()


def test_apply_maps_points_with_the_inverted_linear_result(result, sample_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["apply", str(sample_dir / "moving_landmarks.csv"), "-t", str(result), "--inverse", "-o", str(out),
               "-q"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "moving-space points mapped to fixed space" in stdout and "matrix inverted" in stdout
    matrix = np.linalg.inv(np.array(json.loads((result / "report.json").read_text())
                                    ["deformation"]["affine_lps"]))
    pts = read_landmarks(sample_dir / "moving_landmarks.csv").points
    expected = pts @ matrix[:3, :3].T + matrix[:3, 3]
    # report.json's matrix is rounded to 6 decimals: within a micrometre or so of the exact inverse
    assert np.abs(read_landmarks(out).points - expected).max() < 1e-3


def test_apply_bad_input_exits_2_with_one_message(result, sample_dir, tmp_path, capsys):
    out = tmp_path / "w.nii.gz"
    out.write_bytes(b"keep")
    rc = main(["apply", str(sample_dir / "moving.nii.gz"), "-t", str(result), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already exists" in err[0] and err[0].startswith("deepregistration: error:")
    assert out.read_bytes() == b"keep"
    rc = main(["apply", str(sample_dir / "moving.nii.gz"), "-t", str(tmp_path / "none"), "-o",
               str(tmp_path / "x.nii.gz"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]
    rc = main(["apply", str(sample_dir / "moving.nii.gz"), "-t", str(result), "-o", str(tmp_path / "x.nii.gz"),
               "--threads", "-1", "-q"])
    assert rc == 2 and "--threads" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.nii.gz"]


def test_apply_is_listed_and_documented(capsys):
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0 and "apply" in capsys.readouterr().out
    with pytest.raises(SystemExit) as sub:
        main(["apply", "--help"])
    text = capsys.readouterr().out
    assert sub.value.code == 0 and "antsApplyTransformsToPoints" in text and "--interpolation" in text


def test_the_command_report_json_gives_for_a_skipped_warp_writes_it(result, sample_dir, tmp_path, monkeypatch, capsys):
    """``register --warped none`` records in report.json (outputs.warped.how) the apply command that writes the image
    it skipped: run as given, it writes what ``--warped full`` writes (the same registration), bit for bit."""
    import shlex

    skipped = run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "out (1)",
                               RegistrationConfig(**CFG), write_png=False, warped="none").out_dir
    entry = json.loads((skipped / "report.json").read_text())["outputs"]["warped"]
    assert entry["file"] is None and not (skipped / "warped.nii.gz").exists()
    command = shlex.split(entry["how"])
    assert command[:2] == ["deepregistration", "apply"]
    monkeypatch.chdir(tmp_path)
    assert main(command[1:] + ["-q"]) == 0
    capsys.readouterr()
    written = tmp_path / command[command.index("-o") + 1]
    assert written == skipped / "warped.nii.gz"  # into the result folder, its name quoted for the shell
    assert written.read_bytes() == (result / "warped.nii.gz").read_bytes()
