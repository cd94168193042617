"""The registration hands the moving image it warped for the similarity after to ``explain.working_pair``
(``RegistrationResult.working_images``): the pair taken over is bit for bit the pair computed from scratch, with and
without masks and with a moving image that covers only part of the fixed one; another transform is warped anew."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.evaluation.explain import working_pair
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration.pipeline import register

CFG = dict(initialization="moments", affine_iterations=8, iterations=8, levels=2, spacing=6.0, device="cpu", threads=2)


def _slab(image: Image, k0: int, k1: int) -> Image:
    g = image.grid
    origin = np.asarray(g.origin) + g.direction_matrix @ (np.asarray(g.spacing) * np.array([0.0, 0.0, k0]))
    return Image(image.array[k0:k1].copy(), Grid((k1 - k0,) + tuple(g.shape[1:]), g.spacing, tuple(origin),
                                                 g.direction), image.name)


@pytest.mark.parametrize("case", ["plain", "masks_and_slab"])
def test_the_handed_over_pair_is_the_pair_computed_anew(sample_dir, case):
    fixed = read_image(sample_dir / "fixed.nii.gz", "fixed")
    moving = read_image(sample_dir / "moving.nii.gz", "moving")
    fmask = mmask = None
    if case == "masks_and_slab":
        moving = _slab(moving, 8, moving.grid.shape[0] - 20)
        fmask = Image((fixed.array > np.percentile(fixed.array, 40)).astype(np.uint8), fixed.grid, "fm")
        mmask = Image((moving.array > np.percentile(moving.array, 40)).astype(np.uint8), moving.grid, "mm")
    cfg = RegistrationConfig(**CFG)
    result = register(fixed, moving, cfg, fixed_mask=fmask, moving_mask=mmask)
    images = result.working_images
    fw, mw = images  # unpacks as the prepared pair
    assert images[0] is fw and images[1] is mw and len(images) == 2
    handed = working_pair(fixed, moving, result.transform, cfg, fmask, mmask, prepared=images)
    assert handed.warped is images.warped  # taken over, not warped again
    anew = working_pair(fixed, moving, result.transform, cfg, fmask, mmask, prepared=(fw, mw))
    assert anew.warped is not images.warped
    for name in ("fixed", "warped", "view", "fixed_mask"):
        a, b = getattr(handed, name), getattr(anew, name)
        assert (a is None) == (b is None) == (name == "fixed_mask" and fmask is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert handed.grid is anew.grid is fw.grid
    if case == "masks_and_slab":
        assert 0.2 < float(handed.view.float().mean()) < 0.95  # the slab covers part of the fixed image
    # another transform object (even with the same numbers) is warped anew
    other = dataclasses.replace(result.transform, affine=result.transform.affine.copy())
    assert working_pair(fixed, moving, other, cfg, fmask, mmask, prepared=images).warped is not images.warped
    # pickled: the plain prepared pair (readable by earlier versions), whose pair is warped anew
    again = pickle.loads(pickle.dumps(images))
    assert type(again) is tuple and len(again) == 2 and np.array_equal(again[1].array, mw.array)
