"""Users' verdicts on results (workflows.feedback): report.json and the feedback log, bad input, the CLI."""
from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.workflows import feedback

NOTE = "Patient Jane Doe 1970-01-01: fine"  # a note as a clinician may write it: never logged


def make_result(folder, with_id: bool = True) -> dict:
    folder.mkdir(parents=True)
    report = {"inputs": {"fixed": "f.nii.gz", "moving": "m.nii.gz"}, "similarity": {"ncc_after": 0.9}}
    if with_id:
        report["result_id"] = "a" * 32
    (folder / "report.json").write_text(json.dumps(report))
    return report


def test_record_writes_report_and_log_and_latest_wins(tmp_path, caplog):
    make_result(tmp_path / "r1")
    log = tmp_path / "fb.jsonl"
    with caplog.at_level(logging.DEBUG):
        entry = feedback.record(tmp_path / "r1", "accepted", note=NOTE, log=log, reviewer="dr-a")
    assert NOTE not in caplog.text and "Jane" not in caplog.text
    assert entry["result_id"] == "a" * 32 and entry["verdict"] == "accepted" and entry["log"] == str(log)
    assert entry["result_dir"] == str((tmp_path / "r1").absolute()) and entry["time_utc"].endswith("Z")
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["feedback"] == {"verdict": "accepted", "time_utc": entry["time_utc"], "reviewer": "dr-a",
                                  "note": NOTE}
    assert report["similarity"] == {"ncc_after": 0.9}  # the rest of the report is kept
    assert not [p for p in (tmp_path / "r1").iterdir() if p.name != "report.json"]  # no temporary left

    feedback.record(tmp_path / "r1", "rejected", log=log)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["verdict"] for x in lines] == ["accepted", "rejected"]  # the log keeps history
    assert json.loads((tmp_path / "r1" / "report.json").read_text())["feedback"]["verdict"] == "rejected"
    latest = feedback.read_log(log)
    assert list(latest) == ["a" * 32] and latest["a" * 32]["verdict"] == "rejected"
    assert latest["a" * 32]["note"] is None and latest["a" * 32]["reviewer"] is None


def test_a_report_without_id_gets_a_random_one_kept_afterwards(tmp_path):
    make_result(tmp_path / "old", with_id=False)
    log = tmp_path / "fb.jsonl"
    first = feedback.record(tmp_path / "old", "accepted", log=log)
    rid = first["result_id"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert json.loads((tmp_path / "old" / "report.json").read_text())["result_id"] == rid
    assert feedback.record(tmp_path / "old", "rejected", log=log)["result_id"] == rid
    make_result(tmp_path / "other", with_id=False)
    assert feedback.record(tmp_path / "other", "accepted", log=log)["result_id"] != rid
    assert len(feedback.read_log(log)) == 2


def test_default_log_is_per_user(tmp_path, monkeypatch):
    monkeypatch.delenv(feedback.ENV_FEEDBACK_LOG, raising=False)
    monkeypatch.setattr(feedback.sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert feedback.default_log_path() == tmp_path / "data" / "DeepRegistration" / "feedback.jsonl"
    make_result(tmp_path / "r")
    entry = feedback.record(tmp_path / "r", "accepted")  # the default log's folder is created
    assert entry["log"] == str(tmp_path / "data" / "DeepRegistration" / "feedback.jsonl")
    monkeypatch.setenv(feedback.ENV_FEEDBACK_LOG, str(tmp_path / "env.jsonl"))
    assert feedback.default_log_path() == tmp_path / "env.jsonl"


def _snapshot(*paths):
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in paths}


@pytest.mark.parametrize("case", ["verdict", "no-report", "bad-report", "log-folder", "log-is-dir",
                                  "log-read-only"])
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, case):
    make_result(tmp_path / "r")
    log = tmp_path / "fb.jsonl"
    log.write_text("")
    kwargs = dict(result_dir=tmp_path / "r", verdict="accepted", log=log)
    match = {"verdict": "unknown verdict", "no-report": "no report.json", "bad-report": "cannot read",
             "log-folder": "does not exist", "log-is-dir": "not a file", "log-read-only": "permission denied"}[case]
    if case == "verdict":
        kwargs["verdict"] = "maybe"
    elif case == "no-report":
        (tmp_path / "empty").mkdir()
        kwargs["result_dir"] = tmp_path / "empty"
    elif case == "bad-report":
        (tmp_path / "r" / "report.json").write_text("{not json")
    elif case == "log-folder":
        kwargs["log"] = tmp_path / "missing" / "fb.jsonl"
    elif case == "log-is-dir":
        kwargs["log"] = tmp_path
    elif case == "log-read-only":
        if os.geteuid() == 0:
            pytest.skip("running as root: permissions are not enforced")
        log.chmod(stat.S_IRUSR)
    before = _snapshot(tmp_path / "r" / "report.json", log)
    files_before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(InputError, match=match):
        feedback.record(**kwargs)
    assert _snapshot(tmp_path / "r" / "report.json", log) == before
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == files_before
    assert not (tmp_path / "missing").exists()


def test_read_log_skips_a_cut_line_and_refuses_a_missing_log(tmp_path, caplog):
    log = tmp_path / "fb.jsonl"
    log.write_text(json.dumps({"result_id": "b" * 32, "verdict": "accepted"}) + "\n\n" + '{"result_id": "c"')
    with caplog.at_level(logging.WARNING):
        assert list(feedback.read_log(log)) == ["b" * 32]
    assert "line 3" in caplog.text
    with pytest.raises(InputError, match="does not exist"):
        feedback.read_log(tmp_path / "nothing.jsonl")


def test_feedback_command(tmp_path, capsys):
    from DeepRegistrationLib.apps import cli

    make_result(tmp_path / "r")
    log = tmp_path / "fb.jsonl"
    assert cli.main(["feedback", str(tmp_path / "r"), "--reject", "--note", NOTE, "--reviewer", "dr-b",
                     "--log", str(log)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "a" * 32 and NOTE not in out.err
    assert feedback.read_log(log)["a" * 32]["reviewer"] == "dr-b"
    assert cli.main(["feedback", str(tmp_path / "nothing"), "--accept", "--log", str(log)]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a verdict is required, and only one
        cli.main(["feedback", str(tmp_path / "r"), "--accept", "--reject"])
    assert len(log.read_text().splitlines()) == 1
