"""The builder's API: :func:`build_dataset` (scenes → de-identified Learn2Reg dataset), resumable.

An update mirrors the inputs: new cases are added, earlier ones are kept byte for byte (same numbers,
pseudonyms and splits), and the files of cases whose inputs are not given again are deleted (a subject who
withdrew consent leaves the dataset by being left out of the next build).

Stages of :func:`build_dataset`, each a function here: :func:`_open` checks the options and the output folder
(:func:`writer.prepare_output`) and loads the key and the state; :func:`_read_all_inputs` reads every scene (and
the accepted feedback results) and collects cases and PHI strings, skipping what cannot be used (reason in the
report); :func:`_deidentify` pseudonymises subjects (keyed HMAC) and cases and builds the label table;
:func:`_number_and_split` assigns splits (existing subjects keep theirs) and numbers cases stably (pseudonymous
case registry in ``meta/state.json``); :func:`_write_cases` writes each case atomically (a case whose sidecar
exists is done and kept), augments training cases and prunes cases no longer among the inputs;
:func:`_make_all_pairs` makes pairs within splits; :func:`_write_index_and_scan` writes the dataset JSON and
report, scans every output byte for PHI (a hit raises :class:`PhiFoundError` naming the files) and writes the
manifest.
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

    Stages (the module docstring says what each does): :func:`_open` (options, output folder, key, state),
    :func:`_read_all_inputs`, :func:`_deidentify`, :func:`_number_and_split`, :func:`_write_cases`,
    :func:`_make_all_pairs`, and :func:`_write_index_and_scan` (dataset JSON, report, PHI scan, manifest).

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
    b = _open(inputs, out_dir, options, progress)
    _read_all_inputs(b, inputs)
    _deidentify(b)
    _number_and_split(b)
    _write_cases(b)
    _make_all_pairs(b)
    _write_index_and_scan(b.out, options, b.result, b.table, b.modalities, b.entries, b.pairs, b.originals, b.phi,
                          len(b.scenes) + b.result.feedback_pairs, progress, b.selection)
    _tick(progress, 1.0, "done")
    return b.result


@dataclass
class _Build:
    """What the stages of one :func:`build_dataset` call share (made by :func:`_open`)."""

    out: Path
    options: BuildOptions
    progress: Progress | None
    selection: object  # the feedback log's selection (:func:`feedback.read_selection`) or None
    key: bytes  # the pseudonym key
    state: dict  # ``meta/state.json``: case numbers, splits, labels, modalities, groups of the dataset so far
    result: BuildResult
    mapping: object = None  # the subject mapping (scene → subject, session) or None
    scenes: list[Path] = field(default_factory=list)
    raw: list = field(default_factory=list)  # every case read that has a subject identity
    phi: PhiStrings = None  # the identifying strings met while reading
    fb: object = None  # the accepted feedback results' cases (:func:`feedback.read_cases`) or None
    originals: list = field(default_factory=list)  # one case per UID, pseudonymised, in UID order
    feedback_only: set = field(default_factory=set)  # UIDs of cases that come from the feedback log only
    table: LabelTable = None
    splits: dict = field(default_factory=dict)  # subject pseudonym → split
    modalities: dict = field(default_factory=dict)  # "index" → modality
    mod_index: dict = field(default_factory=dict)  # modality → index
    numbers: "_CaseNumbers" = None
    entries: dict = field(default_factory=dict)  # case UID → dataset entry
    aug_pairs: list = field(default_factory=list)  # pairs of augmented cases with their originals
    pairs: dict = field(default_factory=dict)  # split → pair entries


class _CaseNumbers:
    """Stable case numbers (the pseudonymous case registry of ``meta/state.json``): a case keeps its number
    across builds; images of one session in different modalities share one (Learn2Reg's ``<case>_0000`` /
    ``<case>_0001``)."""

    def __init__(self, state: dict):
        self.numbers = dict(state["cases"])
        self.groups, self.case_mods = dict(state.get("groups", {})), dict(state.get("case_modalities", {}))
        self.used = {(self.numbers[u], self.case_mods[u]) for u in self.numbers if u in self.case_mods}

    def __getitem__(self, uid: str) -> int:
        return self.numbers[uid]

    def number_of(self, uid: str, group: str | None = None, mod: int | None = None) -> int:
        """Stable case number: the first free one of its group (same session, another modality), else a new one."""
        numbers = self.numbers
        if uid not in numbers:
            mates = sorted({numbers[u] for u, g in self.groups.items()
                            if group is not None and g == group and u in numbers})
            numbers[uid] = next((n for n in mates if (n, mod) not in self.used), max(numbers.values(), default=0) + 1)
            if group is not None:
                self.groups[uid], self.case_mods[uid] = group, mod
                self.used.add((numbers[uid], mod))
        return numbers[uid]


def _open(inputs: list, out_dir, options: BuildOptions, progress: Progress | None) -> _Build:
    """Set-up: the options checked (key outside the output, classical method available, something to build
    from), the feedback selection read, the output folder checked or made, the key and the state loaded."""
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
    return _Build(out, options, progress, selection, key, state, BuildResult(out))


def _read_all_inputs(b: _Build, inputs: list) -> None:
    """Read inputs: the subject mapping, every scene / DICOM folder (:func:`_read_inputs`) and the accepted
    feedback results' images; sets ``b.raw``, ``b.phi``, ``b.fb``."""
    b.mapping = read_subject_mapping(b.options.subject_mapping)
    b.scenes = find_scene_files(inputs)
    b.raw, b.phi = _read_inputs(b.scenes, b.key, b.mapping, b.options, b.progress, b.result)
    if b.selection is not None:
        _tick(b.progress, 0.3, f"reading {len(b.selection.accepted)} accepted result(s)")
        b.fb = F.read_cases(b.selection, b.mapping, b.options.modality)
        b.raw += b.fb.cases
        b.phi.update(b.fb.phi)


def _deidentify(b: _Build) -> None:
    """De-identify: subjects with conflicting birth dates skipped, subject pseudonyms and case UIDs (one case
    per UID), the feedback-only cases, the label table (label names are not PHI)."""
    b.raw = _without_conflicting_birth_dates(b.raw, b.key, b.result)
    b.originals = _unique_cases(b.raw, b.key)
    fb_objects = {id(c) for c in b.fb.cases} if b.fb else set()
    b.feedback_only = ({c.uid for c in b.raw if id(c) in fb_objects} -
                       {c.uid for c in b.raw if id(c) not in fb_objects})
    b.table = _label_table(b.originals, b.options, b.state, b.phi, b.result)


def _number_and_split(b: _Build) -> None:
    """Splits (existing subjects keep theirs), modality indices and stable case numbers, saved in the state."""
    options, state = b.options, b.state
    b.splits = assign_splits([c.subject for c in b.originals], options.split_ratios, options.seed, state["splits"])
    b.modalities = dict(state.get("modalities", {}))
    for c in b.originals:
        if c.modality not in b.modalities.values():
            b.modalities[str(len(b.modalities))] = c.modality
    b.mod_index = {m: int(i) for i, m in b.modalities.items()}
    b.numbers = _CaseNumbers(state)
    for c in b.originals:
        known_session = c.session.strip(":") != ""  # same study (date + UID): one time point
        b.numbers.number_of(c.uid, pseudonym(b.key, f"group:{c.identity}:{c.session}", "G", 16) if known_session
                            else None, b.mod_index[c.modality])
    state.update(cases=b.numbers.numbers, splits=b.splits, labels=b.table.ids, modalities=b.modalities,
                 groups=b.numbers.groups, case_modalities=b.numbers.case_mods)
    writer.atomic_write_json(b.out / writer.STATE, state)
    b.result.cases_total = len(b.originals)


def _write_cases(b: _Build) -> None:
    """Write cases: each case (atomically; a case whose sidecar exists is kept) with its shifted date and
    de-identified header summary, the augmented copies of training cases, the state; then the files of cases
    no longer among the inputs are deleted (:func:`_prune`)."""
    options, key, numbers = b.options, b.key, b.numbers
    todo = sorted(b.originals, key=lambda c: numbers[c.uid])
    needles = b.phi.needles()  # the PHI strings as the scan searches them, for the header summaries
    for n, c in enumerate(todo):
        _tick(b.progress, 0.3 + 0.6 * n / max(len(todo), 1), f"writing case {n + 1}/{len(todo)}")
        split = b.splits[c.subject]
        extra = {}
        if options.dates == "shift" and _parse_date(c.study_date) is not None:
            extra["study_date"] = shifted_date(key, c.identity, c.study_date)
        if c.header:
            extra["dicom_header"] = {k: v for k, v in c.header.items()
                                     if not occurs_in(v if isinstance(v, str) else " ".join(map(str, v)), needles)}
        entry, wrote = _write_case(b.out, options.task, numbers[c.uid], b.mod_index[c.modality], c.subject, split,
                                   c.modality, c.image, _remap(c, b.table), c.mask, c.points,
                                   [pseudonym(key, f"kp:{x}", "K", 8) for x in c.point_labels], extra)
        b.entries[c.uid] = entry
        b.result.cases_written += wrote
        if split != "train":
            continue
        for k in range(options.augment_per_case):
            aug_uid = pseudonym(key, f"aug:{c.uid}:{k}:{options.seed}", "C", 16)
            aug_number = numbers.number_of(aug_uid)
            pair = _augment(b.out, options, aug_uid, aug_number, c, entry, _remap(c, b.table), key, b.mod_index,
                            b.result)
            if pair is not None:
                b.entries[aug_uid] = pair[0]
                b.aug_pairs.append(pair[1])
    b.state["cases"] = numbers.numbers
    writer.atomic_write_json(b.out / writer.STATE, b.state)
    b.result.removed = _prune(b.out, b.entries)


def _make_all_pairs(b: _Build) -> None:
    """Pairs within splits (``options.pairing``; feedback cases only with each other), their algorithmic
    ground truth with ``options.classical``, the accepted results' pairs, and the sampling weights."""
    options, numbers, entries = b.options, b.numbers, b.entries
    refs = [CaseRef(c.uid, c.subject, b.splits[c.subject], "", c.modality) for c in b.originals
            if c.uid not in b.feedback_only]  # feedback cases are paired with each other only
    atlas = None
    if options.pairing == "atlas":
        inverse: dict[int, str] = {}
        for r in sorted(refs, key=lambda r: b.mod_index[r.modality]):  # a shared number: its first modality
            inverse.setdefault(numbers[r.key], r.key)
        atlas = inverse.get(options.atlas_case) if options.atlas_case else \
            min((r.key for r in refs if r.split == "train"), key=lambda u: numbers[u], default=None)
    pair_list = make_pairs(refs, options.pairing, options.max_pairs_per_split, options.seed, atlas)
    b.pairs = pairs = {"train": list(b.aug_pairs), "val": [], "test": []}
    for n, (f, m) in enumerate(pair_list):
        pair = _pair_entry(entries[f], entries[m])
        if options.classical:
            _tick(b.progress, 0.9 + 0.05 * n / len(pair_list), f"classical registration {n + 1}/{len(pair_list)}")
            pair["gold_standard"].append(_classical(b.out, entries[f], entries[m], options.classical_options))
        pairs[entries[f]["split"]].append(pair)
    if b.fb is not None:
        _feedback_pairs(b.out, b.fb, b.selection, entries, pairs, b.result, b.progress)
    b.result.pairs = {k: len(v) for k, v in pairs.items()}
    _weights([e for e in entries.values() if e["split"] in ("train", "val")])


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
