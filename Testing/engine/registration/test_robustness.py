"""Robustness of the default registration to real acquisitions: a large rotation of the moving image and
partial fields of view (a slab, a scan cropped in z), on the bundled Colin27 pair; and the overlap-aware
similarities underneath (only the overlap of the two fields of view counts)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.evaluation.metrics import mean_dice
from DeepRegistrationLib.registration.pipeline import register
from DeepRegistrationLib.spatial.resampling import warp_image
from DeepRegistrationLib.registration.similarity import LNCC, Similarity


@pytest.fixture(scope="module")
def pair(sample_pair):
    return sample_pair


def cfg(**kw) -> RegistrationConfig:
    base = dict(spacing=4.0, threads=2)
    base.update(kw)
    return RegistrationConfig(**base)


def dice(transform, flab, mlab) -> float:
    return mean_dice(flab.array, warp_image(mlab, flab.grid, transform, "nearest").array)


@pytest.fixture(scope="module")
def reference(pair):
    """The unmodified pair registered with the defaults: its transform and Dice."""
    fixed, moving, flab, mlab = pair
    res = register(fixed, moving, cfg())
    return res.transform, dice(res.transform, flab, mlab)


def rotated(image: Image, axis, degrees: float, shift_mm=(0.0, 0.0, 0.0)) -> Image:
    """The same voxels placed rotated about the field-of-view centre and shifted (a new header, no resampling)."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    g = image.grid
    c = g.center()
    origin = c + rot @ (np.asarray(g.origin) - c) + np.asarray(shift_mm)
    return Image(image.array, Grid(g.shape, g.spacing, tuple(origin), tuple((rot @ g.direction_matrix).ravel())),
                 image.name)


def cropped_z(image: Image, lo: float, hi: float) -> Image:
    """The slices between fractions ``lo`` and ``hi`` of the array's first (z) axis, at their true position."""
    g = image.grid
    a, b = int(round(g.shape[0] * lo)), int(round(g.shape[0] * hi))
    origin = np.asarray(g.origin) + g.direction_matrix @ (np.array([0.0, 0.0, a]) * np.asarray(g.spacing))
    return Image(image.array[a:b].copy(), Grid((b - a,) + g.shape[1:], g.spacing, tuple(origin), g.direction),
                 image.name)


def test_large_oblique_rotation_is_recovered(pair, reference):
    """The moving image turned by 70° about an oblique axis and shifted 25 mm: the default search
    initialization recovers it (Dice within 0.02 of the unrotated pair's); centre of mass alone does not."""
    fixed, moving, flab, mlab = pair
    axis, angle, shift = (1.0, -0.6, 0.8), 70.0, (15.0, -10.0, 17.0)
    mov, mlab_r = rotated(moving, axis, angle, shift), rotated(mlab, axis, angle, shift)
    _, ref_dice = reference
    res = register(fixed, mov, cfg())
    assert res.initialization["mode"] == "search" and res.initialization["start"] != "moments"
    assert dice(res.transform, flab, mlab_r) > ref_dice - 0.02
    old = register(fixed, mov, cfg(initialization="moments"))
    assert dice(old.transform, flab, mlab_r) < ref_dice - 0.2


def test_slab_registers_like_the_whole_image(pair, reference):
    """A moving slab (the upper half of the brain): Dice, over what the slab's labels can cover, within
    0.03 of the whole moving image's transform applied to the same slab labels."""
    fixed, moving, flab, mlab = pair
    mov, mlab_c = cropped_z(moving, 0.5, 1.0), cropped_z(mlab, 0.5, 1.0)
    ref_transform, _ = reference
    best = dice(ref_transform, flab, mlab_c)
    res = register(fixed, mov, cfg())
    assert dice(res.transform, flab, mlab_c) > best - 0.03


def test_zero_padding_taken_for_image_fails_where_the_overlap_succeeds(pair, reference):
    """What the engine did before with a partial field of view: the slab's surroundings read as zeros, i.e.
    the slab zero-padded back to the whole field of view (centre-of-mass start). That misregisters (the cut
    faces look like the brain's surface); the same slab as a partial field of view registers."""
    fixed, moving, flab, mlab = pair
    slab, slab_labels = cropped_z(moving, 0.5, 1.0), cropped_z(mlab, 0.5, 1.0)
    n = moving.grid.shape[0] - slab.grid.shape[0]
    padded = Image(np.concatenate([np.zeros((n,) + slab.grid.shape[1:], np.float32), slab.array]), moving.grid,
                   moving.name)
    ref_transform, _ = reference
    best = dice(ref_transform, flab, slab_labels)
    old = register(fixed, padded, cfg(initialization="moments"))
    assert dice(old.transform, flab, slab_labels) < best - 0.1
    res = register(fixed, slab, cfg(initialization="moments"))
    assert dice(res.transform, flab, slab_labels) > best - 0.03


def test_report_records_the_winning_start(tmp_path, sample_dir):
    from DeepRegistrationLib.registration.run import run_registration

    run_registration(sample_dir / "fixed.nii.gz", sample_dir / "moving.nii.gz", tmp_path / "out",
                     cfg(mode="rigid"), write_png=False)
    init = json.loads((tmp_path / "out" / "report.json").read_text())["initialization"]
    assert init["mode"] == "search" and init["candidates"] > 100
    assert isinstance(init["start"], str) and np.isfinite(init["score"]) and init["score"] <= init["moments_score"]


# ------------------------------------------------------------------ the similarities count the overlap only
def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 26, 28, generator=g), 3, 1, 1)
    return fixed


def test_lncc_ignores_fixed_anatomy_outside_the_moving_view():
    """The moving image equals the fixed one inside its view (a slab) and is zero-padded outside: over the
    overlap the match is perfect (loss 0); without the view the zero padding makes edges and misses."""
    fixed = _images()
    view = torch.zeros_like(fixed, dtype=torch.bool)
    view[:, :, 8:18] = True
    warped = torch.where(view, fixed, torch.zeros_like(fixed))
    lncc = LNCC(radius=2)
    assert float(lncc(fixed, warped, view, None, view)) == pytest.approx(0.0, abs=1e-5)
    assert float(lncc(fixed, warped)) > 0.3
    # a moving image that differs outside the overlap gives the same loss: nothing there pulls or pushes
    other = torch.where(view, fixed, torch.rand_like(fixed))
    assert float(lncc(fixed, other, view, None, view)) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["mi", "mse"])
def test_global_similarities_use_the_overlap(name):
    fixed = _images(1)
    view = torch.zeros_like(fixed, dtype=torch.bool)
    view[:, :, :, 5:20] = True
    warped = torch.where(view, 1.0 - fixed, torch.zeros_like(fixed))
    sim = Similarity(name)
    inside = sim(fixed[:, :, :, 5:20], warped[:, :, :, 5:20])
    assert float(sim(fixed, warped, view)) == pytest.approx(float(inside), rel=1e-5)
    batch = sim.per_sample(fixed, torch.cat([warped, fixed]), torch.cat([view, view]))
    assert float(batch[0]) == pytest.approx(float(inside), rel=1e-5)
