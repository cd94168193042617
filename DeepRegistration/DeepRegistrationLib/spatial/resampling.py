"""Applying a :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform` to whole images at full resolution.

``warp_image(moving, fixed_grid, T)`` returns ``moving(T(x))`` for every voxel centre ``x`` of
``fixed_grid`` — what ITK/SimpleITK ``Resample`` does with our ``transform.h5`` (linear or
nearest-neighbour interpolation, border values up to half a voxel outside the moving image, 0 beyond). Work is done in slabs so a
181×217×181 image needs well under 1 GB.
"""
from __future__ import annotations

import numpy as np
import torch

from . import warp as W
from ..core.grid import Grid
from ..core.image import Image
from .transforms import SpatialTransform


def slab_grid(grid: Grid, k0: int, k1: int) -> Grid:
    """The sub-grid of slices ``k0 <= k < k1`` of ``grid`` (same voxels, same positions)."""
    origin = grid.index_to_world @ np.array([0.0, 0.0, k0, 1.0])
    return Grid((k1 - k0, grid.shape[1], grid.shape[2]), grid.spacing, tuple(origin[:3]), grid.direction)


def warp_image(image: Image, target: Grid, transform: SpatialTransform, interpolation: str = "linear",
               device=None, slab_voxels: int = 2_000_000) -> Image:
    """Resamples ``image`` (on its own grid) onto ``target`` through ``transform`` (target → image space).

    Args:
        image: The moving image, any dtype (labels: use ``interpolation="nearest"``).
        target: Grid to fill (usually the fixed image's full-resolution grid).
        transform: Fixed → moving map.
        interpolation: ``"linear"`` or ``"nearest"``.
        device: torch device (default CPU).
        slab_voxels: Voxels per processed slab (memory bound).

    Returns:
        Image on ``target`` with ``image``'s dtype (float32 stays float32; labels stay integer).
    """
    mode = {"linear": "bilinear", "nearest": "nearest"}[interpolation]
    vol = torch.as_tensor(np.ascontiguousarray(image.array), device=device)
    vol = vol.to(torch.float64 if interpolation == "nearest" else torch.float32)[None, None]
    field = None
    if transform.field is not None:
        field = torch.as_tensor(transform.field, dtype=torch.float32, device=device)[None]
    affine = torch.as_tensor(transform.affine, dtype=torch.float32, device=device)
    out = np.empty(target.shape, dtype=image.array.dtype if image.array.dtype != bool else np.uint8)
    step = max(1, slab_voxels // max(1, target.shape[1] * target.shape[2]))
    with torch.no_grad():
        for k0 in range(0, target.shape[0], step):
            k1 = min(target.shape[0], k0 + step)
            sub = slab_grid(target, k0, k1)
            pts = W.map_points(W.grid_points(sub, device), affine, field, transform.field_grid)
            vals = W.sample(vol, image.grid, pts.to(vol.dtype), mode=mode, padding_mode="itk")[0, 0]
            if np.issubdtype(out.dtype, np.integer):
                vals = torch.round(vals)
            out[k0:k1] = vals.cpu().numpy().astype(out.dtype)
    return Image(out, target, image.name)


def sample_on_grid(values: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """Linearly resamples a scalar map ``(Z, Y, X)`` on ``source`` onto ``target`` (border values repeat)."""
    vol = torch.as_tensor(np.ascontiguousarray(values), dtype=torch.float32)[None, None]
    out = np.empty(target.shape, dtype=np.float32)
    step = max(1, 2_000_000 // max(1, target.shape[1] * target.shape[2]))
    with torch.no_grad():
        for k0 in range(0, target.shape[0], step):
            k1 = min(target.shape[0], k0 + step)
            pts = W.grid_points(slab_grid(target, k0, k1))
            out[k0:k1] = W.sample(vol, source, pts, padding_mode="border")[0, 0].numpy()
    return out
