"""DatasetBuilder end to end on real MRML scenes (PyPI slicer-core) built from the bundled real images.

Every scene is saved as ``.mrml`` + data files (or ``.mrb``) with identifying strings injected everywhere
docs/CONVENTIONS.md §4 lists: node names and attributes, subject-hierarchy item names / attributes / UIDs, markup
labels and descriptions, segment names, storage file names and the scene file name. The builder must
produce a dataset in which neither its own PHI scan nor the independent scan here finds any of them.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "DatasetBuilder") not in sys.path:
    sys.path.insert(0, str(ROOT / "DatasetBuilder"))

from DatasetBuilderLib import build as B  # noqa: E402
from DatasetBuilderLib.classical import ClassicalOptions  # noqa: E402
from DatasetBuilderLib.scenes import make_scene  # noqa: E402
from DatasetBuilderLib.writer import NotOurDatasetError  # noqa: E402
from DeepRegistrationLib.core.errors import Cancelled  # noqa: E402
from DeepRegistrationSlicerLib import nodes as N  # noqa: E402

SEGMENTS = ("Left Hemisphere", "right_hemisphere", "Cerebellum")
TABLE = ["Hemisphere_L", "Hemisphere_R", "Cerebellum"]
SYNONYMS = {"left hemisphere": "Hemisphere_L", "right hemisphere": "Hemisphere_R"}
CEREBELLUM_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                          "Structure~SCT^113305005^Cerebellum~^^~Anatomic codes - DICOM master list~^^~^^")


def subject_phi(n: int) -> dict[str, str]:
    """Identifying values of synthetic subject ``n`` (distinctive, so a chance match is impossible)."""
    return {"name": f"Quixley{n}^Marguerite", "id": f"PID-{n}7731-QX", "birth": f"19{40 + n:02d}0{1 + n % 9}17",
            "study_date": f"20{10 + n:02d}0312", "accession": f"ACC{n}99887766", "institution": f"Zorvath Clinic {n}",
            "uid": f"1.2.826.0.1.3680043.8.498.{n}4455667788"}


def _read(scene, path, node_class, storage_class):
    node = scene.AddNewNodeByClass(node_class)
    storage = scene.AddNewNodeByClass(storage_class)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, path
    return node


def make_subject_scene(sample: Path, folder: Path, n: int, session: int, fmt: str = "mrml",
                       birth: str | None = None) -> tuple[Path, dict]:
    """Saves a scene of subject ``n`` at time point ``session``; returns its path and injected strings."""
    phi = subject_phi(n)
    phi["birth"] = birth or phi["birth"]
    visit = f"{phi['study_date'][:-2]}{10 + session}"
    scene = make_scene()
    image = "fixed" if session == 0 else "moving"
    volume = _read(scene, sample / f"{image}.nii.gz", "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode")
    volume.SetName(f"{phi['name']} T1 {visit}")
    volume.SetAttribute("DICOM.instanceUIDs", f"{phi['uid']}.{session}.1 {phi['uid']}.{session}.2")
    arr = slicer.util.arrayFromVolume(volume)
    arr *= 1.0 + 0.05 * n  # subjects differ
    slicer.util.arrayFromVolumeModified(volume)
    labels = _read(scene, sample / f"{image}_labels.nii.gz", "vtkMRMLLabelMapVolumeNode",
                   "vtkMRMLVolumeArchetypeStorageNode")
    la = slicer.util.arrayFromVolume(labels)
    grouped = np.where(la > 0, la % 3 + 1, 0).astype(la.dtype)
    mask = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"brain mask of {phi['name']}")
    slicer.util.updateVolumeFromArray(mask, (la > 0).astype(np.uint8))
    mask.SetIJKToRASMatrix(N.vtkMatrixFromArray(N.volumeIJKToRAS(volume)))
    slicer.util.updateVolumeFromArray(labels, grouped)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"Segmentation {phi['id']}")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, seg)
    scene.RemoveNode(labels)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    names = list(SEGMENTS) + ([f"lesion {phi['name']}"] if n % 2 else [])
    s = seg.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        s.GetNthSegment(i).SetName(names[i])
    if n == 2:  # named in another language but coded: the terminology, not the name, finds its label
        s.GetNthSegment(2).SetName("Kleinhirn")
        s.GetNthSegment(2).SetTerminology(CEREBELLUM_TERMINOLOGY)
    if n % 2:  # an extra segment whose name identifies the subject (not in the label table)
        s.AddEmptySegment("extra", names[3])
    lm = N.lpsPointsToMarkups(np.loadtxt(sample / f"{image}_landmarks.csv", delimiter=",", skiprows=2,
                                         usecols=(1, 2, 3)), name=f"landmarks {phi['accession']}", scene=scene)
    for i in range(lm.GetNumberOfControlPoints()):
        lm.SetNthControlPointLabel(i, f"L{i:02d}")
        lm.SetNthControlPointDescription(i, f"placed for {phi['name']}")
    lm.SetNthControlPointLabel(0, f"{phi['id']}-origin")  # an identifying markup label
    sh = scene.GetSubjectHierarchyNode()
    subject = sh.CreateSubjectItem(sh.GetSceneItemID(), phi["name"])
    for key, value in (("DICOM.PatientName", phi["name"]), ("DICOM.PatientID", phi["id"]),
                       ("DICOM.PatientBirthDate", phi["birth"]), ("DICOM.PatientSex", "F")):
        sh.SetItemAttribute(subject, key, value)
    study = sh.CreateStudyItem(subject, f"MR Brain {visit} {phi['institution']}")
    sh.SetItemUID(study, "DICOM", f"{phi['uid']}.{session}")
    for key, value in (("DICOM.StudyDate", visit), ("DICOM.StudyInstanceUID", f"{phi['uid']}.{session}"),
                       ("DICOM.AccessionNumber", phi["accession"]), ("DICOM.InstitutionName", phi["institution"]),
                       ("DICOM.Modality", "MR")):
        sh.SetItemAttribute(study, key, value)
    for node in (volume, seg, lm, mask):
        sh.CreateItem(study, node)
    out = folder / f"{phi['name'].replace('^', '_')}_{visit}"
    out.mkdir(parents=True)
    scene.SetRootDirectory(str(out))
    for node in (volume, seg, lm, mask):
        node.AddDefaultStorageNode()
        st = node.GetStorageNode()
        st.SetFileName(str(out / f"{node.GetName()}.{st.GetDefaultWriteFileExtension()}"))
        assert st.WriteData(node), node.GetName()
    path = out / f"{phi['name'].replace('^', '_')}_{visit}.mrml"
    scene.SetURL(str(path))
    assert scene.Commit(str(path))
    if fmt == "mrb":
        mrb = folder / f"{phi['name'].replace('^', '_')}_{visit}.mrb"
        assert scene.WriteToMRB(str(mrb))
        shutil.rmtree(out)
        path = mrb
    values = dict(phi, visit=visit, study_uid=f"{phi['uid']}.{session}")
    return path, values


# ------------------------------------------------------------------------------------------------ fixtures
N_SUBJECTS = 3


def options(tmp: Path, **kw) -> B.BuildOptions:
    base = dict(key_file=str(tmp / "secret" / "key.hex"), task="DREG", label_names=TABLE, label_synonyms=SYNONYMS,
                augment_per_case=1, augment_intensity=False, seed=3)
    base.update(kw)
    return B.BuildOptions(**base)


@pytest.fixture(scope="module")
def scenes(sample_dir, tmp_path_factory):
    """6 scenes (3 subjects × 2 time points; one saved as .mrb) and every injected identifying string."""
    folder = tmp_path_factory.mktemp("scenes")
    injected = []
    for n in range(N_SUBJECTS):
        for session in range(2):
            _, values = make_subject_scene(sample_dir, folder / "in", n, session,
                                           "mrb" if (n, session) == (2, 1) else "mrml")
            injected.append(values)
    return folder, sorted({v for d in injected for v in d.values()} |
                          {p for d in injected for p in d["name"].split("^")})


@pytest.fixture(scope="module")
def built(scenes):
    folder, injected = scenes
    out = folder / "out"
    result = B.build_dataset([folder / "in"], out, options(folder))
    return folder, out, result, injected, json.loads((out / "DREG_dataset.json").read_text())


def independent_scan(root: Path, strings: list[str]) -> list[tuple[str, str]]:
    """Every (file, string) where an injected string occurs, case-insensitively, in a file or its name."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            assert not data[3] & 0x08, f"{path}: gzip header carries a file name"
            data = gzip.decompress(data)
        text = data.lower() + path.relative_to(root).as_posix().lower().encode()
        hits += [(path.name, s) for s in strings if s.lower().encode() in text]
    return hits


# ------------------------------------------------------------------------------------------------ tests
def test_build_is_complete_and_free_of_injected_identifiers(built):
    folder, out, result, injected, meta = built
    assert result.cases_total == 2 * N_SUBJECTS and not result.skipped
    assert result.phi_strings >= 10 * N_SUBJECTS and not result.phi_hits
    assert independent_scan(out, injected) == []
    assert independent_scan(out, [str(folder / "in"), "scenes0", ".mrml", ".mrb"]) == []  # no input path
    # every file in the manifest, with its hash; the key is nowhere in the dataset
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(result.manifest["files"]) == files
    key = (folder / "secret" / "key.hex").read_text().strip()
    assert independent_scan(out, [key, key[:16]]) == []
    # NIfTI header text fields are empty
    for image in out.rglob("*.nii.gz"):
        header = gzip.decompress(image.read_bytes())[:348]
        assert header[148:228] == bytes(80) and header[228:252] == bytes(24) and header[4:22] == bytes(18)
    report = (out / "report.md").read_text()
    assert "no identifying string found" in report and "faces may be recognizable" in report
    thumbnails = sorted((out / "thumbnails").glob("*.png"))
    assert len(thumbnails) == 3 and all(f"thumbnails/{t.name}" in report for t in thumbnails)
    tile = sitk.GetArrayFromImage(sitk.ReadImage(str(thumbnails[0])))
    assert tile.ndim == 2 and tile.std() > 10
    assert meta["labels"] == {"0": "background", "1": "Hemisphere_L", "2": "Hemisphere_R", "3": "Cerebellum"}


def test_labels_masks_keypoints_match_the_scene(built, sample_dir):
    folder, out, result, injected, meta = built
    originals = [e for e in meta["training"] + meta["test"] if "augmented_from" not in e]
    for e in originals:  # every case has all three labels (subject 2's cerebellum matched by terminology)
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / e["label"]))))) == {0, 1, 2, 3}
    assert result.manifest["parameters"]["label_names"] == TABLE
    entry = originals[0]
    image = sitk.ReadImage(str(out / entry["image"]))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / entry["label"])))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / entry["mask"])))
    np.testing.assert_array_equal(mask > 0, labels > 0)
    lps = np.loadtxt(out / entry["keypoints_lps"], delimiter=",", skiprows=1, usecols=(1, 2, 3))
    vox = np.loadtxt(out / entry["keypoints"], delimiter=",")
    back = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(v)) for v in vox])
    np.testing.assert_allclose(back, lps, atol=1e-4)
    # the points are the sample landmarks (LPS mm) of one of the two time points
    ref = [np.loadtxt(sample_dir / f"{s}_landmarks.csv", delimiter=",", skiprows=2, usecols=(1, 2, 3))
           for s in ("fixed", "moving")]
    assert any(len(r) == len(lps) and np.abs(np.sort(r, 0) - np.sort(lps, 0)).max() < 1e-3 for r in ref)


def test_pairs_never_cross_splits(built):
    folder, out, result, injected, meta = built
    split_of = {e["image"]: e["split"] for e in meta["training"] + meta["test"]}
    subject_of = {e["image"]: e["subject"] for e in meta["training"] + meta["test"]}
    assert {e["split"] for e in meta["test"]} <= {"test"} and {e["split"] for e in meta["training"]} <= {"train", "val"}
    for key, split in (("training_paired_images", "train"), ("registration_val", "val"), ("registration_test", "test")):
        for pair in meta[key]:
            assert split_of[pair["fixed"]] == split_of[pair["moving"]] == split, (key, pair)
            assert subject_of[pair["fixed"]] == subject_of[pair["moving"]]  # intra-subject pairing
    subjects = {}
    for image, subject in subject_of.items():
        subjects.setdefault(subject, set()).add(split_of[image])
    assert all(len(s) == 1 for s in subjects.values()), "a subject is in two splits"
    assert len(meta["training_paired_images"]) + len(meta["registration_val"]) + len(meta["registration_test"]) > 0


def test_augmented_image_equals_original_resampled_through_stored_h5(built):
    folder, out, result, injected, meta = built
    synthetic = [p for p in meta["training_paired_images"]
                 if any(g["kind"] == "synthetic_field" for g in p["gold_standard"])]
    assert len(synthetic) == result.augmented >= 2
    by_image = {e["image"]: e for e in meta["training"]}
    for pair in synthetic:
        gold = next(g for g in pair["gold_standard"] if g["kind"] == "synthetic_field")
        transform = sitk.ReadTransform(str(out / gold["transform"]))
        fixed = sitk.ReadImage(str(out / pair["fixed"]), sitk.sitkFloat32)
        moving = sitk.ReadImage(str(out / pair["moving"]), sitk.sitkFloat32)
        expected = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
        got = sitk.GetArrayFromImage(fixed)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        assert np.abs(got - sitk.GetArrayFromImage(moving)).mean() > 0.01 * np.abs(expected).mean(), "no change"
        fl = sitk.ReadImage(str(out / by_image[pair["fixed"]]["label"]))
        ml = sitk.ReadImage(str(out / by_image[pair["moving"]]["label"]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fl), sitk.GetArrayFromImage(
            sitk.Resample(ml, fl, transform, sitk.sitkNearestNeighbor, 0)))
        lo, hi = gold["det_jacobian_range"]
        assert 0.5 <= lo <= 1.0 <= hi <= 2.0


def test_interrupted_build_resumes_to_the_same_manifest(built):
    folder, out, result, injected, meta = built
    other = folder / "resumed"
    calls = []

    def cancel_after_three_cases(fraction, message):
        calls.append(message)
        return sum(m.startswith("writing case") for m in calls) <= 3  # False = cancel (the engine's convention)

    with pytest.raises(Cancelled):
        B.build_dataset([folder / "in"], other, options(folder), progress=cancel_after_three_cases)
    assert not (other / "manifest.json").exists()
    partial = {p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file()}
    assert any(p.startswith("imagesTr/") or p.startswith("imagesTs/") for p in partial)
    # a write killed half-way leaves a temporary file: the resume removes it
    (other / "imagesTr").mkdir(exist_ok=True)
    (other / "imagesTr" / ".tmp-killed").write_bytes(b"half a file")
    again = B.build_dataset([folder / "in"], other, options(folder))
    assert 0 < again.cases_written < result.cases_total
    differ = sorted(f for f in set(again.manifest["files"]) | set(result.manifest["files"])
                    if again.manifest["files"].get(f) != result.manifest["files"].get(f))
    assert not differ
    assert again.manifest == result.manifest
    assert not list(other.rglob(".tmp-*"))


def test_refuses_a_foreign_non_empty_folder(scenes):
    folder, _ = scenes
    foreign = folder / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(NotOurDatasetError):
        B.build_dataset([folder / "in"], foreign, options(folder))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="outside"):
        B.build_dataset([folder / "in"], folder / "x", options(folder, key_file=str(folder / "x" / "k.hex")))


def test_adding_subjects_keeps_earlier_splits_pseudonyms_and_files(scenes, sample_dir):
    folder, injected = scenes
    out = folder / "incremental"
    opts = options(folder, augment_per_case=0)
    B.build_dataset([folder / "in"], out, opts)
    first = json.loads((out / "DREG_dataset.json").read_text())
    before = {e["image"]: (e["subject"], e["split"]) for e in first["training"] + first["test"]}
    hashes = json.loads((out / "manifest.json").read_text())["files"]
    for n in range(N_SUBJECTS, N_SUBJECTS + 3):
        for session in range(2):
            make_subject_scene(sample_dir, folder / "more", n, session)
    result = B.build_dataset([folder / "in", folder / "more"], out, opts)
    second = json.loads((out / "DREG_dataset.json").read_text())
    after = {e["image"]: (e["subject"], e["split"]) for e in second["training"] + second["test"]}
    assert result.cases_total == 2 * (N_SUBJECTS + 3) and result.cases_written == 6
    assert all(after[image] == value for image, value in before.items()), "an earlier case moved or was renamed"
    assert len({s for s, _ in after.values()}) == N_SUBJECTS + 3
    for rel, digest in hashes.items():
        if rel.startswith(("images", "labels", "masks", "keypoints")):
            assert result.manifest["files"][rel] == digest, rel
    assert independent_scan(out, injected) == []
    # a subject left out of the inputs (e.g. consent withdrawn) leaves the dataset entirely; the others stay
    kept = sorted(p for p in (folder / "in").iterdir() if not p.name.startswith("Quixley0")) + [folder / "more"]
    result = B.build_dataset(kept, out, opts)
    third = json.loads((out / "DREG_dataset.json").read_text())
    remaining = {e["image"]: (e["subject"], e["split"]) for e in third["training"] + third["test"]}
    gone = sorted(set(after) - set(remaining))
    assert result.removed == 2 and len(gone) == 2 and result.cases_written == 0
    assert all(remaining[i] == after[i] for i in remaining)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    stems = [Path(g).name.split(".")[0] for g in gone]
    assert not [f for f in files if any(stem in f for stem in stems)], "files of a removed case remain"
    assert not [f for f in result.manifest["files"] if any(stem in f for stem in stems)]
    pairs = third["training_paired_images"] + third["registration_val"] + third["registration_test"]
    assert not [p for p in pairs if p["fixed"] in gone or p["moving"] in gone]
    assert "cases removed because their inputs were not given again: 2" in (out / "report.md").read_text()


def test_identifying_segment_name_fails_the_build_and_names_the_file(scenes):
    folder, injected = scenes
    inputs = sorted(p for p in (folder / "in").iterdir() if p.name.startswith("Quixley1"))
    assert inputs
    out = folder / "leaky"
    with pytest.raises(B.PhiFoundError, match="DREG_dataset.json"):
        B.build_dataset(inputs, out, options(folder, label_names=None, augment_per_case=0))
    report = (out / "report.md").read_text()
    assert "FAILED" in report and "DREG_dataset.json" in report
    assert not (out / "manifest.json").exists()


def make_anonymous_scene(sample: Path, folder: Path) -> Path:
    """Two volumes, no subject hierarchy, and a segmentation that names no reference volume."""
    scene = make_scene()
    folder.mkdir(parents=True)
    nodes = []
    for image in ("fixed", "moving"):
        v = _read(scene, sample / f"{image}.nii.gz", "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode")
        v.SetName(f"Volume_{image == 'moving'}")
        nodes.append(v)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.GetSegmentation().AddEmptySegment("a", "Cerebellum")
    nodes.append(seg)
    scene.SetRootDirectory(str(folder))
    for node in nodes:
        node.AddDefaultStorageNode()
        st = node.GetStorageNode()
        st.SetFileName(str(folder / f"{node.GetID()}.{st.GetDefaultWriteFileExtension()}"))
        st.WriteData(node)
    path = folder / "case17.mrml"
    scene.SetURL(str(path))
    assert scene.Commit(str(path))
    return path


def test_cases_without_identity_are_reported_and_a_mapping_names_them(scenes, sample_dir):
    folder, _ = scenes
    path = make_anonymous_scene(sample_dir, folder / "anon")
    result = B.build_dataset([path], folder / "anon_out", options(folder, augment_per_case=0))
    reasons = sorted(s.reason for s in result.skipped)
    assert result.cases_total == 0 and len(reasons) == 3
    assert sum("no subject identity" in r for r in reasons) == 2
    assert sum("without its reference volume" in r for r in reasons) == 1
    assert "without its reference volume" in (folder / "anon_out" / "report.md").read_text()
    by_file = B.build_dataset([path], folder / "anon_file", options(folder, augment_per_case=0,
                                                                    subject_from_file=True))
    assert by_file.cases_total == 2 and len(by_file.skipped) == 1
    assert independent_scan(folder / "anon_file", ["case17"]) == []
    mapping = folder / "subjects.csv"
    mapping.write_text("scene,subject,session\ncase17.mrml,HOSP-REF-88231,v1\n")
    from DatasetBuilderLib import cli

    code = cli.main(["dataset", "build", str(path), "-o", str(folder / "anon_out2"), "--key",
                     str(folder / "secret" / "key.hex"), "--subjects", str(mapping), "--split", "1,0,0"])
    assert code == 0
    meta = json.loads((folder / "anon_out2" / "DREG_dataset.json").read_text())
    assert len(meta["training"]) == 2 and len(meta["training_paired_images"]) == 2
    assert independent_scan(folder / "anon_out2", ["HOSP-REF-88231", "case17"]) == []
    (folder / "occupied").mkdir()
    (folder / "occupied" / "x").write_text("x")
    assert cli.main(["dataset", "build", str(path), "-o", str(folder / "occupied"), "--key",
                     str(folder / "secret" / "key.hex")]) == 3


def test_engine_dataset_reads_pairs_with_matched_keypoints(built):
    torch = pytest.importorskip("torch")
    from DeepRegistrationLib.learning.l2r_dataset import L2RPairDataset, collate_pairs

    folder, out, result, injected, meta = built
    ds = L2RPairDataset(out)
    assert len(ds) == len(meta["training_paired_images"])
    synthetic = [i for i in range(len(ds)) if "transform_path" in ds[i]]
    assert synthetic
    item = ds[synthetic[0]]
    assert item["fixed"].shape == (1, *item["fixed_grid"].shape) and item["fixed"].dtype == torch.float32
    assert item["fixed_label"].shape == item["fixed_grid"].shape and item["fixed_mask"].dtype == torch.bool
    assert "synthetic_field" in item["gold_standard"] and len(item["keypoint_ids"]) >= 10
    transform = sitk.ReadTransform(item["transform_path"])  # fixed -> moving: maps fixed keypoints onto moving ones
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in item["fixed_keypoints"].numpy()])
    np.testing.assert_allclose(mapped, item["moving_keypoints"].numpy(), atol=1e-3)
    batch = collate_pairs([ds[0], ds[0]])
    assert batch["fixed"].shape[0] == 2 and len(batch["fixed_grid"]) == 2
    assert len(L2RPairDataset(out, "registration_test")) == len(meta["registration_test"])


def test_dicom_series_folders_with_real_headers(scenes):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    folder, _ = scenes
    root = folder / "dicom"
    strings = set()
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for n, (name, study_date) in enumerate((("CT_small.dcm", None), ("MR_small.dcm", None),
                                            ("MR_small.dcm", "20050117"), ("CT_small.dcm", "same study"))):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyDescription = "HEAD"  # a common description: not identifying, and the report says "Head MR/CT"
        if study_date == "same study":  # a CT of the MR subject in its first MR study: one time point, 2 modalities
            for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate"):
                setattr(ds, keyword, mr.get(keyword))
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".88"
            ds.SOPInstanceUID = ds.SOPInstanceUID + ".88"
        elif study_date:  # a second time point of the MR subject, with more identifying text
            ds.StudyDate = study_date
            ds.StudyInstanceUID = ds.StudyInstanceUID + ".77"
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".77"
            ds.SOPInstanceUID = ds.SOPInstanceUID + ".77"
            ds.InstitutionAddress = "12 Vexmoor Lane, Trelleck"
            block = ds.private_block(0x0041, "ACME_PRIVATE", create=True)
            block.add_new(0x01, "LO", "Referred by Dr Orpington")
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "StudyDate", "InstitutionName", "InstitutionAddress"):
            value = str(ds.get(keyword, "") or "")
            strings |= {value} | set(value.split("^"))
        strings.add("Referred by Dr Orpington")
        target = root / f"series{n}"
        target.mkdir(parents=True)
        ds.save_as(target / "IM0001.dcm")
    strings = sorted(s for s in strings if len(s) >= 4)
    out = folder / "dicom_out"
    result = B.build_dataset([root], out, options(folder, augment_per_case=0, label_names=None, dates="shift"))
    meta = json.loads((out / "DREG_dataset.json").read_text())
    assert result.cases_total == 4 and not result.skipped and not result.phi_hits
    # PS3.15 basic profile: the header summary keeps acquisition parameters, no identity, no UID, no private tag
    entries = meta["training"] + meta["test"]
    for e in entries:
        header = json.loads((out / e["dicom_header"]).read_text())
        assert header["Modality"] == e["modality"] and "SliceThickness" in header and "PixelSpacing" in header
        assert not {"PatientName", "PatientID", "PatientBirthDate", "StudyDate", "InstitutionName",
                    "InstitutionAddress", "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber"} & set(header)
        assert not any(k.startswith("(0041") for k in header)
    mr = next(e for e in entries if e["modality"] == "MR")
    assert json.loads((out / mr["dicom_header"]).read_text())["RepetitionTime"] == "4000.0000"
    # dates shifted per subject: no real date written, the interval between the MR sessions kept
    mr_dates = sorted(e["study_date"] for e in entries if e["modality"] == "MR")
    assert len(mr_dates) == 2 and all(d.count("-") == 2 for d in mr_dates)
    pairs = meta["training_paired_images"] + meta["registration_val"] + meta["registration_test"]
    intervals = sorted(abs(p["interval_days"]) for p in pairs)
    first = pydicom.valuerep.DA(str(pydicom.dcmread(get_testdata_file("MR_small.dcm")).StudyDate))
    days = abs((pydicom.valuerep.DA("20050117") - first).days)
    assert days > 0 and intervals == [0, 0] + [days] * 4  # CT <-> MR of one study: 0 days
    # the CT and the MR of one study share their case number: <TASK>_<case>_<modality> as in Learn2Reg
    names = sorted(Path(e["image"]).name.split(".")[0] for e in entries)
    numbers = [n.split("_")[1] for n in names]
    assert len(set(numbers)) == 3 and sorted({n.split("_")[2] for n in names}) == ["0000", "0001"]
    assert not any(d.replace("-", "") in (str(first).replace("-", ""), "20050117") for d in mr_dates)
    assert sorted(meta["modality"].values()) == ["CT", "MR"]
    assert len({e["subject"] for e in meta["training"] + meta["test"]}) == 2
    assert len(meta["training_paired_images"]) + len(meta["registration_val"]) + len(meta["registration_test"]) == 6
    assert result.phi_strings >= len(strings)
    assert independent_scan(out, strings) == []
    image = sitk.ReadImage(str(out / (meta["training"] + meta["test"])[0]["image"]))
    assert image.GetSize()[:2] in ((128, 128), (64, 64))


def test_bad_scenes_are_skipped_with_a_reason(scenes, sample_dir):
    folder, _ = scenes
    bad = folder / "bad"
    make_subject_scene(sample_dir, bad, 7, 0)
    make_subject_scene(sample_dir, bad, 7, 1, birth="19991231")  # same PatientID, another birth date
    broken, _ = make_subject_scene(sample_dir, bad, 8, 0)
    for image in broken.parent.glob("* T1 *.nrrd"):
        image.unlink()  # the volume's file is gone
    (bad / "garbage.mrb").write_bytes(b"not a zip")
    cwd = os.getcwd()
    result = B.build_dataset([bad], folder / "bad_out", options(folder, augment_per_case=0))
    assert os.getcwd() == cwd, "reading a broken .mrb moved the process to another folder"
    reasons = sorted(s.reason for s in result.skipped)
    assert result.cases_total == 0
    assert reasons.count("subject ID shared by different birth dates") == 1
    assert any("volume without image data" in r for r in reasons)
    assert any("scene could not be read" in r for r in reasons)
    report = (folder / "bad_out" / "report.md").read_text()
    assert "different birth dates" in report and "Quixley" not in report


def test_build_killed_in_a_child_process_resumes_to_the_same_manifest(built):
    """The module's background path: ``dataset build`` in a child process, SIGKILLed mid-way, then resumed."""
    import time

    from DatasetBuilderLib.background import BuildProcess

    folder, out, result, injected, meta = built
    table = folder / "labels.json"
    table.write_text(json.dumps({"names": TABLE, "synonyms": SYNONYMS}))
    other = folder / "killed"
    args = [folder / "in", "-o", other, "--key", folder / "secret" / "key.hex", "--labels", table, "--augment", "1",
            "--no-intensity", "--seed", "3"]
    child = BuildProcess(args)
    deadline = time.time() + 120
    while child.fraction < 0.5 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, f"the child ended early: {child.last_error()}"
    child.cancel(kill=True)
    assert child.wait(60) != 0
    assert not (other / "manifest.json").exists() and (other / "meta" / "state.json").exists()
    again = BuildProcess(args)
    assert again.wait(180) == 0, again.last_error()
    assert again.fraction == 1.0
    assert json.loads((other / "manifest.json").read_text()) == result.manifest


@pytest.mark.parametrize("method", ["engine", "ants"])
def test_classical_registration_ground_truth_is_flagged_and_improves_the_pair(scenes, method):
    if method == "ants":
        pytest.importorskip("ants", reason="antspyx (test extra) not installed")
    folder, injected = scenes
    inputs = sorted(p for p in (folder / "in").iterdir() if p.name.startswith("Quixley0"))
    out = folder / f"classical_{method}"
    B.build_dataset(inputs, out, options(folder, augment_per_case=0, classical=True, split_ratios=(1, 0, 0),
                                         classical_options=ClassicalOptions(method=method)))
    meta = json.loads((out / "DREG_dataset.json").read_text())
    pairs = meta["training_paired_images"]
    assert len(pairs) == 2
    by_image = {e["image"]: e for e in meta["training"]}
    for pair in pairs:
        gold = next(g for g in pair["gold_standard"] if g["kind"] == "algorithmic")
        assert ("ANTs" in gold["method"]) == (method == "ants") and gold["transform"].endswith(f"_{method}.h5")
        q = gold["quality"]
        assert q["ncc_after"] > q["ncc_before"] and q["dice_after"] > q["dice_before"] + 0.1, q
        assert q["folding_percent"] < 0.05, q
    if method == "engine":  # algorithmic transforms are pseudo ground truth for supervised training
        from DeepRegistrationLib.learning.dataset_pairs import DatasetPairs

        known = DatasetPairs(out, shape=(24, 24, 24), spacing=4.0, need_field=True, jitter=0.0)
        assert len(known) == 2 and float(known.fixed_batches(1)[0].field.abs().max()) > 1.0
        # the stored .h5 brings the moving landmarks onto the fixed ones better than no transform
        transform = sitk.ReadTransform(str(out / gold["transform"]))
        fk, mk = (np.loadtxt(out / by_image[pair[s]]["keypoints_lps"], delimiter=",", skiprows=1,
                             usecols=(1, 2, 3)) for s in ("fixed", "moving"))
        mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in fk])
        assert np.linalg.norm(mapped - mk, axis=1).mean() < 0.7 * np.linalg.norm(fk - mk, axis=1).mean()
    assert independent_scan(out, injected) == []


def test_evaluate_scores_methods_on_the_dataset_pairs(built, tmp_path, capsys):
    """``deepregistration evaluate --dataset``: per-pair Learn2Reg metrics of none / IO / model / model + IO."""
    from DeepRegistrationLib.apps import cli
    from DeepRegistrationLib.learning.model_files import save_model
    from DeepRegistrationLib.learning.networks import UNetFieldPredictor

    folder, out, result, injected, meta = built
    model = save_model(UNetFieldPredictor((4, 8), 4.0, "separable", "svf"), tmp_path / "untrained",
                       {"name": "untrained", "preprocessing": {"working_spacing_mm": 4.0}})
    report = tmp_path / "eval"
    args = ["evaluate", "--dataset", str(out), "--pairs", "training_paired_images", "--max-pairs", "2",
            "--model", str(model), "--spacing", "4", "-o", str(report)]
    assert cli.main(args) == 0
    assert "model+io" in capsys.readouterr().out
    ev = json.loads((report / "evaluation.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert ev["summary"]["none"]["sdlogj"]["mean"] == 0.0
    assert ev["methods"] == ["none", "io", "model", "model+io"] and len(ev["pairs"]) == 2
    assert ev["config"]["similarity"] == "lncc" and ev["config"]["spacing_mm"] == 4.0
    s = ev["summary"]
    assert s["io"]["dice"]["mean"] > s["none"]["dice"]["mean"] + 0.05
    assert s["io"]["tre"]["mean"] < 0.8 * s["io"]["tre_before"]["mean"]
    assert s["io"]["dice"]["p30"] <= s["io"]["dice"]["median"] and s["io"]["folding_percent"]["max"] < 0.05
    # the untrained model predicts no deformation: alone it is the affine stage, as the IO's start it is harmless
    assert s["model"]["dice"]["mean"] < s["io"]["dice"]["mean"]
    assert abs(s["model+io"]["dice"]["mean"] - s["io"]["dice"]["mean"]) < 0.02
    md = (report / "evaluation.md").read_text()
    assert "Dice p30" in md and md.count("| model+io |") == 3  # summary + one row per pair
    png = sitk.ReadImage(str(report / "evaluation.png"))
    assert png.GetSize()[0] > 500
    # an existing report is never overwritten silently; a missing pair list is one clear error
    before = (report / "evaluation.json").read_bytes()
    assert cli.main(args) != 0 and (report / "evaluation.json").read_bytes() == before
    assert "already holds" in capsys.readouterr().err
    assert cli.main(["evaluate", "--dataset", str(out), "--pairs", "registration_val", "-o", str(tmp_path / "e2")]) != 0
    assert "no 'registration_val' pairs" in capsys.readouterr().err


def test_training_pairs_from_the_dataset_are_weighted_cropped_and_carry_the_known_field(built, tmp_path):
    torch = pytest.importorskip("torch")
    from DeepRegistrationLib.learning.dataset_pairs import DatasetPairs
    from DeepRegistrationLib.core.errors import InputError
    from DeepRegistrationLib.learning.synth import warp

    folder, out, result, injected, meta = built
    pairs = DatasetPairs(out, shape=(24, 24, 24), spacing=4.0, seed=1)
    assert len(pairs) == len(meta["training_paired_images"])
    batch = pairs.sample(2)
    assert batch.fixed.shape == (2, 1, 24, 24, 24) and batch.fixed_labels.dtype == torch.int64
    assert 0 <= float(batch.fixed.min()) and float(batch.fixed.max()) <= 1
    assert set(np.unique(batch.fixed_labels)) <= {0, 1, 2, 3}
    # supervised: only the augmented pairs; their stored field maps the fixed crop onto the moving one
    known = DatasetPairs(out, shape=(32, 32, 32), spacing=3.0, need_field=True, jitter=0.0)
    assert len(known) == sum(any(g["kind"] == "synthetic_field" for g in p["gold_standard"])
                             for p in meta["training_paired_images"])
    # every known pair, including those of the RAS-stored (flipped) sample image, on the LPS working grid
    directions = {sitk.ReadImage(str(out / known.data.pairs[k]["fixed"])).GetDirection()[0] for k in known.indices}
    assert directions == {1.0, -1.0}
    for b in known.fixed_batches():
        assert float(b.field.abs().max()) > 1.0
        before = (b.moving - b.fixed).abs().mean()
        after = (warp(b.moving, b.field, b.grid) - b.fixed).abs().mean()
        assert after < 0.6 * before, (float(before), float(after))
    # weighted sampling follows the cases' weights (mean of the pair's two)
    heavy = tmp_path / "weighted"
    shutil.copytree(out, heavy)
    data = json.loads((heavy / "DREG_dataset.json").read_text())
    first = data["training_paired_images"][0]
    for entry in data["training"]:
        entry["weight"] = 9.0 if entry["image"] in (first["fixed"], first["moving"]) else 1.0
    (heavy / "DREG_dataset.json").write_text(json.dumps(data))
    weighted = DatasetPairs(heavy, seed=5)
    expected = (weighted.weights / weighted.weights.sum())[0].item()
    share = np.mean([k == 0 for k in weighted.pick(4000)])
    assert expected > 2.0 / len(weighted) and abs(share - expected) < 0.03
    with pytest.raises(InputError, match="no 'registration_val' pair"):
        DatasetPairs(out, pairs="registration_val")


def test_train_on_the_dataset_writes_a_model_whose_card_names_no_identity(built, tmp_path):
    pytest.importorskip("torch")
    from DeepRegistrationLib.learning.model_files import load_model
    from DeepRegistrationLib.learning.training import TrainConfig, train

    folder, out, result, injected, meta = built
    cfg = TrainConfig(mode="semi-supervised", steps=16, shape=(16, 16, 16), spacing=6.0, channels=(4, 8, 8),
                      val_every=8, val_pairs=2, output_dir=str(tmp_path / "run"), model_name="from-dataset",
                      dataset=str(out), seed=2)
    res = train(cfg)
    assert res.step == 16 and all(np.isfinite(res.losses)) and len(res.validation) == 2
    card = load_model(res.model_path).card
    assert "Learn2Reg-layout dataset 'DREG'" in card["training"]["data"]
    assert card["training"]["recipe"]["dataset"] == str(out)
    assert independent_scan(tmp_path / "run", injected) == []


def test_training_in_a_child_process_installs_the_model_and_cancel_stops_it(built, tmp_path, monkeypatch):
    """The DatasetBuilder module's "Train" path: ``train --dataset`` in a child with progress lines; the
    model lands in the user models folder (Deep Registration lists it); Cancel stops a run, nothing installed."""
    import time

    from DatasetBuilderLib.background import TrainProcess
    from DeepRegistrationLib.learning import registry

    folder, out, result, injected, meta = built
    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    common = ["--dataset", out, "--shape", "16", "16", "16", "--spacing", "6", "--channels", "4", "8",
              "--mode", "semi-supervised", "--install", "--val-every", "2", "--checkpoint-every", "2"]
    child = TrainProcess(common + ["--name", "child-model", "--steps", "4", "-o", tmp_path / "run"])
    assert child.wait(240) == 0, child.last_error()
    assert child.fraction == 1.0 and "step 4/4" in child.message
    # 4 steps from a zero-initialized head: still the identity; the module shows this warning with the result
    assert [w for w in child.warnings() if w.startswith("the model has not learned to register yet")], child.errors
    assert [e.name for e in registry.list_models() if e.ok and e.source == "user"] == ["child-model"]
    long = TrainProcess(common + ["--name", "stopped", "--steps", "100000", "-o", tmp_path / "run2"])
    deadline = time.time() + 120
    while long.fraction <= 0 and long.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert long.poll() is None, long.last_error()
    long.cancel()
    assert long.wait(60) == 130
    assert "stopped" not in [e.name for e in registry.list_models()]


def test_current_scene_with_generic_names_builds(tmp_path, sample_dir):
    """What the DatasetBuilder module does with the current scene (saved as ``current_scene.mrb``): nodes
    named "fixed", "moving", "fixed_labels"... (Slicer names loaded files after them) are role words, not
    identity — they must not fail the PHI scan by matching the dataset's own "fixed"/"moving" keys."""
    scene = make_scene()
    volumes = []
    for side in ("fixed", "moving"):
        volume = _read(scene, sample_dir / f"{side}.nii.gz", "vtkMRMLScalarVolumeNode",
                       "vtkMRMLVolumeArchetypeStorageNode")
        volume.SetName(side)
        labels = _read(scene, sample_dir / f"{side}_labels.nii.gz", "vtkMRMLLabelMapVolumeNode",
                       "vtkMRMLVolumeArchetypeStorageNode")
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{side}_labels")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, seg)
        scene.RemoveNode(labels)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        volumes.append(volume)
    data = tmp_path / "scene"
    data.mkdir()
    scene.SetRootDirectory(str(data))
    for node in volumes + list(scene.GetNodesByClass("vtkMRMLSegmentationNode")):
        node.AddDefaultStorageNode()
        st = node.GetStorageNode()
        st.SetFileName(str(data / f"{node.GetName()}.{st.GetDefaultWriteFileExtension()}"))
        assert st.WriteData(node)
    scene.SetURL(str(data / "current_scene.mrml"))
    assert scene.Commit(str(data / "current_scene.mrml"))
    assert scene.WriteToMRB(str(tmp_path / "current_scene.mrb"))
    result = B.build_dataset([tmp_path / "current_scene.mrb"], tmp_path / "out",
                             B.BuildOptions(key_file=str(tmp_path / "k.hex"), subject_from_file=True))
    meta = json.loads((tmp_path / "out" / "DREG_dataset.json").read_text())
    cases = meta["training"] + meta["test"]
    pairs = meta["training_paired_images"] + meta["registration_val"] + meta["registration_test"]
    assert result.cases_total == 2 and not result.phi_hits and not result.skipped
    assert all("label" in c for c in cases) and len(pairs) == 2
    assert "no identifying string found" in (tmp_path / "out" / "report.md").read_text()
