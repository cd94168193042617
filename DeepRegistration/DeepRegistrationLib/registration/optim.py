"""A minimal Adam with a cosine step schedule, for the registration loops.

``torch.optim`` would do the same, but constructing any ``torch.optim`` optimizer imports
``torch._dynamo`` (about 1 s on a 2-core CPU), a large share of a 2 mm registration. This module
implements the textbook update (Kingma & Ba 2015, bias-corrected) for one parameter tensor.
"""
from __future__ import annotations

import math

import torch


class CosineAdam:
    """Adam on one tensor whose step size decays from ``lr`` to ``lr_end`` along a half cosine.

    Args:
        param: The tensor to optimize (``requires_grad=True``); updated in place.
        lr: Initial step size (in the parameter's units).
        steps: Number of steps of the schedule (the step size reaches ``lr_end`` at the last one).
        lr_end: Final step size.
        betas: Decay rates of the first and second moment estimates.
        eps: Added to the root of the second moment.
        vector_dim: If set, the second moment is shared along this dimension (the mean of the squared
            components): for displacement fields ``(B, 3, Z, Y, X)`` with ``vector_dim=1`` each voxel's
            step is scaled by the length of its gradient vector, not per component, so the update turns
            with the world frame (plain Adam is not rotation-equivariant).
    """

    def __init__(self, param: torch.Tensor, lr: float, steps: int, lr_end: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, vector_dim: int | None = None):
        self.param = param
        self.lr, self.lr_end, self.steps = float(lr), float(lr_end), max(int(steps), 1)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = torch.zeros_like(param)
        self.vector_dim = vector_dim
        self.v = torch.zeros_like(param if vector_dim is None else param.narrow(vector_dim, 0, 1))
        self._square = self._denom = None  # work buffers reused by every step (no allocation per step)

    def current_lr(self) -> float:
        """Step size of the next update (cosine annealing as ``torch.optim.lr_scheduler.CosineAnnealingLR``)."""
        frac = min(self.t, self.steps) / self.steps
        return self.lr_end + 0.5 * (self.lr - self.lr_end) * (1.0 + math.cos(math.pi * frac))

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``param.grad`` (no-op when there is no gradient)."""
        grad = self.param.grad
        if grad is None:
            return
        lr = self.current_lr()
        self.t += 1
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        if self.vector_dim is None:
            self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        else:
            # the squared gradient in a buffer kept between steps (the bits of grad.square())
            sq = self._square
            if sq is None or sq.shape != grad.shape or sq.dtype != grad.dtype or sq.stride() != grad.stride():
                self._square = torch.empty_like(grad)  # grad's layout: the reduction below sums in the same order
            torch.mul(grad, grad, out=self._square)
            self.v.mul_(self.b2).add_(self._square.mean(self.vector_dim, keepdim=True), alpha=1 - self.b2)
        if self._denom is None:
            self._denom = torch.empty_like(self.v)
        denom = torch.div(self.v, 1 - self.b2 ** self.t, out=self._denom).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - self.b1 ** self.t))
