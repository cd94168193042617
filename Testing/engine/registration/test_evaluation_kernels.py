"""The cheaper kernels of the similarity before/after and the level set-up against the plain formulas they
replace, bit for bit: ``global_ncc`` (one index for both images instead of boolean indexing), ``warp.grid_points``
(per-line coordinates for axis-aligned grids) and LNCC's fixed statistics (computed only when the view is whole)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.registration.similarity import LNCC, global_ncc
from DeepRegistrationLib.spatial import warp as W


def _plain_ncc(fixed, warped, mask):
    if mask is not None:
        sel = mask.bool().expand_as(fixed)
        fixed, warped = fixed[sel], warped[sel]
    f, w = fixed.flatten().double(), warped.flatten().double()
    f, w = f - f.mean(), w - w.mean()
    return float((f * w).sum() / (f.norm() * w.norm()).clamp_min(1e-12))


def _plain_points(grid: Grid) -> torch.Tensor:
    m = torch.as_tensor(grid.index_to_world, dtype=torch.float64)
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid.shape], indexing="ij")
    return (torch.stack([i, j, k], dim=-1) @ m[:3, :3].T + m[:3, 3]).float().unsqueeze(0)


def test_global_ncc_is_the_plain_formula():
    g = torch.Generator().manual_seed(3)
    fixed = torch.rand((1, 1, 23, 31, 29), generator=g)
    warped = 0.7 * fixed + 0.3 * torch.rand(fixed.shape, generator=g)
    mask = torch.rand(fixed.shape, generator=g) > 0.4
    for m in (None, mask, mask.float()):
        assert global_ncc(fixed, warped, m) == _plain_ncc(fixed, warped, m)
    assert 0.5 < global_ncc(fixed, warped, mask) < 1.0


@pytest.mark.parametrize("direction", [
    (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),             # axis-aligned
    (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),           # LPS / RAS flip
    (0, 0, 1.0, -1.0, 0, 0, 0, 1.0, 0),            # permuted axes
    (0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1.0),        # oblique: the matrix product
])
def test_grid_points_are_the_plain_formula(direction):
    grid = Grid((9, 11, 13), (0.7, 1.3, 2.1), (-0.0, 12.25, -103.3), direction)
    for factor in (1, 2, 4):
        g = grid.downsampled(factor)
        got, want = W.grid_points(g), _plain_points(g)
        assert got.shape == want.shape == (1, *g.shape, 3) and torch.equal(got, want)
        assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert (W._separable_lines(grid) is None) == (direction[1] != 0 and direction[0] != 0)


def test_lncc_fixed_statistics_only_when_the_view_is_whole():
    g = torch.Generator().manual_seed(5)
    fixed = torch.rand((1, 1, 12, 14, 16), generator=g)
    warped = 0.5 * fixed + 0.5 * torch.rand(fixed.shape, generator=g)
    view = torch.ones_like(fixed, dtype=torch.bool)
    view[..., :4] = False
    lazy = LNCC(2)
    cut = lazy(fixed, warped, view, None, view)
    assert lazy._stats is None  # a cut view uses the view's own statistics only
    whole = lazy(fixed, warped)
    assert lazy._stats is not None
    fresh_cut, fresh_whole = LNCC(2)(fixed, warped, view, None, view), LNCC(2)(fixed, warped)
    assert torch.equal(cut, fresh_cut) and torch.equal(whole, fresh_whole) and not torch.equal(cut, whole)
    # changed in place: the statistics are computed again
    fixed.mul_(0.5)
    assert torch.equal(lazy(fixed, warped), LNCC(2)(fixed, warped))
