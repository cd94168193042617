"""The PACS worker against a real Orthanc server with its DICOMweb plugin (Debian ``orthanc``,
``orthanc-dicomweb``), started here on a loopback port with a temporary storage folder and HTTP basic
authentication, and always stopped.

Two studies of one synthetic patient (prior: an oblique moving image; current: the fixed image) are
uploaded; ``pacs register`` stores a (deformable) registration object and a derived series that we read
back from Orthanc; ``pacs watch`` registers the newer study to the prior one and, restarted, repeats
nothing; bad input (no image series, different patients, 401/404/500, unreachable server) gives one clear
error each and stores nothing.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client")
requests = pytest.importorskip("requests")

from dicom_series_data import SAMPLE, make_series, oblique, rotation  # noqa: E402

from DeepRegistrationLib.dicom import pacs  # noqa: E402
from DeepRegistrationLib.dicom.dicomweb import Auth, PacsClient, PacsError, ServerUnavailable, auth_from_options
from DeepRegistrationLib.dicom.registration_objects import read_registration  # noqa: E402
from DeepRegistrationLib.dicom.series import new_uid, read_series  # noqa: E402
from DeepRegistrationLib.core.errors import InputError  # noqa: E402

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)
PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
PLUGIN = next((p for p in PLUGIN_CANDIDATES if Path(p).exists()), None)
USER, PASSWORD = "deepreg", "test-password"

pytestmark = pytest.mark.skipif(not (ORTHANC and PLUGIN), reason="Orthanc with its DICOMweb plugin is not installed "
                                "(Debian packages orthanc, orthanc-dicomweb)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(root: Path, config: dict, name: str):
    """Orthanc started on ``root/<name>.json`` (written from ``config``), its output in ``root/<name>.log``:
    ``(process, open log file)``."""
    (root / f"{name}.json").write_text(json.dumps(config))
    log = open(root / f"{name}.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / f"{name}.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    return proc, log


def stop_orthanc(proc, log) -> None:
    """Stops a server of :func:`start_orthanc` (terminate, then kill after 10 s) and closes its log."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "DeepRegistrationTest", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}, "HttpTimeout": 60}
    proc, log = start_orthanc(root, config, "orthanc")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        stop_orthanc(proc, log)


def upload(base: str, folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        requests.post(f"{base}/instances", data=p.read_bytes(), auth=(USER, PASSWORD), timeout=30).raise_for_status()


def orthanc_series(base: str, study_uid: str) -> dict:
    """Series Instance UID -> (Modality, number of instances) of a study on the server (REST API)."""
    ids = requests.post(f"{base}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                        auth=(USER, PASSWORD), timeout=30).json()
    out = {}
    for sid in ids:
        for s in requests.get(f"{base}/studies/{sid}/series", auth=(USER, PASSWORD), timeout=30).json():
            tags = s["MainDicomTags"]
            out[tags["SeriesInstanceUID"]] = (tags.get("Modality"), len(s["Instances"]))
    return out


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory):
    """Patient A: prior (oblique moving image, 2023) and current (fixed image, 2024) studies; patient B: one
    study; patient A also has a study with no image series (a lone REG-like object is not an image)."""
    root = tmp_path_factory.mktemp("studies")
    uids = {"prior": new_uid(), "current": new_uid(), "other": new_uid()}
    a = dict(patient_name="Synthetic^A", patient_id="SYNA0001")
    moving = oblique(sitk.ReadImage(str(SAMPLE / "moving.nii.gz")), rotation([1, 2, 3], 15))
    make_series(moving, root / "prior", study_uid=uids["prior"], study_date="20230101", **a)
    make_series("fixed", root / "current", study_uid=uids["current"], study_date="20240101", **a)
    make_series("fixed", root / "other", study_uid=uids["other"], study_date="20240101",
                patient_name="Synthetic^B", patient_id="SYNB0002")
    for name in ("prior", "current", "other"):
        upload(orthanc, root / name)
    # patient A's study holding only a registration object (no image series)
    from DeepRegistrationLib.dicom.registration_objects import registration_dataset

    uids["no-images"] = new_uid()
    reg = registration_dataset(np.eye(4), read_series(root / "current"), read_series(root / "prior"))
    reg.StudyInstanceUID, reg.StudyDate = uids["no-images"], "20240601"
    (root / "no-images").mkdir()
    reg.save_as(root / "no-images" / "reg.dcm", enforce_file_format=True)
    upload(orthanc, root / "no-images")
    return uids


def client(base: str, **kw) -> PacsClient:
    return PacsClient(f"{base}/dicom-web", Auth("basic", USER, PASSWORD), **kw)


FAST = ["--spacing", "6", "--levels", "1", "--iterations", "5", "--affine-iterations", "15", "--threads", "1"]


def engine_register(mode: str):
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.registration.run import run_registration

    def register(fixed_dir, moving_dir, out_dir):
        cfg = RegistrationConfig(mode=mode, spacing=6.0, iterations=5, affine_iterations=15, levels=1, threads=1)
        return run_registration(fixed_dir, moving_dir, out_dir, cfg, write_png=False).report

    return register


def test_pacs_register_command_stores_registration_and_derived_series(orthanc, studies, tmp_path, monkeypatch,
                                                                       capsys):
    """``deepregistration pacs register`` end to end; what Orthanc holds afterwards is read back and used."""
    from DeepRegistrationLib.apps.cli import main

    before = orthanc_series(orthanc, studies["current"])
    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", PASSWORD)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(pacs.tempfile, "tempdir", str(scratch))  # where the downloads go
    status = main(["pacs", "register", "--server", f"{orthanc}/dicom-web", "--user", USER,
                   "--fixed-study", studies["current"], "--moving-study", studies["prior"], "--modality", "MR",
                   "--series-filter", "t1", "--mode", "deformable", *FAST, "-q"])
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    after = orthanc_series(orthanc, studies["current"])
    new = {k: v for k, v in after.items() if k not in before}
    assert len(new) == 2
    (reg_series,) = [k for k, v in new.items() if v[0] == "REG"]
    assert new[reg_series][1] == 1 and printed["instances"] == 1 + new[printed["derived_series_uid"]][1]
    assert list(scratch.iterdir()) == []  # the downloads are removed
    # read back what Orthanc holds (WADO-RS): the deformable object links the two series' frames and maps
    # points like the transform of a plain 'register' run would; the derived series is in the fixed frame
    c = client(orthanc)
    (reg,) = c.retrieve_series(studies["current"], reg_series)
    assert reg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.3" and reg.SOPInstanceUID == printed["registration_uid"]
    fixed = pacs.fetch_series(c, studies["current"], printed["fixed_series"], tmp_path / "fixed", "fixed")
    moving = pacs.fetch_series(c, studies["prior"], printed["moving_series"], tmp_path / "moving", "moving")
    back = read_registration(reg)
    back.check_frames(fixed.frame_of_reference_uid, moving.frame_of_reference_uid)
    derived = c.retrieve_series(studies["current"], printed["derived_series_uid"])
    assert {ds.FrameOfReferenceUID for ds in derived} == {fixed.frame_of_reference_uid}
    # the stored transform aligns: moving landmarks-free check by image similarity after vs before
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.spatial.resampling import warp_image
    from DeepRegistrationLib.spatial.transforms import SpatialTransform

    f = read_image(tmp_path / "fixed")
    m = read_image(tmp_path / "moving")
    registered = warp_image(m, f.grid, SpatialTransform(back.affine, back.field, back.field_grid), "linear")
    unregistered = warp_image(m, f.grid, SpatialTransform.identity(), "linear")
    def ncc(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert ncc(f.array, registered.array) > ncc(f.array, unregistered.array) + 0.1


def test_pacs_result_kept_for_feedback(orthanc, studies, tmp_path, monkeypatch, capsys):
    """``--keep-results DIR``: the result stays in a numbered folder (no study UID in its path) that
    ``deepregistration feedback`` takes; a refused pair leaves no folder behind; nothing is stored with
    ``--dry-run``."""
    from DeepRegistrationLib.apps.cli import main
    from DeepRegistrationLib.workflows.feedback import read_log

    before = orthanc_series(orthanc, studies["current"])
    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", PASSWORD)
    keep = tmp_path / "results"
    base = ["pacs", "register", "--server", f"{orthanc}/dicom-web", "--user", USER, "--keep-results", str(keep),
            "--dry-run", "--mode", "affine", *FAST, "-q"]
    assert main([*base, "--fixed-study", studies["current"], "--moving-study", studies["prior"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = Path(printed["result"])
    assert result == keep / "result_0001" / "registration" and (result / "report.json").is_file()
    assert studies["current"] not in str(result) and printed["stored"] is False
    assert orthanc_series(orthanc, studies["current"]) == before
    log = tmp_path / "feedback.jsonl"
    assert main(["feedback", str(result), "--accept", "--log", str(log)]) == 0
    assert [e["verdict"] for e in read_log(log).values()] == ["accepted"]
    # a pair refused before any download (another patient's study) leaves no result folder
    assert main([*base, "--fixed-study", studies["other"], "--moving-study", studies["prior"]]) == 2
    assert sorted(p.name for p in keep.iterdir()) == ["result_0001"]


def test_pacs_register_round_trip_matches_transform(orthanc, studies, tmp_path):
    """The object stored on the server maps points like the run's transform.h5 (within 0.01 mm)."""
    result = pacs.register_studies(client(orthanc), studies["current"], studies["prior"], engine_register("affine"),
                                   work_dir=tmp_path / "work", derived=False)
    (reg,) = client(orthanc).retrieve_series(studies["current"], str(result.datasets[0].SeriesInstanceUID))
    engine = sitk.ReadTransform(str(tmp_path / "work" / "registration" / "transform.h5"))
    stored = read_registration(reg).to_sitk()
    pts = read_series(tmp_path / "work" / "fixed").grid.world_points()[::6, ::6, ::6].reshape(-1, 3)
    err = max(np.linalg.norm(np.subtract(engine.TransformPoint(tuple(p)), stored.TransformPoint(tuple(p))))
              for p in pts)
    assert reg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.1" and err < 0.01


def test_pacs_register_bad_input_stores_nothing(orthanc, studies, tmp_path):
    c = client(orthanc)
    counts = {k: orthanc_series(orthanc, v) for k, v in studies.items()}
    calls = []

    def never(*args):
        calls.append(args)
        raise AssertionError("must not register")

    with pytest.raises(InputError, match="different patients"):
        pacs.register_studies(c, studies["other"], studies["prior"], never)
    with pytest.raises(InputError, match="no image series"):
        pacs.register_studies(c, studies["current"], studies["no-images"], never)
    with pytest.raises(InputError, match="no image series"):
        pacs.register_studies(c, studies["current"], studies["prior"], never,
                              rule=pacs.SeriesRule(series_description="^no such series$"))
    with pytest.raises(InputError, match="not on the server"):
        pacs.register_studies(c, studies["current"], new_uid(), never)
    with pytest.raises(PacsError, match="refused the credentials"):
        pacs.register_studies(PacsClient(f"{orthanc}/dicom-web", Auth("basic", USER, "wrong")), studies["current"],
                              studies["prior"], never)
    with pytest.raises(PacsError, match="HTTP 404"):
        pacs.register_studies(PacsClient(f"{orthanc}/no-dicom-web", Auth("basic", USER, PASSWORD)),
                              studies["current"], studies["prior"], never)
    # a registration that fails half-way (after both downloads) stores nothing either
    def broken(fixed_dir, moving_dir, out_dir):
        raise InputError("the registration failed")

    with pytest.raises(InputError, match="the registration failed"):
        pacs.register_studies(c, studies["current"], studies["prior"], broken)
    assert not calls
    # different patients when the user says so (a dry run: built, not stored)
    result = pacs.register_studies(c, studies["other"], studies["prior"], engine_register("rigid"),
                                   allow_different_patients=True, store=False)
    assert result.registration_sop_class == "1.2.840.10008.5.1.4.1.1.66.1"
    assert {k: orthanc_series(orthanc, v) for k, v in studies.items()} == counts


class _Answer(http.server.BaseHTTPRequestHandler):
    """A DICOMweb stand-in that answers every request with one status (counts the requests)."""

    status = 500
    count = 0

    headers = []

    def do_GET(self):  # noqa: N802
        type(self).count += 1
        type(self).headers.append(self.headers.get("Authorization"))
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_server_errors_and_backoff():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    waits = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        _Answer.status = 500
        with pytest.raises(PacsError, match="HTTP 500"):
            PacsClient(url, retries=2, sleep=waits.append).studies()
        assert waits == [] and _Answer.count == 1  # a 500 is an answer: not retried
        _Answer.status = 503
        with pytest.raises(ServerUnavailable, match="unavailable"):
            PacsClient(url, retries=2, backoff_s=0.5, sleep=waits.append).studies()
        assert waits == [0.5, 1.0] and _Answer.count == 4
        with pytest.raises(PacsError, match="HTTP 503"):
            PacsClient(url, Auth("bearer", "", "tok123"), retries=0).studies()
        assert _Answer.headers[-1] == "Bearer tok123"
    finally:
        server.shutdown()
        server.server_close()
    waits.clear()
    with pytest.raises(ServerUnavailable, match="cannot be reached"):
        PacsClient(url, retries=3, backoff_s=1.0, sleep=waits.append).studies()
    assert waits == [1.0, 2.0, 4.0]


def test_credentials_never_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPREG_PACS_PASSWORD", raising=False)
    monkeypatch.delenv("DEEPREG_PACS_TOKEN", raising=False)
    with pytest.raises(InputError, match="DEEPREG_PACS_PASSWORD"):
        auth_from_options(user="u")
    (tmp_path / "pw").write_text("s3cret\n")
    auth = auth_from_options(user="u", password_file=str(tmp_path / "pw"))
    assert (auth.kind, auth.user, auth.secret) == ("basic", "u", "s3cret") and "s3cret" not in repr(auth)
    monkeypatch.setenv("DEEPREG_PACS_TOKEN", "tok")
    assert auth_from_options().kind == "bearer"
    from DeepRegistrationLib.apps.pacs_cli import add_subparser
    import argparse

    parser = argparse.ArgumentParser()
    add_subparser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["pacs", "register", "--server", "http://x", "--fixed-study", "1", "--moving-study", "2",
                           "--password", "s3cret"])


def test_pacs_watch_registers_new_study_once(orthanc, studies, tmp_path, monkeypatch, capsys):
    rule_file = tmp_path / "rule.json"
    rule_file.write_text(json.dumps({"modality": "MR", "series_description": "T1"}))
    rule = pacs.SeriesRule.from_file(rule_file)
    state = tmp_path / "state.json"
    c = client(orthanc)
    before = orthanc_series(orthanc, studies["current"])
    # first run on an empty state file: existing studies are only a baseline
    s = pacs.watch(c, rule, state, engine_register("affine"), max_polls=1, interval_s=0, sleep=lambda s: None)
    assert s.registered == [] and orthanc_series(orthanc, studies["current"]) == before
    # a fresh state that includes existing studies: the current study is registered to the prior one
    state.unlink()
    s = pacs.watch(c, rule, state, engine_register("affine"), max_polls=2, interval_s=0, sleep=lambda s: None,
                   include_existing=True, results_dir=tmp_path / "results")
    registered_current = studies["current"] in s.registered
    assert registered_current, s
    assert studies["prior"] in s.no_prior
    entry = json.loads(state.read_text())["studies"][studies["current"]]
    assert entry["status"] == "stored" and entry["prior"] == studies["prior"]
    # the kept result (for feedback) is recorded in the state
    assert entry["result"] == str(tmp_path / "results" / "result_0001" / "registration")
    assert (Path(entry["result"]) / "report.json").is_file()
    after = orthanc_series(orthanc, studies["current"])
    assert sorted(v[0] for k, v in after.items() if k not in before) == ["MR", "REG"]
    # restart, as the command: nothing repeated
    from DeepRegistrationLib.apps.cli import main

    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", PASSWORD)
    assert main(["pacs", "watch", "--server", f"{orthanc}/dicom-web", "--user", USER, "--rule", str(rule_file),
                 "--state", str(state), "--max-polls", "1", "--interval", "0", *FAST, "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["registered"] == [] and printed["polls"] == 1
    assert orthanc_series(orthanc, studies["current"]) == after
    # a store interrupted after the STOW: found on the server, recorded, not redone
    data = json.loads(state.read_text())
    data["studies"][studies["current"]]["status"] = "storing"
    state.write_text(json.dumps(data))
    s = pacs.watch(c, rule, state, engine_register("affine"), max_polls=1, interval_s=0, sleep=lambda s: None)
    assert s.registered == [studies["current"]] and orthanc_series(orthanc, studies["current"]) == after
    assert json.loads(state.read_text())["studies"][studies["current"]]["status"] == "stored"


def test_pacs_watch_backs_off_while_server_away(tmp_path):
    waits = []
    c = PacsClient(f"http://127.0.0.1:{free_port()}/dicom-web", retries=0, sleep=lambda s: None)
    s = pacs.watch(c, pacs.SeriesRule(), tmp_path / "state.json", engine_register("affine"), max_polls=4,
                   interval_s=5, sleep=waits.append)
    assert s.server_unavailable == 4 and waits == [5, 10, 20]
    assert not (tmp_path / "state.json").exists()
