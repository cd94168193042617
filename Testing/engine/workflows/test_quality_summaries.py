"""The quality verdict in the multi-registration summaries: register-batch (summary.json/csv per pair and
counted in the totals), register-sequence (sequence.json per frame and counted) and the template
(report.json per subject of the last pass and counted). A pair of unrelated images is ``failed``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.workflows.batch import read_pairs, run_batch

CFG = RegistrationConfig(spacing=6.0, levels=2, iterations=5, affine_iterations=10, initialization="moments",
                         threads=1)


def _small(path: Path) -> sitk.Image:
    """The bundled 3 mm image at 6 mm (about 27×33×28 voxels)."""
    img = sitk.ReadImage(str(path))
    return sitk.Resample(img, [s // 2 for s in img.GetSize()], sitk.Transform(), sitk.sitkLinear,
                         img.GetOrigin(), [6.0] * 3, img.GetDirection())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("quality_wf")
    for n in ("fixed", "moving"):
        sitk.WriteImage(_small(SAMPLE / f"{n}.nii.gz"), str(d / f"{n}.nii.gz"))
    fixed = sitk.ReadImage(str(d / "fixed.nii.gz"))
    rng = np.random.default_rng(3)
    noise = sitk.GetImageFromArray(rng.random(sitk.GetArrayFromImage(fixed).shape).astype(np.float32) * 100)
    noise.CopyInformation(fixed)
    sitk.WriteImage(noise, str(d / "unrelated.nii.gz"))
    return d


def test_batch_summary_has_each_pairs_verdict_and_their_counts(tmp_path, data):
    (data / "pairs.csv").write_text("name,fixed,moving\ngood,fixed.nii.gz,moving.nii.gz\n"
                                    "unrelated,fixed.nii.gz,unrelated.nii.gz\n")
    result = run_batch(read_pairs(data / "pairs.csv"), tmp_path / "batch", CFG, write_png=False)
    summary = json.loads((tmp_path / "batch" / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["pairs"]}
    for name, row in rows.items():
        report = json.loads((tmp_path / "batch" / name / "report.json").read_text())
        assert row["quality"] == report["quality"]["verdict"]
        assert row["quality_reasons"] == "; ".join(report["quality"]["reasons"])
    assert rows["unrelated"]["quality"] == "failed" and rows["unrelated"]["quality_reasons"]
    counts = summary["quality"]
    assert sum(counts.values()) == 2 and counts["failed"] >= 1
    assert counts[rows["good"]["quality"]] >= 1 + (rows["good"]["quality"] == "failed")
    with open(tmp_path / "batch" / "summary.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert table["unrelated"]["quality"] == "failed"
    assert [r["quality"] for r in result.rows] == [rows["good"]["quality"], "failed"]
    # a resumed run reads the verdict back from the pair's report.json
    again = run_batch(read_pairs(data / "pairs.csv"), tmp_path / "batch", CFG, write_png=False)
    assert [(r["resumed"], r["quality"]) for r in again.rows] == [(True, r["quality"]) for r in result.rows]


def test_sequence_and_template_summaries_carry_the_verdicts(tmp_path, data):
    from DeepRegistrationLib.workflows.sequence import register_sequence
    from DeepRegistrationLib.workflows.template import build_template

    fixed = sitk.ReadImage(str(data / "fixed.nii.gz"))
    moving = sitk.Resample(sitk.ReadImage(str(data / "moving.nii.gz")), fixed)
    sitk.WriteImage(sitk.JoinSeries([fixed, moving]), str(tmp_path / "seq.nii.gz"))
    seq = register_sequence(tmp_path / "seq.nii.gz", tmp_path / "seq", CFG, write_png=False)
    info = json.loads((seq.out_dir / "sequence.json").read_text())
    for t, frame in enumerate(info["frames"]):
        report = json.loads((seq.out_dir / f"frame_{t:04d}" / "report.json").read_text())
        assert frame["quality"] == report["quality"]["verdict"]
    assert sum(info["quality"].values()) == 2

    tpl = build_template([data / "fixed.nii.gz", data / "moving.nii.gz"], tmp_path / "tpl", CFG, iterations=1,
                         write_png=False)
    report = json.loads((tpl.out_dir / "report.json").read_text())
    subjects = report["quality"]["subjects"]
    assert [s["subject"] for s in subjects] == [0, 1]
    for s in subjects:
        own = json.loads((tpl.out_dir / f"subject_{s['subject']:04d}" / "report.json").read_text())
        assert s["quality"] == own["quality"]["verdict"]
    assert sum(report["quality"]["counts"].values()) == 2
    assert report["iterations"][-1]["quality"] == [s["quality"] for s in subjects]
