"""Learned displacement predictors that plug into the pipeline's :class:`~DeepRegistrationLib.pipeline.FieldPredictor` slot.

:class:`UNetFieldPredictor` wraps MONAI's ``UNet`` (2 input channels: fixed and affinely aligned moving
image on the fixed working grid; 3 output channels). Its output is a displacement in **voxels of the
working grid along (i, j, k)**, converted here to LPS mm with the grid's direction and spacing, so a
model trained at one orientation works at any other. Inputs of any size are padded to a multiple of
``2 ** depth`` and the output cropped back (no fixed input size).

Training and shipped weights come with the training issue; weights load with ``safetensors`` or
``torch.load(weights_only=True)``, never by unpickling arbitrary objects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .grid import Grid


class UNetFieldPredictor(torch.nn.Module):
    """A MONAI U-Net predicting a dense displacement from (fixed, moving) working-grid images.

    Args:
        channels: Feature channels per U-Net level (its length is the depth + 1).
        max_displacement_voxels: The output is ``tanh``-bounded to this many voxels.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32, 32), max_displacement_voxels: float = 8.0):
        super().__init__()
        from monai.networks.nets import UNet

        self.channels = tuple(channels)
        self.max_displacement_voxels = float(max_displacement_voxels)
        self.net = UNet(spatial_dims=3, in_channels=2, out_channels=self.channels[0], channels=self.channels,
                        strides=(2,) * (len(self.channels) - 1), num_res_units=1)
        # a 1×1×1 head initialized to zero: an untrained model predicts the identity
        self.head = torch.nn.Conv3d(self.channels[0], 3, kernel_size=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Displacement in voxels ``(B, 3, Z, Y, X)``, channel order (i, j, k), for inputs ``(B, 1, Z, Y, X)``."""
        x = torch.cat([fixed, moving], 1)
        shape = x.shape[2:]
        pad = []
        for n in reversed(shape):
            extra = (-n) % self.multiple
            pad += [0, extra]
        out = self.head(self.net(F.pad(x, pad)))
        out = out[:, :, :shape[0], :shape[1], :shape[2]]
        return self.max_displacement_voxels * torch.tanh(out / self.max_displacement_voxels)

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor:
        """:class:`FieldPredictor` interface: displacement ``(1, 3, Z, Y, X)`` in LPS mm on ``grid``."""
        self.to(fixed.device)
        vox = self(fixed, moving)
        m = torch.as_tensor(grid.direction_matrix * np.asarray(grid.spacing)[None, :], dtype=vox.dtype,
                            device=vox.device)
        return torch.einsum("ij,bjzyx->bizyx", m, vox)

    def config(self) -> dict:
        return {"architecture": "monai.UNet", "channels": list(self.channels),
                "max_displacement_voxels": self.max_displacement_voxels}


def save_predictor(model: UNetFieldPredictor, path: str | Path) -> Path:
    """Saves weights and a self-description (config, conventions) as a torch file of plain values.

    The file is a plain dict of tensors and JSON-able values, readable with ``weights_only=True``.
    """
    p = Path(path)
    torch.save({"config": model.config(), "conventions": "output voxels (i,j,k) of the fixed working grid",
                "state_dict": model.state_dict()}, p)
    return p


def load_predictor(path: str | Path) -> UNetFieldPredictor:
    """Loads a model saved by :func:`save_predictor` without executing pickled code.

    Raises:
        InputError: missing or corrupt file, or a file that is not a DeepRegistration model.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model file '{p}' does not exist. Check the path.")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        cfg = blob["config"]
        model = UNetFieldPredictor(tuple(cfg["channels"]), cfg["max_displacement_voxels"])
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # torch raises many types for corrupt files
        raise InputError(f"model file '{p}' is corrupt or not a DeepRegistration model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:150]}). Re-download or re-train it.") from None
    return model.eval()
