"""The diffusion regularizer's hand-written passes bit for bit against the plain formula they replace.

``_Diffusion`` writes the three axes' differences into one shared buffer; the loss and the gradient must keep the
bits of fresh-tensor differences ``mean((u[i+1] - u[i])²) · w`` and ``2 w (Δu) / n`` scattered per axis.
"""
from __future__ import annotations

import pytest
import torch

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.registration.regularizers import diffusion


def _plain(field: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    total = field.new_zeros(())
    grad = torch.zeros_like(field)
    for axis, w in zip((2, 3, 4), weights):
        n = field.shape[axis]
        if n > 1:
            diff = field.narrow(axis, 1, n - 1) - field.narrow(axis, 0, n - 1)
            total = total + diff.square().mean() * w
            step = diff * (2.0 * w / diff.numel())
            grad.narrow(axis, 0, n - 1).sub_(step)
            grad.narrow(axis, 1, n - 1).add_(step)
    return total, grad


@pytest.mark.parametrize("shape", [(1, 3, 20, 17, 15), (2, 3, 1, 5, 4), (1, 3, 33, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diffusion_loss_and_gradient_have_the_plain_formulas_bits(shape, dtype):
    field = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    grid = Grid(shape[2:][::-1], (0.7, 1.3, 2.1), (0.0, 0.0, 0.0))
    sz, sy, sx = grid.spacing_zyx
    weights = (1.0 / sz ** 2, 1.0 / sy ** 2, 1.0 / sx ** 2)
    for u in (field, torch.movedim(torch.movedim(field, 1, -1).contiguous(), -1, 1)):  # contiguous, channels last
        p = u.clone().requires_grad_()
        loss = diffusion(p, grid)
        (3.0 * loss).backward()
        want_loss, want_grad = _plain(u, weights)
        assert torch.equal(loss.detach(), want_loss)
        assert torch.equal(p.grad, want_grad * 3.0)
