"""``register --large-grid-voxels``: the cap reaches the engine's settings, ``report.json`` lists the plan that
ran (a cut finest level on a grid above the cap), and a bad value is refused before anything is written."""
from __future__ import annotations

import json

from DeepRegistrationLib.apps.cli import main

FAST = ["--quiet", "--no-png", "--iterations", "4", "--affine-iterations", "6", "--levels", "3", "--spacing", "4",
        "--init", "moments", "--threads", "2", "--device", "cpu"]


def _register(sample_dir, out, *extra) -> int:
    return main(["register", str(sample_dir / "fixed.nii.gz"), str(sample_dir / "moving.nii.gz"), "-o", str(out),
                 *FAST, *extra])


def test_the_cap_reaches_the_engine_and_the_report_lists_the_plan(tmp_path, sample_dir):
    assert _register(sample_dir, tmp_path / "capped", "--large-grid-voxels", "0.002") == 0
    report = json.loads((tmp_path / "capped" / "report.json").read_text())
    assert report["parameters"]["large_grid_voxels"] == 0.002
    plan = report["plan"]
    assert [(e["stage"], e["factor"]) for e in plan] == [("linear", 4), ("linear", 2), ("deformable", 4),
                                                         ("deformable", 2), ("deformable", 1)]
    assert [e["planned"] for e in plan] == [12, 6, 8, 8, 4]
    finest = plan[-1]
    # the 4 mm working grid is far above a cap of 2,000 voxels (counted at 2 mm: 250 at 4 mm): the finest
    # level gives way
    assert finest["iterations"] < finest["planned"]

    assert _register(sample_dir, tmp_path / "uncapped", "--large-grid-voxels", "0") == 0
    plan = json.loads((tmp_path / "uncapped" / "report.json").read_text())["plan"]
    assert [e["iterations"] for e in plan] == [e["planned"] for e in plan]


def test_a_negative_cap_is_refused_with_nothing_written(tmp_path, sample_dir, capsys):
    assert _register(sample_dir, tmp_path / "bad", "--large-grid-voxels", "-1") != 0
    assert "large_grid_voxels" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
