"""The initialization search's pre-screen (every start scored on a 2× coarser level first, only the best scored
on the search level) picks the same start with the same score as scoring every start on the search level, and
still finds a large oblique rotation of the bundled pair."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.registration import initialization as init_search
from DeepRegistrationLib.registration import pipeline
from dicom_series_data import rotation as _rotation  # degrees, as here


def _turned(image: Image, rot: np.ndarray, shift_mm) -> Image:
    """The same voxels placed rotated about the field-of-view centre and shifted (a new header)."""
    g = image.grid
    c = g.center()
    origin = c + rot @ (np.asarray(g.origin) - c) + np.asarray(shift_mm)
    return Image(image.array, Grid(g.shape, g.spacing, tuple(origin), tuple((rot @ g.direction_matrix).ravel())),
                 image.name)


def _search(fixed: Image, moving: Image, keep) -> tuple[np.ndarray, dict]:
    cfg = RegistrationConfig(spacing=4.0, threads=2).validate()
    prepared = pipeline._prepare_levels(fixed, moving, cfg, None, None, None, torch.device("cpu"))
    old = init_search.PRESCREEN_KEEP
    init_search.PRESCREEN_KEEP = keep
    try:
        return pipeline._initialize(prepared, cfg, None, None, {})
    finally:
        init_search.PRESCREEN_KEEP = old


def test_prescreen_picks_the_same_start_and_finds_a_large_oblique_rotation(sample_pair):
    fixed, moving, _, _ = sample_pair
    rot = _rotation((1.0, 1.0, 1.0), 65.0)
    turned = _turned(moving, rot, (12.0, -9.0, 14.0))
    screened, info = _search(fixed, turned, init_search.PRESCREEN_KEEP)
    full, info_full = _search(fixed, turned, None)
    assert init_search.PRESCREEN_KEEP and init_search.PRESCREEN_KEEP < info["candidates"]
    assert info["start"] == info_full["start"] and info["start"] != "moments"
    assert info["score"] == pytest.approx(info_full["score"], abs=1e-6)
    np.testing.assert_allclose(screened, full, atol=1e-4)
    # the found rotation is the applied one (fixed -> moving maps through rot), within the linear stage's reach
    r = screened[:3, :3] @ rot.T
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    assert angle < 15.0
