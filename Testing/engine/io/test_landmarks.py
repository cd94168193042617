"""Landmark files: CSV / Slicer .mrk.json / legacy .fcsv, RAS↔LPS, pairing, bad input, and real MRML parity."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.io.landmarks import (MARKUPS_SCHEMA, Landmarks, match_landmarks, read_landmarks,
    write_landmarks_csv, write_markups_json)

LPS = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, 6.25]])
RAS = np.array([[-1.0, -2.0, 3.0], [4.0, -5.5, 6.25]])     # the same points, written by hand in RAS


def _write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_defaults_to_lps(tmp_path):
    lm = read_landmarks(_write(tmp_path, "a.csv", "label,x,y,z\nA,1,2,3\nB,-4,5.5,6.25\n"))
    assert lm.labels == ["A", "B"]
    np.testing.assert_array_equal(lm.points, LPS)


def test_csv_ras_comment_and_header_variants(tmp_path):
    lm = read_landmarks(_write(tmp_path, "a.csv", "# coordinateSystem = RAS\nLabel,X,Y,Z\nA,-1,-2,3\nB,4,-5.5,6.25\n"))
    np.testing.assert_array_equal(lm.points, LPS)
    lm = read_landmarks(_write(tmp_path, "b.csv", "Name;X (mm);Y (mm);Z (mm)\nA;1;2;3\nB;-4;5.5;6.25\n"))
    assert lm.labels == ["A", "B"]
    np.testing.assert_array_equal(lm.points, LPS)
    lm = read_landmarks(_write(tmp_path, "c.tsv", "landmark\tposition_x\tposition_y\tposition_z\nA\t1\t2\t3\n"))
    np.testing.assert_array_equal(lm.points, LPS[:1])
    lm = read_landmarks(_write(tmp_path, "d.csv", "R,A,S\n-1,-2,3\n4,-5.5,6.25\n"))   # RAS by column names
    assert lm.labels == ["1", "2"]
    np.testing.assert_array_equal(lm.points, LPS)


def test_csv_coordinate_system_column_per_row(tmp_path):
    text = "label,x,y,z,coordinateSystem\nA,-1,-2,3,RAS\nB,-4,5.5,6.25,LPS\n"
    np.testing.assert_array_equal(read_landmarks(_write(tmp_path, "a.csv", text)).points, LPS)


def test_csv_written_is_lps_with_comment(tmp_path):
    p = tmp_path / "out.csv"
    write_landmarks_csv(Landmarks(["A", "B, x"], LPS), p)
    text = p.read_text()
    assert text.startswith("# coordinateSystem = LPS\n")
    assert 'label,x,y,z\nA,1.0,2.0,3.0\n"B, x",-4.0,5.5,6.25\n' in text
    lm = read_landmarks(p)
    assert lm.labels == ["A", "B, x"]
    np.testing.assert_array_equal(lm.points, LPS)


# ---------------------------------------------------------------------------------------------- Slicer files
def test_markups_json_ras_by_hand_and_undefined_points(tmp_path):
    doc = {"@schema": MARKUPS_SCHEMA, "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": "A", "position": RAS[0].tolist()},
        {"label": "skip", "positionStatus": "undefined"},
        {"label": "B", "position": RAS[1].tolist(), "positionStatus": "defined"}]}]}
    lm = read_landmarks(_write(tmp_path, "a.mrk.json", json.dumps(doc)))
    assert lm.labels == ["A", "B"]
    np.testing.assert_array_equal(lm.points, LPS)


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_markups_json_round_trip(tmp_path, system):
    p = tmp_path / "out.mrk.json"
    write_markups_json(Landmarks(["A", "B"], LPS), p, coordinate_system=system)
    doc = json.loads(p.read_text())
    assert doc["@schema"] == MARKUPS_SCHEMA
    node = doc["markups"][0]
    assert node["type"] == "Fiducial" and node["coordinateSystem"] == system
    written = np.array([cp["position"] for cp in node["controlPoints"]])
    np.testing.assert_array_equal(written, LPS if system == "LPS" else RAS)
    lm = read_landmarks(p)
    assert lm.labels == ["A", "B"]
    np.testing.assert_array_equal(lm.points, LPS)


# Written by slicer-core 5.13 (vtkMRMLMarkupsFiducialStorageNode) for the RAS points (1,2,3), (-4,5.5,6).
SLICER_FCSV = """# Markups fiducial file version = slicer-core-5.13.31053.0
# CoordinateSystem = LPS
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
1,-1,-2,3,0,0,0,1,1,1,0,A,,,2,0
2,4,-5.5,6,0,0,0,1,1,1,0,"B, x",,,2,0
"""


@pytest.mark.parametrize("header,points", [
    ("# CoordinateSystem = 0\n", RAS), ("# CoordinateSystem = RAS\n", RAS),
    ("# CoordinateSystem = 1\n", LPS), ("# CoordinateSystem = LPS\n", LPS), ("", RAS)])   # no line: legacy RAS
def test_fcsv_coordinate_systems(tmp_path, header, points):
    rows = "".join(f"vtkMRMLMarkupsFiducialNode_{n},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,P{n},,\n"
                   for n, p in enumerate(points))
    columns = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    text = "# Markups fiducial file version = 4.10\n" + header + columns + rows
    lm = read_landmarks(_write(tmp_path, "a.fcsv", text))
    assert lm.labels == ["P0", "P1"]
    np.testing.assert_array_equal(lm.points, LPS)


def test_slicer_fcsv_to_json_to_csv_round_trip(tmp_path):
    lm = read_landmarks(_write(tmp_path, "s.fcsv", SLICER_FCSV))
    assert lm.labels == ["A", "B, x"]
    np.testing.assert_array_equal(lm.points, [[-1, -2, 3], [4, -5.5, 6]])
    write_markups_json(lm, tmp_path / "s.mrk.json", "RAS")
    write_landmarks_csv(read_landmarks(tmp_path / "s.mrk.json"), tmp_path / "s.csv")
    back = read_landmarks(tmp_path / "s.csv")
    assert back.labels == lm.labels
    np.testing.assert_array_equal(back.points, lm.points)
    # an .fcsv saved with a .csv extension is still read as one
    np.testing.assert_array_equal(read_landmarks(_write(tmp_path, "f.csv", SLICER_FCSV)).points, lm.points)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,text,match", [
    ("a.csv", "label,x,y,z\n", "no points"),
    ("a.csv", "", "no points"),
    ("a.csv", "label,x,y,z\nA,1,two,3\n", r"line 2.*'two' is not a number"),
    ("a.csv", "label,x,y,z\nA,1,2,3\nB,1,nan,3\n", r"line 3.*not finite"),
    ("a.csv", "A,1,2,3\n", "header"),
    ("a.csv", "label,x,y,z\nA,1,2\n", "expected 4 values"),
    ("a.csv", "# coordinateSystem = XYZ\nlabel,x,y,z\nA,1,2,3\n", "unknown coordinate system 'XYZ'"),
    ("a.fcsv", "# CoordinateSystem = 0\n1,2,3\n", "at least 4"),
    ("a.fcsv", "# CoordinateSystem = 1\n", "no points"),
    ("a.mrk.json", "{not json", "not a Slicer markups JSON"),
    ("a.mrk.json", '{"markups": []}', "not a Slicer markups JSON"),
    ("a.mrk.json", '{"markups": [{"controlPoints": []}]}', "no points"),
    ("a.mrk.json", '{"markups": [{"controlPoints": [{"label": "A", "position": [1, 2]}]}]}', "3 numbers"),
    ("a.mrk.json", '{"markups": [{"controlPoints": [{"label": "A", "position": [1, "x", 3]}]}]}', "not a number"),
    ("a.xyz", "label,x,y,z\nA,1,2,3\n", "unknown extension"),
])
def test_bad_input_raises_input_error(tmp_path, name, text, match):
    with pytest.raises(InputError, match=match):
        read_landmarks(_write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_landmarks(tmp_path / "nothing.csv")


# ---------------------------------------------------------------------------------------------- pairing
def test_match_by_label_reorders():
    a = Landmarks(["A", "B", "C"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    b = Landmarks(["C", "A", "B"], [[20, 20, 20], [0, 0, 10], [1, 1, 11]])
    pa, pb, labels = match_landmarks(a, b)
    assert labels == ["A", "B", "C"]
    np.testing.assert_array_equal(pb, [[0, 0, 10], [1, 1, 11], [20, 20, 20]])
    np.testing.assert_array_equal(pa, a.points)


def test_match_by_order_when_labels_differ(caplog):
    a = Landmarks(["F-1", "F-2"], [[0, 0, 0], [1, 1, 1]])
    b = Landmarks(["M-1", "M-2"], [[5, 0, 0], [6, 1, 1]])
    with caplog.at_level(logging.WARNING):
        pa, pb, labels = match_landmarks(a, b)
    assert "by their order" in caplog.text
    np.testing.assert_array_equal(pb, b.points)
    assert labels == ["F-1", "F-2"]


def test_match_errors():
    with pytest.raises(InputError, match=r"only in the first list: C; only in the second list: D"):
        match_landmarks(Landmarks(["A", "B", "C"], np.zeros((3, 3))), Landmarks(["A", "B", "D"], np.zeros((3, 3))))
    with pytest.raises(InputError, match="first has 3 points, the second 2"):
        match_landmarks(Landmarks(["", "", ""], np.zeros((3, 3))), Landmarks(["x", "y"], np.zeros((2, 3))))


# ---------------------------------------------------------------------------------------------- real MRML
def test_markups_json_is_read_by_mrml(tmp_path):
    try:
        import slicer
        import vtk  # noqa: F401
    except Exception as exc:  # slicer-core not installed
        pytest.skip(f"slicer-core not available: {exc}")
    for system in ("LPS", "RAS"):
        path = tmp_path / f"p_{system}.mrk.json"
        write_markups_json(Landmarks(["A", "B, x"], LPS), path, coordinate_system=system)
        scene = slicer.vtkMRMLScene()
        node = slicer.vtkMRMLMarkupsFiducialNode()
        scene.AddNode(node)
        storage = slicer.vtkMRMLMarkupsJsonStorageNode()
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetFileName(str(path))
        assert storage.ReadData(node) == 1
        assert node.GetNumberOfControlPoints() == 2
        ras = np.array([node.GetNthControlPointPosition(n) for n in range(2)])
        np.testing.assert_allclose(ras, RAS, atol=1e-12)
        assert [node.GetNthControlPointLabel(n) for n in range(2)] == ["A", "B, x"]
        # and what MRML writes back is read by us
        out = tmp_path / f"mrml_{system}.mrk.json"
        storage.SetFileName(str(out))
        assert storage.WriteData(node) == 1
        np.testing.assert_allclose(read_landmarks(out).points, LPS, atol=1e-12)
