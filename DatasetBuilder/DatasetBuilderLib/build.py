"""The builder's API: :func:`build_dataset` (scenes → de-identified Learn2Reg dataset), resumable.

An update mirrors the inputs: new cases are added, earlier ones are kept byte for byte (same numbers,
pseudonyms and splits), and the files of cases whose inputs are not given again are deleted (a subject who
withdrew consent leaves the dataset by being left out of the next build).

Steps: check the output folder (:func:`writer.prepare_output`), read every scene and collect cases and PHI
strings, skip what cannot be used (reason in the report), pseudonymise subjects (keyed HMAC), number cases
stably (pseudonymous case registry in ``meta/state.json``), build the label table, assign splits (existing
subjects keep theirs), write each case atomically (a case whose sidecar exists is done and kept), augment
training cases, make pairs within splits, write the dataset JSON and report, scan every output byte for
PHI (a hit raises :class:`PhiFoundError` naming the files) and write the manifest.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from DeepRegistrationLib.core.errors import Cancelled, DeepRegistrationError
from DeepRegistrationLib.core.image import Image

from . import BUILDER_VERSION
from . import writer
from .augment import AugmentOptions, augment_case
from .classical import ClassicalOptions, check_available, register_pair
from .deid import PhiStrings, load_or_create_key, occurs_in, pseudonym, scan_for_phi
from .dicom_input import load_dicom_folder
from . import feedback as F
from .labels import LabelTable, normalize
from .pairs import CaseRef, make_pairs
from .report import write_dataset_report, write_thumbnails
from .scenes import Skipped, collect_cases, find_scene_files, load_scene, read_subject_mapping
from .splits import assign_splits

logger = logging.getLogger(__name__)
Progress = Callable[[float, str], "bool | None"]  # returns False to cancel (the engine's convention)


class PhiFoundError(DeepRegistrationError, RuntimeError):
    """The PHI scan found identifying text in the output."""


@dataclass
class BuildOptions:
    """Builder parameters (everything but paths goes into the manifest).

    Attributes:
        key_file: Pseudonym key file, outside the output folder (created when missing).
        task: Learn2Reg task name (file prefix).
        subject_mapping: CSV ``scene,subject[,session]`` for scenes without DICOM identity.
        subject_from_file: Scenes with neither: the scene file name is the subject (one scene per subject).
        pairing: ``intra`` | ``inter`` | ``atlas``; max_pairs_per_split bounds ``inter``;
            atlas_case: case number of the template (default: the first training case).
        split_ratios, seed: Train/val/test shares and the seed of the assignment.
        label_names: Fixed label table (None = every segment name seen); label_synonyms: name → canonical.
        augment_per_case: Augmented copies of each training case; augment: their ranges;
            augment_intensity: bias/gamma/noise on (geometry only when False).
        modality: Modality when the scene does not say.
        classical: Also store an algorithmic ground truth per (non-augmented) pair from a classical
            registration (slow: one registration per pair); classical_options: its settings (method
            ``engine``, or ``ants`` when antspyx is installed).
        dates: ``remove`` (default: no date is written) or ``shift``: each case's study date is written
            shifted by a per-subject offset of 1 to 11 years back (keyed hash, so stable across builds;
            intervals between a subject's sessions are kept, and intra-subject pairs get ``interval_days``).
        feedback_log: A feedback log (``deepregistration feedback``): accepted results become pairs with their
            transform as ground truth flagged "accepted by a user", rejected ones are listed in the report
            (:mod:`~DatasetBuilderLib.feedback`). Its path is not written to the manifest.
    """

    key_file: str
    task: str = "DREG"
    subject_mapping: str | None = None
    subject_from_file: bool = False
    pairing: str = "intra"
    max_pairs_per_split: int | None = None
    atlas_case: int | None = None
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    label_names: list[str] | None = None
    label_synonyms: dict[str, str] | None = None
    augment_per_case: int = 0
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    augment_intensity: bool = True
    modality: str = "MR"
    classical: bool = False
    classical_options: ClassicalOptions = field(default_factory=ClassicalOptions)
    dates: str = "remove"
    feedback_log: str | None = None

    def __post_init__(self) -> None:
        if self.dates not in ("remove", "shift"):
            raise ValueError(f"dates must be 'remove' or 'shift', not {self.dates!r}")

    def manifest_parameters(self) -> dict:
        d = asdict(self)
        for private in ("key_file", "subject_mapping", "feedback_log"):
            d.pop(private)
        d["feedback"] = self.feedback_log is not None
        d["split_ratios"] = list(self.split_ratios)
        return d


@dataclass
class BuildResult:
    """What a build did (counts only; no identifying text)."""

    out_dir: Path
    cases_total: int = 0
    cases_written: int = 0
    augmented: int = 0
    augment_rejected: int = 0
    pairs: dict = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    phi_strings: int = 0
    phi_hits: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    removed: int = 0
    feedback_pairs: int = 0
    feedback_rejected: list[str] = field(default_factory=list)
    feedback_unusable: list[tuple[str, str]] = field(default_factory=list)


def _tick(progress: Progress | None, fraction: float, message: str) -> None:
    logger.info("%3.0f%% %s", 100 * fraction, message)
    if progress is not None and progress(fraction, message) is False:
        raise Cancelled("build cancelled; finished cases are kept: run it again to resume")


def _seed_of(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def _read_inputs(scenes: list[Path], key: bytes, mapping, options: BuildOptions, progress: Progress | None,
                 result: BuildResult) -> tuple[list, PhiStrings]:
    """Every case of every scene or DICOM folder that has a subject identity, and the identifying strings met;
    unreadable inputs and cases without identity are recorded in ``result.skipped``."""
    phi = PhiStrings()
    raw = []
    for n, path in enumerate(scenes):
        _tick(progress, 0.3 * n / max(len(scenes), 1), f"reading scene {n + 1}/{len(scenes)}")
        tag = pseudonym(key, f"input:{path.name}", "input-", 8)
        try:
            extra, headers = PhiStrings(), {}
            if path.is_dir():  # a DICOM series folder
                scene, extra, headers = load_dicom_folder(path)
            else:
                scene = load_scene(path)
            cases, skipped = collect_cases(scene, str(path), mapping, options.modality, options.subject_from_file)
            for case in cases:
                case.phi.update(extra)
                case.header = headers.get(case.source.rsplit(":", 1)[-1])
        except ImportError as exc:  # a missing optional package is the user's to fix, not a bad scene
            raise ValueError(str(exc)) from exc
        except Exception as exc:  # an unreadable scene is skipped, with its reason
            logger.warning("skipping %s: %s", path, exc)
            result.skipped.append(Skipped(tag, f"scene could not be read ({type(exc).__name__})"))
            continue
        result.skipped += [Skipped(tag, s.reason) for s in skipped]
        for case in cases:
            phi.update(case.phi)
            if case.identity is None:
                result.skipped.append(Skipped(tag, "no subject identity (no DICOM PatientID, not in the mapping)"))
            else:
                raw.append(case)
    return raw, phi


def _without_conflicting_birth_dates(raw: list, key: bytes, result: BuildResult) -> list:
    """The cases whose subject ID is not shared by different birth dates (those are skipped)."""
    births: dict[str, set] = {}
    for c in raw:
        if c.birth_date:
            births.setdefault(c.identity, set()).add(c.birth_date)
    conflicting = {i for i, b in births.items() if len(b) > 1}
    if conflicting:
        result.skipped += [Skipped(pseudonym(key, i), "subject ID shared by different birth dates")
                           for i in sorted(conflicting)]
        raw = [c for c in raw if c.identity not in conflicting]
    return raw


def _unique_cases(raw: list, key: bytes) -> list:
    """Subject pseudonyms and case UIDs set on every case; one case per UID, in UID order."""
    by_uid = {}
    for c in raw:
        c.subject = pseudonym(key, c.identity)
        digest = hashlib.sha256(np.ascontiguousarray(c.image.array).tobytes()).hexdigest()
        c.uid = pseudonym(key, f"case:{c.identity}:{c.session}:{digest}", "C", 16)
        by_uid.setdefault(c.uid, c)
    return [by_uid[u] for u in sorted(by_uid)]


def _label_table(originals: list, options: BuildOptions, state: dict, phi: PhiStrings, result: BuildResult
                 ) -> LabelTable:
    """The label table of the cases (IDs already in the dataset kept); label names are dropped from ``phi``."""
    table = LabelTable.create(options.label_names, options.label_synonyms)
    for c in originals:
        table.observe(c.segment_names, c.segment_terms)
    if not table.fixed:
        old = {k: int(v) for k, v in state["labels"].items()}
        new = sorted(set(table.ids) - set(old))
        table.ids = dict(old, **{name: max(old.values(), default=0) + n + 1 for n, name in enumerate(new)})
    allowed = {normalize(n) for n in table.ids} | set(table.synonyms)
    # a label name is written on purpose (a study described "Liver" with a "Liver" label is no leak)
    phi.values = {v: k for v, k in phi.values.items() if normalize(v) not in allowed}
    result.phi_strings = len(phi.values)
    return table


def _write_index_and_scan(out: Path, options: BuildOptions, result: BuildResult, table: LabelTable, modalities: dict,
                          entries: dict[str, dict], pairs: dict[str, list[dict]], originals: list, phi: PhiStrings,
                          n_inputs: int, progress: Progress | None, selection=None) -> None:
    """The dataset JSON, thumbnails and report, the PHI scan of everything written (PhiFoundError on a hit, with
    the report saying where) and, last, the manifest."""
    sizes = {tuple(c.image.grid.size) for c in originals}
    shape = list(sizes.pop()) if len(sizes) == 1 else None  # Learn2Reg: (X, Y, Z), only when all agree
    writer.atomic_write_json(out / f"{options.task}_dataset.json",
                             writer.dataset_json(options.task, table.as_json(), modalities,
                                                 sorted(entries.values(), key=lambda e: e["image"]), pairs, shape))
    thumbnails = write_thumbnails(out, pairs["train"] + pairs["val"] + pairs["test"])
    _tick(progress, 0.95, "PHI scan")
    hits = scan_for_phi(out, phi)
    _write_report(out, options, result, table, hits, thumbnails, selection)
    hits = scan_for_phi(out, phi)
    result.phi_hits = hits
    if hits:
        _write_report(out, options, result, table, hits, thumbnails, selection)
        raise PhiFoundError("identifying text found in the output: " +
                            ", ".join(sorted({f"{h.file} ({h.kind})" for h in hits})))
    logger.info("%d of %d cases written in this run (the others were already done)", result.cases_written,
                result.cases_total)
    _tick(progress, 0.99, "writing the manifest")
    result.manifest = writer.write_manifest(out, BUILDER_VERSION, options.manifest_parameters(), n_inputs)


def _write_report(out: Path, options: BuildOptions, result: BuildResult, table: LabelTable, hits: list,
                  thumbnails: list[str], selection) -> None:
    """``report.md``, with the feedback section (result ids only) when the build read a feedback log."""
    write_dataset_report(out, options.task, result, table, hits, thumbnails)
    if selection is not None:
        text = (out / "report.md").read_text(encoding="utf-8")
        writer.atomic_write_bytes(out / "report.md", (text.rstrip("\n") + "\n\n" + "\n".join(
            F.report_lines(selection, result.feedback_pairs))).encode("utf-8"))


def build_dataset(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, options: BuildOptions,
                  progress: Progress | None = None) -> BuildResult:
    """Builds (or resumes / extends) a de-identified Learn2Reg dataset from Slicer scenes.

    Args:
        inputs: Scene files (``.mrb``, ``.mrml``) and folders of them or of DICOM series (may be empty with
            ``options.feedback_log``).
        out_dir: Empty/new folder, or a dataset this builder made for the same task (resume, update).
        options: :class:`BuildOptions`.
        progress: ``progress(fraction 0..1, message)``; return False to cancel (raises Cancelled).

    Raises:
        NotOurDatasetError, Cancelled (``DeepRegistrationLib.core.errors``), PhiFoundError, ValueError (bad options
        or inputs).
    """
    out = Path(out_dir).resolve()
    key_path = Path(options.key_file).resolve()
    if out == key_path.parent or out in key_path.parents:
        raise ValueError("the pseudonym key must live outside the output folder")
    if options.classical:
        check_available(options.classical_options)
    if not inputs and options.feedback_log is None:
        raise ValueError("nothing to build from: give scene files or folders, or a feedback log (--feedback LOG)")
    selection = F.read_selection(options.feedback_log) if options.feedback_log is not None else None
    writer.prepare_output(out, options.task)
    key = load_or_create_key(key_path)
    state = writer.load_state(out)
    result = BuildResult(out)
    mapping = read_subject_mapping(options.subject_mapping)
    scenes = find_scene_files(inputs)
    raw, phi = _read_inputs(scenes, key, mapping, options, progress, result)
    fb = None
    if selection is not None:
        _tick(progress, 0.3, f"reading {len(selection.accepted)} accepted result(s)")
        fb = F.read_cases(selection, mapping, options.modality)
        raw += fb.cases
        phi.update(fb.phi)
    raw = _without_conflicting_birth_dates(raw, key, result)
    originals = _unique_cases(raw, key)
    fb_objects = {id(c) for c in fb.cases} if fb else set()
    feedback_only = {c.uid for c in raw if id(c) in fb_objects} - {c.uid for c in raw if id(c) not in fb_objects}
    table = _label_table(originals, options, state, phi, result)
    # splits, modalities, case numbers
    splits = assign_splits([c.subject for c in originals], options.split_ratios, options.seed, state["splits"])
    modalities = dict(state.get("modalities", {}))
    for c in originals:
        if c.modality not in modalities.values():
            modalities[str(len(modalities))] = c.modality
    mod_index = {m: int(i) for i, m in modalities.items()}
    numbers = dict(state["cases"])
    groups, case_mods = dict(state.get("groups", {})), dict(state.get("case_modalities", {}))
    used = {(numbers[u], case_mods[u]) for u in numbers if u in case_mods}

    def number_of(uid: str, group: str | None = None, mod: int | None = None) -> int:
        """Stable case number; images of one session in different modalities share it (Learn2Reg's
        ``<case>_0000`` / ``<case>_0001``), the first free one of its group, else a new number."""
        if uid not in numbers:
            mates = sorted({numbers[u] for u, g in groups.items() if group is not None and g == group and u in numbers})
            numbers[uid] = next((n for n in mates if (n, mod) not in used), max(numbers.values(), default=0) + 1)
            if group is not None:
                groups[uid], case_mods[uid] = group, mod
                used.add((numbers[uid], mod))
        return numbers[uid]

    for c in originals:
        known_session = c.session.strip(":") != ""  # same study (date + UID): one time point
        number_of(c.uid, pseudonym(key, f"group:{c.identity}:{c.session}", "G", 16) if known_session else None,
                  mod_index[c.modality])
    state.update(cases=numbers, splits=splits, labels=table.ids, modalities=modalities, groups=groups,
                 case_modalities=case_mods)
    writer.atomic_write_json(out / writer.STATE, state)
    result.cases_total = len(originals)
    # cases
    entries: dict[str, dict] = {}
    aug_pairs: list[dict] = []
    todo = sorted(originals, key=lambda c: numbers[c.uid])
    needles = phi.needles()  # the PHI strings as the scan searches them, for the header summaries
    for n, c in enumerate(todo):
        _tick(progress, 0.3 + 0.6 * n / max(len(todo), 1), f"writing case {n + 1}/{len(todo)}")
        split = splits[c.subject]
        extra = {}
        if options.dates == "shift" and _parse_date(c.study_date) is not None:
            extra["study_date"] = shifted_date(key, c.identity, c.study_date)
        if c.header:
            extra["dicom_header"] = {k: v for k, v in c.header.items()
                                     if not occurs_in(v if isinstance(v, str) else " ".join(map(str, v)), needles)}
        entry, wrote = _write_case(out, options.task, numbers[c.uid], mod_index[c.modality], c.subject, split,
                                   c.modality, c.image, _remap(c, table), c.mask, c.points,
                                   [pseudonym(key, f"kp:{x}", "K", 8) for x in c.point_labels], extra)
        entries[c.uid] = entry
        result.cases_written += wrote
        if split != "train":
            continue
        for k in range(options.augment_per_case):
            aug_uid = pseudonym(key, f"aug:{c.uid}:{k}:{options.seed}", "C", 16)
            aug_number = number_of(aug_uid)
            pair = _augment(out, options, aug_uid, aug_number, c, entry, _remap(c, table), key, mod_index, result)
            if pair is not None:
                entries[aug_uid] = pair[0]
                aug_pairs.append(pair[1])
    state["cases"] = numbers
    writer.atomic_write_json(out / writer.STATE, state)
    result.removed = _prune(out, entries)
    # pairs within splits
    refs = [CaseRef(c.uid, c.subject, splits[c.subject], "", c.modality) for c in originals
            if c.uid not in feedback_only]  # feedback cases are paired with each other only
    atlas = None
    if options.pairing == "atlas":
        inverse: dict[int, str] = {}
        for r in sorted(refs, key=lambda r: mod_index[r.modality]):  # a shared number: its first modality
            inverse.setdefault(numbers[r.key], r.key)
        atlas = inverse.get(options.atlas_case) if options.atlas_case else \
            min((r.key for r in refs if r.split == "train"), key=lambda u: numbers[u], default=None)
    pair_list = make_pairs(refs, options.pairing, options.max_pairs_per_split, options.seed, atlas)
    pairs = {"train": list(aug_pairs), "val": [], "test": []}
    for n, (f, m) in enumerate(pair_list):
        pair = _pair_entry(entries[f], entries[m])
        if options.classical:
            _tick(progress, 0.9 + 0.05 * n / len(pair_list), f"classical registration {n + 1}/{len(pair_list)}")
            pair["gold_standard"].append(_classical(out, entries[f], entries[m], options.classical_options))
        pairs[entries[f]["split"]].append(pair)
    if fb is not None:
        _feedback_pairs(out, fb, selection, entries, pairs, result, progress)
    result.pairs = {k: len(v) for k, v in pairs.items()}
    _weights([e for e in entries.values() if e["split"] in ("train", "val")])
    _write_index_and_scan(out, options, result, table, modalities, entries, pairs, originals, phi,
                          len(scenes) + result.feedback_pairs, progress, selection)
    _tick(progress, 1.0, "done")
    return result


def _feedback_pairs(out: Path, fb, selection, entries: dict[str, dict], pairs: dict[str, list[dict]],
                    result: BuildResult, progress: Progress | None) -> None:
    """The accepted results' pairs with their ground truth (see :mod:`~DatasetBuilderLib.feedback`); pairs whose
    cases were dropped or fall in different splits are reported as not usable."""
    used: set[str] = set()
    existing = {(p["fixed"], p["moving"]): p for split in pairs.values() for p in split}
    for n, (rid, (fc, mc)) in enumerate(fb.pairs.items()):
        _tick(progress, 0.95, f"accepted result {n + 1}/{len(fb.pairs)}")
        if getattr(fc, "uid", None) not in entries or getattr(mc, "uid", None) not in entries:
            selection.unusable.append((rid, "its subject was skipped (see Skipped)"))
            continue
        f, m = entries[fc.uid], entries[mc.uid]
        if f["split"] != m["split"]:
            selection.unusable.append((rid, "its fixed and moving subjects fall in different splits"))
            continue
        if fc.uid == mc.uid:
            selection.unusable.append((rid, "its fixed and moving images are the same image"))
            continue
        gold = F.gold_standard(out, f, m, fb.results[rid])
        used.add(f"classical_{Path(gold['transform']).stem}.json")
        pair = existing.get((f["image"], m["image"]))
        if pair is None:
            pair = _pair_entry(f, m)
            pairs[f["split"]].append(pair)
            existing[(f["image"], m["image"])] = pair
        pair["gold_standard"].append(gold)
        result.feedback_pairs += 1
    F.remove_stale(out, used)
    result.feedback_rejected = list(selection.rejected)
    result.feedback_unusable = list(selection.unusable)


ENTRY_FILES = ("image", "label", "mask", "keypoints", "keypoints_lps", "dicom_header")


def _prune(out: Path, entries: dict[str, dict]) -> int:
    """Deletes the files of cases no longer among the inputs (a subject dropped from the inputs, e.g. after
    consent was withdrawn, leaves the dataset entirely), with their augmentations and algorithmic ground
    truths; returns how many cases were removed. Runs after every current case is written, so an
    interrupted build never loses a current case."""
    current = {e["image"] for e in entries.values()}
    names = {Path(i).name.split(".")[0] for i in current}
    removed = 0
    for sidecar in sorted((out / "meta").glob("*.json")):
        if sidecar.name in (Path(writer.STATE).name, Path(writer.MARKER).name):
            continue
        info = json.loads(sidecar.read_text())
        if sidecar.name.startswith("classical_"):  # classical_<fixed>_<moving>_<method>.json
            match = re.fullmatch(r"classical_(.+_\d{4,}_\d{4,})_(.+_\d{4,}_\d{4,})_[a-z]+", sidecar.stem)
            if match is None or not {match.group(1), match.group(2)} <= names:
                (out / info["transform"]).unlink(missing_ok=True)
                sidecar.unlink()
            continue
        entry = info.get("entry")
        if entry is None or entry["image"] in current:
            continue
        for key in ENTRY_FILES:
            if key in entry:
                (out / entry[key]).unlink(missing_ok=True)
        for gold in (info.get("pair") or {}).get("gold_standard", []):
            if gold.get("transform"):
                (out / gold["transform"]).unlink(missing_ok=True)
        sidecar.unlink()
        removed += "augmented_from" not in entry
    if removed:
        logger.info("removed %d case(s) no longer among the inputs", removed)
    return removed


def _remap(c, table: LabelTable) -> np.ndarray | None:
    if c.labels is None:
        return None
    lut = np.zeros(len(c.segment_names) + 1, np.int32)
    terms = c.segment_terms or [None] * len(c.segment_names)
    for n, (name, term) in enumerate(zip(c.segment_names, terms), start=1):
        lut[n] = table.id_of(name, term)
    return lut[c.labels]


def _parse_date(text: str | None) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(text).strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def shifted_date(key: bytes, identity: str, study_date: str) -> str:
    """``study_date`` (DICOM ``YYYYMMDD``) moved back by the subject's keyed offset (365 to 4014 days), ISO."""
    offset = 365 + int(pseudonym(key, f"dateshift:{identity}", "", 12), 16) % 3650
    return (_parse_date(study_date) - datetime.timedelta(days=offset)).isoformat()


def _write_case(out: Path, task: str, number: int, mod: int, subject: str, split: str, modality: str,
                image: Image, labels, mask, points, point_ids: list[str], extra: dict | None = None
                ) -> tuple[dict, bool]:
    """Writes one case unless its sidecar exists; returns its dataset entry and whether it was written.

    ``extra``: ``study_date`` (shifted) goes into the entry; ``dicom_header`` (de-identified summary) is
    written to ``headers{Tr,Ts}/<name>.json`` and referenced from the entry.
    """
    extra = extra or {}
    name = writer.case_name(task, number, mod)
    sfx = "Tr" if split in ("train", "val") else "Ts"
    entry = {"image": f"./images{sfx}/{name}.nii.gz", "subject": subject, "split": split, "modality": modality}
    if "study_date" in extra:
        entry["study_date"] = extra["study_date"]
    if extra.get("dicom_header"):
        entry["dicom_header"] = f"./headers{sfx}/{name}.json"
    if labels is not None:
        entry["label"] = f"./labels{sfx}/{name}.nii.gz"
    if mask is not None:
        entry["mask"] = f"./masks{sfx}/{name}.nii.gz"
    if points is not None and len(points):
        entry["keypoints"] = f"./keypoints{sfx}/{name}.csv"
        entry["keypoints_lps"] = f"./keypoints{sfx}/{name}_lps.csv"
    sidecar = out / "meta" / f"{name}.json"
    if sidecar.exists():
        return json.loads(sidecar.read_text())["entry"], False
    writer.write_image(out / entry["image"], Image(image.array.astype(np.float32), image.grid))
    if labels is not None:
        dtype = np.uint8 if labels.max() < 256 else np.uint16
        writer.write_image(out / entry["label"], Image(labels.astype(dtype), image.grid))
    if mask is not None:
        writer.write_image(out / entry["mask"], Image(mask.astype(np.uint8), image.grid))
    if "dicom_header" in entry:
        writer.atomic_write_json(out / entry["dicom_header"], extra["dicom_header"])
    if "keypoints" in entry:
        vox, lps = writer.keypoint_csvs(points, point_ids, image)
        writer.atomic_write_bytes(out / entry["keypoints"], vox)
        writer.atomic_write_bytes(out / entry["keypoints_lps"], lps)
    writer.atomic_write_json(sidecar, {"entry": entry})
    return entry, True


def _augment(out, options, aug_uid, number, c, orig_entry, labels, key, mod_index, result):
    name = writer.case_name(options.task, number, mod_index[c.modality])
    transform_rel = f"./transformsTr/{name}.h5"
    sidecar = out / "meta" / f"{name}.augment.json"
    if sidecar.exists():
        info = json.loads(sidecar.read_text())
        result.augment_rejected += info.get("rejected", 0)
        result.augmented += "pair" in info
        return (info["entry"], info["pair"]) if "pair" in info else None
    rng = np.random.default_rng(_seed_of(options.seed, aug_uid))
    aug = augment_case(rng, c.image, labels, c.mask, c.points, c.point_labels, options.augment,
                       options.augment_intensity)
    if aug is None:
        result.augment_rejected += options.augment.max_tries
        writer.atomic_write_json(sidecar, {"rejected": options.augment.max_tries, "entry": None})
        return None
    result.augment_rejected += aug.rejected
    ids = [pseudonym(key, f"kp:{x}", "K", 8) for x in aug.point_labels]
    writer.write_transform(out / transform_rel, aug.transform)
    entry, _ = _write_case(out, options.task, number, mod_index[c.modality], c.subject, "train", c.modality,
                           aug.image, aug.labels, aug.mask, aug.points, ids)
    entry["augmented_from"] = orig_entry["image"]
    pair = _pair_entry(entry, orig_entry)
    for gold in pair["gold_standard"]:
        gold["source"] = "expert, carried through the synthetic field"
    pair["gold_standard"].append({"kind": "synthetic_field", "transform": transform_rel,
                                  "direction": "fixed->moving", "frame": "LPS",
                                  "det_jacobian_range": list(aug.det_range)})
    writer.atomic_write_json(sidecar, {"entry": entry, "pair": pair, "rejected": aug.rejected, "params": aug.params})
    result.augmented += 1
    return entry, pair


def _classical(out: Path, fixed: dict, moving: dict, opts: ClassicalOptions) -> dict:
    """Algorithmic gold-standard entry of a pair, computed once (cached in a sidecar for resume)."""
    names = [Path(e["image"]).name.split(".")[0] for e in (fixed, moving)]
    folder = "transformsTs" if fixed["split"] == "test" else "transformsTr"
    stem = f"{names[0]}_{names[1]}_{opts.method}"
    sidecar = out / "meta" / f"classical_{stem}.json"
    if sidecar.exists():
        return json.loads(sidecar.read_text())
    gold = register_pair(out, fixed, moving, f"./{folder}/{stem}.h5", opts)
    writer.atomic_write_json(sidecar, gold)
    return gold


def _pair_entry(fixed: dict, moving: dict) -> dict:
    gold = []
    if "label" in fixed and "label" in moving:
        gold.append({"kind": "segmentation", "source": "expert"})
    if "keypoints" in fixed and "keypoints" in moving:
        gold.append({"kind": "landmarks", "source": "expert"})
    pair = {"fixed": fixed["image"], "moving": moving["image"], "gold_standard": gold}
    if "study_date" in fixed and "study_date" in moving and fixed["subject"] == moving["subject"]:
        pair["interval_days"] = (datetime.date.fromisoformat(moving["study_date"]) -
                                 datetime.date.fromisoformat(fixed["study_date"])).days
    return pair


def _weights(entries: list[dict]) -> None:
    """Inverse-frequency sampling weight per modality group (mean 1) in each training entry."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["modality"]] = counts.get(e["modality"], 0) + 1
    for e in entries:
        e["weight"] = round(len(entries) / (len(counts) * counts[e["modality"]]), 6)
