"""The continuous-update loop end to end through the ``deepregistration`` command: register two pairs, accept
one and reject the other (``feedback``), build a dataset from the feedback log (``dataset build --feedback``),
fine-tune the shipped model on it (``train --init-model``). Plus the builder's handling of bad and stale
feedback. Small data: the bundled pair at 8 mm, a few iterations."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.apps import cli
from DeepRegistrationLib.workflows import feedback

NOTE = "Quixley7 Marguerite, MRN 99887766: skull base fine"
FAST = ["--spacing", "8", "--levels", "1", "--iterations", "5", "--affine-iterations", "10", "--init", "moments",
        "--no-png", "-q", "--device", "cpu"]


def _identifying(tmp: Path) -> list[str]:
    return [NOTE.lower(), "quixley7", "marguerite", "99887766", str(tmp).lower(), "dr-quill"]


def independent_scan(root: Path, strings: list[str]) -> list[tuple[str, str]]:
    """Every (file, string) where a string occurs, case-insensitively, in a file (``.gz`` decompressed) or its name."""
    hits = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            data = gzip.decompress(data)
        text = (data + p.relative_to(root).as_posix().encode()).lower()
        hits += [(p.relative_to(root).as_posix(), s) for s in strings if s.encode() in text]
    return hits


@pytest.fixture(scope="module")
def results(sample_dir, tmp_path_factory):
    """Two registrations of images whose file names identify the patient; (folder, accepted dir, rejected dir)."""
    tmp = tmp_path_factory.mktemp("loop")
    images = tmp / "Quixley7_Marguerite"
    images.mkdir()
    f, m = images / "Quixley7_Marguerite_T1_2019.nii.gz", images / "Quixley7_Marguerite_T1_2021.nii.gz"
    shutil.copy(sample_dir / "fixed.nii.gz", f)
    shutil.copy(sample_dir / "moving.nii.gz", m)
    good, bad = tmp / "Quixley7-accepted", tmp / "Quixley7-rejected"
    assert cli.main(["register", str(f), str(m), "-o", str(good), *FAST]) == 0
    assert cli.main(["register", str(m), str(f), "-o", str(bad), *FAST, "--mode", "rigid"]) == 0
    return tmp, good, bad


def test_feedback_loop_register_accept_build_fine_tune(results, tmp_path, monkeypatch, capsys):
    from DeepRegistrationLib.learning import registry
    from DeepRegistrationLib.learning.model_files import load_model

    tmp, good, bad = results
    log = tmp_path / "feedback.jsonl"
    capsys.readouterr()
    # the verdicts: the second result first accepted, then rejected (the latest counts)
    assert cli.main(["feedback", str(good), "--accept", "--note", NOTE, "--reviewer", "dr-quill",
                     "--log", str(log)]) == 0
    good_id = capsys.readouterr().out.strip()
    assert cli.main(["feedback", str(bad), "--accept", "--log", str(log)]) == 0
    assert cli.main(["feedback", str(bad), "--reject", "--note", NOTE, "--log", str(log)]) == 0
    bad_id = capsys.readouterr().out.split()[-1]
    assert good_id == json.loads((good / "report.json").read_text())["result_id"] != bad_id

    ds = tmp_path / "dataset"
    assert cli.main(["dataset", "build", "--feedback", str(log), "-o", str(ds), "--key", str(tmp_path / "key.hex"),
                     "--split", "1,0,0"]) == 0
    out = capsys.readouterr().out
    assert "feedback: 1 accepted result(s) used as pairs, 1 rejected" in out
    meta = json.loads((ds / "DREG_dataset.json").read_text())
    assert meta["numPairedTraining"] == 1 and len(meta["training"]) == 2
    pair = meta["training_paired_images"][0]
    gold = pair["gold_standard"][0]
    assert gold["kind"] == "algorithmic" and gold["source"] == "accepted by a user" and gold["accepted_by_user"]
    assert gold["result_id"] == good_id and gold["direction"] == "fixed->moving"
    assert gold["quality"]["ncc_after"] > gold["quality"]["ncc_before"] + 0.02, gold["quality"]
    assert bad_id not in json.dumps(meta)
    # the stored transform is the accepted one, and the pair's images are the result's inputs (same world)
    stored, original = sitk.ReadTransform(str(ds / gold["transform"])), sitk.ReadTransform(str(good / "transform.h5"))
    fixed = sitk.ReadImage(str(ds / pair["fixed"]))
    pts = [fixed.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx))
           for idx in ((10, 20, 15), (27, 33, 28), (40, 50, 45))]
    np.testing.assert_allclose([stored.TransformPoint(p) for p in pts], [original.TransformPoint(p) for p in pts],
                               atol=1e-6)
    source = sitk.ReadImage(str(tmp / "Quixley7_Marguerite" / "Quixley7_Marguerite_T1_2019.nii.gz"), sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(source))
    np.testing.assert_allclose(fixed.GetOrigin(), source.GetOrigin(), atol=1e-4)
    # rejected results are listed for review by id only; no note, path, file name or reviewer in the dataset
    report = (ds / "report.md").read_text()
    assert "## Feedback" in report and f"- {bad_id}" in report
    assert independent_scan(ds, _identifying(tmp) + [str(tmp_path).lower()]) == []

    # fine-tune the shipped model on the accepted pair (supervised: its transform is the known field)
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    assert cli.main(["train", "--init-model", "default", "--dataset", str(ds), "--mode", "supervised",
                     "--steps", "2", "--lr", "0.001", "--shape", "16", "16", "16", "--spacing", "3",
                     "--val-every", "2", "--val-pairs", "1", "-o", str(tmp_path / "run"), "--name", "tuned"]) == 0
    summary = json.loads(capsys.readouterr().out)
    tuned, shipped = load_model(summary["model"]), registry.load("default")
    assert tuned.card["training"]["recipe"]["init_model"] == "default"
    a, b = tuned.model.state_dict(), shipped.model.state_dict()
    assert a.keys() == b.keys() and any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert independent_scan(tmp_path / "run", _identifying(tmp)) == []


def clone(src: Path, dst: Path) -> Path:
    """A copy of a result folder without its result id (a verdict gives it a new one)."""
    shutil.copytree(src, dst)
    report = json.loads((dst / "report.json").read_text())
    del report["result_id"]
    (dst / "report.json").write_text(json.dumps(report))
    return dst


def test_feedback_build_bad_and_stale_input(results, tmp_path, capsys):
    """A missing log: one error, nothing written. A result whose inputs are gone or whose folder now holds
    another result is listed as not usable; a verdict turned to 'rejected' removes the pair and its files."""
    from DatasetBuilderLib import build as B

    tmp, good, bad = results
    key = str(tmp_path / "key.hex")
    ds = tmp_path / "ds"
    assert cli.main(["dataset", "build", "--feedback", str(tmp_path / "none.jsonl"), "-o", str(ds),
                     "--key", key]) == 2
    assert "does not exist" in capsys.readouterr().err and not ds.exists() and not Path(key).exists()
    assert cli.main(["dataset", "build", "-o", str(ds), "--key", key]) == 2  # nothing to build from
    assert not ds.exists()

    log = tmp_path / "fb.jsonl"
    copy = clone(good, tmp_path / "copy")
    feedback.record(copy, "accepted", log=log)
    gone = clone(good, tmp_path / "gone")
    report = json.loads((gone / "report.json").read_text())
    report["result_id"] = "e" * 32
    report["inputs"]["fixed"] = str(tmp_path / "deleted.nii.gz")
    (gone / "report.json").write_text(json.dumps(report))
    feedback.record(gone, "accepted", log=log)
    other = clone(good, tmp_path / "other")
    other_id = feedback.record(other, "accepted", log=log)["result_id"]
    report = json.loads((other / "report.json").read_text())
    report["result_id"] = "f" * 32  # registered again into the same folder after the verdict
    (other / "report.json").write_text(json.dumps(report))
    options = B.BuildOptions(key_file=key, split_ratios=(1, 0, 0), feedback_log=str(log))
    result = B.build_dataset([], ds, options)
    assert result.feedback_pairs == 1
    reasons = dict(result.feedback_unusable)
    assert "input images are gone" in reasons["e" * 32] and "another result" in reasons[other_id]
    assert "feedback" not in json.dumps(result.manifest["parameters"]).replace('"feedback": true', "")
    assert len(list((ds / "transformsTr").glob("*_accepted.h5"))) == 1
    # the accepted copy is rejected now: its pair, cases and ground truth leave the dataset
    feedback.record(copy, "rejected", log=log)
    result = B.build_dataset([], ds, options)
    assert result.feedback_pairs == 0 and result.pairs == {"train": 0, "val": 0, "test": 0}
    assert not list((ds / "transformsTr").glob("*.h5")) and not list(ds.glob("imagesTr/*.nii.gz"))
    assert not list((ds / "meta").glob("classical_*"))


def test_accepted_dicom_result_is_pseudonymised_by_patient_and_leaks_nothing(tmp_path, capsys):
    """An accepted registration of two DICOM series of one patient: both cases get that patient's pseudonym
    (DICOM PatientID, one subject, one split), the headers go through the Annex E profile, and no patient
    name, ID or UID reaches the dataset."""
    pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")
    pytest.importorskip("pydicom")
    from dicom_series_data import SAMPLE, make_series, oblique

    from DatasetBuilderLib.dicom_input import dicom_support_problem

    if dicom_support_problem():
        pytest.skip(dicom_support_problem())
    from DeepRegistrationLib.dicom.series import new_uid

    patient = {"patient_name": "Quixley8^Marguerite", "patient_id": "PID-87731-QX"}
    studies = [new_uid(), new_uid()]
    f, m = tmp_path / "dicom" / "fixed", tmp_path / "dicom" / "moving"
    for name, folder, study, date in (("fixed", f, studies[0], "20190312"), ("moving", m, studies[1], "20210312")):
        small = oblique(sitk.ReadImage(str(SAMPLE / f"{name}.nii.gz")), np.eye(3), spacing=6.0)  # 6 mm: few slices
        make_series(small, folder, study_uid=study, study_date=date, **patient)
    out = tmp_path / "result"
    assert cli.main(["register", str(f), str(m), "-o", str(out), *FAST]) == 0
    log = tmp_path / "fb.jsonl"
    feedback.record(out, "accepted", note="Marguerite Quixley8 ok", log=log)
    ds = tmp_path / "ds"
    capsys.readouterr()
    assert cli.main(["dataset", "build", "--feedback", str(log), "-o", str(ds), "--key", str(tmp_path / "k.hex"),
                     "--split", "1,0,0"]) == 0, capsys.readouterr().err
    meta = json.loads((ds / "DREG_dataset.json").read_text())
    assert meta["numPairedTraining"] == 1
    subjects = {e["subject"] for e in meta["training"]}
    assert len(meta["training"]) == 2 and len(subjects) == 1 and all("dicom_header" in e for e in meta["training"])
    strings = ["quixley8", "marguerite", "pid-87731-qx", "20190312", "20210312", str(tmp_path).lower(),
               *(s.lower() for s in studies)]
    assert independent_scan(ds, strings) == []
