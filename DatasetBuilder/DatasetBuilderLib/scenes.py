"""MRML access (PyPI ``slicer-core`` headless, or inside Slicer): load scenes, collect cases and PHI strings.

A **case** is one scalar volume of a scene with what belongs to it: a segmentation whose reference geometry
is that volume (exported to a label map on the volume's grid), label-map volumes as masks, and markups point
lists (LPS mm) of the same subject-hierarchy study (or of the scene when it holds one volume).

Subject identity, in order: ``DICOM.PatientID`` (+ name, birth date) on the volume's subject-hierarchy
ancestors; the user mapping (CSV ``scene,subject[,session]``, scene = scene file name); the scene file name
when the user asks for it; else nothing (the case is reported, never guessed). Everything identifying met on the way (docs/CONVENTIONS.md §4: node names and attributes,
subject-hierarchy names/attributes/UIDs, markup and segment labels, storage file names, the scene file
name) is collected into :class:`~DatasetBuilderLib.deid.PhiStrings` for the PHI scan.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .deid import GENERIC_TEXT, PhiStrings
from .labels import parse_terminology

logger = logging.getLogger(__name__)

SCENE_SUFFIXES = (".mrb", ".mrml")
# Subject-hierarchy bookkeeping attributes (values like "Patient", "Study"), not searched.
NON_IDENTIFYING_ATTRIBUTES = {"Level", "DICOM.Modality", "DICOM.PatientSex"}


@dataclass
class SceneCase:
    """One image of a scene with its annotations (raw, still identifying: never written as is).

    Attributes:
        source: Scene file and volume node ID (report of skipped cases only, never written to the dataset).
        identity: Subject identity (e.g. DICOM PatientID), None when unknown.
        session: Study date / UID / time point used to order sessions (not written).
        birth_date: DICOM birth date when present (conflict check).
        modality: Modality code ("MR", "CT", ...).
        image: Engine Image, array ``(Z, Y, X)`` float32, LPS grid.
        labels: ``(Z, Y, X)`` int32, value ``n + 1`` for ``segment_names[n]``; None without segmentation.
        segment_names: Segment names in label order.
        segment_terms: Their coded terminology (:class:`~DatasetBuilderLib.labels.Term`) or None each.
        mask: ``(Z, Y, X)`` uint8 or None.
        points: ``(N, 3)`` LPS mm or None.
        point_labels: One label per point.
        phi: Identifying strings found for this case.
        study_date: DICOM study date ``YYYYMMDD`` when present (written only shifted, never as is).
        header: De-identified DICOM header summary (DICOM input only), see ``dicom_input.header_summary``.
    """

    source: str
    identity: str | None
    session: str
    birth_date: str | None
    modality: str
    image: object
    labels: np.ndarray | None = None
    segment_names: list[str] = field(default_factory=list)
    segment_terms: list = field(default_factory=list)
    mask: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: list[str] = field(default_factory=list)
    phi: PhiStrings = field(default_factory=PhiStrings)
    study_date: str | None = None
    header: dict | None = None


@dataclass
class Skipped:
    """An input left out, with the reason (no identifying text in ``reason``)."""

    source: str
    reason: str


def make_scene():
    """Empty scene with the logics slicer-core needs (docs/CONVENTIONS.md §3); sets ``slicer.mrmlScene``."""
    from DeepRegistrationSlicerLib.nodes import makeScene

    return makeScene()


def load_scene(path: str | os.PathLike):
    """A new scene read from an ``.mrml`` (with its data files) or ``.mrb``; ValueError if unreadable."""
    p = Path(path).resolve()
    cwd = os.getcwd()
    try:
        return _load_scene(p)
    finally:  # a failing vtkMRMLScene::ReadFromMRB leaves the process in its (deleted) temporary folder
        try:
            moved = os.getcwd() != cwd
        except FileNotFoundError:
            moved = True
        if moved:
            os.chdir(cwd)


def _load_scene(p: Path):
    import slicer

    scene = make_scene()
    if p.suffix.lower() == ".mrb":
        cache = slicer.vtkCacheManager()
        scene.SetCacheManager(cache)
        dio = slicer.vtkDataIOManager()
        dio.SetCacheManager(cache)
        scene.SetDataIOManager(dio)
        ok = scene.ReadFromMRB(str(p))
    else:
        scene.SetURL(str(p))
        ok = scene.Import()
    if not ok:  # some data could not be read: keep what was (unreadable nodes are reported per node)
        if scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0:
            raise ValueError(f"cannot read scene {p.name}")
        logger.warning("scene %s read with errors; unreadable data will be skipped", p.name)
    return scene


def find_scene_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """Scene files and DICOM series folders of the inputs (files, or folders searched recursively), sorted.

    A folder holding a scene is not searched for DICOM (its data files belong to the scene).
    """
    from .dicom_input import dicom_series_folders

    found: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            scenes = {q.resolve() for q in p.rglob("*") if q.suffix.lower() in SCENE_SUFFIXES}
            found |= scenes
            found |= {d for d in dicom_series_folders(p) if not any(s.parent == d for s in scenes)}
        elif p.suffix.lower() in SCENE_SUFFIXES and p.is_file():
            found.add(p.resolve())
        else:
            raise ValueError(f"input {p} is neither a scene file (.mrb, .mrml) nor a folder")
    return sorted(found)


def read_subject_mapping(path: str | os.PathLike | None) -> dict[str, tuple[str, str]]:
    """CSV ``scene,subject[,session]`` → ``{scene file name: (subject, session)}``."""
    if not path:
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[Path(row["scene"]).name] = (row["subject"].strip(), (row.get("session") or "").strip())
    return out


def _sh_ancestors(sh, item) -> list[int]:
    out = []
    while item and item != sh.GetSceneItemID():
        out.append(item)
        item = sh.GetItemParent(item)
    return out


def _collect_sh_phi(sh, items: list[int], phi: PhiStrings) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in items:
        if not GENERIC_TEXT.match((sh.GetItemName(item) or "").strip()):
            phi.add(sh.GetItemName(item), "subject hierarchy name")
        uid = sh.GetItemUID(item, "DICOM")
        phi.add(uid, "subject hierarchy UID")
        for name in sh.GetItemAttributeNames(item):
            value = sh.GetItemAttribute(item, name)
            if name not in NON_IDENTIFYING_ATTRIBUTES:
                phi.add(value, name)
            attributes.setdefault(name, value)
    return attributes


def _add_node_phi(node, phi: PhiStrings) -> None:
    name = node.GetName() or ""
    if not GENERIC_TEXT.match(name.strip()):
        phi.add(name, "node name")
    for attr in node.GetAttributeNames() or ():
        phi.add(node.GetAttribute(attr), f"node attribute {attr}")
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    if storage is not None and storage.GetFileName():
        stem = Path(storage.GetFileName()).name.split(".")[0]
        if not GENERIC_TEXT.match(stem):
            phi.add(stem, "storage file name")


def _scene_phi(scene_name: str, nodes: "_SceneNodes") -> PhiStrings:
    """Identifying strings of the whole scene: its file name, node names/attributes/files, markup labels and
    descriptions, segment names (every case of the scene is checked against them)."""
    phi = PhiStrings()
    stem = scene_name.split(".")[0]
    if not GENERIC_TEXT.match(stem):
        phi.add(stem, "scene file name")
    for node in nodes.volumes + nodes.labelmaps + nodes.segmentations + nodes.markups:
        _add_node_phi(node, phi)
    for node in nodes.markups:
        for i in range(node.GetNumberOfControlPoints()):
            phi.add(node.GetNthControlPointLabel(i), "markup label")
            phi.add(node.GetNthControlPointDescription(i), "markup description")
    for node in nodes.segmentations:
        seg = node.GetSegmentation()
        for i in range(seg.GetNumberOfSegments()):
            phi.add(seg.GetNthSegment(i).GetName(), "segment name")
    return phi


@dataclass
class _SceneNodes:
    """The nodes of a scene that cases are built from."""

    volumes: list
    labelmaps: list
    segmentations: list
    markups: list

    @classmethod
    def of(cls, scene) -> "_SceneNodes":
        return cls([n for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                    if not n.IsA("vtkMRMLLabelMapVolumeNode")],
                   list(scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode")),
                   list(scene.GetNodesByClass("vtkMRMLSegmentationNode")),
                   list(scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")))


def _case_identity(attrs: dict[str, str], scene_name: str, mapping: dict[str, tuple[str, str]],
                   subject_from_file: bool) -> tuple[str | None, str]:
    """``(subject identity or None, session)`` of a volume: its DICOM PatientID (session = study date + UID),
    else the mapping file's row for the scene, else (``subject_from_file``) the scene file name."""
    identity = attrs.get("DICOM.PatientID") or None
    session = attrs.get("DICOM.StudyDate", "") + ":" + attrs.get("DICOM.StudyInstanceUID", "")
    if identity is None and scene_name in mapping:
        identity, session = mapping[scene_name][0], mapping[scene_name][1] or session
    if identity is None and subject_from_file:
        identity = "file:" + scene_name.split(".")[0]
    return identity, session


def _attach_segmentation(case: SceneCase, volume, nodes: _SceneNodes, scene, used_segs: set[str]) -> None:
    """Labels, segment names and terms from the segmentation whose reference geometry is ``volume`` (or the
    one without a reference when the scene has a single volume); marks it used."""
    from DeepRegistrationSlicerLib import nodes as N

    same = [s for s in nodes.segmentations if s.GetNodeReference("referenceImageGeometryRef") is volume]
    if not same and len(nodes.volumes) == 1:
        same = [s for s in nodes.segmentations if s.GetNodeReference("referenceImageGeometryRef") is None]
    if not same:
        return
    seg = same[0]
    used_segs.add(seg.GetID())
    ids = [seg.GetSegmentation().GetNthSegmentID(i) for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    if ids:
        case.labels = N.labelArrayOnVolume(seg, volume, ids, "segmentation", scene)
        segments = [seg.GetSegmentation().GetSegment(i) for i in ids]
        case.segment_names = [s.GetName() for s in segments]
        case.segment_terms = [parse_terminology(s.GetTerminology()) for s in segments]


def _attach_mask_and_points(case: SceneCase, volume, nodes: _SceneNodes, scene, study_of) -> None:
    """The first label map (mask) and the first point list of the volume's study (any, with a single volume)."""
    from DeepRegistrationSlicerLib import nodes as N

    def same_study(node) -> bool:
        return len(nodes.volumes) == 1 or bool(study_of(node) and study_of(node) == study_of(volume))

    masks = [m for m in nodes.labelmaps if same_study(m)]
    if masks:
        case.mask = (N.labelArrayOnVolume(masks[0], volume, what="mask", scene=scene) > 0).astype(np.uint8)
    points = [m for m in nodes.markups if same_study(m)]
    if points and points[0].GetNumberOfControlPoints() > 0:
        case.points, case.point_labels = N.markupsToLpsPoints(points[0], world=True)


def _volume_case(volume, scene_name: str, scene_phi: PhiStrings, sh, mapping: dict[str, tuple[str, str]],
                 default_modality: str, subject_from_file: bool) -> SceneCase | Skipped:
    """The case of one volume (image, identity, session, modality, identifying strings), or why it is skipped."""
    from DeepRegistrationSlicerLib import nodes as N

    where = f"{scene_name}:{volume.GetID()}"
    data = volume.GetImageData()
    if data is None or min(data.GetDimensions()) < 1 or data.GetNumberOfPoints() == 0:
        return Skipped(where, "volume without image data (file missing or unreadable)")
    phi = PhiStrings()
    phi.update(scene_phi)
    item = sh.GetItemByDataNode(volume) if sh else 0
    attrs = _collect_sh_phi(sh, _sh_ancestors(sh, item), phi) if item else {}
    for attr in volume.GetAttributeNames() or ():
        attrs.setdefault(attr, volume.GetAttribute(attr))
    identity, session = _case_identity(attrs, scene_name, mapping, subject_from_file)
    if identity is not None:
        phi.add(identity, "subject identity")
    return SceneCase(where, identity, session, attrs.get("DICOM.PatientBirthDate") or None,
                     attrs.get("DICOM.Modality") or default_modality,
                     N.volumeToImage(volume, "image", world=True), phi=phi,
                     study_date=attrs.get("DICOM.StudyDate") or None)


def collect_cases(scene, source: str, mapping: dict[str, tuple[str, str]] | None = None,
                  default_modality: str = "MR", subject_from_file: bool = False
                  ) -> tuple[list[SceneCase], list[Skipped]]:
    """Cases of a scene (see module doc) and the items skipped with their reasons.

    One case per scalar volume with image data (:func:`_volume_case`), with the segmentation, mask and points
    that belong to it (:func:`_attach_segmentation`, :func:`_attach_mask_and_points`); a segmentation that
    belongs to no volume is skipped. ``subject_from_file``: last resort, the scene file name (without suffix)
    is the subject identity.
    """
    mapping = mapping or {}
    sh = scene.GetSubjectHierarchyNode()
    scene_name = Path(source).name
    nodes = _SceneNodes.of(scene)
    scene_phi = _scene_phi(scene_name, nodes)

    def study_of(node) -> int:
        item = sh.GetItemByDataNode(node) if sh else 0
        return sh.GetItemParent(item) if item else 0

    cases: list[SceneCase] = []
    skipped: list[Skipped] = []
    used_segs: set[str] = set()
    for volume in nodes.volumes:
        case = _volume_case(volume, scene_name, scene_phi, sh, mapping, default_modality, subject_from_file)
        if isinstance(case, Skipped):
            skipped.append(case)
            continue
        _attach_segmentation(case, volume, nodes, scene, used_segs)
        _attach_mask_and_points(case, volume, nodes, scene, study_of)
        cases.append(case)
    for seg in nodes.segmentations:
        if seg.GetID() not in used_segs:
            skipped.append(Skipped(f"{scene_name}:{seg.GetID()}", "segmentation without its reference volume"))
    return cases, skipped
