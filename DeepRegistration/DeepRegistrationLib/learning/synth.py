"""SynthMorph-style synthetic training pairs, generated on the fly with known deformations.

A pair is built from a label map ``L`` (random smooth shapes inside a random ellipsoid, or one of the
caller's label maps, randomly deformed): the moving labels are ``L``, the fixed labels are
``L(x + u(x))`` for a random smooth (diffeomorphic, stationary-velocity) displacement ``u``, and each
image gets its own random contrast per label, blur, bias field, gamma and noise — so a network trained
on them never sees a real contrast and learns to be contrast-agnostic. ``u`` is the exact answer:
``warped(x) = moving(x + u(x))`` matches the fixed image, so the same pairs serve the unsupervised,
semi-supervised (labels) and supervised (known field) losses.

Everything lives on a synthetic grid of isotropic ``spacing`` mm (identity direction, so LPS mm
components (x, y, z) are the index axes (i, j, k)); tensors are ``(B, C, Z, Y, X)``. All randomness
comes from one ``torch.Generator``, whose state :meth:`SynthPairs.state` saves for resuming.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..spatial import warp as W
from ..core.grid import Grid
from ..spatial.transforms import scaling_and_squaring


@dataclass
class SynthBatch:
    """One batch of synthetic pairs on ``grid``.

    Attributes:
        fixed / moving: ``(B, 1, Z, Y, X)`` float32 images in [0, 1].
        fixed_labels / moving_labels: ``(B, 1, Z, Y, X)`` int64 labels (0 = background).
        field: ``(B, 3, Z, Y, X)`` true displacement in mm (x, y, z) with ``fixed ≈ moving(x + u(x))``.
        grid: The synthetic grid (isotropic spacing, identity direction).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    field: torch.Tensor
    grid: Grid


def smooth_noise(batch: int, channels: int, shape: Sequence[int], scale: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on a grid ``scale`` times coarser and upsampled trilinearly, ``(B, C, Z, Y, X)``."""
    coarse = [max(2, int(round(s / scale))) for s in shape]
    noise = torch.randn(batch, channels, *coarse, generator=generator)
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def random_displacement(batch: int, grid: Grid, max_mm: float, scale: float,
                        generator: torch.Generator) -> torch.Tensor:
    """Random smooth diffeomorphic displacement ``(B, 3, Z, Y, X)`` in mm: exp of a smooth velocity.

    The velocity's largest component is ``max_mm`` times a random factor in [0.25, 1] per pair.
    """
    v = smooth_noise(batch, 3, grid.shape, scale, generator)
    amp = max_mm * (0.25 + 0.75 * torch.rand(batch, 1, 1, 1, 1, generator=generator))
    v = v / v.abs().amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6) * amp
    return scaling_and_squaring(v, grid, steps=5)


def warp(volume: torch.Tensor, field: torch.Tensor, grid: Grid, mode: str = "bilinear") -> torch.Tensor:
    """``volume(x + u(x))`` for ``volume`` ``(B, C, Z, Y, X)`` and ``field`` ``(B, 3, Z, Y, X)`` mm on ``grid``.

    Integer volumes are warped with nearest neighbour; values outside repeat the border.
    """
    pts = W.grid_points(grid, field.device, field.dtype) + torch.movedim(field, 1, -1)
    if volume.dtype.is_floating_point:
        return W.sample(volume, grid, pts, mode=mode, padding_mode="border")
    out = W.sample(volume.to(field.dtype), grid, pts, mode="nearest", padding_mode="border")
    return out.round().to(volume.dtype)


def random_label_maps(batch: int, shape: Sequence[int], num_labels: int, scale: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Random smooth shapes: argmax of ``num_labels - 1`` smooth noise channels inside a random ellipsoid.

    Returns:
        ``(B, 1, Z, Y, X)`` int64 labels; 0 outside the ellipsoid, 1..num_labels-1 inside.
    """
    logits = smooth_noise(batch, num_labels - 1, shape, scale, generator)
    labels = logits.argmax(1, keepdim=True) + 1
    axes = [torch.linspace(-1, 1, n) for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    radii = 0.6 + 0.35 * torch.rand(batch, 3, generator=generator)
    centre = 0.1 * (torch.rand(batch, 3, generator=generator) - 0.5)
    r2 = sum(((c - centre[:, i].view(-1, 1, 1, 1)) / radii[:, i].view(-1, 1, 1, 1)) ** 2
             for i, c in enumerate((zz, yy, xx)))
    return torch.where((r2 <= 1).unsqueeze(1), labels, torch.zeros_like(labels))


def labels_to_image(labels: torch.Tensor, num_labels: int, generator: torch.Generator,
                    noise: float = 0.05, bias: float = 0.3, means: torch.Tensor | None = None) -> torch.Tensor:
    """A random contrast of ``labels`` ``(B, 1, Z, Y, X)``: per-label mean and texture, blur, bias, gamma, noise.

    The background (label 0) is black in 80 % of the images (like skull-stripped or masked scans).
    Intensities are mapped to [0, 1] by the 0.5 / 99.5 percentiles, as the engine's preprocessing does.
    ``means`` ``(B, num_labels)`` imposes the per-label mean intensities (see :func:`random_label_means`).
    """
    b, _, *shape = labels.shape
    if means is None:
        means = random_label_means(b, num_labels, generator)
    stds = 0.1 * torch.rand(b, num_labels, generator=generator)
    flat = labels.view(b, -1)
    img = torch.gather(means, 1, flat) + torch.gather(stds, 1, flat) * torch.randn(flat.shape, generator=generator)
    img = img.view(b, 1, *shape)
    img = F.avg_pool3d(F.pad(img, (1,) * 6, mode="replicate"), 3, stride=1)  # partial-volume blur
    img = img * torch.exp(bias * smooth_noise(b, 1, shape, 8.0, generator))
    img = img.clamp_min(0) ** torch.exp(0.25 * torch.randn(b, 1, 1, 1, 1, generator=generator))
    img = img + noise * torch.rand(b, 1, 1, 1, 1, generator=generator) * torch.randn(img.shape, generator=generator)
    q = torch.quantile(img.view(b, -1), torch.tensor([0.005, 0.995]), dim=1).T  # (B, 2)
    lo, hi = q[:, 0].view(b, 1, 1, 1, 1), q[:, 1].view(b, 1, 1, 1, 1)
    return ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def random_label_means(batch: int, num_labels: int, generator: torch.Generator) -> torch.Tensor:
    """Random mean intensity per label ``(B, num_labels)`` in [0, 1]; background black in 80 % of the rows."""
    means = torch.rand(batch, num_labels, generator=generator)
    black = torch.rand(batch, generator=generator) < 0.8
    means[:, 0] = torch.where(black, torch.zeros(batch), means[:, 0])
    return means


class SynthPairs:
    """Endless stream of synthetic registration pairs with known fields.

    Args:
        shape: Image shape ``(Z, Y, X)``.
        spacing: Isotropic voxel size in mm (the model's working spacing).
        num_labels: Labels per random map (including background 0).
        max_displacement_mm: Largest velocity component of the random deformations.
        field_scale: Smoothness of the deformation (voxels between independent control values).
        label_scale: Size of random shapes (voxels).
        label_maps: Optional real label maps ``(Z, Y, X)`` int on this shape; when given, half the pairs
            start from one of them (randomly deformed) instead of random shapes.
        same_contrast: Give both images of a pair the same label intensities (mono-modal pairs); by
            default each image draws its own (multi-modal, contrast-agnostic training).
        seed: Seed of the generator.
    """

    def __init__(self, shape: Sequence[int] = (32, 32, 32), spacing: float = 2.0, num_labels: int = 16,
                 max_displacement_mm: float = 8.0, field_scale: float = 8.0, label_scale: float = 6.0,
                 label_maps: Sequence[np.ndarray] | None = None, same_contrast: bool = False, seed: int = 0):
        self.shape = tuple(int(s) for s in shape)
        self.grid = Grid(self.shape, (float(spacing),) * 3, (0.0, 0.0, 0.0))
        self.num_labels = int(num_labels)
        self.max_displacement_mm = float(max_displacement_mm)
        self.field_scale = float(field_scale)
        self.label_scale = float(label_scale)
        self.same_contrast = bool(same_contrast)
        self.label_maps = []
        for lm in label_maps or []:
            arr = np.asarray(lm)
            if arr.shape != self.shape:
                raise ValueError(f"label map shape {arr.shape} differs from the synthetic shape {self.shape}")
            _, inverse = np.unique(arr, return_inverse=True)  # consecutive labels
            self.num_labels = max(self.num_labels, int(inverse.max()) + 1)
            self.label_maps.append(torch.as_tensor(inverse.reshape(arr.shape), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(int(seed))

    def state(self) -> torch.Tensor:
        """The generator state (a uint8 tensor) for checkpoints."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def _base_labels(self, batch: int) -> torch.Tensor:
        g = self.generator
        labels = random_label_maps(batch, self.shape, self.num_labels, self.label_scale, g)
        if self.label_maps:
            use = torch.rand(batch, generator=g) < 0.5
            picks = torch.randint(len(self.label_maps), (batch,), generator=g)
            real = torch.stack([self.label_maps[int(i)] for i in picks]).unsqueeze(1)
            real = warp(real, random_displacement(batch, self.grid, self.max_displacement_mm / 2,
                                                  self.field_scale, g), self.grid)
            labels = torch.where(use.view(-1, 1, 1, 1, 1), real, labels)
        return labels

    def sample(self, batch: int = 1) -> SynthBatch:
        """Draws ``batch`` new pairs (see :class:`SynthBatch`)."""
        g = self.generator
        with torch.no_grad():
            moving_labels = self._base_labels(batch)
            u = random_displacement(batch, self.grid, self.max_displacement_mm, self.field_scale, g)
            fixed_labels = warp(moving_labels, u, self.grid)
            means = random_label_means(batch, self.num_labels, g) if self.same_contrast else None
            fixed = labels_to_image(fixed_labels, self.num_labels, g, means=means)
            moving = labels_to_image(moving_labels, self.num_labels, g, means=means)
        return SynthBatch(fixed, moving, fixed_labels, moving_labels, u, self.grid)
