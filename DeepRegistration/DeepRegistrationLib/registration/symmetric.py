"""The midpoint frame of the symmetric (``--symmetric``) deformable stage: half of the affine on each side.

With the linear stage's fixed → moving matrix ``A`` split as ``A = H_m H_f`` (normally ``H_f = H_m = A^{1/2}``,
the principal matrix square root), the velocity ``v`` lives on a *midpoint grid* in the half-way space
``z = H_f x`` (fixed point ``x``) ``= H_m⁻¹ y`` (moving point ``y``). The fixed image is sampled at
``H_f⁻¹ exp(-v/2)(z)``, the moving one at ``H_m exp(v/2)(z)``; the full map is

    T = H_m ∘ exp(v) ∘ H_f = A ∘ exp(v_f),   v_f(x) = L_f⁻¹ v(H_f x)

(``L_f`` the linear part of ``H_f``): conjugating a flow by an affine map gives the flow of the pulled-back
velocity, so the exported transform keeps the engine's form ``A (x + u(x))`` with ``u = exp(v_f) - id`` and the
exact inverse ``exp(-v_f)``. Swapping the images turns ``A`` into ``A⁻¹``, ``(H_f, H_m)`` into
``(H_m⁻¹, H_f⁻¹)`` and ``v`` into ``-v`` on the same midpoint grid (:func:`midpoint_grid` depends only on the
pair): the objective of B → A is that of A → B, up to the linear stage's own convergence and interpolation.

All matrices are 4×4 LPS mm (float64 numpy); fields are ``(B, 3, Z, Y, X)`` LPS mm, components (x, y, z).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..core.grid import Grid
from ..spatial import warp as W

logger = logging.getLogger(__name__)


def matrix_sqrt(a: np.ndarray, tol: float = 1e-12, max_iter: int = 100) -> np.ndarray | None:
    """Principal square root of a 4×4 affine (Denman–Beavers iteration), or None where it does not converge
    (an eigenvalue on the closed negative real axis: a reflection, a rotation by 180°).

    Args:
        a: ``(4, 4)`` affine matrix (last row ``0 0 0 1``).

    Returns:
        ``(4, 4)`` float64 ``h`` with ``h @ h ≈ a`` (a real affine: last row ``0 0 0 1``), or None.
    """
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)) or np.linalg.det(a[:3, :3]) <= 0:
        return None
    y, z = a.copy(), np.eye(4)
    for _ in range(max_iter):
        try:
            y, z = 0.5 * (y + np.linalg.inv(z)), 0.5 * (z + np.linalg.inv(y))
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(y)):
            return None
        if np.abs(y @ y - a).max() <= tol * max(1.0, np.abs(a).max()):
            y[3] = (0.0, 0.0, 0.0, 1.0)
            return y
    return None


def half_affines(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(H_f, H_m)`` with ``H_m @ H_f = A``: both ``A^{1/2}`` (the midpoint frame), or, where the principal
    square root does not exist or does not converge, ``(I, A)`` (the fixed frame; logged)."""
    a = np.asarray(a, dtype=np.float64)
    h = matrix_sqrt(a)
    if h is None:
        logger.warning("symmetric: the affine has no principal square root (a rotation near 180 degrees?); "
                       "the velocity stays in the fixed image's frame")
        return np.eye(4), a.copy()
    return h, h


def midpoint_grid(fixed: Grid, moving: Grid, h_fixed: np.ndarray, h_moving: np.ndarray) -> Grid:
    """The velocity's grid in the half-way space: LPS-aligned, isotropic at the finer of the two grids'
    spacings, covering the fixed grid mapped by ``H_f`` and the moving grid mapped by ``H_m⁻¹`` (their union,
    so every fixed and moving voxel has a velocity). The same grid for the swapped pair."""
    pts = np.concatenate([_apply_np(h_fixed, fixed.corners()), _apply_np(np.linalg.inv(h_moving), moving.corners())])
    lo, hi = pts.min(0), pts.max(0)
    sp = float(min(min(fixed.spacing), min(moving.spacing)))
    size = np.maximum(1, np.ceil((hi - lo) / sp - 1e-6)).astype(int)
    origin = 0.5 * (lo + hi) - sp * (size - 1) / 2.0
    return Grid(shape=(size[2], size[1], size[0]), spacing=(sp, sp, sp), origin=tuple(origin))


def _apply_np(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """A 4×4 matrix applied to points ``(N, 3)`` (numpy)."""
    return pts @ m[:3, :3].T + m[:3, 3]


def _transport(field: torch.Tensor, grid: Grid, points: torch.Tensor, linear: torch.Tensor,
               target: Grid) -> torch.Tensor:
    """``linear · field(points · x)`` at the voxel centres ``x`` of ``target`` (``points`` 4×4, ``linear`` 3×3)."""
    pts = W.apply_affine(W.grid_points(target, field.device, field.dtype), points)
    return torch.einsum("ij,bj...->bi...", linear, W.sample_field(field, grid, pts))


def pull_back(field: torch.Tensor, grid: Grid, h: np.ndarray, target: Grid) -> torch.Tensor:
    """``L⁻¹ field(h x)`` at the voxel centres ``x`` of ``target``: a velocity on the midpoint grid expressed in
    the frame ``h`` maps into (``field`` ``(B, 3, Z, Y, X)`` on ``grid``; the result ``(B, 3, Z', Y', X')`` on
    ``target``; ``L`` is ``h``'s linear part)."""
    ht = torch.as_tensor(h, dtype=field.dtype, device=field.device)
    return _transport(field, grid, ht, torch.linalg.inv(ht[:3, :3]), target)


def push_forward(field: torch.Tensor, grid: Grid, h: np.ndarray, target: Grid) -> torch.Tensor:
    """The inverse of :func:`pull_back`: ``L field(h⁻¹ z)`` at the voxel centres ``z`` of ``target`` (a fixed-frame
    velocity or displacement, on ``grid``, expressed on the midpoint grid ``target``)."""
    ht = torch.as_tensor(h, dtype=field.dtype, device=field.device)
    return _transport(field, grid, torch.linalg.inv(ht), ht[:3, :3], target)
