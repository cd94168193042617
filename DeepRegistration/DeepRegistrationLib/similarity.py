"""Image similarity losses (lower is better) on tensors ``(B, 1, Z, Y, X)`` sampled on one grid.

- ``lncc``: local normalized cross-correlation, ``1 - mean(cc²)`` over cubic windows of
  ``2 r + 1`` voxels (mono-modal; robust to smooth intensity changes).
- ``mi``: global mutual information with Parzen (Gaussian) histograms, from MONAI
  (``GlobalMutualInformationLoss``; multi-modal). Images must be normalized to [0, 1].
- ``mse``: mean squared difference (same modality and intensity scale).

``mask`` (bool or {0,1}, same shape) restricts the average to the voxels that matter (the fixed
mask, and where the moving image was sampled inside its field of view).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITIES = ("lncc", "mi", "mse")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _box_sum(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a ``(2r+1)³`` window (zeros outside) of ``(B, C, Z, Y, X)`` by running sums."""
    k = 2 * radius + 1
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


class LNCC:
    """Local normalized cross-correlation loss ``1 - mean(cc²)`` over ``(2r+1)³`` windows.

    The fixed image's local means and variances are cached between calls (the fixed image does
    not change during an optimization level), so each call filters only three warped-image terms.
    """

    def __init__(self, radius: int = 2, eps: float = 1e-5):
        self.radius = radius
        self.eps = eps
        self._key = None
        self._stats = None

    def _fixed_stats(self, fixed: torch.Tensor):
        key = (fixed.data_ptr(), tuple(fixed.shape), fixed.device, getattr(fixed, "_version", 0))
        if key != self._key:
            with torch.no_grad():
                mf, mff = torch.split(box_filter(torch.cat([fixed, fixed * fixed], 1), self.radius), 1, 1)
                self._stats = (mf, (mff - mf * mf).clamp_min(0))
            self._key = key
        return self._stats

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mf, var_f = self._fixed_stats(fixed)
        mw, mww, mfw = torch.split(box_filter(torch.cat([warped, warped * warped, fixed * warped], 1),
                                              self.radius), 1, 1)
        cross = mfw - mf * mw
        var_w = (mww - mw * mw).clamp_min(0)
        cc2 = cross * cross / (var_f * var_w + self.eps)
        return 1.0 - _masked_mean(cc2, mask)


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, radius: int = 2,
              mask: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean(cc²)``; cc is the Pearson correlation in a ``(2r+1)³`` window around each voxel."""
    return LNCC(radius, eps)(fixed, warped, mask)


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference."""
    return _masked_mean((fixed - warped) ** 2, mask)


class MutualInformation:
    """Negative global mutual information (MONAI's Parzen-window estimator), optionally masked."""

    def __init__(self, num_bins: int = 32):
        from monai.losses import GlobalMutualInformationLoss

        self.loss = GlobalMutualInformationLoss(num_bins=num_bins, sigma_ratio=0.5)

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            sel = mask.bool().expand_as(fixed)
            fixed = fixed[sel].view(1, 1, -1)
            warped = warped[sel].view(1, 1, -1)
        return self.loss(warped.clamp(0, 1), fixed.clamp(0, 1))


class Similarity:
    """A similarity loss chosen by name: ``Similarity("lncc", radius=2)(fixed, warped, mask)``."""

    def __init__(self, name: str, radius: int = 2):
        if name not in SIMILARITIES:
            raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
        self.name = name
        self.radius = radius
        self._mi = MutualInformation() if name == "mi" else None
        self._lncc = LNCC(radius) if name == "lncc" else None

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.name == "lncc":
            return self._lncc(fixed, warped, mask)
        if self.name == "mse":
            return mse_loss(fixed, warped, mask)
        return self._mi(fixed, warped, mask)


def global_ncc(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Pearson correlation of the two images over the mask (a comparable summary for reports)."""
    if mask is not None:
        sel = mask.bool().expand_as(fixed)
        fixed, warped = fixed[sel], warped[sel]
    f = fixed.flatten().double()
    w = warped.flatten().double()
    f = f - f.mean()
    w = w - w.mean()
    return float((f * w).sum() / (f.norm() * w.norm()).clamp_min(1e-12))
