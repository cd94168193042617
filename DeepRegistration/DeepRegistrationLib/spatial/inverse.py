"""The inverse of the engine's transform (moving → fixed LPS points) and how exactly it inverts.

The engine's transform is ``T(x) = A (x + u(x))`` (fixed → moving, LPS mm, see
:mod:`DeepRegistrationLib.spatial.transforms`). Its inverse is written as

    ``T⁻¹(y) = z + w(z)`` with ``z = A⁻¹ y``,

a displacement ``w`` on the same fixed-space grid as ``u``, applied after the inverse affine. ``w`` must
satisfy ``z + w(z) + u(z + w(z)) = z``, i.e. ``w(z) = -u(z + w(z))``:

- for a stationary velocity field ``v`` (``u = exp(v) - id``) it is ``exp(-v) - id``, integrated by the
  same scaling and squaring as the forward field (exact up to the integration's discretization);
- for any other field it is found by the fixed-point iteration ``w ← -u(z + w)`` (converges where
  ``|∇u| < 1``; it stops when the largest residual is below ``tol_mm``).

As an ITK transform the inverse is ``CompositeTransform([w, A⁻¹])`` (the last added, ``A⁻¹``, is applied
first), readable by SimpleITK, ANTs and Slicer like ``transform.h5``. :func:`consistency_error` measures
``|T(T⁻¹(y)) - y|`` in mm at moving-space points (the moving image's mask or foreground).

Sampling goes through :mod:`DeepRegistrationLib.spatial.warp` (the engine's one ``grid_sample`` caller).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from . import warp as W
from ..core.grid import Grid
from .transforms import SpatialTransform, scaling_and_squaring

logger = logging.getLogger(__name__)

#: Fixed-point iteration limits: stop when the largest residual ``|z + w + u(z + w) - z|`` is below
#: ``TOL_MM``; or, from iteration ``SETTLED_AFTER`` on, when no more than ``SETTLED_FRACTION`` of the grid
#: points still move by more than ``SETTLED_MM`` (a field whose steepest spot converges slowly: measured on the 1 mm ICBM152-Colin27 pair,
#: after 20 iterations the 99.9th percentile residual was 0.0007 mm and 326 of ~1 M points moved by more
#: than 0.01 mm, while the largest residual fell only as ~1/n: 0.61 mm after 20, 0.20 mm after 100, 17 s);
#: or after ``MAX_ITERATIONS``. The largest residual is reported either way.
TOL_MM = 1e-3
MAX_ITERATIONS = 100
SETTLED_AFTER = 20
SETTLED_MM = 1e-2
SETTLED_FRACTION = 1e-4
#: A grid point whose fixed-point step fell below ``FROZEN_MM``, or a tenth of the tolerance if that is smaller
#: (0.001 mm for the written inverse, 0.0001 mm for :data:`TOL_MM`), stops iterating: every point's iteration
#: ``w(z) ← -u(z + w(z))`` is independent of the others'. Steps above 0.001 / 0.0001 mm after iteration 2: 44 % /
#: 76 % of the points of the 2 mm trunk CT (57 % / 87 % of the 2 mm synthetic brain), after 3: 3 % / 26 % (20 % /
#: 46 %), after 4: 0.3 % / 3 % (3 % / 19 %). Its error there is about the step (contraction where ``|∇u| < 1/2``).
#: Measured (1 thread, CPU s, loaded machine) with the written inverse's rule, against iterating every point:
#: 2 mm trunk CT 6.0–7.3 → 3.1–3.3 s (4.8 s with 0.0001 mm), 2 mm synthetic pair 0.51–0.58 → 0.38 s, bundled pair
#: 0.15–0.19 → 0.12–0.15 s; the same iteration counts; the written field changed by at most 0.0007 mm (0.00006 mm
#: with 0.0001 mm), the consistency error's mean and p95 by at most 0.00001 mm, its maximum by 0.0001 mm.
FROZEN_MM = 1e-3
#: The tolerance the written ``inverse.h5`` is iterated to (:func:`DeepRegistrationLib.registration.run.run_registration`).
#: The consistency error over the moving foreground stops changing long before: on the 2 mm synthetic Colin27
#: pair (seed 0) its mean and p95 were 0.0160 / 0.0397 mm after 5 iterations (largest grid residual 0.027 mm),
#: 6 (0.0098 mm), 9 (0.0005 mm) and 20 (0.00001 mm) alike; what is left is the interpolation of ``w``.
WRITE_TOL_MM = 1e-2
#: The settled rule of the written ``inverse.h5``: from iteration ``WRITE_SETTLED_AFTER`` on, stop once no more than
#: ``WRITE_SETTLED_FRACTION`` of the grid points move by more than ``SETTLED_MM``. On the 1 mm ICBM152-Colin27
#: pair the library's rule (20, 1e-4) ran 33 iterations (3.5 s on 2 threads) for a consistency error of
#: mean / p95 / max 0.0538 / 0.1341 / 0.4214 mm; this one stops after 13 (1.5 s) at 0.0540 / 0.1344 / 0.4203 mm
#: (the slow points are a few steep spots that the consistency error hardly sees); the 2 mm and 1 mm synthetic
#: pairs reach ``WRITE_TOL_MM`` after 6 iterations either way.
WRITE_SETTLED_AFTER = 8
WRITE_SETTLED_FRACTION = 1e-3
#: Moving-space points :func:`consistency_error` is estimated on (the default of :func:`foreground_points`: a
#: deterministic subsample of the foreground): on the bundled pair and the 2 mm synthetic pair the mean
#: and the p95 of 20,000 points were within 0.3 % of those over all foreground voxels (66 k and 211 k); the
#: sample's maximum is a lower bound of the maximum (0.17 vs 0.27 mm, 0.13 vs 0.16 mm).
CONSISTENCY_POINTS = 20_000


@dataclass
class InverseTransform:
    """``T⁻¹(y) = z + w(z)``, ``z = A⁻¹ y``: moving LPS points (mm) to fixed LPS points (mm).

    Attributes:
        affine_inverse: 4×4 LPS matrix ``A⁻¹`` (float64).
        field: Displacement ``w`` ``(3, Z, Y, X)``, LPS mm, components (x, y, z), on ``field_grid``
            (fixed space); None for a linear transform.
        field_grid: Grid of ``field`` (the forward field's grid).
        method: ``"linear"`` (matrix inverse), ``"velocity"`` (negated velocity) or ``"fixed-point"``.
        iterations: Fixed-point iterations used (0 otherwise).
        residual_max_mm: Largest fixed-point residual on the grid when it stopped (0 otherwise).
    """

    affine_inverse: np.ndarray
    field: np.ndarray | None = None
    field_grid: Grid | None = None
    method: str = "linear"
    iterations: int = 0
    residual_max_mm: float = 0.0

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Maps moving LPS points ``(N, 3)`` mm to fixed LPS points ``(N, 3)`` mm."""
        pts = W.points_to_tensor(points, dtype=torch.float64)
        z = W.apply_affine(pts, torch.as_tensor(self.affine_inverse, dtype=torch.float64))
        if self.field is not None:
            w = W.sample_field(torch.as_tensor(self.field, dtype=torch.float64)[None], self.field_grid, z)
            z = z + torch.movedim(w, 1, -1)
        return z.reshape(-1, 3).numpy()

    def to_sitk(self) -> sitk.Transform:
        """ITK ``CompositeTransform([DisplacementFieldTransform(w), AffineTransform(A⁻¹)])`` (A⁻¹ first)."""
        composite = sitk.CompositeTransform(3)
        if self.field is not None:
            vec = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(np.asarray(self.field), 0, -1),
                                                              dtype=np.float64), isVector=True)  # w is channels-last
            self.field_grid.apply_to_sitk(vec)
            composite.AddTransform(sitk.DisplacementFieldTransform(vec))
        aff = sitk.AffineTransform(3)
        aff.SetMatrix(tuple(float(v) for v in self.affine_inverse[:3, :3].ravel()))
        aff.SetTranslation(tuple(float(v) for v in self.affine_inverse[:3, 3]))
        composite.AddTransform(aff)
        return composite

    def summary(self) -> dict:
        """JSON-friendly description for ``report.json``."""
        return {"method": self.method, "iterations": int(self.iterations),
                "grid_residual_max_mm": round(float(self.residual_max_mm), 6),
                "convention": "moving -> fixed (resampling direction for fixed-space data onto the moving "
                              "image), ITK CompositeTransform [displacement, affine^-1]: "
                              "T^-1(y) = z + w(z), z = A^-1 y"}


def invert_field(field: np.ndarray, grid: Grid, tol_mm: float = TOL_MM, max_iterations: int = MAX_ITERATIONS,
                 device=None, settled_after: int = SETTLED_AFTER,
                 settled_fraction: float = SETTLED_FRACTION) -> tuple[np.ndarray, int, float]:
    """The inverse displacement ``w`` of ``x ↦ x + u(x)`` by fixed-point iteration ``w ← -u(z + w)``.

    Args:
        field: ``u`` ``(3, Z, Y, X)``, LPS mm, components (x, y, z), on ``grid``.
        grid: Grid of ``field``; ``w`` is returned on the same grid.
        tol_mm: Stop when the largest residual ``|w(z) + u(z + w(z))|`` on the grid is below this (over
            the grid points whose ``z + w(z)`` lies within the grid; beyond it ITK's ``u`` is 0 and the
            iteration repeats the border values instead).
        max_iterations: Upper bound on iterations; from iteration ``settled_after`` on, the iteration also
            stops once no more than ``settled_fraction`` of the points still move by more than
            :data:`SETTLED_MM`.
        device: torch device (CPU by default). Computed in float32 (the precision of the forward field;
            float32 positions of a 40 cm grid resolve 0.00003 mm, and float64 sampling took 1.6× as long).

    Returns:
        ``(w (3, Z, Y, X) float64 mm, iterations, largest residual in mm)``.
    """
    u = torch.as_tensor(np.asarray(field), dtype=torch.float32, device=device)[None]
    zt = W.grid_points(grid, u.device, torch.float32).reshape(-1, 3)
    wt = -torch.movedim(u[0], 0, -1).reshape(-1, 3)  # (N, 3), channels last like the sampling points
    # the points still iterated: their positions zt, current w and indices into the grid (all at first)
    index = torch.arange(zt.shape[0], device=u.device)
    w = torch.empty(wt.shape, dtype=wt.dtype, device=wt.device)  # channels-last memory (wt is a strided view)
    frozen_sq = min(FROZEN_MM, tol_mm / 10.0) ** 2
    frozen_inside = 0  # frozen points whose image z + w lies within the grid
    residual = float("inf")
    n = 0
    for n in range(1, max_iterations + 1):
        # border values repeat while iterating (a smooth map to invert); the residual counts only points
        # whose image z + w lies within the grid, where u is what ITK applies
        target = zt + wt
        m = target.shape[0]
        norm = W.world_to_normalized(target, grid)  # once: for the sampling and for the in-grid test
        sampled = W.sample_normalized(u, grid, norm.view(1, m, 1, 1, 3), padding_mode="border").view(3, m)
        # negated into channels-last memory: every later step reads w like the positions, row by row
        new = torch.neg(sampled.t(), out=torch.empty((m, 3), dtype=wt.dtype, device=wt.device))
        inside = norm.abs_().amax(dim=-1) <= 1.0
        # squared steps, square-rooted once (torch's vector norm over the component axis took 0.24 s per call
        # on a 1 mm brain grid; the sum of squares takes a few ms)
        step_sq = (new - wt).square_().sum(dim=-1)
        squared = torch.where(inside, step_sq, 0.0)
        residual = float(squared.max().sqrt()) if squared.numel() else 0.0
        wt = new
        if residual < tol_mm:
            break
        if n >= settled_after and (int((squared > SETTLED_MM ** 2).sum())
                                   <= settled_fraction * (frozen_inside + int(inside.sum()))):
            break
        # a point whose step fell below FROZEN_MM has converged: it leaves the iteration (each point's
        # iteration is independent of the others'), once that spares a fifth of the points (copying the
        # others out costs about a tenth of an iteration per point; until then converged points go on)
        still = step_sq > frozen_sq
        if 5 * int(still.sum()) <= 4 * m:
            converged = ~still
            done = torch.nonzero(converged).squeeze(1)
            w.index_copy_(0, index.index_select(0, done), wt.index_select(0, done))
            frozen_inside += int((inside & converged).sum())  # the frozen points' in-grid count, without a gather
            keep = torch.nonzero(still).squeeze(1)
            zt, wt, index = zt.index_select(0, keep), wt.index_select(0, keep), index.index_select(0, keep)
    w.index_copy_(0, index, wt.contiguous())
    if residual >= tol_mm and n == max_iterations:
        logger.warning("field inversion stopped after %d iterations with a largest grid residual of %.3g mm "
                       "(the field may fold or be too steep to invert exactly)", n, residual)
    # float64, channels last in memory: the (3, Z, Y, X) array is a view that ITK's vector image takes as it is
    w = w.reshape(*grid.shape, 3).double().cpu().numpy()
    return np.moveaxis(w, -1, 0), n, residual


def invert(transform: SpatialTransform, velocity: np.ndarray | None = None, velocity_steps: int = 7,
           tol_mm: float = TOL_MM, max_iterations: int = MAX_ITERATIONS, device=None,
           settled_after: int = SETTLED_AFTER, settled_fraction: float = SETTLED_FRACTION) -> InverseTransform:
    """The inverse of ``T(x) = A (x + u(x))``.

    Args:
        transform: The forward transform (fixed → moving, LPS mm).
        velocity: Optional stationary velocity ``v`` ``(3, Z, Y, X)`` LPS mm on ``transform.field_grid``
            with ``u = exp(v) - id``: the inverse is then ``exp(-v) - id`` (scaling and squaring with
            ``velocity_steps`` squarings, as the forward field).
        velocity_steps: Squarings of the scaling and squaring.
        tol_mm / max_iterations / settled_after / settled_fraction: Fixed-point stopping rule (see
            :func:`invert_field`).
        device: torch device for the field computations (CPU by default).

    Returns:
        :class:`InverseTransform`.
    """
    a_inv = np.linalg.inv(np.asarray(transform.affine, dtype=np.float64))
    if transform.field is None:
        return InverseTransform(a_inv)
    grid = transform.field_grid
    if velocity is not None:
        v = torch.as_tensor(np.asarray(velocity), dtype=torch.float64, device=device)[None]
        if tuple(v.shape[2:]) != tuple(grid.shape):
            raise ValueError(f"velocity shape {tuple(v.shape[2:])} does not match the field grid {grid.shape}")
        w = scaling_and_squaring(-v, grid, velocity_steps)[0].cpu().numpy()
        return InverseTransform(a_inv, w, grid, "velocity")
    w, n, residual = invert_field(transform.field, grid, tol_mm, max_iterations, device, settled_after,
                                  settled_fraction)
    return InverseTransform(a_inv, w, grid, "fixed-point", n, residual)


def foreground_points(array: np.ndarray, grid: Grid, mask: np.ndarray | None = None,
                      max_points: int = CONSISTENCY_POINTS, threshold: float = 0.1,
                      max_voxels: int = 2_000_000) -> np.ndarray:
    """LPS points (mm) of an image's mask, or of its foreground, for measuring consistency.

    Deterministic: an image of more than ``max_voxels`` voxels is first thinned to every s-th voxel along each
    axis (the smallest s that leaves at most ``max_voxels``), then every n-th selected voxel is taken (in
    array order) so that at most ``max_points`` remain.

    Args:
        array: Image ``(Z, Y, X)`` on ``grid``.
        grid: Its grid.
        mask: Optional boolean ``(Z, Y, X)``; when None (or empty) the foreground is the voxels brighter
            than ``threshold`` × the 99th percentile of the image (all voxels if none is).
        max_points: At most this many points are returned.
        max_voxels: Voxels looked at (see above).

    Returns:
        ``(N, 3)`` LPS mm.
    """
    shape = np.asarray(np.shape(array))
    s = 1
    while int(np.prod(-(-shape // s))) > max_voxels:
        s += 1
    sub = (slice(None, None, s),) * 3
    sel = None if mask is None else np.asarray(mask, dtype=bool)[sub]
    if sel is None or not sel.any():
        a = np.asarray(array)[sub]
        sel = a > threshold * np.percentile(a, 99)
        if not sel.any():
            sel = np.ones(a.shape, dtype=bool)
    k, j, i = np.nonzero(sel)
    step = max(1, int(np.ceil(len(i) / max_points)))
    ijk = s * np.stack([i[::step], j[::step], k[::step]], axis=-1).astype(np.float64)
    m = grid.index_to_world
    return ijk @ m[:3, :3].T + m[:3, 3]


def consistency_error(transform: SpatialTransform, inverse: InverseTransform, points: np.ndarray) -> dict:
    """``|T(T⁻¹(y)) - y|`` in mm at moving-space points ``y``.

    Args:
        transform: Forward transform (fixed → moving).
        inverse: Its inverse (moving → fixed).
        points: ``(N, 3)`` moving LPS points (mm), e.g. :func:`foreground_points` of the moving image.

    Returns:
        ``{"mean_mm", "p95_mm", "max_mm", "n"}``.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    err = np.linalg.norm(transform.map_points(inverse.map_points(pts)) - pts, axis=1)
    return {"mean_mm": float(err.mean()), "p95_mm": float(np.percentile(err, 95)), "max_mm": float(err.max()),
            "n": int(len(err))}
