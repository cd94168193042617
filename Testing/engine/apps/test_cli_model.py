"""``deepregistration register --model``: a model file plugs into the command; bad models are one clear error."""
from __future__ import annotations

import json

import torch

from DeepRegistrationLib.apps.cli import main
from DeepRegistrationLib.learning.model_files import save_model
from DeepRegistrationLib.learning.networks import UNetFieldPredictor


def _args(sample_dir, out):
    return ["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
            "--spacing", "4", "--quiet", "--no-png"]


def test_register_with_a_model_file(tmp_path, sample_dir, capsys):
    torch.manual_seed(0)
    path = save_model(UNetFieldPredictor(), tmp_path / "tiny")  # untrained: predicts the identity
    out = tmp_path / "out"
    code = main(_args(sample_dir, out) + ["--model", str(path), "--model-mode", "replace"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["similarity"]["ncc_after"] > report["similarity"]["ncc_before"]  # the affine stage still runs


def test_unknown_or_corrupt_model_is_one_clear_error(tmp_path, sample_dir, capsys):
    out = tmp_path / "out"
    assert main(_args(sample_dir, out) + ["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model" in err[0] and not out.exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert main(_args(sample_dir, out) + ["--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepregistration: error:") and not out.exists()
    # a model with a rigid/affine mode would be silently unused: refused instead
    assert main(_args(sample_dir, out) + ["--model", "default", "--mode", "rigid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mode deformable" in err[0] and not out.exists()


def test_register_with_the_shipped_model_uses_its_spacing(tmp_path, sample_dir, capsys):
    out = tmp_path / "out"
    args = ["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
            "--quiet", "--no-png", "--model", "default"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["parameters"]["spacing"] == 3.0  # the card's working spacing, not the engine's 2 mm
    assert report["similarity"]["ncc_after"] > 0.95
