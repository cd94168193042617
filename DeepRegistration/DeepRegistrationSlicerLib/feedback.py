"""Accept / Reject of a registration result in Slicer, kept with a copy of the result for the feedback loop.

The background job's folder is removed once its results are in the scene, so :meth:`RegistrationJob.loadResults
<DeepRegistrationSlicerLib.run.RegistrationJob.loadResults>` keeps what a verdict needs in memory
(:class:`PendingResult`: the fixed and moving images as the engine received them, ``transform.h5`` and
``inverse.h5`` as bytes, the report). Nothing is written until the user gives a verdict; then
:func:`recordVerdict` writes a result folder into the per-user **feedback store**::

    STORE/result_0001/fixed.nii.gz, moving.nii.gz   the inputs (LPS, engine frame; what was registered)
                      transform.h5 [, inverse.h5]     the engine's transform (fixed -> moving), as written
                      report.json                     "inputs" pointing at the two copies above

(the folder appears complete or not at all) and calls :func:`DeepRegistrationLib.workflows.feedback.record`,
which stores the verdict in that ``report.json`` and appends it to the feedback log (the per-user default, or
the one set below). The DatasetBuilder's ``--feedback LOG`` then finds the inputs through ``report.json``.
A second verdict on the same result reuses its folder (the log keeps both lines, the latest counts).

Settings (Slicer's application settings, ``slicer.app.userSettings()``): ``DeepRegistration/FeedbackFolder``
(the store; default :func:`defaultStoreFolder`) and ``DeepRegistration/FeedbackLog`` (the log file; default
the engine's per-user log, :func:`DeepRegistrationLib.workflows.feedback.default_log_path`).

Folders are numbered (``result_0001``, ``result_0002``, ...): a name says nothing about the patient and is
not the result's id either (the DatasetBuilder treats distinctive folder names as identifying and refuses a
dataset that contains them, and the result id goes into the dataset). The images themselves are patient data
and stay on this computer.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import slicer

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.image import Image

logger = logging.getLogger(__name__)

STORE_SETTING = "DeepRegistration/FeedbackFolder"
LOG_SETTING = "DeepRegistration/FeedbackLog"
VERDICTS = ("accepted", "rejected")


@dataclass
class PendingResult:
    """What a verdict on one result needs, held in memory until the user gives one.

    Attributes:
        fixed / moving: The images the engine registered (engine frame, LPS).
        transform: ``transform.h5`` (bytes); inverse: ``inverse.h5`` (bytes) or None.
        report: The engine's report (report.json).
        folder: The result folder in the feedback store, once a verdict was recorded (else None).
        entry: The last feedback-log entry recorded (else None).
    """

    fixed: Image
    moving: Image
    transform: bytes
    report: dict
    inverse: bytes | None = None
    folder: Path | None = None
    entry: dict | None = None


def _setting(key: str) -> str | None:
    app = getattr(slicer, "app", None)
    try:
        value = app.userSettings().value(key) if app is not None else None
    except Exception:  # noqa: BLE001 - no settings (slicer-core without the application)
        value = None
    return str(value) if isinstance(value, (str, os.PathLike)) and str(value).strip() else None


def defaultStoreFolder() -> Path:
    """``DeepRegistration/Feedback`` next to Slicer's user settings file (``slicer.app.slicerUserSettingsFilePath``,
    e.g. ``~/.config/slicer.org/``); outside the application, next to the engine's per-user feedback log."""
    app = getattr(slicer, "app", None)
    settingsFile = getattr(app, "slicerUserSettingsFilePath", None) if app is not None else None
    if isinstance(settingsFile, str) and settingsFile:
        return Path(settingsFile).parent / "DeepRegistration" / "Feedback"
    from DeepRegistrationLib.workflows.feedback import default_log_path

    return default_log_path().parent / "results"


def storeFolder() -> Path:
    """The feedback store: the ``DeepRegistration/FeedbackFolder`` setting, else :func:`defaultStoreFolder`."""
    value = _setting(STORE_SETTING)
    return Path(value).expanduser() if value else defaultStoreFolder()


def logPath() -> Path | None:
    """The feedback log set in ``DeepRegistration/FeedbackLog``, or None (the engine's per-user default)."""
    value = _setting(LOG_SETTING)
    return Path(value).expanduser() if value else None


def saveResult(pending: PendingResult, store: str | os.PathLike | None = None) -> Path:
    """Writes the next free result folder ``STORE/result_NNNN/`` (see the module docstring) and returns it; the
    folder is complete or absent (written under a temporary name, then renamed)."""
    from DeepRegistrationLib.io.images import write_image

    store = Path(store) if store is not None else storeFolder()
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the feedback folder '{store}' ({exc.strerror}). Choose a writable "
                         f"folder in the application settings ({STORE_SETTING}).") from None
    resultId = str(pending.report.get("result_id") or "") or None
    if resultId is None:
        from DeepRegistrationLib.workflows.feedback import new_result_id

        resultId = new_result_id()
    tmp = Path(tempfile.mkdtemp(prefix=".result.partial-", dir=store))
    try:
        write_image(pending.fixed, tmp / "fixed.nii.gz")
        write_image(pending.moving, tmp / "moving.nii.gz")
        (tmp / "transform.h5").write_bytes(pending.transform)
        if pending.inverse is not None:
            (tmp / "inverse.h5").write_bytes(pending.inverse)
        name = _nextName(store)
        report = dict(pending.report, result_id=resultId)
        report["inputs"] = {**(report.get("inputs") or {}), "fixed": str(store / name / "fixed.nii.gz"),
                            "moving": str(store / name / "moving.nii.gz")}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True), encoding="utf-8")
        os.rename(tmp, store / name)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write the result into the feedback folder '{store}' ({exc}). Choose a "
                             f"writable folder in the application settings ({STORE_SETTING}).") from None
        raise
    pending.report = report
    return store / name


def _nextName(store: Path) -> str:
    """``result_NNNN`` one above the highest number in ``store``."""
    numbers = [int(p.name[7:]) for p in store.glob("result_*") if p.name[7:].isdigit()]
    return f"result_{max(numbers, default=0) + 1:04d}"


def recordVerdict(pending: PendingResult, verdict: str, note: str | None = None,
                  store: str | os.PathLike | None = None, log: str | os.PathLike | None = None) -> dict:
    """Records the user's ``verdict`` ("accepted" or "rejected") and ``note`` on a result: writes its folder into
    the feedback store on the first verdict (:func:`saveResult`), then
    :func:`DeepRegistrationLib.workflows.feedback.record`. Returns the log entry (with ``log`` and ``folder``).
    Store and log default to the settings (:func:`storeFolder`, :func:`logPath`)."""
    from DeepRegistrationLib.workflows.feedback import record

    if verdict not in VERDICTS:
        raise InputError(f"unknown verdict {verdict!r}: use 'accepted' or 'rejected'.")
    log = log if log is not None else logPath()
    if pending.folder is None or not (pending.folder / "report.json").is_file():
        pending.folder = saveResult(pending, store)
    entry = record(pending.folder, verdict, note=note or None, log=log)
    pending.entry = {**entry, "folder": str(pending.folder)}
    return pending.entry
