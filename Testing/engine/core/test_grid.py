"""Grid geometry: index ↔ LPS world, derived grids, SimpleITK parity, oblique and flipped axes."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.io.images import image_to_sitk, sitk_to_image
from DeepRegistrationLib.core.image import Image


def rotation(ax, ay, az):
    t = sitk.Euler3DTransform()
    t.SetRotation(ax, ay, az)
    return np.array(t.GetMatrix()).reshape(3, 3)


GRIDS = {
    "identity": Grid((5, 6, 7), (1.0, 1.5, 2.0), (10.0, -20.0, 30.0)),
    "lps_flip": Grid((5, 6, 7), (1.0, 1.0, 3.0), (90.0, 125.0, -71.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "permuted": Grid((5, 6, 7), (0.8, 1.0, 1.2), (0.0, 5.0, -5.0), (0, 0, 1, 1, 0, 0, 0, 1, 0)),
    "oblique": Grid((5, 6, 7), (1.1, 0.9, 2.5), (3.0, 4.0, 5.0), tuple(rotation(0.3, -0.2, 0.5).ravel())),
}


@pytest.mark.parametrize("name", GRIDS)
def test_world_points_match_simpleitk(name):
    g = GRIDS[name]
    img = sitk.Image(g.size, sitk.sitkFloat32)
    g.apply_to_sitk(img)
    pts = g.world_points()
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        expected = img.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(pts[ijk[2], ijk[1], ijk[0]], expected, atol=1e-9)
    back = np.c_[pts.reshape(-1, 3), np.ones(pts[..., 0].size)] @ g.world_to_index.T
    np.testing.assert_allclose(back[0, :3], [0, 0, 0], atol=1e-9)
    assert Grid.from_sitk(img).same_as(g)


@pytest.mark.parametrize("name", GRIDS)
def test_with_spacing_keeps_field_of_view(name):
    g = GRIDS[name]
    h = g.with_spacing(0.5)
    np.testing.assert_allclose(h.center(), g.center(), atol=1e-9)
    np.testing.assert_allclose(sorted(np.ptp(h.corners(), 0)), sorted(np.ptp(g.corners(), 0)), atol=0.5 + 1e-9)
    assert h.direction == g.direction


@pytest.mark.parametrize("name", GRIDS)
def test_downsampled_grid_matches_avg_pool(name):
    """Pooling a world-coordinate ramp gives the world coordinate of the pooled grid's voxels."""
    g = Grid((8, 8, 8), (1.0, 2.0, 1.5), GRIDS[name].origin, GRIDS[name].direction)
    pts = torch.as_tensor(g.world_points(), dtype=torch.float64)  # (Z,Y,X,3)
    pooled = F.avg_pool3d(pts.permute(3, 0, 1, 2)[None], 2, stride=2)[0].permute(1, 2, 3, 0)
    np.testing.assert_allclose(pooled.numpy(), g.downsampled(2).world_points(), atol=1e-9)


def test_sitk_round_trip_keeps_array_order():
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    image = Image(arr, GRIDS["oblique"], "x")
    back = sitk_to_image(image_to_sitk(image))
    np.testing.assert_array_equal(back.array, arr)
    assert back.grid.same_as(image.grid)


def test_spacing_zyx_follows_the_array_axes_of_simpleitk():
    """``spacing`` is along (i, j, k) = SimpleITK's (x, y, z); ``spacing_zyx`` along the numpy axes (Z, Y, X)."""
    image = sitk.Image(7, 6, 5, sitk.sitkFloat32)  # size (x, y, z): array shape (5, 6, 7)
    image.SetSpacing((0.5, 1.25, 3.0))
    g = Grid.from_sitk(image)
    assert g.shape == sitk.GetArrayViewFromImage(image).shape == (5, 6, 7)
    assert g.spacing_zyx == (3.0, 1.25, 0.5)


def test_overlap_fraction():
    a = Grid((10, 10, 10), (1, 1, 1), (0, 0, 0))
    assert a.overlap_fraction(a) == pytest.approx(1.0)
    b = Grid((10, 10, 10), (1, 1, 1), (5, 0, 0))
    assert a.overlap_fraction(b) == pytest.approx(0.5)
    c = Grid((10, 10, 10), (1, 1, 1), (50, 0, 0))
    assert a.overlap_fraction(c) == 0.0


def test_invalid_grid_rejected():
    with pytest.raises(ValueError):
        Grid((0, 3, 3), (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError):
        Grid((3, 3, 3), (1, -1, 1), (0, 0, 0))
