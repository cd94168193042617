"""DatasetBuilder pure logic: splits, pairs, label table, pseudonyms, PHI scan, augmentation, HDF5 times."""
from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "DatasetBuilder") not in sys.path:
    sys.path.insert(0, str(ROOT / "DatasetBuilder"))

from DatasetBuilderLib import deid  # noqa: E402
from DatasetBuilderLib.augment import AugmentOptions, augment_case  # noqa: E402
from DatasetBuilderLib.hdf5_times import lookup3, zero_object_header_times  # noqa: E402
from DatasetBuilderLib.labels import LabelTable, Term, parse_terminology  # noqa: E402
from DatasetBuilderLib.pairs import CaseRef, check_no_cross_split, make_pairs  # noqa: E402
from DatasetBuilderLib.splits import assign_splits  # noqa: E402
from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.io.images import read_label_image  # noqa: E402
from DeepRegistrationLib.evaluation.metrics import jacobian_determinant  # noqa: E402


# ------------------------------------------------------------------------------------------------ splits
@pytest.mark.parametrize("n, expected", [(10, (7, 1, 2)), (100, (70, 10, 20)), (3, (2, 0, 1))])
def test_splits_follow_the_ratios(n, expected):
    subjects = [f"S{i:03d}" for i in range(n)]
    splits = assign_splits(subjects, seed=1)
    assert tuple(sum(v == s for v in splits.values()) for s in ("train", "val", "test")) == expected
    assert assign_splits(list(reversed(subjects)), seed=1) == splits  # order of the inputs does not matter
    assert assign_splits(subjects, seed=2) != splits or n <= 3


def test_splits_are_stable_under_additions():
    first = assign_splits([f"S{i}" for i in range(20)], seed=0)
    grown = assign_splits([f"S{i}" for i in range(50)], seed=0, existing=first)
    assert all(grown[s] == first[s] for s in first)
    counts = [sum(v == s for v in grown.values()) for s in ("train", "val", "test")]
    assert counts == [35, 5, 10]
    with pytest.raises(ValueError):
        assign_splits(["a"], ratios=(1, -1, 0))


# ------------------------------------------------------------------------------------------------ pairs
def _cases():
    return [CaseRef(f"c{s}{t}", f"s{s}", "train" if s < 4 else ("val" if s == 4 else "test"), str(t))
            for s in range(7) for t in range(2)]


def test_pairs_stay_within_splits_for_every_strategy():
    cases = _cases()
    split_of = {c.key: c.split for c in cases}
    subject_of = {c.key: c.subject for c in cases}
    intra = make_pairs(cases, "intra")
    assert len(intra) == 14 and all(subject_of[a] == subject_of[b] for a, b in intra)
    inter = make_pairs(cases, "inter")
    assert len(inter) == (8 * 7 - 4 * 2) + 0 + (4 * 3 - 2 * 2)  # ordered pairs across subjects: train, val, test
    assert all(subject_of[a] != subject_of[b] and split_of[a] == split_of[b] for a, b in inter)
    bounded = make_pairs(cases, "inter", max_pairs_per_split=5, seed=1)
    assert bounded == make_pairs(cases, "inter", max_pairs_per_split=5, seed=1)
    assert sum(split_of[a] == "train" for a, _ in bounded) == 5
    atlas = make_pairs(cases, "atlas", atlas_key="c00")
    assert len(atlas) == 7 and all(a == "c00" and split_of[b] == "train" for a, b in atlas)
    with pytest.raises(ValueError, match="cross"):
        check_no_cross_split([("c00", "c50")], split_of)


# ------------------------------------------------------------------------------------------------ labels
def test_label_table_synonyms_and_unmatched_names():
    table = LabelTable.create(["Hippocampus_L", "Hippocampus_R"], {"left hippocampus": "Hippocampus_L"})
    table.observe(["Left_Hippocampus", "hippocampus-r", "Tumour of J. Smith"])
    assert table.id_of("LEFT hippocampus ") == 1 and table.id_of("Hippocampus_R") == 2
    assert table.id_of("Tumour of J. Smith") == 0 and table.unmatched == {"Tumour of J. Smith": 1}
    open_table = LabelTable.create(None, {"lh": "Liver"})
    open_table.observe(["Spleen", "lh", "Liver", "Kidney"])
    open_table.finalize()
    assert open_table.as_json() == {"0": "background", "1": "Kidney", "2": "Liver", "3": "Spleen"}


SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMY = "Anatomic codes - DICOM master list"


def _entry(kind: str, modifier: str = "^^") -> str:
    """A TerminologyEntry string as Slicer writes it (category, type, modifier, anatomic context, region)."""
    return f"{SLICER_CONTEXT}~SCT^123037004^Anatomical Structure~{kind}~{modifier}~{ANATOMY}~^^~^^"


def test_terminology_codes_match_segments_named_differently():
    liver = parse_terminology(_entry("SCT^10200004^Liver"))
    left_kidney = parse_terminology(_entry("SCT^64033007^Kidney", "SCT^7771000^Left"))
    assert liver == Term("SCT^10200004", "Liver")
    assert left_kidney == Term("SCT^64033007/SCT^7771000", "Kidney (Left)")
    # Slicer's default entry ("Tissue") and malformed strings carry no meaning
    assert parse_terminology(f"{SLICER_CONTEXT}~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~{ANATOMY}~^^~^^") is None
    assert parse_terminology("") is None and parse_terminology("garbage") is None
    # open table: coded segments are labelled by their meaning whatever their names
    table = LabelTable.create(None, None)
    table.observe(["Leber", "liver_seg_final JS", "Niere li", "Spleen"], [liver, liver, left_kidney, None])
    table.finalize()
    assert table.as_json() == {"0": "background", "1": "Kidney (Left)", "2": "Liver", "3": "Spleen"}
    assert table.id_of("Leber", liver) == table.id_of("liver_seg_final JS", liver) == 2
    # fixed table: a code synonym, and a meaning equal to a table name, both match; the name alone does not
    fixed = LabelTable.create(["LIVER", "Kidney_L"], {"SCT^64033007/SCT^7771000": "Kidney_L"})
    fixed.observe(["Leber", "Niere li", "Niere li"], [liver, left_kidney, None])
    assert fixed.id_of("Leber", liver) == 1 and fixed.id_of("Niere li", left_kidney) == 2
    assert fixed.id_of("Niere li") == 0 and fixed.unmatched == {"Niere li": 1}


# ------------------------------------------------------------------------------------------------ de-identification
def test_pseudonyms_are_keyed_and_stable(tmp_path):
    key = deid.load_or_create_key(tmp_path / "k.hex")
    assert deid.load_or_create_key(tmp_path / "k.hex") == key
    assert deid.pseudonym(key, "PID-1") == deid.pseudonym(key, " PID-1 ") != deid.pseudonym(key, "PID-2")
    assert deid.pseudonym(b"x" * 32, "PID-1") != deid.pseudonym(key, "PID-1")
    assert "PID" not in deid.pseudonym(key, "PID-1")


def test_phi_scan_finds_strings_in_compressed_files_and_respects_number_boundaries(tmp_path):
    phi = deid.PhiStrings()
    phi.add("Doe^Jane", "DICOM.PatientName")
    phi.add("20190312", "DICOM.StudyDate")
    phi.add("M", "too short")
    (tmp_path / "a.txt").write_text("value 120190312.5 and 0.20190312")  # inside longer numbers: no hit
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(b"header ... jane ..."))
    (tmp_path / "c.csv").write_text("date,20190312\n")
    hits = deid.scan_for_phi(tmp_path, phi)
    assert sorted((h.file, h.value) for h in hits) == [("b.nii.gz", "Jane"), ("c.csv", "20190312")]
    assert "M" not in phi.values


def test_nifti_scrub_and_deterministic_gzip(tmp_path, sample_dir):
    img = sitk.ReadImage(str(sample_dir / "fixed_labels.nii.gz"))
    p = tmp_path / "x.nii"
    sitk.WriteImage(img, str(p))
    raw = bytearray(p.read_bytes())
    raw[148:160] = b"Doe^Jane 123"
    clean = deid.scrub_nifti_bytes(bytes(raw))
    assert b"Doe" not in clean[:352] and clean[352:] == bytes(raw[352:])
    z = deid.deterministic_gzip(clean)
    assert z == deid.deterministic_gzip(clean) and gzip.decompress(z) == clean and not z[3] & 0x08


# ------------------------------------------------------------------------------------------------ augmentation
def test_jacobian_of_a_known_affine_and_a_known_field():
    grid = Grid((12, 14, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    a = np.diag([1.2, 0.9, 1.1, 1.0])
    np.testing.assert_allclose(jacobian_determinant(np.zeros((3, *grid.shape)), grid, a), np.prod([1.2, 0.9, 1.1]))
    x = grid.world_points()
    u = np.stack([0.1 * x[..., 0], np.zeros(grid.shape), -0.2 * x[..., 2]])  # u = (0.1 x, 0, -0.2 z)
    np.testing.assert_allclose(jacobian_determinant(u, grid, np.eye(4)), 1.1 * 0.8, rtol=1e-9)


def test_augmentation_rejects_implausible_fields_and_keeps_labels_exact(sample_dir):
    from DeepRegistrationLib.io.images import read_image

    image = read_image(sample_dir / "fixed.nii.gz")
    labels = read_label_image(sample_dir / "fixed_labels.nii.gz").array
    strict = AugmentOptions(svf_max_mm=6.0, min_det=0.99, max_det=1.01, max_tries=2)
    assert augment_case(np.random.default_rng(0), image, labels, None, None, [], strict) is None
    rng = np.random.default_rng(1)
    aug = augment_case(rng, image, labels, None, None, [], AugmentOptions(svf_max_mm=3.0))
    assert aug is not None and aug.rejected >= 0 and 0.5 <= aug.det_range[0] < 1 < aug.det_range[1] <= 2
    ref = sitk.GetImageFromArray(labels)
    image.grid.apply_to_sitk(ref)
    expected = sitk.GetArrayFromImage(sitk.Resample(ref, ref, aug.transform, sitk.sitkNearestNeighbor, 0))
    np.testing.assert_array_equal(aug.labels, expected)
    assert {"gamma", "noise_std", "bias_log_amplitude"} <= set(aug.params)


# ------------------------------------------------------------------------------------------------ HDF5
def test_lookup3_reference_values_and_reproducible_h5(tmp_path):
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551  # lookup3.c driver5
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    t = sitk.Euler3DTransform((1, 2, 3), 0.1, 0.2, 0.3, (4, 5, 6))
    blobs = []
    for n in range(2):
        time.sleep(1.1 * n)  # HDF5 time stamps have a resolution of one second
        sitk.WriteTransform(t, str(tmp_path / f"{n}.h5"))
        blobs.append(zero_object_header_times((tmp_path / f"{n}.h5").read_bytes()))
    assert (tmp_path / "0.h5").read_bytes() != (tmp_path / "1.h5").read_bytes()
    assert blobs[0][1] > 0 and blobs[0][0] == blobs[1][0]
    (tmp_path / "z.h5").write_bytes(blobs[0][0])
    back = sitk.ReadTransform(str(tmp_path / "z.h5"))
    np.testing.assert_allclose(back.TransformPoint((1, 1, 1)), t.TransformPoint((1, 1, 1)))


def test_phi_scan_finds_non_ascii_names_also_json_escaped(tmp_path):
    phi = deid.PhiStrings()
    phi.add("Müller^Jörg", "DICOM PatientName")
    (tmp_path / "plain.json").write_text('{"x": "Jörg"}', encoding="utf-8")
    (tmp_path / "escaped.json").write_text('{"x": "M\\u00fcller"}', encoding="ascii")
    (tmp_path / "clean.json").write_text('{"x": "Mueller"}')
    hits = {h.file for h in deid.scan_for_phi(tmp_path, phi)}
    assert hits == {"plain.json", "escaped.json"}


def test_generic_words_are_not_phi_but_names_are():
    phi = deid.PhiStrings()
    for value in ("HEAD", "MR Brain", "fixed_labels", "Chest CT 2", "Volume_3", "T1"):
        phi.add(value, "description")
    assert phi.values == {}
    phi.add("Brain^Johanna", "DICOM PatientName")  # a surname that is a generic word: the name still counts
    assert set(phi.values) == {"Brain^Johanna", "Johanna"}
    phi.add("Head Clinic Vexmoor", "institution")
    assert "Head Clinic Vexmoor" in phi.values


def test_numeric_identifiers_are_searched_as_whole_tokens_of_six_digits_or_more(tmp_path):
    phi = deid.PhiStrings()
    phi.add("4711", "DICOM PatientID")  # too short: would match case numbers and hex digests by chance
    phi.add("20040826", "DICOM StudyDate")
    phi.add("1.2.840.99.7", "DICOM StudyInstanceUID")
    assert set(phi.values) == {"20040826", "1.2.840.99.7"}
    (tmp_path / "hex.json").write_text('{"uid": "C3fa20040826b1"}')  # inside a hex pseudonym: not the date
    (tmp_path / "longer.txt").write_text("120040826 1.2.840.99.77")   # inside longer numbers
    (tmp_path / "leak.csv").write_text("id,date\nx,20040826\n")      # a whole token: found
    (tmp_path / "uid.txt").write_text("uid=1.2.840.99.7;")
    assert {h.file for h in deid.scan_for_phi(tmp_path, phi)} == {"leak.csv", "uid.txt"}


def test_short_name_parts_count_as_whole_words_only(tmp_path):
    phi = deid.PhiStrings()
    phi.add("Case^Jo-Ann Wexford", "DICOM PatientName")
    (tmp_path / "report.md").write_text("- cases written: 4\n- showcase\n")  # the builder's own words
    (tmp_path / "a.csv").write_text("name\nCase\n")                       # the surname as a word
    (tmp_path / "case_01.json").write_text("{}")                           # in a file name, between separators
    (tmp_path / "b.txt").write_text("xxjo-ann wexfordxx")                  # long parts: anywhere
    assert {h.file for h in deid.scan_for_phi(tmp_path, phi)} == {"a.csv", "case_01.json", "b.txt"}
