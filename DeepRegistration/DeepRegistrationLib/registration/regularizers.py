"""Regularizers of displacement fields ``(B, 3, Z, Y, X)`` in LPS mm on a grid with known spacing.

Derivatives are finite differences along the index axes divided by the voxel size, so weights mean
the same thing at every resolution (diffusion: mm/mm squared; bending: 1/mm squared).
"""
from __future__ import annotations

import numpy as np
import torch

from ..core.grid import Grid

from ..core.config import REGULARIZERS  # noqa: E402  (torch-free list of names)


class _Diffusion(torch.autograd.Function):
    """``sum_d mean((Δ_d u / h_d)²)`` with a hand-written backward (a discrete Laplacian).

    Autograd through the slicing would allocate a dozen full-size temporaries; the explicit
    gradient costs two in-place updates per axis. The differences of the three axes share one buffer.
    """

    @staticmethod
    def forward(ctx, field, weights):
        ctx.save_for_backward(field)
        ctx.weights = weights
        total = field.new_zeros(())
        buf = field.new_empty(field.numel())  # the three axes' differences, one after the other
        for axis, w in zip((2, 3, 4), weights):
            n = field.shape[axis]
            if n > 1:
                diff = _difference(field, axis, buf)
                total = total + diff.square_().mean() * w
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (field,) = ctx.saved_tensors
        grad = torch.zeros_like(field)
        buf = field.new_empty(field.numel())
        for axis, w in zip((2, 3, 4), ctx.weights):
            n = field.shape[axis]
            if n > 1:
                diff = _difference(field, axis, buf)
                diff.mul_(2.0 * w / diff.numel())
                grad.narrow(axis, 0, n - 1).sub_(diff)
                grad.narrow(axis, 1, n - 1).add_(diff)
        return grad.mul_(grad_output), None


def _difference(field: torch.Tensor, axis: int, buf: torch.Tensor) -> torch.Tensor:
    """``field[i + 1] - field[i]`` along ``axis``; for a contiguous ``field`` written into the flat buffer ``buf``
    (``field.numel()`` elements, shared by the axes), contiguous as a new tensor would be (else a new tensor)."""
    n = field.shape[axis]
    hi, lo = field.narrow(axis, 1, n - 1), field.narrow(axis, 0, n - 1)
    if not field.is_contiguous():
        return hi - lo
    return torch.sub(hi, lo, out=buf[:lo.numel()].view(lo.shape))


def diffusion(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean squared first derivative ``|∇u|²`` (forward differences along each index axis), dimensionless.

    Args:
        field: Displacement ``(B, 3, Z, Y, X)`` in mm on ``grid``.
        grid: Its grid (only the spacing is used).

    Returns:
        Scalar ``sum over axes of mean((Δu / h)²)``, differentiable.
    """
    sz, sy, sx = grid.spacing_zyx
    return _Diffusion.apply(field, (1.0 / sz ** 2, 1.0 / sy ** 2, 1.0 / sx ** 2))


def bending_energy(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Mean bending energy (sum of squared second derivatives, mixed terms twice), in 1/mm²."""
    sz, sy, sx = grid.spacing_zyx

    def d(t: torch.Tensor, axis: int, h: float) -> torch.Tensor:
        n = t.shape[axis]
        return (t.narrow(axis, 2, n - 2) - t.narrow(axis, 0, n - 2)) / (2 * h)

    out = 0.0
    axes = ((2, sz), (3, sy), (4, sx))
    firsts = [d(field, a, h) for a, h in axes]
    for i, (a, h) in enumerate(axes):
        for j, (b, hb) in enumerate(axes):
            if j < i:
                continue
            second = d(firsts[i], b, hb)
            out = out + (1.0 if i == j else 2.0) * (second ** 2).mean()
    return out


def jacobian_determinant(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det(∂(x + u)/∂x) at interior voxels (central differences), shape ``(B, Z-2, Y-2, X-2)``.

    Handles oblique/flipped grids: index derivatives are mapped to LPS with ``inv(direction·spacing)``.
    """
    inv = torch.as_tensor(np.linalg.inv(grid.direction_matrix * np.asarray(grid.spacing)[None, :]),
                          dtype=field.dtype, device=field.device)
    c = field[:, :, 1:-1, 1:-1, 1:-1]
    di = (field[:, :, 1:-1, 1:-1, 2:] - field[:, :, 1:-1, 1:-1, :-2]) / 2
    dj = (field[:, :, 1:-1, 2:, 1:-1] - field[:, :, 1:-1, :-2, 1:-1]) / 2
    dk = (field[:, :, 2:, 1:-1, 1:-1] - field[:, :, :-2, 1:-1, 1:-1]) / 2
    del c
    g = torch.stack([di, dj, dk], dim=-1)  # (B, 3 comps, Z, Y, X, 3 index axes)
    g = torch.movedim(g, 1, -2)  # (B, Z, Y, X, 3 comps, 3 index axes)
    jac = g @ inv + torch.eye(3, dtype=field.dtype, device=field.device)
    return torch.linalg.det(jac)


def folding_penalty(field: torch.Tensor, grid: Grid, threshold: float = 0.05) -> torch.Tensor:
    """Mean of ``relu(threshold - det J)``: zero unless the map nearly folds."""
    return torch.relu(threshold - jacobian_determinant(field, grid)).mean()


class Regularizer:
    """``Regularizer("diffusion")(field, grid)``; the name picks diffusion or bending energy."""

    def __init__(self, name: str):
        if name not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}")
        self.name = name

    def __call__(self, field: torch.Tensor, grid: Grid) -> torch.Tensor:
        return diffusion(field, grid) if self.name == "diffusion" else bending_energy(field, grid)
