"""Users' verdicts on registration results: stored with the result and in a feedback log.

``record(OUTDIR, "accepted" | "rejected", note=..., log=...)`` (command ``deepregistration feedback``, the
Slicer module's Accept / Reject buttons) writes the verdict into ``OUTDIR/report.json`` (key ``"feedback"``)
and appends one line to a **feedback log**, a JSON-lines file keyed by the result's non-identifying
``result_id`` (a random uuid4 hex that ``report.json`` carries; one is created when it has none). The
DatasetBuilder's ``--feedback LOG`` turns the accepted results into training pairs and lists the rejected
ones (:mod:`DatasetBuilderLib.feedback`): the continuous-update loop (docs/FEEDBACK.md).

Log line (one JSON object per line, UTF-8)::

    {"format": 1, "result_id": "3f2a...", "verdict": "accepted", "time_utc": "2026-12-01T12:00:00Z",
     "result_dir": "/abs/path/OUTDIR", "reviewer": "dr-a" | null, "note": "free text" | null}

A second verdict for the same result replaces the first in ``report.json``; the log keeps every line
(history) and readers (:func:`read_log`) take the latest line of each ``result_id``.

Privacy: the note is free text written by clinicians and may hold identifying information. It is never
logged (not even at DEBUG), it stays in ``report.json`` and the local log, and the DatasetBuilder never
copies it (nor paths or file names) into a dataset. The default log is per user (:func:`default_log_path`).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ..core.errors import InputError

logger = logging.getLogger(__name__)

VERDICTS = ("accepted", "rejected")
LOG_FORMAT = 1
ENV_FEEDBACK_LOG = "DEEPREG_FEEDBACK_LOG"
LOG_NAME = "feedback.jsonl"


def default_log_path() -> Path:
    """The per-user feedback log (not created here): ``$DEEPREG_FEEDBACK_LOG`` when set, else
    ``%APPDATA%/DeepRegistration/feedback.jsonl`` on Windows,
    ``~/Library/Application Support/DeepRegistration/feedback.jsonl`` on macOS,
    ``$XDG_DATA_HOME/DeepRegistration/feedback.jsonl`` (default ``~/.local/share``) elsewhere."""
    env = os.environ.get(ENV_FEEDBACK_LOG)
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
        return base / "DeepRegistration" / LOG_NAME
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "DeepRegistration" / LOG_NAME
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "DeepRegistration" / LOG_NAME


def new_result_id() -> str:
    """A random, non-identifying result id (uuid4 hex, 32 characters): nothing derived from the data."""
    return uuid.uuid4().hex


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_report(result_dir: str | os.PathLike) -> dict:
    """``result_dir/report.json`` as a dict; :class:`InputError` when it is missing or not a JSON object."""
    folder = Path(result_dir)
    path = folder / "report.json"
    if not folder.is_dir():
        raise InputError(f"'{folder}' is not a folder. Give the output folder of a registration (the folder "
                         "that holds report.json).")
    if not path.is_file():
        raise InputError(f"'{folder}' has no report.json, so it is not a registration result. Give the output "
                         "folder of 'deepregistration register' (or of a result saved by the Slicer module).")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read '{path}' ({exc}). Register again to get a readable report.json.") from None
    if not isinstance(report, dict):
        raise InputError(f"'{path}' is not a registration report (not a JSON object). Register again.")
    return report


def _check_log(log: Path, create_parent: bool) -> None:
    if log.exists():
        if not log.is_file():
            raise InputError(f"feedback log '{log}' exists and is not a file. Give a file path (--log FILE).")
        if not os.access(log, os.W_OK):
            raise InputError(f"cannot write the feedback log '{log}' (permission denied). Give a writable "
                             "file (--log FILE).")
        return
    parent = log.parent
    if not parent.exists():
        if not create_parent:
            raise InputError(f"the folder of the feedback log, '{parent}', does not exist. Create it first "
                             "or give another --log FILE.")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the folder of the feedback log, '{parent}' ({exc.strerror}). "
                             "Give a writable --log FILE.") from None
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"cannot write the feedback log in '{parent}' (not a writable folder). Give a "
                         "writable --log FILE.")


def record(result_dir: str | os.PathLike, verdict: str, note: str | None = None,
           log: str | os.PathLike | None = None, *, reviewer: str | None = None) -> dict:
    """Records a user's verdict on one registration result, in its ``report.json`` and in the feedback log.

    Everything is checked before anything is written; then the log line is appended and ``report.json`` is
    replaced atomically (written to a temporary file in ``result_dir``, then renamed), so a failure leaves
    both as they were. A later verdict for the same result replaces this one in ``report.json``; the log
    keeps both lines and :func:`read_log` takes the latest.

    Args:
        result_dir: A registration output folder holding ``report.json`` (``deepregistration register``
            OUTDIR, one pair folder of ``register-batch``, a PACS or Slicer result folder).
        verdict: ``"accepted"`` or ``"rejected"``.
        note: Optional free text (may hold identifying information: never logged, never copied into a
            dataset; kept in ``report.json`` and the log only).
        log: The feedback log file (JSON lines, created if absent; its folder must exist). Default: the
            per-user log :func:`default_log_path` (its folder is created).
        reviewer: Optional name the user chooses to sign the verdict with (stored as given).

    Returns:
        The log entry written: ``{"format", "result_id", "verdict", "time_utc" (ISO 8601, UTC, "Z"),
        "result_dir" (absolute path), "reviewer", "note"}`` plus ``"log"`` (the log file's path, str).

    Raises:
        InputError: unknown verdict, no (readable) ``report.json``, a folder or log that cannot be written.
            Nothing is written then.
    """
    if verdict not in VERDICTS:
        raise InputError(f"unknown verdict {verdict!r}: use 'accepted' or 'rejected'.")
    if note is not None and not isinstance(note, str):
        raise InputError("the note must be text (or None).")
    if reviewer is not None and (not isinstance(reviewer, str) or not reviewer.strip()):
        raise InputError("the reviewer name must be non-empty text (or None).")
    note = note if note else None
    folder = Path(result_dir).absolute()
    report = read_report(folder)
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write in the result folder '{folder}' (permission denied), so the verdict "
                         "cannot be stored with the result. Make it writable and record again.")
    log_path = Path(log).expanduser().absolute() if log is not None else default_log_path().absolute()
    _check_log(log_path, create_parent=log is None)

    result_id = report.get("result_id")
    if not (isinstance(result_id, str) and result_id):
        result_id = new_result_id()
    entry = {"format": LOG_FORMAT, "result_id": result_id, "verdict": verdict, "time_utc": _utc_now(),
             "result_dir": str(folder), "reviewer": reviewer.strip() if reviewer else None, "note": note}
    report = {"result_id": result_id, **{k: v for k, v in report.items() if k != "result_id"}}
    report["feedback"] = {k: entry[k] for k in ("verdict", "time_utc", "reviewer", "note")}

    fd, tmp_name = tempfile.mkstemp(prefix=".report.json.", suffix=".partial", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, allow_nan=True)
            fh.flush()
            os.fsync(fh.fileno())
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        size = log_path.stat().st_size if log_path.exists() else None
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.replace(tmp, folder / "report.json")
        except BaseException:
            _undo_append(log_path, size)
            raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"could not store the verdict ({exc}); nothing was changed. Check the folder "
                         f"'{folder}' and the log '{log_path}' can be written.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("verdict %s recorded for result %s (log %s)", verdict, result_id, log_path)
    return {**entry, "log": str(log_path)}


def _undo_append(log_path: Path, size: int | None) -> None:
    """Takes back the line just appended (the log had ``size`` bytes, or did not exist)."""
    try:
        if size is None:
            log_path.unlink(missing_ok=True)
        else:
            os.truncate(log_path, size)
    except OSError:  # pragma: no cover - the original error is raised anyway
        logger.warning("could not take back the last line of the feedback log %s", log_path)


def read_log(log: str | os.PathLike) -> dict[str, dict]:
    """The latest entry of each result in a feedback log: ``{result_id: entry}`` (entries as
    :func:`record` writes them, in the order their results first appear).

    Lines that are blank are skipped; a line that is not a JSON object with a ``result_id`` and a known
    ``verdict`` (e.g. one cut short by a crash) is skipped with a warning giving its line number.

    Raises:
        InputError: the log does not exist or cannot be read.
    """
    path = Path(log).expanduser()
    if not path.is_file():
        raise InputError(f"feedback log '{path}' does not exist. Give the log that 'deepregistration feedback' "
                         "wrote (--log FILE, or the default per-user log).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the feedback log '{path}' ({exc}).") from None
    latest: dict[str, dict] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if not (isinstance(entry, dict) and isinstance(entry.get("result_id"), str)
                and entry.get("verdict") in VERDICTS):
            logger.warning("feedback log %s: line %d is not a verdict entry; skipped", path, number)
            continue
        latest[entry["result_id"]] = entry
    return latest
