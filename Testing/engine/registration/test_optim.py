"""``CosineAdam``'s step with its reused work buffers bit for bit against the allocating formula it replaces."""
from __future__ import annotations

import math

import pytest
import torch

from DeepRegistrationLib.registration.optim import CosineAdam


def _reference_steps(param: torch.Tensor, grads, lr, steps, vector_dim):
    """The textbook update with fresh temporaries (the formula before the buffers)."""
    p = param.clone()
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = torch.zeros_like(p)
    v = torch.zeros_like(p if vector_dim is None else p.narrow(vector_dim, 0, 1))
    for t, g in enumerate(grads, start=1):
        frac = min(t - 1, steps) / steps
        step = 0.5 * lr * (1.0 + math.cos(math.pi * frac))
        m.mul_(b1).add_(g, alpha=1 - b1)
        if vector_dim is None:
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            v.mul_(b2).add_(g.square().mean(vector_dim, keepdim=True), alpha=1 - b2)
        denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
        p.addcdiv_(m, denom, value=-step / (1 - b1 ** t))
    return p


@pytest.mark.parametrize("vector_dim", [None, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cosine_adam_steps_have_the_bits_of_the_allocating_formula(vector_dim, channels_last):
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(1, 3, 6, 5, 4, generator=gen)
    grads = [torch.randn(1, 3, 6, 5, 4, generator=gen) for _ in range(5)]
    if channels_last:
        grads = [torch.movedim(torch.movedim(g, 1, -1).contiguous(), -1, 1) for g in grads]
    param = start.clone().requires_grad_()
    opt = CosineAdam(param, 0.3, 5, vector_dim=vector_dim)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    want = _reference_steps(start, grads, 0.3, 5, vector_dim)
    assert torch.equal(param.detach(), want)
    assert not torch.equal(want, start)
