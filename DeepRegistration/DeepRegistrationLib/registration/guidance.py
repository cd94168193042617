"""Landmark guidance: corresponding points that steer a registration (not the evaluation landmarks).

Guide landmarks are read with :func:`DeepRegistrationLib.io.landmarks.read_landmarks` (Slicer ``.mrk.json``,
``.fcsv``, CSV) and paired by label with :func:`~DeepRegistrationLib.io.landmarks.match_landmarks`, exactly as
the landmarks that give the TRE. They serve twice:

- **initialization**: :func:`fit_linear` is the least-squares rigid (Kabsch) or affine fit mapping the
  fixed points onto the moving points (fixed → moving, LPS mm, the engine's transform direction);
  :func:`choose_initialization` keeps it over an image-based start when that start is far off on the points;
- **a term of the objective**: :class:`LandmarkTerm` is ``weight · mean_i |T(f_i) - m_i|²`` (mm²), evaluated
  through the stage's own point mapping ``T`` (the linear stage's matrix, the deformable stage's
  ``A (x + u(x))``), so it is differentiable in the transform's parameters.

Every problem with the input (one file missing, lists that cannot be paired, non-finite coordinates,
points outside their image, fewer than 3 points, collinear points) raises one :class:`InputError`
before any work.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..spatial import warp as W
from ..core.config import DEFAULT_GUIDE_WEIGHT
from ..core.errors import InputError
from ..core.grid import Grid
from ..io.landmarks import match_landmarks, read_landmarks

logger = logging.getLogger(__name__)

#: Default weight of the landmark term, per mm² (the configuration's default ``guide_weight``, where the
#: reason for the value is given).
DEFAULT_WEIGHT = DEFAULT_GUIDE_WEIGHT
#: Fewest point pairs for a linear fit (3 non-collinear points fix a rigid transform).
MIN_POINTS = 3
#: An image-based start is replaced by the point fit when its mean landmark distance exceeds the fit's
#: by more than this many mm.
FAR_OFF_MM = 5.0


@dataclass
class GuideLandmarks:
    """Paired guide points.

    Attributes:
        fixed: ``(N, 3)`` LPS mm, in the fixed image.
        moving: ``(N, 3)`` LPS mm, the corresponding points in the moving image.
        labels: The fixed list's labels of the pairs.
    """

    fixed: np.ndarray
    moving: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.fixed)

    def summary(self) -> dict:
        return {"n": len(self), "labels": list(self.labels)}


def _outside(points: np.ndarray, grid: Grid) -> np.ndarray:
    """True for LPS points outside ``grid``'s field of view (beyond half a voxel past the outer centres)."""
    ijk = points @ grid.world_to_index[:3, :3].T + grid.world_to_index[:3, 3]
    size = np.asarray(grid.size, dtype=float)
    return ((ijk < -0.5 - 1e-6) | (ijk > size - 0.5 + 1e-6)).any(axis=1)


def check_guide_points(fixed: np.ndarray, moving: np.ndarray, labels: list[str], fixed_grid: Grid | None = None,
                       moving_grid: Grid | None = None) -> None:
    """Raises :class:`InputError` unless the pairs can guide a registration.

    Args:
        fixed / moving: ``(N, 3)`` LPS mm.
        labels: Labels of the pairs (named in messages).
        fixed_grid / moving_grid: When given, every point must lie in its image's field of view.
    """
    fixed, moving = np.asarray(fixed, dtype=float), np.asarray(moving, dtype=float)
    if fixed.shape != moving.shape:
        raise InputError(f"guide landmarks: {len(fixed)} fixed points but {len(moving)} moving points after "
                         "matching. Give both lists the same points.")
    if not (np.isfinite(fixed).all() and np.isfinite(moving).all()):
        raise InputError("guide landmarks contain NaN or infinite coordinates. Fix or remove those points.")
    if len(fixed) < MIN_POINTS:
        raise InputError(f"guide landmarks: {len(fixed)} pair(s) found, at least {MIN_POINTS} are needed for a "
                         "point-based fit. Add corresponding points (4-8 well-spread ones work best).")
    for pts, grid, which in ((fixed, fixed_grid, "fixed"), (moving, moving_grid, "moving")):
        if grid is None:
            continue
        out = _outside(pts, grid)
        if out.any():
            names = ", ".join(labels[n] for n in np.flatnonzero(out)[:5])
            raise InputError(f"guide landmarks: {int(out.sum())} {which} point(s) lie outside the {which} image "
                             f"({names}). Check that the points belong to that image and are in LPS (or "
                             "state RAS in the file).")
    centred = fixed - fixed.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    if sv[1] < 1e-3 * max(sv[0], 1e-9):
        raise InputError("guide landmarks are (nearly) collinear: they cannot fix a rotation. Place at least "
                         "3 points that are not on one line, spread over the anatomy.")


def read_guide_landmarks(fixed_path, moving_path, fixed_grid: Grid | None = None,
                         moving_grid: Grid | None = None) -> GuideLandmarks:
    """Reads, pairs (by label, as for TRE) and checks the guide landmark files.

    Args:
        fixed_path / moving_path: Landmark files (both are required).
        fixed_grid / moving_grid: Grids of the images, to check the points lie inside them.

    Raises:
        InputError: see :func:`check_guide_points`, plus a missing file or lists that cannot be paired.
    """
    if fixed_path is None or moving_path is None:
        raise InputError("--guide-landmarks needs two files, FIXED and MOVING (the same points in each image).")
    fixed_pts, moving_pts, labels = match_landmarks(read_landmarks(fixed_path), read_landmarks(moving_path))
    check_guide_points(fixed_pts, moving_pts, labels, fixed_grid, moving_grid)
    return GuideLandmarks(fixed_pts, moving_pts, labels)


def fit_linear(fixed: np.ndarray, moving: np.ndarray, kind: str = "rigid") -> np.ndarray:
    """Least-squares 4×4 LPS matrix ``M`` with ``M f_i ≈ m_i`` (fixed → moving points, mm).

    Args:
        fixed / moving: ``(N, 3)`` LPS mm, ``N >= 3`` (see :func:`check_guide_points`).
        kind: ``"rigid"`` (rotation + translation, Kabsch/Umeyama without scaling) or ``"affine"``
            (12 parameters; needs 4 points not in one plane, otherwise the rigid fit is returned).

    Returns:
        ``(4, 4)`` float64.
    """
    f, m = np.asarray(fixed, dtype=np.float64), np.asarray(moving, dtype=np.float64)
    fc, mc = f.mean(axis=0), m.mean(axis=0)
    out = np.eye(4)
    if kind == "affine":
        sv = np.linalg.svd(f - fc, compute_uv=False)
        if len(f) >= 4 and sv[2] > 1e-2 * sv[0]:
            design = np.hstack([f - fc, np.ones((len(f), 1))])
            sol, *_ = np.linalg.lstsq(design, m - mc, rcond=None)
            out[:3, :3] = sol[:3].T
            out[:3, 3] = mc + sol[3] - out[:3, :3] @ fc
            return out
        logger.warning("guide landmarks: %d points lie (nearly) in one plane; fitting a rigid transform "
                       "instead of an affine one", len(f))
    elif kind != "rigid":
        raise ValueError(f"unknown linear fit kind {kind!r}")
    h = (f - fc).T @ (m - mc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    out[:3, :3] = r
    out[:3, 3] = mc - r @ fc
    return out


def point_distances(matrix_or_map, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """``|T(f_i) - m_i|`` in mm for a 4×4 matrix or a callable mapping ``(N, 3)`` fixed points to moving."""
    f = np.asarray(fixed, dtype=np.float64)
    if callable(matrix_or_map):
        mapped = np.asarray(matrix_or_map(f))
    else:
        a = np.asarray(matrix_or_map, dtype=np.float64)
        mapped = f @ a[:3, :3].T + a[:3, 3]
    return np.linalg.norm(mapped - np.asarray(moving, dtype=np.float64), axis=1)


def choose_initialization(image_start: np.ndarray, guide: GuideLandmarks, kind: str = "rigid",
                          far_off_mm: float = FAR_OFF_MM) -> tuple[np.ndarray, dict]:
    """The start of the linear stage: the image-based one unless the points say it is far off.

    Args:
        image_start: 4×4 fixed → moving matrix from the images (moments, search, ...).
        guide: The guide points.
        kind: Kind of the point fit (:func:`fit_linear`).
        far_off_mm: The point fit replaces the image start when the image start's mean point distance
            exceeds the fit's by more than this.

    Returns:
        ``(matrix, info)``; ``info`` holds both mean distances (mm) and which start was kept.
    """
    fit = fit_linear(guide.fixed, guide.moving, kind)
    d_image = float(point_distances(image_start, guide.fixed, guide.moving).mean())
    d_fit = float(point_distances(fit, guide.fixed, guide.moving).mean())
    use_fit = d_image > d_fit + far_off_mm
    info = {"guide_start": "landmark fit" if use_fit else "images", "guide_fit_kind": kind,
            "image_start_landmark_mean_mm": round(d_image, 4), "landmark_fit_mean_mm": round(d_fit, 4)}
    logger.info("guide landmarks: image start %.2f mm, %s point fit %.2f mm -> starting from the %s",
                d_image, kind, d_fit, info["guide_start"])
    return (fit if use_fit else np.asarray(image_start, dtype=np.float64)), info


class LandmarkTerm:
    """``weight · mean_i |T(f_i) - m_i|²`` (mm²): a differentiable term for the linear and deformable stages.

    Args:
        guide: The guide points.
        weight: Weight per mm² (default :data:`DEFAULT_WEIGHT`); 0 turns the term off.
        device / dtype: Where the point tensors live.

    The fixed points are held as a ``(1, N, 1, 1, 3)`` tensor (the layout :func:`warp.map_points` takes),
    the moving points as ``(N, 3)``.
    """

    def __init__(self, guide: GuideLandmarks, weight: float = DEFAULT_WEIGHT, device=None, dtype=torch.float32):
        self.weight = float(weight)
        self.fixed = W.points_to_tensor(guide.fixed, device=device, dtype=dtype)
        self.moving = torch.as_tensor(np.asarray(guide.moving), device=device, dtype=dtype)
        self.moving_points = W.points_to_tensor(guide.moving, device=device, dtype=dtype)

    def __call__(self, point_map: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The term for ``point_map`` (LPS fixed points ``(1, N, 1, 1, 3)`` → moving points, same shape)."""
        mapped = point_map(self.fixed).reshape(-1, 3)
        return self.weight * ((mapped - self.moving) ** 2).sum(dim=1).mean()

    def pairs(self, fixed_map: Callable[[torch.Tensor], torch.Tensor],
              moving_map: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``weight · mean_i |fixed_map(f_i) - moving_map(m_i)|²``: both point sets mapped into a common space
        (the symmetric mode's midpoint; each map takes and returns ``(1, N, 1, 1, 3)`` LPS mm)."""
        diff = (fixed_map(self.fixed) - moving_map(self.moving_points)).reshape(-1, 3)
        return self.weight * (diff ** 2).sum(dim=1).mean()

    def linear_symmetric(self, matrix: torch.Tensor) -> torch.Tensor:
        """The mean of the term for ``A`` (fixed → moving) and for ``A⁻¹`` with the point sets' roles swapped:
        unchanged when the images (and the points) are swapped (the symmetric mode's linear stage)."""
        forward = self(lambda p: W.apply_affine(p, matrix))
        inverse = torch.linalg.inv(matrix)
        backward = self.pairs(lambda f: f, lambda m: W.apply_affine(m, inverse))
        return 0.5 * (forward + backward)

    def linear(self, matrix: torch.Tensor) -> torch.Tensor:
        """The term for a 4×4 fixed → moving matrix (the linear stage)."""
        return self(lambda p: W.apply_affine(p, matrix))

    def deformable(self, affine: torch.Tensor, field: torch.Tensor, field_grid: Grid) -> torch.Tensor:
        """The term for ``A (x + u(x))`` with ``field`` ``(1, 3, Z, Y, X)`` mm on ``field_grid`` (the deformable stage)."""
        return self(lambda p: W.map_points(p, affine, field, field_grid))
