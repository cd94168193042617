"""A DICOMweb client (QIDO-RS, WADO-RS, STOW-RS over ``dicomweb-client``) with authentication, TLS
verification and retries, whose failures are one clear :class:`PacsError` each.

Credentials never come from the command line: HTTP basic uses a user name plus a password read from a
file or the environment variable ``DEEPREG_PACS_PASSWORD``; a bearer token comes from a file or
``DEEPREG_PACS_TOKEN``. TLS certificates are verified (optionally against a given CA bundle).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import DeepRegistrationError, InputError

logger = logging.getLogger(__name__)

PASSWORD_ENV = "DEEPREG_PACS_PASSWORD"
TOKEN_ENV = "DEEPREG_PACS_TOKEN"
RETRY_STATUS = (502, 503, 504)


class PacsError(DeepRegistrationError):
    """The PACS refused a request or could not be reached; the message says which and what to do."""


class ServerUnavailable(PacsError):
    """The server did not answer (connection refused, timeout, 502/503/504) after every retry."""


@dataclass
class Auth:
    """How to authenticate: ``kind`` "none", "basic" (user + password) or "bearer" (token)."""

    kind: str = "none"
    user: str = ""
    secret: str = ""

    def __repr__(self) -> str:  # never show the secret
        return f"Auth(kind={self.kind!r}, user={self.user!r})"


def _read_secret(path: str | None, env: str, what: str) -> str:
    if path:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"the {what} file '{p}' does not exist.")
        value = p.read_text().strip()
    else:
        value = os.environ.get(env, "").strip()
    if not value:
        raise InputError(f"no {what}: put it in a file (--{what}-file FILE) or in the environment variable {env}.")
    return value


def auth_from_options(user: str | None = None, password_file: str | None = None, token_file: str | None = None,
                      use_token_env: bool = False) -> Auth:
    """Basic auth when ``user`` is given (password from ``password_file`` or ``$DEEPREG_PACS_PASSWORD``),
    bearer auth from ``token_file`` or (``use_token_env`` / the variable set) ``$DEEPREG_PACS_TOKEN``, else none."""
    if user and (token_file or use_token_env):
        raise InputError("give either a user (basic authentication) or a token (bearer), not both.")
    if user:
        return Auth("basic", user, _read_secret(password_file, PASSWORD_ENV, "password"))
    if token_file or use_token_env or os.environ.get(TOKEN_ENV):
        return Auth("bearer", "", _read_secret(token_file, TOKEN_ENV, "token"))
    if password_file:
        raise InputError("a password file needs --user NAME.")
    return Auth()


def make_session(auth: Auth, ca_bundle: str | None = None):
    """A ``requests.Session`` with the credentials and TLS verification on (against ``ca_bundle`` if given;
    ``$REQUESTS_CA_BUNDLE`` / ``$CURL_CA_BUNDLE`` do not override a given bundle)."""
    import requests

    if ca_bundle and not Path(ca_bundle).is_file():
        raise InputError(f"the CA bundle '{ca_bundle}' does not exist. Give --ca-bundle the PEM file holding the "
                         "server's CA certificate(s).")

    class _Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            # requests lets $REQUESTS_CA_BUNDLE replace the session's own bundle: keep the given one
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if verify is None and ca_bundle:
                settings["verify"] = ca_bundle
            return settings

    session = _Session()
    session.verify = ca_bundle if ca_bundle else True
    if auth.kind == "basic":
        session.auth = (auth.user, auth.secret)
    elif auth.kind == "bearer":
        session.headers["Authorization"] = f"Bearer {auth.secret}"
    return session


class PacsClient:
    """QIDO/WADO/STOW calls with retry and back-off on an unreachable server.

    Args:
        url: DICOMweb base URL (e.g. ``https://pacs.example.org/dicom-web``).
        auth: Credentials.
        ca_bundle: CA certificates to verify the server against (default: the system's).
        retries: Attempts after the first when the server is away (connection error, timeout, 502/503/504).
        backoff_s: First wait; doubled after each failed attempt.
        timeout_s: Per-request timeout.
        sleep: Sleep function (tests pass a recorder).
    """

    def __init__(self, url: str, auth: Auth | None = None, ca_bundle: str | None = None, retries: int = 3,
                 backoff_s: float = 1.0, timeout_s: float = 60.0, sleep: Callable[[float], None] = time.sleep):
        try:
            from dicomweb_client.api import DICOMwebClient
        except ModuleNotFoundError:
            raise InputError("the PACS worker needs the Python package 'dicomweb-client': pip install "
                             "'deepregistration[pacs]'") from None
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--server '{url}' is not an http(s) URL. Give the DICOMweb base URL, e.g. "
                             "https://pacs.example.org/dicom-web")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.page_size = 500
        self.client = DICOMwebClient(self.url, session=make_session(auth or Auth(), ca_bundle), timeout=timeout_s)
        self.client.set_http_retry_params(retry=False)  # retries are ours (bounded, logged, injectable sleep)

    # ------------------------------------------------------------------ plumbing
    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except requests.exceptions.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status in RETRY_STATUS and attempt < self.retries:
                    logger.warning("%s: server answered %d; retrying in %.1f s", what, status, wait)
                else:
                    raise self._http_error(what, status) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise PacsError(f"{what}: the TLS certificate of {self.url} could not be verified ({exc}). "
                                    "Give the server's CA with --ca-bundle FILE.") from None
                if attempt >= self.retries:
                    raise ServerUnavailable(f"{what}: the server {self.url} cannot be reached "
                                            f"({type(exc).__name__}) after {self.retries + 1} attempts. Check "
                                            "the URL and that the server is running.") from None
                logger.warning("%s: %s; retrying in %.1f s", what, type(exc).__name__, wait)
            self.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")

    def _http_error(self, what: str, status: int) -> PacsError:
        if status in (401, 403):
            return PacsError(f"{what}: the server refused the credentials (HTTP {status}). Check the user and "
                             f"password (--user, --password-file or ${PASSWORD_ENV}) or the token (--token-file or "
                             f"${TOKEN_ENV}).")
        if status == 404:
            return PacsError(f"{what}: not found on the server (HTTP 404). Check the UID and the DICOMweb base "
                             f"URL ({self.url}).")
        if status in RETRY_STATUS:
            return ServerUnavailable(f"{what}: the server is unavailable (HTTP {status}) after {self.retries + 1} "
                                     "attempts. Try again later.")
        return PacsError(f"{what}: the server answered HTTP {status}. See the server's log.")

    # ------------------------------------------------------------------ QIDO / WADO / STOW
    def _search(self, what: str, fn, uid_tag: str, **kwargs) -> list[dict]:
        """QIDO-RS in pages of :attr:`page_size`; stops at a short page or at a page with nothing new (a server
        that ignores ``offset``, as Orthanc's plugin does, would otherwise be paged for ever)."""
        out, seen, offset = [], set(), 0
        while True:
            page = self._call(what, fn, limit=self.page_size, offset=offset, **kwargs) or []
            new = [item for item in page if _uid(item, uid_tag) not in seen]
            seen.update(_uid(item, uid_tag) for item in new)
            out += new
            if len(page) < self.page_size or not new:
                return out
            offset += len(page)

    def studies(self, filters: dict | None = None, fields=()) -> list[dict]:
        """QIDO-RS study search; DICOM JSON results."""
        return self._search("searching studies", self.client.search_for_studies, "0020000D",
                            search_filters=filters or {}, fields=list(fields) or None)

    def series(self, study_uid: str, fields=()) -> list[dict]:
        """QIDO-RS series of one study."""
        return self._search(f"searching the series of study {study_uid}", self.client.search_for_series,
                            "0020000E", study_instance_uid=study_uid, fields=list(fields) or None)

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[dict]:
        """QIDO-RS instances of a study (or one series)."""
        return self._search(f"searching the instances of study {study_uid}", self.client.search_for_instances,
                            "00080018", study_instance_uid=study_uid, series_instance_uid=series_uid)

    def retrieve_series(self, study_uid: str, series_uid: str) -> list:
        """WADO-RS: every instance of a series as pydicom datasets."""
        return self._call(f"retrieving series {series_uid}", self.client.retrieve_series, study_uid, series_uid)

    def store(self, datasets: list) -> None:
        """STOW-RS of ``datasets`` in one request; PacsError when the server reports any instance failed."""
        from pydicom.dataset import validate_file_meta

        for ds in datasets:  # dicomweb-client writes datasets "as is": make each a DICOM Part 10 file
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128
            validate_file_meta(ds.file_meta, enforce_standard=True)
        response = self._call(f"storing {len(datasets)} instances", self.client.store_instances, datasets)
        failed = list(response.get("FailedSOPSequence", [])) if response is not None else []
        if failed:
            uids = ", ".join(str(f.get("ReferencedSOPInstanceUID", "?")) for f in failed[:3])
            raise PacsError(f"the server refused {len(failed)} of {len(datasets)} instances ({uids}...). See the "
                            "server's log.")


def _uid(item: dict, tag: str) -> str:
    entry = item.get(tag) or {}
    return str((entry.get("Value") or [""])[0])


def value(item: dict, keyword: str, default=""):
    """First value of an attribute in a DICOM JSON object (QIDO result); person names as text."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    entry = item.get(f"{tag:08X}") if tag is not None else None
    if not entry or not entry.get("Value"):
        return default
    v = entry["Value"][0]
    if isinstance(v, dict):  # PN
        return v.get("Alphabetic", default)
    return v
