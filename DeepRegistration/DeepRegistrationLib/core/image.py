"""The engine's image type: a voxel array with the :class:`~DeepRegistrationLib.core.grid.Grid` it lives on."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import Grid


@dataclass
class Image:
    """A 3D scalar image.

    Attributes:
        array: Voxel values, shape ``(Z, Y, X)`` (C order ``[k, j, i]``), float32 for intensities (or a CT's
            int16/uint16 as stored, exact in float32: ``read_image(..., keep_integer=True)``), an integer type
            for label maps, bool for masks.
        grid: Where the voxels are in LPS world space (mm).
        name: What the image is, for messages ("fixed image", "moving labels", ...).
    """

    array: np.ndarray
    grid: Grid
    name: str = "image"

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != tuple(self.grid.shape):
            raise ValueError(f"{self.name}: array shape {self.array.shape} != grid shape {self.grid.shape}")
