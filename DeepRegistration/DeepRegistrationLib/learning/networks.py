"""Learned field predictors that plug into the pipeline's :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor` slot.

:class:`UNetFieldPredictor` is a VoxelMorph-style 3D U-Net (2 input channels: the fixed image and the
affinely aligned moving image on the fixed working grid, intensities in [0, 1]; or, with
``input_features="local-contrast"``, their :func:`local_contrast`, which a linear contrast change does not
alter). Its raw output is a field in **voxels of the working grid along (i, j, k)**: a displacement, or a stationary velocity
(``output="svf"``) integrated by scaling and squaring (diffeomorphic). :meth:`~UNetFieldPredictor.field_mm`
converts it to LPS mm with the grid's direction and spacing, so a model trained at one orientation works
at any other. Blocks are plain 3×3×3 convolutions (``block="conv"``) or depthwise-separable
(``block="separable"``, MobileNet-style, ~5× fewer weights for CPU). Inputs of any size are padded to a
multiple of ``2 ** depth`` and the output cropped back; :func:`depth_for_shape` picks the depth from the
working image size.

Models on disk (safetensors + JSON card, never a pickle) are handled by
:mod:`~DeepRegistrationLib.learning.model_files` (``save_model`` / ``load_model``), which imports this module, never the
other way round.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..spatial import warp as W
from ..core.grid import Grid
from ..spatial.filters import box_filter
from ..spatial.transforms import scaling_and_squaring

BLOCKS = ("conv", "separable")
OUTPUTS = ("displacement", "svf")
INPUT_FEATURES = ("intensity", "local-contrast")


def local_contrast(image: torch.Tensor, radius: int = 2, floor: float = 0.05) -> torch.Tensor:
    """How far each voxel is from its neighbourhood's mean, in local standard deviations, mapped to [0, 1).

    ``z = |I − mean| / sqrt(var + floor²)`` over ``(2·radius + 1)³`` windows, returned as ``z / (1 + z)``, for
    images ``(B, 1, Z, Y, X)`` normalized to [0, 1]. Any local linear intensity map ``a·I + b`` (``a ≠ 0``: an
    inverted contrast too) leaves ``z`` unchanged where the window's spread exceeds ``floor`` (which keeps
    noise in flat regions small): a network fed these sees a T1 and a T2-like image of the same anatomy alike.
    """
    mean, mean_sq = torch.split(box_filter(torch.cat([image, image * image], 1), radius), 1, 1)
    z = (image - mean).abs() / torch.sqrt((mean_sq - mean * mean).clamp_min(0) + floor * floor)
    return z / (1.0 + z)


def depth_for_shape(shape: Sequence[int], min_size: int = 6, max_depth: int = 4) -> int:
    """Number of down-sampling levels so the coarsest level keeps at least ``min_size`` voxels per axis.

    Args:
        shape: Working image shape ``(Z, Y, X)``.
        min_size: Smallest extent (voxels) allowed at the coarsest level.
        max_depth: Upper bound on the depth.
    """
    smallest = max(1, min(int(s) for s in shape))
    return int(max(1, min(max_depth, math.floor(math.log2(max(smallest / min_size, 1.0))) or 1)))


class _Block(torch.nn.Module):
    """Conv (3×3×3) or depthwise-separable conv (3×3×3 depthwise + 1×1×1 pointwise), then LeakyReLU."""

    def __init__(self, cin: int, cout: int, block: str, stride: int = 1):
        super().__init__()
        if block == "conv":
            self.conv = torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        else:
            self.conv = torch.nn.Sequential(
                torch.nn.Conv3d(cin, cin, 3, stride=stride, padding=1, groups=cin),
                torch.nn.Conv3d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


class UNetFieldPredictor(torch.nn.Module):
    """A U-Net predicting a dense field from (fixed, moving) working-grid images.

    Args:
        channels: Feature channels per level; ``len(channels) - 1`` is the depth (number of halvings).
        max_displacement_voxels: The raw output is ``tanh``-bounded to this many voxels.
        block: ``"conv"`` or ``"separable"`` (depthwise-separable, lighter).
        output: ``"displacement"`` or ``"svf"`` (stationary velocity, integrated by scaling and squaring).
        integration_steps: Squarings for ``"svf"``.
        input_features: ``"intensity"`` (the images as given) or ``"local-contrast"`` (:func:`local_contrast`
            of each image, computed inside the network: unchanged by local linear contrast changes, inversion
            included).
        seg_classes: With N > 0, a segmentation head on the shared encoder-decoder features (multi-task
            registration + segmentation): logits of N classes (0 = background) for the fixed image and for
            the moving image (:meth:`segment`).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 32, 32), max_displacement_voxels: float = 8.0,
                 block: str = "conv", output: str = "displacement", integration_steps: int = 6,
                 seg_classes: int = 0, input_features: str = "intensity"):
        super().__init__()
        if input_features not in INPUT_FEATURES:
            raise ValueError(f"input_features must be one of {INPUT_FEATURES}, not {input_features!r}")
        self.input_features = input_features
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, not {block!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        if len(channels) < 2:
            raise ValueError("channels needs at least 2 levels")
        self.channels = tuple(int(c) for c in channels)
        self.max_displacement_voxels = float(max_displacement_voxels)
        self.block = block
        self.output = output
        self.integration_steps = int(integration_steps)
        ch = self.channels
        self.stem = _Block(2, ch[0], "conv")  # the first block is always a full conv (2 input channels)
        self.down = torch.nn.ModuleList(_Block(ch[i], ch[i + 1], block, stride=2) for i in range(len(ch) - 1))
        self.up = torch.nn.ModuleList(_Block(ch[i + 1] + ch[i], ch[i], block) for i in reversed(range(len(ch) - 1)))
        # a 3×3×3 head initialized to zero: an untrained model predicts the identity
        self.head = torch.nn.Conv3d(ch[0], 3, 3, padding=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.seg_classes = int(seg_classes)
        self.seg_head = torch.nn.Conv3d(ch[0], 2 * self.seg_classes, 3, padding=1) if self.seg_classes > 0 else None

    @property
    def depth(self) -> int:
        return len(self.channels) - 1

    @property
    def multiple(self) -> int:
        return 2 ** self.depth

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, with_segmentation: bool = False):
        """Raw field in voxels ``(B, 3, Z, Y, X)``, components (i, j, k), for inputs ``(B, 1, Z, Y, X)``.

        A displacement for ``output="displacement"``, a velocity for ``"svf"`` (see :meth:`field_mm`).
        ``with_segmentation`` (multi-task models): returns ``(field, logits)``, logits ``(B, 2N, Z, Y, X)``:
        N classes of the fixed image, then N of the moving image.
        """
        if self.input_features == "local-contrast":
            fixed, moving = local_contrast(fixed), local_contrast(moving)
        x = torch.cat([fixed, moving], 1)
        shape = x.shape[2:]
        pad = []
        for n in reversed(shape):
            pad += [0, (-n) % self.multiple]
        x = self.stem(F.pad(x, pad))
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = up(torch.cat([x, skip], 1))
        out = self.head(x)[:, :, :shape[0], :shape[1], :shape[2]]
        field = self.max_displacement_voxels * torch.tanh(out / self.max_displacement_voxels)
        if not with_segmentation:
            return field
        if self.seg_head is None:
            raise ValueError("this model has no segmentation head (seg_classes = 0)")
        return field, self.seg_head(x)[:, :, :shape[0], :shape[1], :shape[2]]

    def segment(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Label maps ``(B, 1, Z, Y, X)`` int64 of the fixed and the moving image (argmax of the
        segmentation head), for working-grid inputs ``(B, 1, Z, Y, X)`` normalized to [0, 1]."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            _, logits = self(fixed, moving, with_segmentation=True)
        self.train(was_training)
        n = self.seg_classes
        return logits[:, :n].argmax(1, keepdim=True), logits[:, n:].argmax(1, keepdim=True)

    def field_mm(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Differentiable displacement ``(B, 3, Z, Y, X)`` in LPS mm on ``grid`` (components x, y, z).

        ``warped(x) = moving(x + u(x))``; for ``"svf"`` the velocity is converted to mm and integrated.
        """
        return self.raw_to_mm(self(fixed, moving), grid)

    def raw_to_mm(self, raw: torch.Tensor, grid: Grid) -> torch.Tensor:
        """The network's output ``(B, 3, Z, Y, X)`` (voxel steps of ``grid``, components i, j, k) as a displacement
        in LPS mm (components x, y, z, through ``grid.voxel_to_mm``); a velocity (``"svf"``) is then integrated."""
        m = torch.as_tensor(grid.voxel_to_mm, dtype=raw.dtype, device=raw.device)
        u = torch.einsum("ij,bjzyx->bizyx", m, raw)
        if self.output == "svf":
            u = scaling_and_squaring(u, grid, self.integration_steps)
        return u

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor:
        """:class:`FieldPredictor` interface: displacement ``(1, 3, Z, Y, X)`` in LPS mm on ``grid``."""
        self.to(fixed.device)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            u = self.field_mm(fixed, moving, grid)
        self.train(was_training)
        return u

    def config(self) -> dict:
        """The architecture as JSON-able values (what :meth:`from_config` needs)."""
        return {"architecture": "DeepRegistration.UNet", "channels": list(self.channels),
                "max_displacement_voxels": self.max_displacement_voxels, "block": self.block,
                "output": self.output, "integration_steps": self.integration_steps,
                "seg_classes": self.seg_classes, "input_features": self.input_features}

    @classmethod
    def from_config(cls, cfg: dict) -> "UNetFieldPredictor":
        """Builds an (untrained) network from :meth:`config`'s dict; raises KeyError/ValueError when invalid."""
        if cfg.get("architecture") != "DeepRegistration.UNet":
            raise ValueError(f"unknown architecture {cfg.get('architecture')!r}")
        return cls(tuple(cfg["channels"]), float(cfg["max_displacement_voxels"]), str(cfg["block"]),
                   str(cfg["output"]), int(cfg["integration_steps"]), int(cfg.get("seg_classes", 0)),
                   str(cfg.get("input_features", "intensity")))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class AtSpacing:
    """A :class:`FieldPredictor` that runs ``model`` at its own working spacing whatever the pipeline's grid.

    A network sees structures at the voxel size it was trained at. When the pipeline's working grid has
    another spacing (e.g. a 3 mm model starting a 2 mm optimization), the fixed and moving images are
    resampled onto a grid with the model's spacing covering the same field of view (same direction, centred;
    box-smoothed first when coarsening by more than 1.25×), the model predicts there, and the displacement
    (LPS mm) is resampled trilinearly back to the pipeline's grid (border values repeat beyond the coarse
    grid's outer voxel centres, at most one coarse voxel).

    Args:
        model: The network.
        spacing_mm: Its working spacing (isotropic mm); None = use the pipeline's grid as it is.
    """

    def __init__(self, model: UNetFieldPredictor, spacing_mm: float | None):
        self.model = model
        self.spacing_mm = None if spacing_mm is None else float(spacing_mm)

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Displacement ``(1, 3, Z, Y, X)`` in LPS mm on ``grid`` for inputs ``(1, 1, Z, Y, X)`` in [0, 1] on ``grid``."""
        if self.spacing_mm is None or np.allclose(grid.spacing, self.spacing_mm, rtol=0.02):
            return self.model.predict(fixed, moving, grid)
        coarse = grid.with_spacing(self.spacing_mm)
        if self.spacing_mm > 1.25 * min(grid.spacing):
            fixed, moving = box_filter(fixed, 1), box_filter(moving, 1)
        pts = W.grid_points(coarse, fixed.device, fixed.dtype)
        f_c = W.sample(fixed, grid, pts, padding_mode="border")
        m_c = W.sample(moving, grid, pts, padding_mode="border")
        u = self.model.predict(f_c, m_c, coarse)
        return W.sample(u, coarse, W.grid_points(grid, u.device, u.dtype), padding_mode="border")

