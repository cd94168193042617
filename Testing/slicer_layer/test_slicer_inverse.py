"""The inverse transform node (moving → fixed) against a real vtkMRMLScene (PyPI slicer-core): built from the
engine's ``inverse.h5``, it maps points as the engine's inverse does and undoes the forward node."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) not installed")

from conftest import random_smooth_field  # noqa: E402
from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.spatial.inverse import invert  # noqa: E402
from DeepRegistrationLib.spatial.transforms import SpatialTransform  # noqa: E402
from DeepRegistrationSlicerLib import nodes as N  # noqa: E402

C = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = (0.9362934, -0.2896295, 0.1986693, 0.3129918, 0.9447025, -0.0978434, -0.1593451, 0.1537912, 0.9751703)


@pytest.mark.parametrize("direction", [None, OBLIQUE])
@pytest.mark.parametrize("deformable", [True, False])
def test_inverse_node_maps_like_the_engine_inverse(tmp_path, direction, deformable):
    rng = np.random.default_rng(5)
    grid = Grid((18, 20, 16), (3.0, 2.5, 3.5), (-25.0, -20.0, -30.0), direction or np.eye(3).ravel())
    affine = np.eye(4)
    affine[:3, :3] += rng.normal(scale=0.04, size=(3, 3))
    affine[:3, 3] = (4.0, -3.0, 2.0)
    field = random_smooth_field(grid.shape, rng, max_mm=3.0) if deformable else None
    forward = SpatialTransform(affine, field, grid if deformable else None)
    inverse = invert(forward)
    sitk.WriteTransform(forward.to_sitk(), str(tmp_path / "transform.h5"))
    sitk.WriteTransform(inverse.to_sitk(), str(tmp_path / "inverse.h5"))

    scene = N.makeScene()
    fwd_node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    N.setTransformNodeFromEngine(fwd_node, *N.readItkTransform(str(tmp_path / "transform.h5")))
    inv_node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    parts = N.readItkInverseTransform(str(tmp_path / "inverse.h5"))
    assert (parts[1] is None) == (not deformable)
    N.setInverseTransformNodeFromEngine(inv_node, *parts)

    ijk = np.stack([rng.uniform(3, s - 4, 100) for s in grid.size], axis=-1)
    x = ijk @ grid.index_to_world[:3, :3].T + grid.index_to_world[:3, 3]
    y = forward.map_points(x)
    ours = inverse.map_points(y)
    slicer_inv = N.mapPointsRas(inv_node, y @ C) @ C
    np.testing.assert_allclose(slicer_inv, ours, atol=1e-3)
    back = N.mapPointsRas(fwd_node, slicer_inv @ C) @ C
    assert np.percentile(np.linalg.norm(back - y, axis=1), 95) < 0.02


def test_inverse_of_a_moved_moving_frame():
    """With an initial RAS matrix E moving the moving side, the inverse undoes E⁻¹ · forward."""
    scene = N.makeScene()
    affine = np.eye(4)
    affine[:3, 3] = (5.0, 1.0, -2.0)
    e = np.eye(4)
    e[:3, 3] = (0.0, 10.0, 3.0)
    fwd_node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    N.setTransformNodeFromEngine(fwd_node, affine, movingMatrix=e)
    inv_node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    N.setInverseTransformNodeFromEngine(inv_node, np.linalg.inv(affine), movingMatrix=e)
    p = np.array([[1.0, 2.0, 3.0], [-20.0, 5.0, 7.0]])
    np.testing.assert_allclose(N.mapPointsRas(inv_node, N.mapPointsRas(fwd_node, p)), p, atol=1e-9)


def test_bad_inverse_file_is_one_clear_error(tmp_path):
    from DeepRegistrationLib.core.errors import InputError

    grid = Grid((6, 6, 6), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    sitk.WriteTransform(SpatialTransform(np.eye(4), np.zeros((3, 6, 6, 6)), grid).to_sitk(), str(tmp_path / "t.h5"))
    with pytest.raises(InputError, match="inverse transform"):
        N.readItkInverseTransform(str(tmp_path / "t.h5"))
