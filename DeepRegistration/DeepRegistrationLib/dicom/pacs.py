"""The PACS worker: fetch two studies over DICOMweb, register, store the registration back.

``register_studies`` (command ``deepregistration pacs register``): picks one image series in each study
(CT/MR/PET, matching an optional :class:`SeriesRule`, the one with most instances), retrieves both
(WADO-RS), registers them with a given function (the ``register`` command's engine run), builds the
Spatial Registration (linear) or Deformable Spatial Registration object and, optionally, the resampled
moving series (derived, in the fixed frame), and stores them with **one** STOW-RS request, only once
everything is built: a failure before that stores nothing.

``watch`` (command ``deepregistration pacs watch``): polls for studies, registers each new study of a
patient (fixed = the new study) to the same patient's most recent prior study with a series matching the
rule (moving = the prior), through a bounded queue; a JSON state file, replaced atomically after every
study, records what was done so that a restart neither repeats nor loses work (a study is recorded as
``stored`` only after its STOW succeeded, and one interrupted while storing is checked on the server
before being redone); an unreachable server is retried with doubling back-off.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import Cancelled, InputError
from .dicomweb import PacsClient, PacsError, ServerUnavailable, value
from .derived_series import DERIVED_MARK
from .series import IMAGE_SOP_CLASSES, Series, series_from_datasets

logger = logging.getLogger(__name__)

IMAGE_MODALITIES = tuple(sorted(set(IMAGE_SOP_CLASSES.values())))
SERIES_FIELDS = ("Modality", "SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances",
                 "SeriesNumber")
STUDY_FIELDS = ("PatientID", "PatientName", "StudyDate", "StudyTime", "StudyInstanceUID", "ModalitiesInStudy")

#: ``register(fixed_dir, moving_dir, out_dir) -> report dict``; writes ``transform.h5``, and ``warped.nii.gz`` when
#: the derived series is to be stored (``derived=True``), which is read from it.
RegisterFunction = Callable[[Path, Path, Path], dict]


@dataclass
class SeriesRule:
    """Which series of a study to register: modality, body part (exact, case-insensitive) and a regular
    expression searched in the Series Description (case-insensitive); None = any."""

    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SeriesRule":
        """A rule from a JSON file ``{"modality": "MR", "body_part": "HEAD", "series_description": "T1"}``."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"rule file '{p}' cannot be read as JSON ({exc}).") from None
        unknown = set(data) - {"modality", "body_part", "series_description"}
        if not isinstance(data, dict) or unknown:
            raise InputError(f"rule file '{p}': unknown keys {sorted(unknown)}; use modality, body_part, "
                             "series_description.")
        rule = cls(**data)
        rule.check()
        return rule

    def check(self) -> None:
        if self.series_description:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise InputError(f"series description pattern {self.series_description!r} is not a regular "
                                 f"expression ({exc}).") from None

    def matches(self, item: dict) -> bool:
        """Whether a QIDO series result matches (image modalities only)."""
        modality = str(value(item, "Modality")).upper()
        if modality not in IMAGE_MODALITIES:
            return False
        if self.modality and modality != self.modality.upper():
            return False
        if self.body_part and str(value(item, "BodyPartExamined")).upper() != self.body_part.upper():
            return False
        if self.series_description and not re.search(self.series_description, str(value(item, "SeriesDescription")),
                                                     re.IGNORECASE):
            return False
        return True


@dataclass
class PacsResult:
    """What ``register_studies`` stored."""

    fixed_study: str
    moving_study: str
    fixed_series: str
    moving_series: str
    registration_sop_class: str
    registration_uid: str
    derived_series_uid: str | None
    stored_uids: list = field(default_factory=list)
    report: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list, repr=False)


def is_derived(item: dict) -> bool:
    """Whether a QIDO series result is a series this package derived (never registered again)."""
    return str(value(item, "SeriesDescription")).endswith(DERIVED_MARK)


def pick_series(client: PacsClient, study_uid: str, rule: SeriesRule | None, what: str) -> dict:
    """The image series of a study that matches ``rule`` with the most instances (QIDO result).

    Raises:
        InputError: the study has no (matching) image series.
    """
    items = client.series(study_uid, fields=SERIES_FIELDS)
    if not items:
        raise InputError(f"{what}: study {study_uid} holds no series (or does not exist on the server).")
    rule = rule or SeriesRule()
    matching = [s for s in items if rule.matches(s) and not is_derived(s)]
    if not matching:
        found = ", ".join(sorted({f"{value(s, 'Modality')} '{value(s, 'SeriesDescription')}'" for s in items}))
        raise InputError(f"{what}: study {study_uid} has no image series (CT/MR/PT) matching {rule} "
                         f"(it has: {found}). Choose another study or change --series-filter / the rule.")
    return max(matching, key=lambda s: int(value(s, "NumberOfSeriesRelatedInstances", 0) or 0))


def fetch_series(client: PacsClient, study_uid: str, series_uid: str, folder: Path, what: str) -> Series:
    """Retrieves a series into ``folder`` (one file per instance) and returns it sorted."""
    datasets = [ds for ds in client.retrieve_series(study_uid, series_uid) if "ImagePositionPatient" in ds]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=False)
        paths.append(p)
    return series_from_datasets(datasets, f"{what} (series {series_uid})", paths)


def _patient(item_or_ds) -> tuple[str, str]:
    if isinstance(item_or_ds, dict):
        return str(value(item_or_ds, "PatientID")), str(value(item_or_ds, "PatientName"))
    return str(item_or_ds.get("PatientID", "")), str(item_or_ds.get("PatientName", ""))


def build_objects(out_dir: Path, fixed: Series, moving: Series, method: str, derived: bool = True) -> list:
    """The registration object (and derived series) from a registration output folder, in memory."""
    import SimpleITK as sitk

    from ..io.images import sitk_to_image
    from ..io.itk_transform import from_itk
    from .derived_series import derived_series_datasets
    from .registration_objects import registration_dataset, software_version

    affine, u, grid = from_itk(sitk.ReadTransform(str(out_dir / "transform.h5")))
    reg = registration_dataset(affine, fixed, moving, field=u, field_grid=grid, description=method,
                               software_version=software_version())
    out = [reg]
    if derived:
        warped = sitk_to_image(sitk.ReadImage(str(out_dir / "warped.nii.gz")), "warped")
        out += derived_series_datasets(warped, fixed, moving, method, registration=reg)
    return out


def method_description(report: dict) -> str:
    """'DeepRegistration <version> <mode> registration (<similarity>)' from a report.json dict."""
    params = report.get("parameters", {})
    version = report.get("versions", {}).get("deepregistration", "")
    return (f"DeepRegistration {version} {params.get('mode', '')} registration "
            f"({params.get('similarity', '')})").replace("  ", " ")


def new_result_folder(base: str | os.PathLike) -> Path:
    """A new, empty folder ``base/result_NNNN`` (the next free number; created here). Numbered rather than
    named by study UIDs, so the path names no study; ``deepregistration feedback`` takes its
    ``registration/`` subfolder (a ``register`` OUTDIR)."""
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name[7:]) for p in root.glob("result_[0-9]*") if p.name[7:].isdigit()), default=0)
    while True:
        folder = root / f"result_{n:04d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another process took this number
            n += 1


def register_studies(client: PacsClient, fixed_study: str, moving_study: str, register: RegisterFunction, *,
                     rule: SeriesRule | None = None, allow_different_patients: bool = False, derived: bool = True,
                     work_dir: str | os.PathLike | None = None, store: bool = True,
                     keep_failed: bool = True) -> PacsResult:
    """Registers the moving study onto the fixed study and stores the result on the server.

    Args:
        client: The PACS.
        fixed_study / moving_study: Study Instance UIDs.
        register: Runs the registration (see :data:`RegisterFunction`).
        rule: Series selection (default: any image series; the largest is used).
        allow_different_patients: Register studies of different patients (refused by default).
        derived: Also store the resampled moving series.
        work_dir: Where to keep the downloaded series (``fixed/``, ``moving/``) and the registration's outputs
            (``registration/``, a ``register`` OUTDIR) (default: a temporary folder, removed).
        keep_failed: With ``work_dir``: keep it when the registration fails (False: remove it, e.g. a
            folder of :func:`new_result_folder`, so nothing half-written stays).
        store: False to build everything but store nothing (dry run).

    Raises:
        InputError: no image series, different patients, series that cannot be registered.
        PacsError: the server refused or is away; nothing is stored unless the single STOW request succeeded.
    """
    if fixed_study == moving_study:
        raise InputError("the fixed and moving studies are the same study; give two studies.")
    studies = {}
    for role, uid in (("fixed", fixed_study), ("moving", moving_study)):
        found = client.studies({"StudyInstanceUID": uid}, fields=STUDY_FIELDS)
        if not found:
            raise InputError(f"{role} study {uid} is not on the server. Check the Study Instance UID.")
        studies[role] = found[0]
    if _patient(studies["fixed"])[0] != _patient(studies["moving"])[0] and not allow_different_patients:
        raise InputError(f"the fixed and moving studies belong to different patients (Patient ID "
                         f"{_patient(studies['fixed'])[0]!r} vs {_patient(studies['moving'])[0]!r}). Pass "
                         "--allow-different-patients to register them anyway (e.g. to an atlas).")
    fixed_item = pick_series(client, fixed_study, rule, "fixed study")
    moving_item = pick_series(client, moving_study, rule, "moving study")
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="deepreg-pacs-")) if own_tmp else Path(work_dir)
    completed = False
    try:
        fixed = fetch_series(client, fixed_study, str(value(fixed_item, "SeriesInstanceUID")), work / "fixed",
                             "fixed study")
        moving = fetch_series(client, moving_study, str(value(moving_item, "SeriesInstanceUID")), work / "moving",
                              "moving study")
        if _patient(fixed.first)[0] != _patient(moving.first)[0] and not allow_different_patients:
            raise InputError("the fixed and moving series belong to different patients; pass "
                             "--allow-different-patients to register them anyway.")
        out_dir = work / "registration"
        report = register(work / "fixed", work / "moving", out_dir)
        method = method_description(report)
        datasets = build_objects(out_dir, fixed, moving, method, derived)
        reg = datasets[0]
        result = PacsResult(fixed_study, moving_study, fixed.series_uid, moving.series_uid, str(reg.SOPClassUID),
                            str(reg.SOPInstanceUID), str(datasets[1].SeriesInstanceUID) if derived else None,
                            [str(d.SOPInstanceUID) for d in datasets], report, datasets)
        if store:
            client.store(datasets)
            logger.info("stored %d instances (registration %s) in study %s", len(datasets),
                        result.registration_uid, fixed_study)
        completed = True
        return result
    finally:
        if own_tmp or (not completed and keep_failed is False):
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------- watch
class WatchState:
    """The watch loop's memory, a JSON file replaced atomically at every change.

    ``studies[uid]`` = ``{"status": "stored" | "no-prior" | "failed" | "storing" | "baseline", ...}``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.studies: dict = {}
        if self.path.exists():
            try:
                self.studies = json.loads(self.path.read_text()).get("studies", {})
            except (OSError, json.JSONDecodeError, AttributeError) as exc:
                raise InputError(f"state file '{self.path}' is not a watch state file ({exc}). Move it away or "
                                 "give another --state file.") from None
        elif not self.path.parent.exists():
            raise InputError(f"the folder of the state file '{self.path}' does not exist.")

    @property
    def fresh(self) -> bool:
        return not self.path.exists()

    def set(self, study_uid: str, **entry) -> None:
        entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.studies[study_uid] = entry
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": 1, "studies": self.studies}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def _study_key(item: dict) -> tuple[str, str]:
    return str(value(item, "StudyDate")), str(value(item, "StudyTime"))


def find_prior(client: PacsClient, study: dict, rule: SeriesRule) -> dict | None:
    """The patient's most recent study before ``study`` (Study Date/Time) with a series matching ``rule``."""
    patient = str(value(study, "PatientID"))
    uid = str(value(study, "StudyInstanceUID"))
    candidates = [s for s in client.studies({"PatientID": patient}, fields=STUDY_FIELDS)
                  if str(value(s, "StudyInstanceUID")) != uid and str(value(s, "PatientID")) == patient
                  and _study_key(s) < _study_key(study)]
    for prior in sorted(candidates, key=_study_key, reverse=True):
        if any(rule.matches(s) for s in client.series(str(value(prior, "StudyInstanceUID")), fields=SERIES_FIELDS)):
            return prior
    return None


@dataclass
class WatchSummary:
    """Counts of one ``watch`` run."""

    polls: int = 0
    registered: list = field(default_factory=list)
    no_prior: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    server_unavailable: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def watch(client: PacsClient, rule: SeriesRule, state_file: str | os.PathLike, register: RegisterFunction, *,
          interval_s: float = 60.0, max_polls: int | None = None, queue_size: int = 10,
          include_existing: bool = False, derived: bool = True, results_dir: str | os.PathLike | None = None,
          max_backoff_s: float = 600.0,
          sleep: Callable[[float], None] = time.sleep, should_stop: Callable[[], bool] = lambda: False) -> WatchSummary:
    """Polls the server and registers each new study to the patient's most recent matching prior study.

    Args:
        client: The PACS.
        rule: Which series count (also used to pick the series of both studies).
        state_file: JSON state (created on first run).
        register: The registration function (see :data:`RegisterFunction`).
        interval_s: Seconds between polls.
        max_polls: Stop after this many polls (None = until ``should_stop``).
        queue_size: At most this many studies are registered per poll; the rest wait for the next one.
        include_existing: On the first run (no state file), also register the studies already on the server
            (default: they are recorded as a baseline and only later studies are registered).
        derived: Also store the resampled series.
        results_dir: Keep each registered study's series and registration folder in a new
            ``results_dir/result_NNNN`` (:func:`new_result_folder`; the state records it as ``result``) for
            users' feedback; default: temporary folders, removed.
        max_backoff_s: Longest wait between attempts while the server is away.
        sleep / should_stop: Injected for tests and services.

    Studies whose registration failed with bad input (no image series, ...) are recorded as ``failed``
    and not retried; a server that is away is retried at the next poll, with doubling back-off.
    """
    state = WatchState(state_file)
    baseline = state.fresh and not include_existing
    summary = WatchSummary()
    backoff = interval_s
    while max_polls is None or summary.polls < max_polls:
        if should_stop():
            break
        summary.polls += 1
        try:
            _poll(client, rule, state, register, summary, queue_size, baseline, derived, results_dir)
            baseline = False
            backoff = interval_s
        except ServerUnavailable as exc:
            summary.server_unavailable += 1
            logger.warning("server unavailable (%s); next attempt in %.0f s", exc, backoff)
            if max_polls is not None and summary.polls >= max_polls:
                break
            sleep(backoff)
            backoff = min(max_backoff_s, backoff * 2)
            continue
        if max_polls is not None and summary.polls >= max_polls:
            break
        sleep(interval_s)
    return summary


def _poll(client, rule, state, register, summary, queue_size, baseline, derived, results_dir=None) -> None:
    filters = {"ModalitiesInStudy": rule.modality.upper()} if rule.modality else {}
    studies = client.studies(filters, fields=STUDY_FIELDS)
    if baseline:
        for s in studies:
            state.studies[str(value(s, "StudyInstanceUID"))] = {"status": "baseline"}
        state.save()
        logger.info("first poll: %d existing studies recorded as baseline", len(studies))
        return
    pending = [s for s in studies if state.studies.get(str(value(s, "StudyInstanceUID")), {}).get("status")
               in (None, "storing")]
    pending.sort(key=_study_key)
    for study in pending[:queue_size]:
        uid = str(value(study, "StudyInstanceUID"))
        previous = state.studies.get(uid, {})
        if previous.get("status") == "storing" and _already_stored(client, uid, previous.get("uids", [])):
            state.set(uid, **{**previous, "status": "stored"})
            summary.registered.append(uid)
            continue
        prior = find_prior(client, study, rule)
        if prior is None:
            state.set(uid, status="no-prior")
            summary.no_prior.append(uid)
            continue
        prior_uid = str(value(prior, "StudyInstanceUID"))
        keep = new_result_folder(results_dir) if results_dir is not None else None
        try:
            result = register_studies(client, uid, prior_uid, register, rule=rule, derived=derived, store=False,
                                      work_dir=keep, keep_failed=False)
        except BaseException as exc:
            if keep is not None:  # nothing of a failed registration stays
                shutil.rmtree(keep, ignore_errors=True)
            if not isinstance(exc, (InputError, Cancelled, PacsError)) or isinstance(exc, ServerUnavailable):
                raise  # a server that is away is retried at the next poll
            state.set(uid, status="failed", prior=prior_uid, error=str(exc))
            summary.failed.append(uid)
            continue
        # the objects were built with store=False: store them now, recording first what is being stored
        state.set(uid, status="storing", prior=prior_uid, uids=result.stored_uids)
        client.store(result.datasets)
        state.set(uid, status="stored", prior=prior_uid, uids=result.stored_uids,
                  registration=result.registration_uid,
                  **({"result": str(keep / "registration")} if keep is not None else {}))
        summary.registered.append(uid)
    if len(pending) > queue_size:
        logger.info("%d studies wait for the next poll (queue size %d)", len(pending) - queue_size, queue_size)


def _already_stored(client: PacsClient, study_uid: str, uids: list) -> bool:
    """Whether every instance of an interrupted store is on the server."""
    if not uids:
        return False
    on_server = {str(value(i, "SOPInstanceUID")) for i in client.instances(study_uid)}
    return set(uids) <= on_server
