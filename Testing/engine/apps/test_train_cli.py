"""The learned engine's commands (``train``, ``models list``, ``evaluate``) through argparse, as cli.py will wire them."""
from __future__ import annotations

import argparse
import json

import pytest

from DeepRegistrationLib.learning import registry
from DeepRegistrationLib.apps import train_cli


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepregistration")
    sub = parser.add_subparsers(dest="command")
    train_cli.add_subparsers(sub)
    return parser.parse_args(argv)


def test_train_install_list_and_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    args = parse(["train", "--name", "cli-tiny", "-o", str(tmp_path / "run"), "--steps", "3", "--shape", "16", "16",
                  "16", "--num-labels", "4", "--val-every", "2", "--val-pairs", "1", "--install", "--tensorboard"])
    assert train_cli.run(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["steps"] == 3 and (tmp_path / "run" / "checkpoint.pt").is_file()
    # two steps from a zero-initialized head: still the identity, and the command says so
    assert out["best_dice"] <= out["dice_no_registration"] + 0.001
    assert "has not learned to register yet" in captured.err
    # TensorBoard event file with the loss of every step and the validation Dice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("validation/dice")] == [2]
    assert (tmp_path / "models" / "cli-tiny.json").is_file()

    assert train_cli.run(parse(["models", "list", "--json"])) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["cli-tiny"]["ok"] and listed["cli-tiny"]["source"] == "user"

    assert train_cli.run(parse(["evaluate", "--model", "cli-tiny", "--synthetic", "2",
                                "--json", str(tmp_path / "e.json")])) == 0
    capsys.readouterr()
    scores = json.loads((tmp_path / "e.json").read_text())["synthetic"]
    assert 0 <= scores["dice"] <= 1 and 0 <= scores["dice_identity"] <= 1
    assert train_cli.run(parse(["evaluate", "--model", "cli-tiny"])) == 2


def test_unknown_model_is_an_input_error(tmp_path, monkeypatch):
    from DeepRegistrationLib.core.errors import InputError

    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path))
    with pytest.raises(InputError, match="unknown model"):
        train_cli.run(parse(["evaluate", "--model", "nothing-here", "--synthetic", "1"]))


def test_bad_dataset_is_one_error_and_leaves_no_run_folder(tmp_path, capsys):
    from DeepRegistrationLib.apps import cli

    assert cli.main(["train", "--dataset", str(tmp_path / "missing"), "--steps", "1", "-o", str(tmp_path / "run")]) == 2
    assert cli.main(["evaluate", "--dataset", str(tmp_path / "missing"), "-o", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.count("expected one *_dataset.json") == 2 and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


def test_train_with_local_contrast_inputs_records_them(tmp_path, capsys):
    args = parse(["train", "--name", "lc", "-o", str(tmp_path / "run"), "--steps", "1", "--shape", "16", "16", "16",
                  "--num-labels", "4", "--val-every", "0", "--input-features", "local-contrast"])
    assert train_cli.run(args) == 0
    card = json.loads((tmp_path / "run" / "lc.json").read_text())
    assert card["architecture"]["input_features"] == "local-contrast"
    assert card["training"]["recipe"]["input_features"] == "local-contrast"
