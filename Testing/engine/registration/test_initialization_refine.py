"""The initialization's rigid refinement returns, bit for bit, what the plain loop (a gradient step after every
evaluation, the last one included) returns: its last evaluation runs without a gradient and takes no step."""
from __future__ import annotations

import numpy as np
import torch

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.registration import initialization as init_search
from DeepRegistrationLib.registration import pipeline
from DeepRegistrationLib.registration.optim import CosineAdam
from DeepRegistrationLib.registration.similarity import Similarity


def _plain_refine(level, sim, starts, center, frame, iters):
    """The refinement written out plainly (backward and step after every evaluation)."""
    b = starts.shape[0]
    local_center = frame[:3, :3].T @ center
    scale = torch.tensor([0.1] * 3 + [10.0] * 3)
    raw = torch.zeros((b, 6), requires_grad=True)
    opt = CosineAdam(raw, init_search.REFINE_STEP, iters, lr_end=0.01)
    best_loss, best = torch.full((b,), float("inf")), starts.clone()
    for _ in range(iters + 1):
        opt.zero_grad()
        m = starts @ frame @ init_search._rigid_batch(raw * scale, local_center) @ frame.T
        warped, valid, view = level.warp(init_search._apply(level.pts, m))
        loss = sim.per_sample(level.fixed, warped, valid, level.fmask, view)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best[better] = m[better].detach()
        loss.sum().backward()
        opt.step()
    return best


def test_refine_is_the_plain_loop_bit_for_bit():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    grid = Grid((18, 20, 22), (4.0, 4.0, 4.0), (-40.0, -30.0, -35.0), tuple(np.eye(3).ravel()))
    base = torch.as_tensor(rng.uniform(0, 1, grid.shape), dtype=torch.float32)[None, None]
    smooth = torch.nn.functional.avg_pool3d(base, 5, 1, 2)
    moving = torch.roll(smooth, (1, -2, 1), (2, 3, 4))
    level = pipeline._Level(smooth, grid, moving, grid, 1, None, None)
    starts = torch.eye(4).repeat(3, 1, 1)
    starts[1, :3, 3] = torch.tensor([3.0, -2.0, 1.0])
    starts[2, :3, 3] = torch.tensor([-4.0, 5.0, 0.5])
    center = torch.tensor([1.0, 2.0, -3.0])
    frame = torch.eye(4)
    for iters in (0, 1, 6):
        ours = init_search._refine(level, Similarity("lncc", 2), starts, center, frame, iters)
        plain = _plain_refine(level, Similarity("lncc", 2), starts, center, frame, iters)
        assert torch.equal(ours, plain)
    assert not torch.equal(ours, starts)  # the refinement moved the starts
