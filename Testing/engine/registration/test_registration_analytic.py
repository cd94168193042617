"""Known transforms recovered in millimetres on a real brain (the bundled fixed image).

Each case builds the moving image by resampling the fixed one through a known map ``S`` (moving →
fixed space: ``moving(y) = fixed(S(y))``); a perfect registration ``T`` (fixed → moving) then
satisfies ``S(T(x)) = x``, so the error at a fixed point x is ``|S(T(x)) - x|`` in mm.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import brain_mask
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk, sitk_to_image
from DeepRegistrationLib.registration.pipeline import register


def make_moving(fixed: Image, s: sitk.Transform, shift_origin=(4.0, -3.0, 2.0)) -> Image:
    """``moving(y) = fixed(S(y))`` on a grid shifted from the fixed one (so grids differ)."""
    src = image_to_sitk(fixed)
    ref = sitk.Image(src)
    ref.SetOrigin(tuple(np.asarray(src.GetOrigin()) + shift_origin))
    return sitk_to_image(sitk.Resample(src, ref, s, sitk.sitkLinear, 0.0), "moving image")


def errors_mm(result, fixed: Image, s: sitk.Transform, step: int = 2) -> np.ndarray:
    """|S(T(x)) - x| over brain voxels of the fixed image (every ``step``-th voxel)."""
    mask = brain_mask(fixed)
    pts = fixed.grid.world_points()[mask][::step]
    mapped = result.transform.map_points(pts)
    back = np.array([s.TransformPoint(tuple(p)) for p in mapped])
    return np.linalg.norm(back - pts, axis=1)


def fast(mode: str, **kw) -> RegistrationConfig:
    base = dict(mode=mode, spacing=3.0, iterations=30, affine_iterations=60, levels=3, threads=2)
    base.update(kw)
    return RegistrationConfig(**base)


def test_identical_images_give_identity(brain):
    res = register(brain, Image(brain.array.copy(), brain.grid, "moving image"), fast("deformable"))
    disp = res.transform.total_displacement(brain.grid).numpy()
    mag = np.linalg.norm(disp[0], axis=0)
    assert mag.max() < 0.1, f"max displacement {mag.max():.3f} mm for identical images"
    assert res.folding_percent == 0.0


def test_translation_recovered(brain):
    s = sitk.TranslationTransform(3, (6.0, -4.5, 3.0))
    res = register(brain, make_moving(brain, s), fast("rigid", initialization="none"))
    err = errors_mm(res, brain, s)
    assert err.mean() < 0.5 and np.percentile(err, 95) < 0.75, (err.mean(), np.percentile(err, 95))


def test_rotation_recovered(brain):
    s = sitk.Euler3DTransform()
    s.SetCenter(tuple(brain.grid.center()))
    s.SetRotation(np.deg2rad(8), np.deg2rad(-6), np.deg2rad(10))
    s.SetTranslation((3.0, 2.0, -4.0))
    res = register(brain, make_moving(brain, s), fast("rigid"))
    err = errors_mm(res, brain, s)
    assert err.mean() < 0.5 and np.percentile(err, 95) < 0.75, (err.mean(), np.percentile(err, 95))


def test_affine_recovered(brain):
    s = sitk.AffineTransform(3)
    s.SetCenter(tuple(brain.grid.center()))
    m = np.array([[1.08, 0.04, 0.0], [-0.03, 0.93, 0.05], [0.02, 0.0, 1.05]])
    s.SetMatrix(tuple(m.ravel()))
    s.SetTranslation((-4.0, 5.0, 2.0))
    res = register(brain, make_moving(brain, s), fast("affine"))
    err = errors_mm(res, brain, s)
    assert err.mean() < 0.5 and np.percentile(err, 95) < 0.75, (err.mean(), np.percentile(err, 95))


def test_smooth_warp_recovered(brain):
    """A smooth non-linear displacement (up to ~5 mm) is undone far better than by an affine."""
    g = brain.grid
    pts = g.world_points()
    c = g.center()
    field = np.zeros(pts.shape)
    field[..., 0] = 4.0 * np.sin((pts[..., 1] - c[1]) / 25.0)
    field[..., 1] = 3.0 * np.cos((pts[..., 2] - c[2]) / 30.0)
    field[..., 2] = 3.0 * np.sin((pts[..., 0] - c[0]) / 20.0)
    img = sitk.GetImageFromArray(field, isVector=True)
    g.apply_to_sitk(img)
    s = sitk.DisplacementFieldTransform(img)
    moving = make_moving(brain, s, shift_origin=(0.0, 0.0, 0.0))
    before = np.linalg.norm(field[brain_mask(brain)][::2], axis=1)
    aff = register(brain, moving, fast("affine"))
    res = register(brain, moving, fast("deformable"))
    err_aff, err = errors_mm(aff, brain, s), errors_mm(res, brain, s)
    assert err.mean() < 0.6, (before.mean(), err_aff.mean(), err.mean())
    assert err.mean() < 0.35 * err_aff.mean() and err.mean() < 0.2 * before.mean()
    assert res.folding_percent < 0.05
