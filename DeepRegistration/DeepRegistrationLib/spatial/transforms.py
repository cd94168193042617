"""Spatial transforms: rigid/affine parameterizations, displacement and stationary-velocity fields,
composition, and conversion to ITK transforms.

Convention: every transform maps **fixed** LPS points (mm) to **moving** LPS points (the resampling
direction, as ITK/ANTs/elastix and Slicer's *FromParent*): ``warped(x) = moving(T(x))``. The engine's
full transform is ``T(x) = A (x + u(x))`` — a displacement field ``u`` on a grid in fixed space
followed by an affine ``A``. As an ITK ``CompositeTransform`` that is ``[A, u]`` (the last added
transform is applied first), which is also ANTs' ``[warp, affine]`` list order reversed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from . import warp as W
from ..core.grid import Grid
from ..io.itk_transform import from_itk, to_itk


# ---------------------------------------------------------------- rigid / affine parameterizations
def rotation_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``(3, 3)`` of a rotation vector ``(3,)`` (axis × angle in radians, Rodrigues)."""
    theta = torch.sqrt((rotvec * rotvec).sum() + 1e-24)
    k = rotvec / theta
    zero = torch.zeros((), dtype=rotvec.dtype, device=rotvec.device)
    kx = torch.stack([torch.stack([zero, -k[2], k[1]]), torch.stack([k[2], zero, -k[0]]),
                      torch.stack([-k[1], k[0], zero])])
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * (kx @ kx)


def params_to_matrix(params: torch.Tensor, kind: str, center: torch.Tensor) -> torch.Tensor:
    """4×4 LPS matrix from optimization parameters, acting about ``center``: ``y = M (x - c) + c + t``.

    Args:
        params: rigid: ``(6,)`` = rotation vector (rad, 3) + translation (mm, 3);
            affine: ``(12,)`` = translation (mm, 3) + the 9 entries of ``M - I`` (row-major).
        kind: ``"rigid"`` or ``"affine"``.
        center: ``(3,)`` LPS centre of rotation/scaling in mm (the fixed image's centre of mass).
    """
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    if kind == "rigid":
        m = rotation_matrix(params[:3])
        t = params[3:6]
    elif kind == "affine":
        t = params[:3]
        m = eye + params[3:12].view(3, 3)
    else:
        raise ValueError(f"unknown linear transform kind {kind!r}")
    out = torch.eye(4, dtype=params.dtype, device=params.device)
    out = out.clone()
    out[:3, :3] = m
    out[:3, 3] = center + t - m @ center
    return out


def affine_params_from_matrix(matrix: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Inverse of :func:`params_to_matrix` for kind ``"affine"``: ``(12,)`` parameters of a 4×4 matrix."""
    m = matrix[:3, :3]
    t = matrix[:3, 3] - center + m @ center
    return np.concatenate([t, (m - np.eye(3)).ravel()])


# ---------------------------------------------------------------- velocity fields
def scaling_and_squaring(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """Displacement of ``exp(v)`` for a stationary velocity field (diffeomorphic when steps suffice).

    Args:
        velocity: ``(B, 3, Z, Y, X)`` velocity in LPS mm on ``grid``.
        grid: The grid of ``velocity``.
        steps: Number of squarings (the field is divided by ``2**steps`` first).

    Returns:
        ``(B, 3, Z, Y, X)`` displacement in mm on ``grid``.
    """
    pts = W.grid_points(grid, velocity.device, velocity.dtype)
    disp = velocity / (2 ** steps)
    for _ in range(steps):
        disp = disp + W.sample_field(disp, grid, pts + torch.movedim(disp, 1, -1))
    return disp


# ---------------------------------------------------------------- the engine's transform
@dataclass
class SpatialTransform:
    """``T(x) = A (x + u(x))`` mapping fixed LPS points (mm) to moving LPS points.

    Attributes:
        affine: 4×4 LPS matrix A (float64).
        field: Displacement u, shape ``(3, Z, Y, X)``, LPS mm, components (x, y, z), on ``field_grid``;
            None for a purely linear transform.
        field_grid: Grid (in fixed space) of ``field``.
    """

    affine: np.ndarray
    field: np.ndarray | None = None
    field_grid: Grid | None = None

    @classmethod
    def identity(cls) -> "SpatialTransform":
        return cls(np.eye(4))

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Maps fixed LPS points ``(N, 3)`` mm to moving LPS points ``(N, 3)`` mm."""
        pts = W.points_to_tensor(points, dtype=torch.float64)
        field = None if self.field is None else torch.as_tensor(self.field, dtype=torch.float64)[None]
        out = W.map_points(pts, torch.as_tensor(self.affine, dtype=torch.float64), field, self.field_grid)
        return out.view(-1, 3).numpy()

    def total_displacement(self, grid: Grid, device=None) -> torch.Tensor:
        """``T(x) - x`` at the voxel centres of ``grid``, shape ``(1, 3, Z, Y, X)`` LPS mm (float32)."""
        pts = W.grid_points(grid, device)
        field = None if self.field is None else torch.as_tensor(self.field, device=device, dtype=torch.float32)[None]
        mapped = W.map_points(pts, torch.as_tensor(self.affine, device=device, dtype=torch.float32), field,
                              self.field_grid)
        return torch.movedim(mapped - pts, -1, 1)

    def to_sitk(self) -> sitk.Transform:
        """ITK transform with the same point mapping: a ``CompositeTransform`` ``[affine, displacement]``
        (see :func:`DeepRegistrationLib.io.itk_transform.to_itk`)."""
        return to_itk(self.affine, self.field, self.field_grid)

    @classmethod
    def from_sitk(cls, transform: sitk.Transform) -> "SpatialTransform":
        """Reads back what :meth:`to_sitk` (or ANTs' ``[affine, warp]`` composite) wrote."""
        return cls(*from_itk(transform))
