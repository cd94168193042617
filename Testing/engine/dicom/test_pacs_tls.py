"""TLS verification of the DICOMweb client against a real Orthanc (Debian ``orthanc``, ``orthanc-dicomweb``)
serving HTTPS on a loopback port with a self-signed certificate made here with ``openssl`` (where Orthanc's
own HTTPS server crashes, Orthanc serves HTTP behind a loopback TLS forwarder with that certificate).

Verification is on by default: without ``--ca-bundle`` a query fails with one clear error naming the
certificate problem and the ``--ca-bundle`` fix (exit 2, nothing written or stored); a bundle holding another
certificate fails the same way; with the server's certificate as the bundle, QIDO, WADO and STOW succeed, also
with ``$REQUESTS_CA_BUNDLE`` set (which requests would otherwise let replace the given bundle); a bundle that
does not exist is one input error; the HTTP basic credentials never appear in logs, error text or stderr.
"""
from __future__ import annotations

import base64
import logging
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client")
requests = pytest.importorskip("requests")

from dicom_series_data import make_series  # noqa: E402

from DeepRegistrationLib.dicom import pacs  # noqa: E402
from DeepRegistrationLib.dicom.dicomweb import Auth, PacsClient, PacsError, ServerUnavailable  # noqa: E402
from DeepRegistrationLib.dicom.series import new_uid  # noqa: E402
from test_pacs_orthanc import ORTHANC, PLUGIN, free_port, start_orthanc, stop_orthanc  # noqa: E402

OPENSSL = shutil.which("openssl")
USER, PASSWORD = "deepreg", "tls-test-password-7c1f"
SECRETS = (PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())

pytestmark = [
    pytest.mark.skipif(not (ORTHANC and PLUGIN), reason="Orthanc with its DICOMweb plugin is not installed "
                       "(Debian packages orthanc, orthanc-dicomweb)"),
    pytest.mark.skipif(not OPENSSL, reason="openssl is not installed (Debian package openssl): it makes the "
                       "server's self-signed certificate"),
]


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (certificate PEM, certificate + private key PEM)."""
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    both = folder / f"{name}.pem"
    both.write_text(cert.read_text() + key.read_text())
    return cert, both


class TlsForwarder:
    """TLS termination on a loopback port in front of a plain-HTTP port (bytes piped both ways, one thread per
    connection). Used only when Orthanc's own HTTPS server crashes: Debian 12's Orthanc 1.10.1 on civetweb 1.15
    with OpenSSL 3 segfaults on the first TLS handshake (a call through a NULL function pointer in libcivetweb)."""

    def __init__(self, pem: Path, target_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pem))
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn):
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused our certificate
            conn.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # Orthanc not listening yet
            tls.close()
            return
        with tls, upstream:
            try:
                while not self.stopped:
                    ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 0.5)[0]
                    for src, dst in ((tls, upstream), (upstream, tls)):
                        if src in ready:
                            data = src.recv(65536)
                            if not data:
                                return
                            dst.sendall(data)
            except (ssl.SSLError, OSError):
                return

    def stop(self):
        self.stopped = True
        self.server.close()


def _wait_ready(url: str, verify, proc) -> bool:
    """True once ``url`` answers; False if the server process ended first (or after 30 s)."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(url, auth=(USER, PASSWORD), verify=verify, timeout=2).ok:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory):
    """(HTTPS base URL, the server's certificate, another self-signed certificate, one study UID on the server).

    Orthanc serves HTTPS itself ("SslEnabled", "SslCertificate": certificate + key PEM); where its HTTPS server
    crashes on the handshake (see :class:`TlsForwarder`) it serves plain HTTP on loopback behind a TLS forwarder
    with the same certificate: the client's verification is the same either way."""
    root = tmp_path_factory.mktemp("orthanc-tls")
    cert, pem = self_signed(root / "certs", "server")
    other, _ = self_signed(root / "certs", "other")
    port = free_port()
    config = {"Name": "DeepRegistrationTLSTest", "StorageDirectory": str(root / "db"),
              "IndexDirectory": str(root / "db"), "HttpPort": port, "DicomServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
              "SslEnabled": True, "SslCertificate": str(pem), "Plugins": [PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}, "HttpTimeout": 60}
    proc, log = start_orthanc(root, config, "orthanc-https")
    forwarder = None
    try:
        base = f"https://127.0.0.1:{port}"
        if not _wait_ready(f"{base}/system", str(cert), proc):
            if proc.poll() is None or proc.returncode >= 0:  # not ended by a signal: a real failure
                pytest.fail(f"Orthanc did not start with TLS: {(root / 'orthanc-https.log').read_text()[-2000:]}")
            stop_orthanc(proc, log)
            config["SslEnabled"] = False
            proc, log = start_orthanc(root, config, "orthanc-http")
            forwarder = TlsForwarder(pem, port)
            base = f"https://127.0.0.1:{forwarder.port}"
            if not _wait_ready(f"{base}/system", str(cert), proc):
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc-http.log').read_text()[-2000:]}")
        study = new_uid()
        for p in make_series("fixed", root / "study", patient_name="Synthetic^TLS", patient_id="SYNTLS01",
                             study_uid=study):
            requests.post(f"{base}/instances", data=p.read_bytes(), auth=(USER, PASSWORD), verify=str(cert),
                          timeout=30).raise_for_status()
        yield base, cert, other, study
    finally:
        if forwarder is not None:
            forwarder.stop()
        stop_orthanc(proc, log)


def series_on_server(base: str, cert: Path) -> int:
    return len(requests.get(f"{base}/series", auth=(USER, PASSWORD), verify=str(cert), timeout=30).json())


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_unverified_certificate_is_one_clear_error(tls_orthanc, tmp_path, monkeypatch, capsys, caplog):
    """No --ca-bundle (the system's CAs) or a bundle holding another certificate: refused before anything is
    fetched, not retried, one error naming the certificate and --ca-bundle; the command exits 2, writes nothing."""
    from DeepRegistrationLib.apps.cli import main

    base, cert, other, study = tls_orthanc
    caplog.set_level(logging.DEBUG)
    waits = []
    for bundle in (None, str(other)):
        with pytest.raises(PacsError, match=r"TLS certificate .* could not be verified") as info:
            PacsClient(f"{base}/dicom-web", Auth("basic", USER, PASSWORD), ca_bundle=bundle, retries=3,
                       sleep=waits.append).studies()
        assert not isinstance(info.value, ServerUnavailable)
        assert "--ca-bundle FILE" in str(info.value) and "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert_no_secret(str(info.value))
    assert waits == []  # a certificate problem is not retried

    before = series_on_server(base, cert)
    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", PASSWORD)
    scratch, out = tmp_path / "scratch", tmp_path / "cwd"
    scratch.mkdir()
    out.mkdir()
    monkeypatch.setattr(pacs.tempfile, "tempdir", str(scratch))  # where downloads would go
    monkeypatch.chdir(out)
    for extra in ([], ["--ca-bundle", str(other)]):
        capsys.readouterr()
        status = main(["pacs", "register", "--server", f"{base}/dicom-web", "--user", USER, *extra,
                       "--fixed-study", study, "--moving-study", new_uid(), "--mode", "rigid", "-q"])
        captured = capsys.readouterr()
        assert status == 2 and captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deepregistration: error: "), captured.err
        assert "TLS certificate" in lines[0] and "--ca-bundle FILE" in lines[0] and "Traceback" not in captured.err
        assert_no_secret(captured.err)
    assert list(scratch.iterdir()) == [] and list(out.iterdir()) == []
    assert series_on_server(base, cert) == before
    assert_no_secret(caplog.text)


def test_server_certificate_as_bundle_verifies(tls_orthanc, tmp_path, monkeypatch, capsys, caplog):
    """With the server's certificate as the CA bundle: QIDO finds the uploaded study, WADO retrieves its
    series, STOW stores a new one; the command with --ca-bundle gets past TLS (to the input error it should)."""
    from DeepRegistrationLib.apps.cli import main

    base, cert, _, study = tls_orthanc
    caplog.set_level(logging.DEBUG)
    # a CA bundle in the environment (common in containers) must not replace the one given
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", requests.certs.where())
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    from DeepRegistrationLib.dicom.dicomweb import auth_from_options

    c = PacsClient(f"{base}/dicom-web", auth_from_options(USER, str(password_file)), ca_bundle=str(cert))
    found = [pacs.value(s, "StudyInstanceUID") for s in c.studies({"PatientID": "SYNTLS01"})]
    assert found == [study]
    (series,) = c.series(study)
    datasets = c.retrieve_series(study, pacs.value(series, "SeriesInstanceUID"))
    assert len(datasets) > 1 and {ds.StudyInstanceUID for ds in datasets} == {study}
    # STOW over HTTPS: a copy of the series as a new series of the same study
    copy_uid = new_uid()
    for ds in datasets:
        ds.SeriesInstanceUID, ds.SOPInstanceUID = copy_uid, new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    c.store(datasets)
    assert copy_uid in {pacs.value(s, "SeriesInstanceUID") for s in c.series(study)}
    assert_no_secret(caplog.text)
    # the command's --ca-bundle reaches the client: the TLS handshake passes, the unknown study is the error
    monkeypatch.chdir(tmp_path)
    missing = new_uid()
    status = main(["pacs", "register", "--server", f"{base}/dicom-web", "--user", USER, "--password-file",
                   str(password_file), "--ca-bundle", str(cert), "--fixed-study", study, "--moving-study", missing,
                   "--mode", "rigid", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and "not on the server" in err and missing in err and "TLS" not in err, err
    assert_no_secret(err, caplog.text)
    # a bundle that does not exist: one input error naming the option, before any request
    assert main(["pacs", "register", "--server", f"{base}/dicom-web", "--user", USER, "--password-file",
                 str(password_file), "--ca-bundle", str(tmp_path / "no-such.pem"), "--fixed-study", study,
                 "--moving-study", missing, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no-such.pem' does not exist" in err and "--ca-bundle" in err, err


def test_credentials_never_shown_over_https(tls_orthanc, monkeypatch, capsys, caplog):
    """Refused credentials over HTTPS (password from the environment): one error naming the fix, no secret in
    it, in the debug log or on stderr."""
    from DeepRegistrationLib.apps.cli import main

    base, cert, _, study = tls_orthanc
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-password-9d2e"
    with pytest.raises(PacsError, match="refused the credentials") as info:
        PacsClient(f"{base}/dicom-web", Auth("basic", USER, wrong), ca_bundle=str(cert)).studies()
    assert wrong not in str(info.value) and wrong not in caplog.text
    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", wrong)
    status = main(["pacs", "register", "--server", f"{base}/dicom-web", "--user", USER, "--ca-bundle", str(cert),
                   "--fixed-study", study, "--moving-study", new_uid(), "-v", "-q"])
    err = capsys.readouterr().err
    assert status == 2 and "refused the credentials" in err and "DEEPREG_PACS_PASSWORD" in err
    b64 = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    for text in (err, caplog.text):
        assert wrong not in text and b64 not in text
    # the right password from the environment, with -v: the query succeeds, nothing secret logged
    monkeypatch.setenv("DEEPREG_PACS_PASSWORD", PASSWORD)
    c = PacsClient(f"{base}/dicom-web", Auth("basic", USER, PASSWORD), ca_bundle=str(cert))
    assert study in {pacs.value(s, "StudyInstanceUID") for s in c.studies()}
    assert_no_secret(caplog.text, capsys.readouterr().err, repr(c.client), repr(Auth("basic", USER, PASSWORD)))
