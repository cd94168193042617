"""Separable filters on tensors ``(B, C, Z, Y, X)`` of one grid (the one place for them): box means by running
sums with an exact backward pass. Units: voxels (a radius ``r`` is a ``(2r+1)³`` window); no grid geometry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["box_filter"]


def _box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a ``(2r+1)³`` window (zeros outside) of ``(B, C, Z, Y, X)`` by running sums."""
    k = 2 * radius + 1
    if radius <= 1:  # shifted adds beat running sums for tiny windows
        for d in (2, 3, 4):
            n = x.shape[d]
            padded = F.pad(x, [0, 0] * (4 - d) + [radius, radius])
            out = padded.narrow(d, 0, n).clone()
            for s in range(1, k):
                out += padded.narrow(d, s, n)
            x = out
        return x
    for d in (2, 3, 4):
        n = x.shape[d]
        c = torch.cumsum(F.pad(x, [0, 0] * (4 - d) + [radius + 1, radius]), dim=d)
        x = c.narrow(d, k, n) - c.narrow(d, 0, n)
    return x


def _box_count(shape, radius: int, dtype, device) -> torch.Tensor:
    """Number of in-grid voxels in each window, broadcastable to ``(1, 1, Z, Y, X)``."""
    out = torch.ones((), dtype=dtype, device=device)
    for axis, n in enumerate(shape[2:]):
        idx = torch.arange(n, dtype=dtype, device=device)
        cnt = torch.clamp(idx + radius, max=n - 1) - torch.clamp(idx - radius, min=0) + 1
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = n
        out = out * cnt.view(view)
    return out


class _BoxMean(torch.autograd.Function):
    """Box mean with an exact, cheap backward: the window sum is self-adjoint."""

    @staticmethod
    def forward(ctx, x, radius, count):
        ctx.radius = radius
        ctx.save_for_backward(count)
        return _box_sum(x, radius) / count

    @staticmethod
    def backward(ctx, grad):
        (count,) = ctx.saved_tensors
        return _box_sum(grad / count, ctx.radius), None, None


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a ``(2r+1)³`` window (shrunk at the borders) of ``(B, C, Z, Y, X)``, by running sums.

    Equal to ``avg_pool3d(x, 2r+1, 1, r, count_include_pad=False)`` but O(1) per voxel and axis,
    with a backward pass of the same cost.
    """
    count = _box_count(x.shape, radius, x.dtype, x.device)
    return _BoxMean.apply(x, radius, count)
