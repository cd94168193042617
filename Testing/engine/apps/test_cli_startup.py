"""What ``deepregistration register`` loads and how its process ends: the register command's parser is the full
parser's (same namespace) without the other commands' modules, and the console script's fast exit keeps the
exit status, the printed summary and every output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import fresh_python
from DeepRegistrationLib.apps import cli

LIB_PARENT = Path(cli.__file__).resolve().parents[2]
FAST = ["--spacing", "8", "--levels", "1", "--mode", "rigid", "--affine-iterations", "5", "--init", "moments",
        "--threads", "1", "-q", "--no-png"]


def test_register_parser_is_the_full_parsers_register(tmp_path):
    argv = ["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path / "o"), "--similarity", "mi", "--fail-on",
            "suspect", "--guide-landmarks", "a.csv", "b.csv", "--explain"]
    assert vars(cli.build_parser("register").parse_args(argv)) == vars(cli.build_parser().parse_args(argv))
    assert cli._command(["--version"]) is None and cli._command(["register", "x"]) == "register"
    for argv in (["feedback", str(tmp_path), "--accept", "--note", "fine"], ["models", "list"],
                 ["register-batch", "pairs.csv", "-o", "out", "--mode", "affine", "--similarity", "mi"]):
        assert vars(cli.build_parser(argv[0]).parse_args(argv)) == vars(cli.build_parser().parse_args(argv)), argv


def _modules_after_parsing(argv: list[str]) -> set[str]:
    code = f"""
import json, sys
sys.path.insert(0, {str(LIB_PARENT)!r})
from DeepRegistrationLib.apps.cli import build_parser, _command
argv = {argv!r}
build_parser(_command(argv)).parse_args(argv)
print(json.dumps(sorted(sys.modules)))
"""
    return set(fresh_python(code, timeout=120))


def test_parsing_a_register_command_loads_neither_torch_nor_the_other_commands():
    modules = _modules_after_parsing(["register", "f", "m", "-o", "out"])
    assert "torch" not in modules and "SimpleITK" not in modules
    assert not {m for m in modules if m.startswith(("DeepRegistrationLib.learning.training",
                                                     "DeepRegistrationLib.apps.train_cli",
                                                     "DeepRegistrationLib.apps.pacs_cli", "DatasetBuilderLib"))}
    # another command builds its own module's parsers only: feedback needs no torch (train's defaults do)
    assert "torch" not in _modules_after_parsing(["feedback", "out", "--accept"])
    assert "torch" in _modules_after_parsing(["models", "list"])


def _console(*args, cwd=None):
    code = f"import sys; sys.path.insert(0, {str(LIB_PARENT)!r}); from DeepRegistrationLib.apps.cli import " \
           "console_main; sys.argv = ['deepregistration', *sys.argv[1:]]; console_main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_console_script_exits_fast_with_the_status_summary_and_outputs(tmp_path, sample_dir):
    out = tmp_path / "out"
    proc = _console("register", sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", "-o", out, *FAST)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"outputs: {out}" and lines[-1].strip().startswith("quality:")  # flushed before the exit
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["mode"] == "rigid"
    assert {"transform.h5", "warped.nii.gz", "jacobian.nii.gz", "report.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder left
    # bad input: status 2 and the one message on stderr, through the same exit
    proc = _console("register", tmp_path / "missing.nii.gz", sample_dir / "moving.nii.gz", "-o", tmp_path / "b",
                    *FAST)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("deepregistration: error:"), proc.stderr
    assert not (tmp_path / "b").exists()
    # another command exits the ordinary way with its own status
    assert _console("models", "list").returncode == 0
