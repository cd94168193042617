"""The MRML glue (DeepRegistration/DeepRegistrationSlicerLib) against a real vtkMRMLScene (PyPI slicer-core).

Registrations run through the real background path (``python -m DeepRegistrationLib.apps.worker`` subprocess) with
small settings (4 mm, one thread) so the whole file takes well under a minute on two cores.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")
vtk = pytest.importorskip("vtk")

from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.spatial.transforms import SpatialTransform  # noqa: E402
from DeepRegistrationSlicerLib import nodes as N  # noqa: E402
from DeepRegistrationSlicerLib import run as R  # noqa: E402
from conftest import random_smooth_field  # noqa: E402

C = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = (0.9362934, -0.2896295, 0.1986693, 0.3129918, 0.9447025, -0.0978434, -0.1593451, 0.1537912, 0.9751703)
FAST = dict(spacing=4.0, iterations=20, affineIterations=30, threads=1)  # a few seconds per registration


# ------------------------------------------------------------------------------------------------ scene set-up
def make_scene():
    """A scene with the logics the glue needs (docs/CONVENTIONS.md §3); also sets ``slicer.mrmlScene``."""
    return N.makeScene()


def read_node(scene, path, node_class="vtkMRMLScalarVolumeNode", storage_class="vtkMRMLVolumeArchetypeStorageNode"):
    node = scene.AddNewNodeByClass(node_class)
    storage = scene.AddNewNodeByClass(storage_class)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"cannot read {path}"
    return node


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def map_lps(transform_node, points_lps: np.ndarray) -> np.ndarray:
    """The node's FromParent applied to LPS points, through the RAS flip."""
    return N.mapPointsRas(transform_node, np.asarray(points_lps) @ C) @ C


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    labels = [v for v in np.unique(a) if v != 0]
    scores = []
    for v in labels:
        x, y = a == v, b == v
        s = x.sum() + y.sum()
        scores.append(2.0 * np.logical_and(x, y).sum() / s if s else np.nan)
    return float(np.nanmean(scores))


# ------------------------------------------------------------------------------------------------ imports
def test_glue_imports_only_what_slicer_core_provides():
    """The glue must run in pytest (slicer-core) and never load torch into Slicer's process."""
    import ast
    import sys
    from pathlib import Path

    folder = Path(N.__file__).parent
    allowed = {"slicer", "vtk", "numpy", "SimpleITK", "DeepRegistrationLib"} | set(sys.stdlib_module_names)
    engine_allowed = {"DeepRegistrationLib", "DeepRegistrationLib.core", "DeepRegistrationLib.io", "DeepRegistrationLib.core.errors", "DeepRegistrationLib.core.grid",
                      "DeepRegistrationLib.core.image", "DeepRegistrationLib.io.images", "DeepRegistrationLib.io.itk_transform",
                      "DeepRegistrationLib.core.config", "DeepRegistrationLib.core.frames",
                      "DeepRegistrationLib.learning.registry", "DeepRegistrationLib.learning.model_files",
                      "DeepRegistrationLib.workflows.feedback",
                      "DeepRegistrationLib.registration.predictors"}  # torch-free engine modules
    # (registry and model_files read model cards without torch, feedback writes JSON, predictors checks a mode;
    # test_glue_import_does_not_load_torch checks them in a fresh process)
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("DeepRegistrationLib"):
                    assert name in engine_allowed, f"{path.name} imports {name} (torch) into Slicer's process"
                assert not name.startswith(("slicer.ScriptedLoadableModule", "qt", "ctk")), name


def test_glue_import_does_not_load_torch():
    """Checked in a fresh interpreter: the allowed engine modules really are torch-free."""
    import subprocess
    import sys
    from pathlib import Path

    module_dir = Path(N.__file__).parents[1]
    code = ("import sys; sys.path.insert(0, %r); import DeepRegistrationSlicerLib.nodes, DeepRegistrationSlicerLib.run; "
            "import DeepRegistrationSlicerLib.feedback, DeepRegistrationLib.learning.model_files, "
            "DeepRegistrationLib.workflows.feedback, DeepRegistrationLib.registration.predictors; "
            "DeepRegistrationSlicerLib.run.availableModels(); "  # the module lists models when it opens
            "bad = [m for m in ('torch', 'monai') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
            % str(module_dir))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ volumes
@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), OBLIQUE],
                         ids=["lps", "ras", "oblique"])
def test_volume_round_trip_is_exact(tmp_path, direction):
    scene = make_scene()
    rng = np.random.default_rng(3)
    grid = Grid((7, 9, 11), (0.7, 1.3, 2.1), (12.5, -30.25, 4.0), direction)
    array = rng.normal(size=grid.shape).astype(np.float32)
    from DeepRegistrationLib.core.image import Image

    node = N.imageToVolume(Image(array, grid, "x"), name="oblique", scene=scene)
    # Slicer stores RAS: IJKToRAS = C4 · index_to_world(LPS)
    np.testing.assert_allclose(N.volumeIJKToRAS(node), np.diag([-1, -1, 1, 1.0]) @ grid.index_to_world, atol=1e-12)
    back = N.volumeToImage(node, "back")
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.grid.index_to_world, grid.index_to_world, atol=1e-12)
    assert back.grid.shape == grid.shape

    # the node written by Slicer and read by SimpleITK has the same LPS geometry
    path = tmp_path / "v.nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(Grid.from_sitk(img).index_to_world, grid.index_to_world, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), array)


def test_labelmap_on_another_grid_and_segmentation_export():
    scene = make_scene()
    from DeepRegistrationLib.core.image import Image

    ref_grid = Grid((10, 12, 14), (2.0, 2.0, 2.0), (-10.0, -12.0, -8.0), OBLIQUE)
    ref = N.imageToVolume(Image(np.zeros(ref_grid.shape, np.float32), ref_grid), name="ref", scene=scene)
    labels = np.zeros(ref_grid.shape, np.int32)
    labels[2:6, 3:8, 4:10] = 1
    labels[6:9, 3:8, 4:10] = 3
    # same grid: values kept
    lab = N.imageToVolume(Image(labels.astype(np.int16), ref_grid), scene=scene)
    np.testing.assert_array_equal(N.labelArrayOnVolume(lab, ref), labels)
    # a segmentation made from the labelmap, exported back on the reference grid: label n+1 per segment
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelmap, labels.astype(np.int16))
    labelmap.SetIJKToRASMatrix(N.vtkMatrixFromArray(N.volumeIJKToRAS(ref)))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    before = node_ids(scene)
    exported = N.labelArrayOnVolume(seg, ref)
    assert node_ids(scene) == before, "temporary nodes left in the scene"
    np.testing.assert_array_equal(exported > 0, labels > 0)
    assert set(np.unique(exported)) == {0, 1, 2}


def test_markups_round_trip_lps():
    scene = make_scene()
    pts = np.array([[1.5, -2.0, 3.25], [-40.0, 12.0, 7.0]])
    node = N.lpsPointsToMarkups(pts, ["a", "b"], scene=scene)
    np.testing.assert_allclose(np.array([node.GetNthControlPointPosition(i) for i in range(2)]), pts @ C)
    back, labels = N.markupsToLpsPoints(node)
    np.testing.assert_allclose(back, pts)
    assert labels == ["a", "b"]


# ------------------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("direction", [(-1, 0, 0, 0, -1, 0, 0, 0, 1), OBLIQUE], ids=["ras", "oblique"])
def test_grid_transform_node_maps_like_engine_and_simpleitk(tmp_path, direction):
    scene = make_scene()
    rng = np.random.default_rng(11)
    grid = Grid((18, 20, 22), (2.0, 2.5, 3.0), (10.0, -20.0, 5.0), direction)
    affine = np.eye(4)
    affine[:3, :3] += rng.normal(0, 0.05, (3, 3))
    affine[:3, 3] = rng.normal(0, 5, 3)
    ours = SpatialTransform(affine, random_smooth_field(grid.shape, rng, 4.0), grid)
    h5 = tmp_path / "engine.h5"
    sitk.WriteTransform(ours.to_sitk(), str(h5))

    # the glue builds the node from the .h5 it reads without torch
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    N.setTransformNodeFromEngine(node, *N.readItkTransform(str(h5)))
    index = rng.uniform(1.0, np.array(grid.size) - 2.0, (300, 3))
    points = (grid.index_to_world @ np.c_[index, np.ones(len(index))].T).T[:, :3]
    expected = ours.map_points(points)
    tx = sitk.ReadTransform(str(h5))
    by_sitk = np.array([tx.TransformPoint(tuple(p)) for p in points])
    by_node = map_lps(node, points)
    assert np.abs(by_sitk - expected).max() <= 1e-4
    assert np.abs(by_node - expected).max() <= 0.01, np.abs(by_node - expected).max()
    assert np.abs(expected - points).max() > 3.0

    # saved with a storage node (.h5 and .tfm) and read back into a new node: same mapping
    for suffix in (".h5", ".tfm"):
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(tmp_path / f"saved{suffix}"))
        assert storage.WriteData(node)
        again = read_node(scene, tmp_path / f"saved{suffix}", "vtkMRMLTransformNode", "vtkMRMLTransformStorageNode")
        N.setLinearGridInterpolation(again.GetTransformFromParent())
        assert np.abs(map_lps(again, points) - expected).max() <= 0.01
        # and SimpleITK reads Slicer's file as the engine's transform
        saved = sitk.ReadTransform(str(tmp_path / f"saved{suffix}"))
        assert np.abs(np.array([saved.TransformPoint(tuple(p)) for p in points]) - expected).max() <= 0.01


def test_linear_result_and_initial_transform_composition():
    scene = make_scene()
    affine = np.eye(4)
    affine[:3, 3] = [5.0, -3.0, 2.0]
    initial = np.eye(4)
    initial[:3, 3] = [1.0, 2.0, 3.0]  # RAS ToParent of the initial transform (moves the moving inputs)
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    N.setTransformNodeFromEngine(node, affine, movingMatrix=initial)
    assert node.IsLinear()
    p = np.array([[10.0, 20.0, 30.0]])
    # engine maps fixed LPS p to (moved) moving LPS p + t; the node then undoes the initial transform (RAS)
    expected_ras = (p + affine[:3, 3]) @ C - initial[:3, 3]
    np.testing.assert_allclose(N.mapPointsRas(node, p @ C), expected_ras, atol=1e-9)


# ------------------------------------------------------------------------------------------------ registration
@pytest.fixture(scope="module")
def registered(sample_dir):
    """The bundled pair registered through the glue (subprocess worker), with labels and landmarks."""
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    fixed_labels = read_node(scene, sample_dir / "fixed_labels.nii.gz", "vtkMRMLLabelMapVolumeNode")
    moving_labels = read_node(scene, sample_dir / "moving_labels.nii.gz", "vtkMRMLLabelMapVolumeNode")
    fixed_lm = read_node(scene, sample_dir / "fixed_landmarks.mrk.json", "vtkMRMLMarkupsFiducialNode",
                         "vtkMRMLMarkupsJsonStorageNode")
    moving_lm = read_node(scene, sample_dir / "moving_landmarks.mrk.json", "vtkMRMLMarkupsFiducialNode",
                          "vtkMRMLMarkupsJsonStorageNode")
    progress = []
    t0 = time.perf_counter()
    result = R.register(fixed, moving, "Deformable — fast", fixedSegmentation=fixed_labels,
                        movingSegmentation=moving_labels, fixedLandmarks=fixed_lm, movingLandmarks=moving_lm,
                        outputVolume=True, jacobianVolume=True,
                        progressCallback=lambda f, m: progress.append((f, m)), **FAST)
    seconds = time.perf_counter() - t0
    return dict(scene=scene, fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                fixed_lm=fixed_lm, moving_lm=moving_lm, result=result, progress=progress, seconds=seconds)


def test_registration_outputs_in_scene(registered):
    r, result = registered, registered["result"]
    # the bundled pair passes the automatic quality control, shown first in the metrics table
    assert result.quality == {"verdict": "ok", "reasons": []}, result.quality
    assert result.metricsTableNode.GetTable().GetValue(0, 0).ToString() == "Quality verdict"
    t = result.transformNode
    assert r["moving"].GetParentTransformNode() == t, "the moving volume should be placed under the result"
    assert t.GetNodeReference("spatialRegistrationFixed") == r["fixed"]
    assert t.GetNodeReference("spatialRegistrationMoving") == r["moving"]
    assert not t.IsLinear()
    m = result.metrics
    assert m["dice_after"] > m["dice_before"] + 0.5 and m["dice_after"] > 0.8, m
    assert m["tre_after"] < 0.5 * m["tre_before"], m
    assert m["ncc_after"] > m["ncc_before"] and m["folding_percent_after"] < 0.1
    assert r["progress"] and 0 <= r["progress"][-1][0] <= 1 and len(r["progress"]) >= 3
    table = result.metricsTableNode.GetTable()
    rows = {table.GetValue(i, 0).ToString(): (table.GetValue(i, 1).ToDouble(), table.GetValue(i, 2).ToDouble())
            for i in range(table.GetNumberOfRows())}
    assert rows["Dice (mean)"][1] == pytest.approx(m["dice_after"])
    assert rows["TRE (mean)"][1] == pytest.approx(m["tre_after"])
    assert {"Similarity loss", "NCC", "Folding (det J <= 0)", "HD95 (mean)"} <= set(rows)
    jac = result.jacobianVolumeNode
    assert jac.GetDisplayNode().GetColorNode().GetName() == N.JACOBIAN_COLOR_NAME
    assert slicer.util.arrayFromVolume(jac).shape == slicer.util.arrayFromVolume(r["fixed"]).shape
    warped = result.outputVolumeNode
    np.testing.assert_allclose(N.volumeIJKToRAS(warped), N.volumeIJKToRAS(r["fixed"]), atol=1e-6)
    print(f"\nglue registration: {r['seconds']:.1f} s, metrics {m}")


def test_transform_node_maps_landmarks_as_engine_reports(registered):
    """TRE measured with the transform node (fixed landmarks through FromParent) equals the engine's TRE."""
    result = registered["result"]
    fixed_pts, labels = N.markupsToLpsPoints(registered["fixed_lm"])
    moving_pts, mlabels = N.markupsToLpsPoints(registered["moving_lm"])
    order = [mlabels.index(label) for label in labels]
    mapped = map_lps(result.transformNode, fixed_pts)
    tre = np.linalg.norm(mapped - moving_pts[order], axis=1).mean()
    assert tre == pytest.approx(result.metrics["tre_after"], abs=0.01)


def _trilinear(arr: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr[k, j, i]`` at continuous indices ``(3, N)`` (i, j, k); 0 outside."""
    base = np.floor(ijk).astype(int)
    frac = ijk - base
    out = np.zeros(ijk.shape[1])
    for corner in np.ndindex(2, 2, 2):
        idx = base + np.array(corner)[:, None]
        w = np.prod(np.where(np.array(corner)[:, None] == 1, frac, 1 - frac), axis=0)
        ok = np.all((idx >= 0) & (idx < np.array(arr.shape[::-1])[:, None]), axis=0)
        out[ok] += w[ok] * arr[idx[2, ok], idx[1, ok], idx[0, ok]]
    return out


def _pull_through_node(moving_node, transform_node, target_ijk_to_ras, shape, nearest: bool) -> np.ndarray:
    """Moving voxels pulled onto a target lattice through the transform node's FromParent (MRML's mapping)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    mapped = N.mapPointsRas(transform_node, (target_ijk_to_ras @ ijk)[:3].T)
    mijk = (np.linalg.inv(N.volumeIJKToRAS(moving_node)) @ np.c_[mapped, np.ones(len(mapped))].T)[:3]
    arr = slicer.util.arrayFromVolume(moving_node)
    if nearest:
        out = np.zeros(i.size, arr.dtype)
        idx = np.rint(mijk).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(arr.shape[::-1])[:, None]), axis=0)
        out[ok] = arr[idx[2, ok], idx[1, ok], idx[0, ok]]
    else:
        out = _trilinear(arr.astype(np.float64), mijk)
    return out.reshape(shape)


def test_hardening_reproduces_engine_dice_and_warped_volume(registered):
    """Hardening the result on the moving labels in MRML gives the engine's Dice; the warped volume matches too.

    Tolerance: MRML hardens a non-linear transform by resampling the labelmap (nearest neighbour) onto a new
    lattice with the moving volume's spacing and orientation around the transformed bounds. Hardened voxels
    equal the transform's mapping exactly; comparing with the fixed labels then needs a second nearest-neighbour
    step onto the fixed grid, which at 3 mm voxels costs up to ~0.06 mean Dice (116 small AAL regions) — the
    same loss the sample-data script measured for two nearest-neighbour steps of the ground truth (0.86).
    """
    r, result = registered, registered["result"]
    t = result.transformNode
    engine_dice = result.metrics["dice_after"]
    fixed_labels = slicer.util.arrayFromVolume(r["fixed_labels"])
    fixed_shape = fixed_labels.shape
    # 1. the transform node's own mapping onto the fixed grid: the engine's Dice
    node_labels = _pull_through_node(r["moving_labels"], t, N.volumeIJKToRAS(r["fixed"]), fixed_shape, nearest=True)
    node_dice = dice_mean(fixed_labels, node_labels)
    assert node_dice == pytest.approx(engine_dice, abs=0.002)
    # 2. MRML hardening (vtkMRMLVolumeNode::ApplyTransform) of a copy of the moving labels
    hardened = r["scene"].AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "hardened labels")
    image = vtk.vtkImageData()
    image.DeepCopy(r["moving_labels"].GetImageData())
    hardened.SetAndObserveImageData(image)
    hardened.SetIJKToRASMatrix(N.vtkMatrixFromArray(N.volumeIJKToRAS(r["moving_labels"])))
    hardened.SetAndObserveTransformNodeID(t.GetID())
    hardened.HardenTransform()
    assert hardened.GetParentTransformNode() is None
    hard = slicer.util.arrayFromVolume(hardened)
    expected = _pull_through_node(r["moving_labels"], t, N.volumeIJKToRAS(hardened), hard.shape, nearest=True)
    agreement = float((hard == expected)[(hard > 0) | (expected > 0)].mean())
    assert agreement >= 0.999, agreement
    hard_dice = dice_mean(fixed_labels, N.labelArrayOnVolume(hardened, r["fixed"]))
    print(f"\nDice: engine {engine_dice:.4f}, transform node {node_dice:.4f}, MRML-hardened labels {hard_dice:.4f} "
          f"(hardened voxels = transform mapping: {100 * agreement:.2f} %)")
    assert hard_dice == pytest.approx(engine_dice, abs=0.06)
    assert hard_dice > result.metrics["dice_before"] + 0.5
    r["scene"].RemoveNode(hardened)
    # 3. the moving volume through the node vs the engine's warped volume (inside the brain)
    warped = slicer.util.arrayFromVolume(result.outputVolumeNode)
    through = _pull_through_node(r["moving"], t, N.volumeIJKToRAS(r["fixed"]), fixed_shape, nearest=False)
    brain = fixed_labels > 0
    assert np.corrcoef(warped[brain], through[brain])[0, 1] > 0.999
    assert np.abs(warped[brain] - through[brain]).mean() < 0.01 * np.percentile(warped[brain], 99)


def test_scene_saved_as_mrml_and_mrb_reloads_with_moving_under_transform(registered, tmp_path):
    r = registered
    scene, result = r["scene"], r["result"]
    rng = np.random.default_rng(0)
    pts = N.markupsToLpsPoints(r["fixed_lm"])[0] + rng.normal(0, 2, (48, 3))
    expected = map_lps(result.transformNode, pts)
    # write every storable node next to the scene, then the .mrml
    folder = tmp_path / "scene"
    folder.mkdir()
    scene.SetRootDirectory(str(folder))
    important = {r["moving"].GetID(), r["fixed"].GetID(), result.transformNode.GetID()}
    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        if not node.IsA("vtkMRMLStorableNode") or node.IsA("vtkMRMLColorTableNode"):
            continue
        if node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        if storage is None:
            continue
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node) or node.GetID() not in important, node.GetName()
    mrml = folder / "scene.mrml"
    scene.SetURL(str(mrml))
    assert scene.Commit(str(mrml))
    assert scene.WriteToMRB(str(tmp_path / "scene.mrb"))

    for source in ("mrml", "mrb"):
        other = make_scene()
        if source == "mrml":
            other.SetURL(str(mrml))
            assert other.Import()
        else:
            cache = slicer.vtkCacheManager()
            other.SetCacheManager(cache)
            io = slicer.vtkDataIOManager()
            io.SetCacheManager(cache)
            other.SetDataIOManager(io)
            assert other.ReadFromMRB(str(tmp_path / "scene.mrb"))
        moving = other.GetNodeByID(r["moving"].GetID())
        transform = moving.GetParentTransformNode()
        assert transform is not None and transform.GetID() == result.transformNode.GetID(), source
        assert transform.GetNodeReference("spatialRegistrationFixed").GetName() == r["fixed"].GetName()
        cubic = float(np.abs(map_lps(transform, pts) - expected).max())
        assert N.restoreLinearInterpolation(other) == 1
        linear = float(np.abs(map_lps(transform, pts) - expected).max())
        print(f"\n{source}: reloaded transform vs original: {cubic:.4f} mm as loaded, {linear:.6f} mm after "
              "switching the grid to linear interpolation")
        assert linear <= 0.01
        assert slicer.util.arrayFromVolume(moving).shape == slicer.util.arrayFromVolume(r["moving"]).shape


# ------------------------------------------------------------------------------------------------ cancel / errors
def test_cancel_kills_worker_and_leaves_scene_unchanged(sample_dir):
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    before = node_ids(scene)
    mtimes = {n: scene.GetNodeByID(n).GetMTime() for n in before}
    job = R.RegistrationJob(fixed, moving, "Deformable — accurate", spacing=3.0, iterations=500, threads=1,
                            outputVolume=True, jacobianVolume=True).start()
    deadline = time.monotonic() + 60
    while job.poll().progress <= 0.0 and time.monotonic() < deadline:  # wait until the engine really works
        time.sleep(0.05)
    assert job.poll().state == "running"
    t0 = time.perf_counter()
    job.cancel()
    stopped = time.perf_counter() - t0
    assert job.stopped(timeout=30), "worker still alive"
    assert job.poll().state == "cancelled"
    assert not job.workDir.exists(), "temporary folder left behind"
    assert node_ids(scene) == before
    assert moving.GetParentTransformNode() is None
    assert {n: scene.GetNodeByID(n).GetMTime() for n in before} == mtimes
    with pytest.raises(Exception, match="cancelled"):
        job.loadResults()
    print(f"\ncancel: worker killed in {stopped * 1000:.0f} ms")


def test_worker_error_comes_back_as_one_clear_message(sample_dir):
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    from DeepRegistrationLib.core.image import Image

    constant = N.imageToVolume(Image(np.full((20, 20, 20), 7.0, np.float32), Grid((20, 20, 20), (3, 3, 3), (0, 0, 0))),
                               name="constant", scene=scene)
    before = node_ids(scene)
    job = R.RegistrationJob(fixed, constant, "Affine", threads=1).start()
    status = job.wait(timeout=60)
    assert status.state == "failed"
    assert "constant" in status.message and "moving" in status.message, status.message
    assert "Traceback" not in status.message and "\n" not in status.message
    assert job.process.returncode == 2
    assert node_ids(scene) == before
    with pytest.raises(Exception, match="constant"):
        R.register(fixed, constant, "Affine", threads=1)
    assert node_ids(scene) == before


def test_bad_options_fail_before_anything_runs(sample_dir):
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    from DeepRegistrationLib.core.errors import InputError

    with pytest.raises(InputError, match="unknown preset"):
        R.RegistrationJob(fixed, fixed.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeNode"), "Fancy")
    with pytest.raises(InputError, match="same node"):
        R.RegistrationJob(fixed, fixed)
    # an unknown engine option is refused by the worker with the list of known ones
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    status = R.RegistrationJob(fixed, moving, "Affine", bogus=3).start().wait(timeout=60)
    assert status.state == "failed" and "bogus" in status.message


def test_engine_config_presets_and_overrides():
    cfg = R.engineConfig("Deformable - fast", regularizationWeight=2.0, device="GPU", diffeomorphic=True)
    assert cfg["mode"] == "deformable" and cfg["reg_weight"] == 2.0 and cfg["device"] == "cuda"
    assert cfg["diffeomorphic"] is True
    assert R.engineConfig("Rigid", spacing=None) == {"mode": "rigid"}
    assert set(R.PRESETS) == {"Rigid", "Affine", "Deformable — fast", "Deformable — accurate"}


def test_every_job_kind_is_a_background_job_and_a_failed_start_leaves_nothing(sample_dir, tmp_path, monkeypatch):
    """Registration, sequence and template jobs share BackgroundJob (folder, worker, poll, cancel, state); a job
    whose inputs cannot be written leaves no folder and can be inspected as new."""
    from DeepRegistrationLib.core.errors import InputError
    from DeepRegistrationSlicerLib import sequences as S

    for kind in (R.RegistrationJob, S.SequenceJob, S.TemplateJob):
        assert issubclass(kind, R.BackgroundJob) and kind.what != R.BackgroundJob.what
    assert not issubclass(S.SequenceJob, R.RegistrationJob) and not issubclass(S.TemplateJob, R.RegistrationJob)
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    job = S.TemplateJob([fixed, moving], threads=1)
    assert (job.state, job.process, job.workDir, job.report) == ("new", None, None, None)
    with pytest.raises(RuntimeError, match="template build has not finished"):
        job.loadResults()

    class Unwritable(R.BackgroundJob):
        def writeInputs(self, folder):
            raise InputError("cannot write")

    monkeypatch.setattr(R, "_temporaryFolder", lambda: str(tmp_path))
    broken = Unwritable(scene, {"mode": "affine"}, "Affine")
    with pytest.raises(InputError, match="cannot write"):
        broken.start()
    assert broken.state == "new" and list(tmp_path.iterdir()) == []
    broken.cancel()
    assert broken.poll().state == "cancelled" and broken.stopped()


def test_symmetric_and_guide_weight_options_reach_the_worker_config(sample_dir, tmp_path):
    """The module's ``symmetric`` and ``guideWeight`` options end up in the job's config as the engine's
    RegistrationConfig fields, the way the worker reads them (apps.worker.make_config)."""
    from DeepRegistrationLib.apps.worker import make_config

    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    job = R.RegistrationJob(fixed, moving, "Deformable — fast", symmetric=True, guideWeight=0.05, threads=1)
    written = job.writeInputs(tmp_path)
    assert written["config"]["symmetric"] is True and written["config"]["guide_weight"] == 0.05
    config = make_config(dict(written["config"]))
    assert config.symmetric is True and config.guide_weight == 0.05 and config.mode == "deformable"
    default = make_config(dict(R.RegistrationJob(fixed, moving, "Deformable — fast").config))
    assert default.symmetric is False and default.guide_weight != 0.05


def test_learned_models_are_listed_and_used_by_the_background_job(sample_dir, tmp_path, monkeypatch):
    """A model in the user's folder appears among the module's models; a job with it loads it in the worker,
    works at the model's spacing and records it on the transform; a non-deformable preset refuses it."""
    from DeepRegistrationLib.learning import registry
    from DeepRegistrationLib.core.errors import InputError
    from DeepRegistrationLib.learning.model_files import save_model
    from DeepRegistrationLib.learning.networks import UNetFieldPredictor

    monkeypatch.setenv(registry.ENV_MODELS_DIR, str(tmp_path / "models"))
    save_model(UNetFieldPredictor((4, 8), 4.0, "separable", "svf"), tmp_path / "models" / "tiny",
               {"name": "tiny", "preprocessing": {"working_spacing_mm": 4.0}})
    (tmp_path / "models" / "broken.json").write_text("{not json")
    assert "tiny" in R.availableModels() and "broken" not in R.availableModels()
    described = dict(R.availableModels(withDescriptions=True))
    assert "working spacing 4.0 mm" in described["tiny"] and "user" in described["tiny"]
    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    with pytest.raises(InputError, match="predicts a deformation"):
        R.RegistrationJob(fixed, moving, "Rigid", model="tiny")
    with pytest.raises(InputError, match="unknown model 'nothing'.*tiny"):
        R.RegistrationJob(fixed, moving, model="nothing")
    job = R.RegistrationJob(fixed, moving, "Deformable — fast", model="tiny", threads=1, iterations=3)
    assert job.config["spacing"] == 4.0
    result = R.register(fixed, moving, "Deformable — fast", model="tiny", modelMode="init", threads=1, iterations=3)
    node = result.transformNode
    assert node.GetAttribute("DeepRegistration.model") == "tiny (init)"
    assert result.report["parameters"]["spacing"] == 4.0
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"]


def test_the_worker_writes_warped_nii_gz_only_for_an_output_volume(sample_dir, tmp_path):
    """The job asks for ``warped.nii.gz`` only when the module has an output volume to fill with it (the scene
    shows the moving volume through the transform without it); the worker writes it or not, and an older job
    without the key gets it, as before."""
    import io

    from DeepRegistrationLib.apps.worker import run_job

    scene = make_scene()
    fixed = read_node(scene, sample_dir / "fixed.nii.gz")
    moving = read_node(scene, sample_dir / "moving.nii.gz")
    jobs = {}
    for name, output in (("none", None), ("full", True)):
        (tmp_path / name).mkdir()
        jobs[name] = R.RegistrationJob(fixed, moving, "Rigid", outputVolume=output, threads=1,
                                       iterations=2).writeInputs(tmp_path / name)
        assert jobs[name]["warped"] == name
    run_job(jobs["none"], io.StringIO())
    assert not (tmp_path / "none" / "result" / "warped.nii.gz").exists()
    assert (tmp_path / "none" / "result" / "transform.h5").is_file()
    older = {k: v for k, v in jobs["full"].items() if k != "warped"}
    run_job(older, io.StringIO())
    assert (tmp_path / "full" / "result" / "warped.nii.gz").is_file()
