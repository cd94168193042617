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


def test_the_prescreen_cuts_both_the_rotations_and_the_shifts(sample_pair, monkeypatch):
    """Each batch of starts (the rotations, then the shifts of the best rotations) reaches the search level only
    through the pre-screen: at most PRESCREEN_KEEP of it plus the always-scored centre-of-mass and principal-axes
    starts, while the coarser level scores every start."""
    fixed, moving, _, _ = sample_pair
    scored: list[tuple[tuple, int]] = []
    plain = init_search._Scorer.__call__

    def counting(self, mats):
        scored.append((tuple(self.lv.fgrid.shape), int(mats.shape[0])))
        return plain(self, mats)

    monkeypatch.setattr(init_search._Scorer, "__call__", counting)
    _, info = _search(fixed, _turned(moving, _rotation((0.0, 0.0, 1.0), 40.0), (5.0, 0.0, 0.0)),
                      init_search.PRESCREEN_KEEP)
    shapes = sorted({s for s, _ in scored}, key=np.prod)
    assert len(shapes) == 2  # the coarser pre-screen level and the search level
    coarse = [n for s, n in scored if s == shapes[0]]
    fine = [n for s, n in scored if s == shapes[1]]
    # the pre-screen level scores the rotations, then the shifts; the search level their best, then (at the
    # registration's coarsest level, of the same shape here) the refined starts
    assert len(coarse) == 2 and len(fine) == 3
    assert sum(coarse) == info["candidates"] > 2 * (init_search.PRESCREEN_KEEP + 5)
    assert all(n <= init_search.PRESCREEN_KEEP + 5 for n in fine[:2])
    assert fine[2] == init_search.TOP_STARTS + 2  # the kept starts, moments and geometry
