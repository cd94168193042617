"""Warp and transforms: sampling in world space, ITK parity of our composite transform, velocity fields."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.spatial import warp as W
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.spatial.resampling import warp_image
from DeepRegistrationLib.spatial.transforms import (SpatialTransform, affine_params_from_matrix, params_to_matrix,
    rotation_matrix, scaling_and_squaring)
from test_grid import GRIDS, rotation


def smooth_field(grid: Grid, amplitude: float, seed: int = 0) -> np.ndarray:
    """A smooth random displacement (3, Z, Y, X) in mm: a few low-frequency sines."""
    rng = np.random.default_rng(seed)
    pts = grid.world_points()
    out = np.zeros((3,) + grid.shape)
    for c in range(3):
        k = rng.normal(size=3) / 40.0
        out[c] = amplitude * np.sin(pts @ k + rng.uniform(0, np.pi))
    return out


@pytest.mark.parametrize("name", GRIDS)
def test_sampling_a_linear_ramp_returns_world_coordinates(name):
    g = GRIDS[name]
    pts = torch.as_tensor(g.world_points(), dtype=torch.float64)
    vol = pts.permute(3, 0, 1, 2)[None]  # each channel = one LPS coordinate
    inner = Grid((3, 4, 5), (0.7, 0.6, 0.9), tuple(g.center() - 1.0), GRIDS["oblique"].direction)
    q = torch.as_tensor(inner.world_points(), dtype=torch.float64)[None]
    vals = W.sample(vol, g, q)[0].permute(1, 2, 3, 0)
    np.testing.assert_allclose(vals.numpy(), q[0].numpy(), atol=1e-9)


def test_rigid_and_affine_parameters():
    rv = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    r = rotation_matrix(rv).numpy()
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    c = torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64)
    m = params_to_matrix(torch.cat([rv, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]), "rigid", c).numpy()
    np.testing.assert_allclose(m[:3, :3] @ c.numpy() + m[:3, 3], c.numpy() + [1, 2, 3], atol=1e-12)
    a = np.eye(4)
    a[:3, :3] = rotation(0.1, 0.2, 0.3) * 1.1
    a[:3, 3] = [4, 5, 6]
    p = affine_params_from_matrix(a, c.numpy())
    np.testing.assert_allclose(params_to_matrix(torch.as_tensor(p), "affine", c).numpy(), a, atol=1e-12)


@pytest.mark.parametrize("name", ["lps_flip", "oblique"])
def test_composite_transform_matches_itk_point_by_point(name, tmp_path):
    g = Grid((10, 12, 11), (3.0, 2.5, 2.0), GRIDS[name].origin, GRIDS[name].direction)
    a = np.eye(4)
    a[:3, :3] = rotation(0.05, -0.1, 0.08) * 1.05
    a[:3, 3] = [2.0, -3.0, 4.0]
    t = SpatialTransform(a, smooth_field(g, 4.0), g)
    itk = t.to_sitk()
    sitk.WriteTransform(itk, str(tmp_path / "t.h5"))
    itk_read = sitk.ReadTransform(str(tmp_path / "t.h5"))
    rng = np.random.default_rng(1)
    # points inside, near the border and outside the field's grid
    corners = g.corners()
    pts = corners.min(0) - 5 + rng.uniform(size=(300, 3)) * (np.ptp(corners, 0) + 10)
    ours = t.map_points(pts)
    theirs = np.array([itk_read.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    back = SpatialTransform.from_sitk(itk_read)
    np.testing.assert_allclose(back.map_points(pts), ours, atol=1e-6)


def test_warp_image_matches_simpleitk_resample():
    mg = Grid((20, 22, 24), (2.0, 2.0, 2.0), (-20.0, -22.0, -18.0), GRIDS["oblique"].direction)
    rng = np.random.default_rng(0)
    arr = rng.uniform(size=mg.shape).astype(np.float32)
    moving = Image(arr, mg, "moving")
    fg = Grid((18, 20, 21), (2.2, 1.9, 2.1), (-18.0, -20.0, -16.0))
    a = np.eye(4)
    a[:3, :3] = rotation(0.1, 0.0, -0.05)
    a[:3, 3] = [1.0, 2.0, -1.0]
    t = SpatialTransform(a, smooth_field(fg, 3.0), fg)
    ours = warp_image(moving, fg, t, "linear").array
    ref = sitk.Image(fg.size, sitk.sitkFloat32)
    fg.apply_to_sitk(ref)
    from DeepRegistrationLib.io.images import image_to_sitk

    theirs = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(moving), ref, t.to_sitk(), sitk.sitkLinear, 0.0))
    inside = theirs != 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-3)
    # labels: nearest neighbour keeps integer values
    lab = Image((arr * 10).astype(np.int32), mg, "labels")
    wl = warp_image(lab, fg, t, "nearest").array
    assert wl.dtype == np.int32 and set(np.unique(wl)) <= set(range(10))


def test_scaling_and_squaring():
    g = Grid((16, 16, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    const = torch.zeros(1, 3, *g.shape, dtype=torch.float64)
    const[:, 0] = 1.5
    disp = scaling_and_squaring(const, g, steps=6)
    core = disp[0, :, 4:-4, 4:-4, 4:-4]
    np.testing.assert_allclose(core[0].numpy(), 1.5, atol=1e-9)
    np.testing.assert_allclose(core[1:].numpy(), 0.0, atol=1e-9)
    # a rotation-like velocity (u = S x with S skew) integrates to a rotation: exp(S)
    pts = torch.as_tensor(g.world_points(), dtype=torch.float64) - 16.0
    s = torch.tensor([[0, -0.2, 0], [0.2, 0, 0], [0, 0, 0]], dtype=torch.float64)
    vel = (pts @ s.T).permute(3, 0, 1, 2)[None]
    disp = scaling_and_squaring(vel, g, steps=8)
    expected = pts @ (torch.linalg.matrix_exp(s) - torch.eye(3, dtype=torch.float64)).T
    c = slice(6, 10)
    np.testing.assert_allclose(disp[0, :, c, c, c].permute(1, 2, 3, 0).numpy(), expected[c, c, c].numpy(), atol=0.02)


def test_compose_fields():
    g = Grid((12, 12, 12), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = torch.zeros(1, 3, *g.shape, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[:, 0] = 1.0
    b[:, 1] = -2.0
    c = W.compose_fields(a, b, g)
    np.testing.assert_allclose(c[0, :, 3:-3, 3:-3, 3:-3].mean(dim=(1, 2, 3)).numpy(), [1.0, -2.0, 0.0], atol=1e-9)
