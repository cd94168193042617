"""The quality verdict, the explanation maps and the users' verdicts in MRML (PyPI slicer-core's real scene):
the metrics table carries the verdict and its reasons, the maps get their colour tables and windows, a
background job with ``explain`` loads the engine's maps as volumes on the fixed grid, and Accept / Reject keep
a copy of the result in the feedback store (nothing before the click)."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")

from DeepRegistrationSlicerLib import nodes as N  # noqa: E402
from DeepRegistrationSlicerLib import run as R  # noqa: E402

FAST = dict(spacing=8.0, affineIterations=20, threads=1)


def table_rows(tableNode) -> list:
    table = tableNode.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    return names, [[table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())]
                   for r in range(table.GetNumberOfRows())]


def test_metrics_table_lists_the_verdict_and_its_reasons():
    scene = N.makeScene()
    report = {"similarity": {"loss_before": -0.2, "loss_after": -0.5, "ncc_before": 0.7, "ncc_after": 0.96},
              "deformation": {"folding_percent": 0.0},
              "quality": {"verdict": "failed", "reasons": ["local similarity (LNCC cc²) after 0.80 < 0.85",
                                                           "rotation of the linear part (deg) 121 > 60"],
                          "signals": {"local_cc2": 0.8}}}
    quality = N.qualityOf(report)
    assert quality == {"verdict": "failed", "reasons": report["quality"]["reasons"]}
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    N.updateMetricsTable(table, N.flatMetrics(report), quality)
    columns, rows = table_rows(table)
    assert columns == ["Metric", "Before", "After", "Unit", "Note"]
    assert [r[0] for r in rows[:3]] == ["Quality verdict", "Quality reason", "Quality reason"]
    assert [r[4] for r in rows[:3]] == ["failed"] + report["quality"]["reasons"]
    assert rows[3][0] == "Similarity loss" and float(rows[3][2]) == -0.5 and rows[3][4] == ""
    # an engine without quality control: no verdict rows, the metrics as before
    assert N.qualityOf({"similarity": {}}) is None and N.qualityOf({"quality": {"verdict": "maybe"}}) is None
    N.updateMetricsTable(table, N.flatMetrics(report), None)
    assert table_rows(table)[1][0][0] == "Similarity loss"
    styles = {v: N.verdictStyleSheet(v) for v in ("ok", "suspect", "failed")}
    assert len(set(styles.values())) == 3 and all(N.VERDICT_COLORS[v] in styles[v] for v in styles)
    assert N.verdictStyleSheet(None) == ""


def test_map_colour_tables_and_windows():
    scene = N.makeScene()
    residual, local, heat = (N.mapColorNode(n, scene) for n in ("residual", "local_similarity", "displacement"))
    assert N.mapColorNode("uncertainty", scene) is heat and N.mapColorNode("residual", scene) is residual
    assert all(c.IsA("vtkMRMLColorTableNode") and c.GetNumberOfColors() == 256 for c in (residual, local, heat))

    def rgb(node, i):
        c = [0.0] * 4
        node.GetColor(i, c)
        return np.array(c[:3])

    assert np.all(rgb(residual, 0) < 0.05) and rgb(residual, 255)[:2].min() > 0.95  # black -> light yellow
    assert np.allclose(rgb(local, 128), 0.97, atol=0.02)  # diverging: white in the middle
    assert rgb(local, 0)[0] > rgb(local, 0)[2] and rgb(local, 255)[2] > rgb(local, 255)[0]  # red .. blue
    assert np.all(rgb(heat, 0) == 0) and np.all(rgb(heat, 255) == 1)
    values = np.concatenate([np.zeros(500), np.linspace(0.0, 10.0, 1001)[1:]])
    assert N.mapWindow("local_similarity", values) == (0.0, 1.0)
    low, high = N.mapWindow("displacement", values)
    assert low == 0.0 and high == pytest.approx(np.percentile(values[values > 0], 99))
    assert N.mapWindow("uncertainty", np.zeros(10)) == (0.0, 1.0)
    mi = np.concatenate([np.zeros(100), np.linspace(-0.5, 2.0, 501)])
    low, high = N.mapWindow("local_mi", mi)  # nats, signed: symmetric about 0
    assert low == -high and high == pytest.approx(np.percentile(np.abs(mi[mi != 0]), 99))
    assert N.mapColorNode("local_mi", scene) is local


def test_local_mi_map_after_an_mi_registration(sample_dir):
    """With similarity 'mi' the engine's local similarity map holds local MI in nats (signed): shown with the
    diverging table centred on 0 and no threshold (negative values are the ones to see)."""
    from DeepRegistrationLib.io.images import read_image

    scene = N.makeScene()
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    for node, name in ((fixed, "fixed"), (moving, "moving")):
        N.imageToVolume(read_image(sample_dir / f"{name}.nii.gz", name), node, scene=scene)
    result = R.register(fixed, moving, "Affine", similarity="mi", explain=True, uncertainty=False, **FAST)
    assert "mutual information" in result.report["explain"]["meaning"]["local_similarity"]
    node = result.mapVolumeNodes["local_similarity"]
    assert node.GetAttribute(N.OUTPUT_ATTRIBUTE) == "local_mi" and "local MI (nats)" in node.GetName()
    display = node.GetDisplayNode()
    array = slicer.util.arrayFromVolume(node)
    assert not display.GetApplyThreshold()
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == \
        pytest.approx(N.mapWindow("local_mi", array), rel=1e-5)
    assert display.GetColorNodeID() == N.mapColorNode("local_similarity", scene).GetID()


def test_job_with_explain_loads_the_maps_and_keeps_the_result_for_a_verdict(sample_dir, tmp_path):
    """A background job with ``explain`` (the real worker and engine): the maps come back as volumes with the
    fixed volume's exact geometry, their colour tables and windows, the verdict in the result and the table.
    A user's verdict then writes the result folder (inputs, transform, report pointing at the copies) and
    records the verdict with the engine's feedback API."""
    import json

    import SimpleITK as sitk

    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.workflows.feedback import read_log
    from DeepRegistrationSlicerLib import feedback as F

    scene = N.makeScene()
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    for node, name in ((fixed, "fixed"), (moving, "moving")):
        N.imageToVolume(read_image(sample_dir / f"{name}.nii.gz", name), node, scene=scene)
    result = R.register(fixed, moving, "Affine", explain=True, uncertainty=False, **FAST)
    assert result.quality is not None and result.quality["verdict"] in N.VERDICT_COLORS
    assert result.quality == N.qualityOf(result.report)
    _, rows = table_rows(result.metricsTableNode)
    assert rows[0][0] == "Quality verdict" and rows[0][4] == result.quality["verdict"]
    assert list(result.mapVolumeNodes) == ["residual", "local_similarity", "displacement"]
    fixedMatrix = N.volumeIJKToRAS(fixed)
    for name, node in result.mapVolumeNodes.items():
        assert node.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
        np.testing.assert_allclose(N.volumeIJKToRAS(node), fixedMatrix, atol=1e-9)
        assert node.GetAttribute(N.OUTPUT_ATTRIBUTE) == name
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == N.mapColorNode(name, scene).GetID()
        array = slicer.util.arrayFromVolume(node)
        assert np.isfinite(array).all() and array.min() >= 0 and array.max() > 0
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == \
            pytest.approx(N.mapWindow(name, array), rel=1e-5)
        assert display.GetApplyThreshold() and display.GetLowerThreshold() == N.MAP_TRANSPARENT_BELOW and \
            display.GetUpperThreshold() > array.max()
    assert slicer.util.arrayFromVolume(result.mapVolumeNodes["local_similarity"]).max() <= 1.0 + 1e-6
    # an affine result moves every point: the displacement map is positive inside the field of view
    assert np.median(slicer.util.arrayFromVolume(result.mapVolumeNodes["displacement"])) > 0

    # nothing was written for feedback before a verdict; the job folder is gone
    store, log = tmp_path / "store", tmp_path / "feedback.jsonl"
    assert not store.exists() and not log.exists()
    pending = result.pendingFeedback
    assert pending is not None and pending.folder is None
    entry = F.recordVerdict(pending, "accepted", "fine", store=store, log=log)
    folder = store / "result_0001"
    assert entry["folder"] == str(folder) and entry["verdict"] == "accepted" and entry["log"] == str(log)
    assert sorted(p.name for p in folder.iterdir()) == ["fixed.nii.gz", "moving.nii.gz", "report.json",
                                                        "transform.h5"]  # affine: no inverse.h5
    report = json.loads((folder / "report.json").read_text())
    assert report["inputs"] == {"fixed": str(folder / "fixed.nii.gz"), "moving": str(folder / "moving.nii.gz")}
    assert report["feedback"]["verdict"] == "accepted" and report["feedback"]["note"] == "fine"
    assert report["quality"] == result.report["quality"]
    # the copies are what was registered: the fixed volume's voxels and geometry, the engine's transform
    copy = read_image(folder / "fixed.nii.gz", "copy")
    np.testing.assert_array_equal(copy.array, slicer.util.arrayFromVolume(fixed))
    np.testing.assert_allclose(N.C4 @ copy.grid.index_to_world, fixedMatrix, atol=1e-6)
    affine, fieldArray, _ = N.readItkTransform(str(folder / "transform.h5"))
    assert fieldArray is None
    np.testing.assert_allclose(affine[:3, :3], np.array(result.report["deformation"]["affine_lps"])[:3, :3],
                               atol=1e-5)
    assert sitk.ReadImage(str(folder / "moving.nii.gz")).GetSize() == \
        tuple(moving.GetImageData().GetDimensions())
    # the DatasetBuilder's --feedback takes the accepted copy as a training pair (the loop's next step)
    from DatasetBuilderLib import build as B

    built = B.build_dataset([], tmp_path / "ds", B.BuildOptions(key_file=str(tmp_path / "key.hex"),
                                                               split_ratios=(1, 0, 0), feedback_log=str(log)))
    assert built.feedback_pairs == 1 and not built.feedback_unusable
    # the user changes their mind: the same folder, the latest verdict counts, the log keeps both lines
    F.recordVerdict(pending, "rejected", None, store=store, log=log)
    assert [p.name for p in store.iterdir()] == [folder.name]
    assert json.loads((folder / "report.json").read_text())["feedback"]["verdict"] == "rejected"
    assert len(log.read_text().splitlines()) == 2
    latest = read_log(log)
    assert [e["verdict"] for e in latest.values()] == ["rejected"]
    with pytest.raises(Exception, match="unknown verdict"):
        F.recordVerdict(pending, "maybe", store=store, log=log)
