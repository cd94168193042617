"""Our ``transform.h5`` read by real MRML (PyPI slicer-core) maps points exactly as the engine and SimpleITK do.

Slicer works in RAS, ITK files in LPS; a transform node's *FromParent* is the resampling direction
(fixed → moving), so ``FromParent(ras) = C · T(C · ras)`` with ``C = diag(-1, -1, 1)`` (docs/CONVENTIONS.md §2).
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.spatial.transforms import SpatialTransform
from conftest import random_smooth_field  # noqa: E402

slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")

C = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = (0.9362934, -0.2896295, 0.1986693, 0.3129918, 0.9447025, -0.0978434, -0.1593451, 0.1537912, 0.9751703)


def _set_linear(transform) -> None:
    """Slicer interpolates grids read from files cubically by default, ITK linearly (docs/CONVENTIONS.md §2)."""
    if hasattr(transform, "SetInterpolationModeToLinear"):
        transform.SetInterpolationModeToLinear()
    for i in range(getattr(transform, "GetNumberOfConcatenatedTransforms", lambda: 0)()):
        _set_linear(transform.GetConcatenatedTransform(i))
    transform.Modified()


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), OBLIQUE],
                         ids=["lps", "ras", "oblique"])
def test_mrml_reads_our_h5_like_simpleitk(tmp_path, direction):
    rng = np.random.default_rng(7)
    grid = Grid((20, 24, 22), (2.0, 2.5, 3.0), (10.0, -20.0, 5.0), direction)
    affine = np.eye(4)
    affine[:3, :3] += rng.normal(0, 0.05, (3, 3))
    affine[:3, 3] = rng.normal(0, 5, 3)
    ours = SpatialTransform(affine, random_smooth_field(grid.shape, rng, 4.0), grid)
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(ours.to_sitk(), str(path))

    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    from_parent = node.GetTransformFromParent()
    _set_linear(from_parent)

    # random points strictly inside the field's grid (between voxel centres, where interpolation matters)
    index = rng.uniform(1.0, np.array(grid.shape[::-1]) - 2.0, (300, 3))
    points = (grid.index_to_world @ np.c_[index, np.ones(len(index))].T).T[:, :3]
    expected = ours.map_points(points)
    tx = sitk.ReadTransform(str(path))
    by_sitk = np.array([tx.TransformPoint(tuple(p)) for p in points])
    by_slicer = np.array([C @ np.array(from_parent.TransformPoint(*(C @ p))) for p in points])
    np.testing.assert_allclose(by_sitk, expected, atol=1e-4)
    np.testing.assert_allclose(by_slicer, expected, atol=1e-4)
    assert np.abs(expected - points).max() > 3.0  # the transform is far from identity
