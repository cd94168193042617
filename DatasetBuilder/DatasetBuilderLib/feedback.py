"""Users' verdicts as training material: ``--feedback LOG`` (the continuous-update loop, docs/FEEDBACK.md).

The feedback log is the one :func:`DeepRegistrationLib.workflows.feedback.record` appends to (``deepregistration
feedback``, the Slicer module's Accept / Reject); the latest verdict of each result counts.

- **accepted** results become pairs: their fixed and moving images (``report.json`` ``"inputs"``: image files or
  DICOM series folders) are read and written as cases like every other input (de-identified, pseudonymised,
  split by subject), and the result's ``transform.h5`` (fixed → moving, LPS; the images are written in the
  same physical space) is the pair's ground truth, flagged ``"kind": "algorithmic"``, ``"source": "accepted by a
  user"``, ``"accepted_by_user": true``, with the method-independent scores of
  :func:`DatasetBuilderLib.classical.quality` and the registration settings. Subject identity: DICOM
  ``PatientID`` for DICOM input, else the ``--subjects`` mapping by file name, else one pseudo-subject per result
  (both images of the result); a pair whose two cases fall in different splits is not used (reported).
  Feedback cases are paired only with each other (the ``--pairing`` strategy applies to the scenes' cases).
- **rejected** results are kept out and listed, by result id only, in ``report.md`` for expert review.
- results that cannot be used (folder, report, transform or inputs gone; the folder now holds another
  result) are listed by result id with the reason.

Privacy: from the log only ``result_id``, ``verdict`` and ``result_dir`` are read; the note and the reviewer
name are never read. Paths and file names of the result and its inputs go into the PHI scan's strings (a
dataset holding one fails the build); the result id (random, non-identifying) is kept in the pair's entry.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .deid import PhiStrings
from .scenes import SceneCase

logger = logging.getLogger(__name__)

SOURCE = "accepted by a user"
METHOD = "DeepRegistration registration accepted by a user"
SIDECAR_METHOD = "accepted"  # meta/classical_<fixed>_<moving>_accepted.json (pruned with its cases)
SETTINGS = ("mode", "similarity", "regularization", "reg_weight", "spacing", "iterations", "affine_iterations",
            "levels", "diffeomorphic")


@dataclass
class AcceptedResult:
    """An accepted result whose files are there (paths identify: never written to the dataset)."""

    result_id: str
    result_dir: Path
    fixed: Path
    moving: Path
    transform: Path
    settings: dict
    engine_verdict: str | None = None


@dataclass
class FeedbackSelection:
    """What a feedback log gives a build: accepted results, rejected result ids, unusable ``(id, reason)``."""

    accepted: list[AcceptedResult] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    unusable: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class FeedbackCases:
    """The cases read for the accepted results: ``pairs`` maps result id → (fixed case, moving case)."""

    cases: list[SceneCase] = field(default_factory=list)
    pairs: dict[str, tuple[SceneCase, SceneCase]] = field(default_factory=dict)
    results: dict[str, AcceptedResult] = field(default_factory=dict)
    phi: PhiStrings = field(default_factory=PhiStrings)


def _input_path(value, result_dir: Path) -> Path | None:
    """An input path of ``report.json``: absolute as is; relative ones against the result folder's parent or the
    current folder, when exactly one of them exists."""
    if not isinstance(value, str) or not value:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    found = {q.resolve() for q in (result_dir.parent / p, Path.cwd() / p) if q.exists()}
    return found.pop() if len(found) == 1 else None


def read_selection(log: str | os.PathLike) -> FeedbackSelection:
    """The latest verdict of every result in the log, checked against its folder (see module doc).

    Raises:
        ValueError: the log does not exist or cannot be read (one message naming the fix).
    """
    from DeepRegistrationLib.core.errors import InputError
    from DeepRegistrationLib.workflows.feedback import read_log

    try:
        latest = read_log(log)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    sel = FeedbackSelection()
    for rid, entry in latest.items():
        if entry["verdict"] == "rejected":
            sel.rejected.append(rid)
            continue
        folder = Path(str(entry.get("result_dir") or ""))
        report_path = folder / "report.json"
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sel.unusable.append((rid, "result folder or its report.json is gone or unreadable"))
            continue
        if not isinstance(report, dict) or report.get("result_id") != rid:
            sel.unusable.append((rid, "the result folder now holds another result (its result id differs): "
                                      "record the verdict on the new result again"))
            continue
        if not (folder / "transform.h5").is_file():
            sel.unusable.append((rid, "transform.h5 is missing from the result folder"))
            continue
        inputs = report.get("inputs") or {}
        fixed, moving = (_input_path(inputs.get(k), folder) for k in ("fixed", "moving"))
        if fixed is None or moving is None:
            sel.unusable.append((rid, "its input images are gone (or a relative input path is ambiguous)"))
            continue
        params = report.get("parameters") or {}
        quality = report.get("quality") or {}
        sel.accepted.append(AcceptedResult(rid, folder, fixed, moving, folder / "transform.h5",
                                           {k: params[k] for k in SETTINGS if k in params},
                                           quality.get("verdict") if isinstance(quality, dict) else None))
    return sel


# Words of the builder's own output ("result_id", "accepted", "source", ...) and of usual folder names: a result
# folder or input named only with them ("result", "out_2", "accepted-case1") identifies nobody, and searching for
# it would fail every build.
OWN_WORDS = {"result", "results", "res", "out", "output", "outputs", "accepted", "rejected", "accept", "reject",
             "feedback", "source", "method", "quality", "settings", "transform", "transforms", "kind", "user", "users",
             "algorithmic", "registration", "registered", "reg", "pair", "pairs", "case", "cases", "dataset", "data",
             "train", "test", "val", "run", "job", "tmp", "temp", "new", "old", "final", "warped", "inverse"}


def _distinctive(name: str) -> bool:
    """Whether a file or folder name says more than the builder's own words and a short number."""
    tokens = re.findall(r"[a-z]+|\d+", name.lower())
    return any((t.isdigit() and len(t) >= 6) or (not t.isdigit() and t not in OWN_WORDS) for t in tokens)


def _add_path_phi(phi: PhiStrings, path: Path, kind: str) -> None:
    phi.add(str(path), f"feedback {kind} path")
    phi.add(str(path.resolve()), f"feedback {kind} path")
    stem = path.name.split(".")[0]
    if _distinctive(stem):
        phi.add(stem, f"feedback {kind} name")


def _cases_of_input(path: Path, role: str, acc: AcceptedResult, mapping: dict, modality: str
                    ) -> tuple[SceneCase, PhiStrings]:
    """One case for an input image file or DICOM series folder (ValueError with a reason otherwise)."""
    if path.is_dir():
        from .dicom_input import load_dicom_folder
        from .scenes import collect_cases

        scene, extra, headers = load_dicom_folder(path)
        cases, _ = collect_cases(scene, str(path), mapping, modality, False)
        if len(cases) != 1:
            raise ValueError(f"the {role} DICOM folder holds {len(cases)} image series, not one")
        case = cases[0]
        case.phi.update(extra)
        case.header = headers.get(case.source.rsplit(":", 1)[-1])
    else:
        from DeepRegistrationLib.io.images import read_image

        image = read_image(path, f"{role} image")
        identity, session = mapping.get(path.name, (None, ""))
        case = SceneCase(f"result {acc.result_id} {role}", identity, session or "", None, modality, image)
    if case.identity is None:  # one pseudo-subject per result: both images together, never guessed wider
        case.identity = f"feedback:{acc.result_id}"
    case.phi.add(case.identity if not case.identity.startswith("feedback:") else None, "subject identity")
    return case, case.phi


def read_cases(selection: FeedbackSelection, mapping: dict, modality: str) -> FeedbackCases:
    """The fixed and moving cases of every accepted result; a result whose images cannot be read is added to
    ``selection.unusable``."""
    out = FeedbackCases()
    for acc in selection.accepted:
        phi = PhiStrings()
        _add_path_phi(phi, acc.result_dir, "result")
        try:
            pair = []
            for role, path in (("fixed", acc.fixed), ("moving", acc.moving)):
                _add_path_phi(phi, path, "input")
                case, case_phi = _cases_of_input(path, role, acc, mapping, modality)
                pair.append(case)
                phi.update(case_phi)
        except ImportError as exc:  # a missing optional package is the user's to fix
            raise ValueError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - an unreadable result is reported, the build goes on
            logger.warning("feedback result %s: inputs unreadable (%s)", acc.result_id, type(exc).__name__)
            selection.unusable.append((acc.result_id, f"input images could not be read ({type(exc).__name__})"))
            continue
        for case in pair:
            case.phi.update(phi)
        out.phi.update(phi)
        out.cases += pair
        out.pairs[acc.result_id] = (pair[0], pair[1])
        out.results[acc.result_id] = acc
    return out


def gold_standard(out: Path, fixed: dict, moving: dict, acc: AcceptedResult) -> dict:
    """The accepted result's transform stored next to the pair (``transforms{Tr,Ts}/<f>_<m>_accepted.h5``) and
    its gold-standard entry; cached in ``meta/classical_<f>_<m>_accepted.json`` for resume (recomputed when
    the pair now comes from another result)."""
    from .classical import quality
    from .writer import atomic_write_json, write_transform

    names = [Path(e["image"]).name.split(".")[0] for e in (fixed, moving)]
    folder = "transformsTs" if fixed["split"] == "test" else "transformsTr"
    stem = f"{names[0]}_{names[1]}_{SIDECAR_METHOD}"
    sidecar = out / "meta" / f"classical_{stem}.json"
    if sidecar.exists():
        cached = json.loads(sidecar.read_text())
        if cached.get("result_id") == acc.result_id and (out / cached["transform"]).is_file():
            return cached
    rel = f"./{folder}/{stem}.h5"
    write_transform(out / rel, sitk.ReadTransform(str(acc.transform)))
    stored = sitk.ReadTransform(str(out / rel))  # score what was written
    labels = [sitk.ReadImage(str(out / e["label"])) for e in (fixed, moving)] \
        if "label" in fixed and "label" in moving else [None, None]
    q = quality(sitk.ReadImage(str(out / fixed["image"]), sitk.sitkFloat32), sitk.ReadImage(str(out / moving["image"])),
                stored, *labels)
    gold = {"kind": "algorithmic", "source": SOURCE, "accepted_by_user": True, "method": METHOD,
            "result_id": acc.result_id, "transform": rel, "direction": "fixed->moving", "frame": "LPS",
            "quality": q, "settings": acc.settings}
    if acc.engine_verdict:
        gold["engine_quality_verdict"] = acc.engine_verdict
    atomic_write_json(sidecar, gold)
    return gold


def remove_stale(out: Path, used: set[str]) -> None:
    """Deletes accepted-result ground truths of earlier builds not used now (e.g. the verdict became
    ``rejected`` while both cases stayed among the inputs)."""
    for sidecar in sorted((out / "meta").glob(f"classical_*_{SIDECAR_METHOD}.json")):
        if sidecar.name in used:
            continue
        try:
            info = json.loads(sidecar.read_text())
            (out / info["transform"]).unlink(missing_ok=True)
        except (OSError, ValueError, KeyError):
            pass
        sidecar.unlink(missing_ok=True)


def report_lines(selection: FeedbackSelection | None, used: int) -> list[str]:
    """The ``report.md`` section on the feedback log (result ids only)."""
    if selection is None:
        return []
    lines = ["## Feedback", "",
             f"- accepted results used as pairs (ground truth flagged \"{SOURCE}\"): {used}",
             f"- rejected results, kept out of the dataset: {len(selection.rejected)}",
             f"- results that could not be used: {len(selection.unusable)}", ""]
    if selection.rejected:
        lines += ["### Rejected (for expert review, by result id)", ""]
        lines += [f"- {rid}" for rid in selection.rejected] + [""]
    if selection.unusable:
        lines += ["### Not usable", ""]
        lines += [f"- {rid}: {reason}" for rid, reason in selection.unusable] + [""]
    return lines
