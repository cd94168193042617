"""The inverse of the engine's transform (moving → fixed LPS points) and how exactly it inverts.

The engine's transform is ``T(x) = A (x + u(x))`` (fixed → moving, LPS mm, see
:mod:`DeepRegistrationLib.spatial.transforms`). Its inverse is written as

    ``T⁻¹(y) = z + w(z)`` with ``z = A⁻¹ y``,

a displacement ``w`` on the same fixed-space grid as ``u``, applied after the inverse affine. ``w`` must
satisfy ``z + w(z) + u(z + w(z)) = z``, i.e. ``w(z) = -u(z + w(z))``:

- for a stationary velocity field ``v`` (``u = exp(v) - id``) it is ``exp(-v) - id``, integrated by the
  same scaling and squaring as the forward field (exact up to the integration's discretization);
- for any other field it is found by the fixed-point iteration ``w ← -u(z + w)`` from the linearized fixed
  point (converges where ``|∇u| < 1``; it stops when the largest residual is below ``tol_mm``).

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
#: Measured (1 thread, CPU s, loaded machine; from ``w = -u(z)``, before the linearized start) with the written
#: inverse's rule, against iterating every point:
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
#: Points per block of :func:`invert_field`'s iteration on the CPU: each block's temporaries (~0.8 MB per (3, n)
#: float32 array) stay in cache and are reused by the allocator, where full-grid temporaries of a 4.6 M-point grid
#: (55 MB each) cost fresh pages at every operation.
BLOCK_POINTS = 1 << 16
#: Linearized iterations of the first guess (:func:`_linearized_start`). On the 2 mm trunk CT 50 % (one pass) or 37 %
#: (two) of the points need a second sampling, against all from ``w = -u(z)`` (whose converged points never made up
#: the fifth that lets them leave); two passes also leave the returned field's largest grid residual below that of
#: ``w = -u(z)`` on the bundled pair, the 2 mm synthetic pair and the CT (one pass: slightly above on two of them).
START_PASSES = 2


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

    The iteration starts from the linearized fixed point (:func:`_linearized_start`) instead of ``w = -u(z)``, runs
    in ``grid_sample``'s normalized coordinates (no conversion of the points at each step) and, on the CPU, in
    blocks of :data:`BLOCK_POINTS` points. A point whose step fell below :data:`FROZEN_MM` (or a tenth of
    ``tol_mm``) leaves it. The largest residual returned is that of the last step (the residual of the iterate
    before the returned one), over the points still iterated.

    Returns:
        ``(w (3, Z, Y, X) float64 mm, iterations, largest residual in mm)``.
    """
    # In grid_sample's normalized coordinates, components first: with the field scaled once into normalized
    # units (un = A u, A the linear part of world_to_normalized), a point at normalized position b(z) has
    # s = un(b(z) - s) at the fixed point, and w = -A⁻¹ s; a step d of s is |A⁻¹ d| mm
    # (dᵀ G d, G = A⁻ᵀA⁻¹).
    size = np.asarray(grid.size, dtype=np.float64)
    # a single-voxel axis: any scale keeps A invertible (grid_sample reads the one voxel wherever the point lies
    # along it), and no in-grid test along it
    scale = 2.0 / np.maximum(size - 1, 1)
    a = scale[:, None] * np.asarray(grid.world_to_index, dtype=np.float64)[:3, :3]
    a_inv = np.linalg.inv(a)
    gram = a_inv.T @ a_inv
    u = torch.as_tensor(np.asarray(field), dtype=torch.float32, device=device)
    dev, shape = u.device, tuple(u.shape[1:])
    total = int(np.prod(shape))
    f32 = dict(dtype=torch.float32, device=dev)
    un = torch.mm(torch.as_tensor(a, **f32), u.reshape(3, total)).view(1, 3, *shape)
    del u
    base = torch.empty((3, *shape), **f32)  # normalized coordinates b(z) of the grid points (x, y, z)
    for c, k in enumerate(size.astype(int)):
        line = (torch.linspace(-1.0, 1.0, k, dtype=torch.float64, device=dev) if k > 1
                else torch.full((1,), -1.0, dtype=torch.float64, device=dev))
        view = [1, 1, 1]
        view[2 - c] = k
        base[c].copy_(line.view(view))
    base = base.view(3, total)
    # |A⁻¹ d|² = Σ G_ij d_i d_j as element-wise products (the same bits for a point in any block)
    terms = [(i, i, float(gram[i, i])) for i in range(3)]
    terms += [(i, j, 2.0 * float(gram[i, j])) for i, j in ((0, 1), (0, 2), (1, 2)) if gram[i, j] != 0.0]
    check = [c for c in range(3) if size[c] > 1]  # axes of the in-grid test
    to_mm = torch.as_tensor(-a_inv.T, dtype=torch.float64, device=dev)  # w rows = sᵀ (-A⁻¹)ᵀ
    w = torch.empty((total, 3), dtype=torch.float64, device=dev)  # the result, channels last
    s = _linearized_start(un[0], size, START_PASSES).view(3, total)  # s, as un at each point's current position
    index = None  # the grid indices of the points still iterated (None: all, in grid order)
    still = torch.empty(total, dtype=torch.bool, device=dev)
    # blocks of points on the CPU: every temporary stays small (in cache, and reused by the allocator instead of
    # fresh pages for each full-grid temporary)
    block = BLOCK_POINTS if dev.type == "cpu" else max(total, 1)
    frozen_sq = min(FROZEN_MM, tol_mm / 10.0) ** 2
    frozen_inside = 0  # frozen points whose image z + w lies within the grid
    residual = float("inf")
    m = total

    def store(lo: int, hi: int, idx: torch.Tensor | None) -> None:
        """``w`` of the points ``lo:hi`` of the arrays (their grid indices ``idx[lo:hi]``; None: in grid order)."""
        rows = torch.mm(s[:, lo:hi].t().double(), to_mm)
        if idx is None:
            w[lo:hi] = rows
        else:
            w.index_copy_(0, idx[lo:hi], rows)

    n = 0
    for n in range(1, max_iterations + 1):
        largest_sq, unsettled, inside_count, moving, converged_inside = 0.0, 0, 0, 0, 0
        for lo in range(0, m, block):
            hi = min(lo + block, m)
            sb = s[:, lo:hi]
            p = torch.sub(base[:, lo:hi], sb)
            new = W.grid_sample(un, p.t().view(1, hi - lo, 1, 1, 3), "bilinear", "border").view(3, hi - lo)
            d = torch.sub(new, sb)
            step_sq = _quadratic_form(d, terms)
            # the residual counts only points whose image z + w lies within the grid, where u is what ITK applies
            if len(check) == 3:
                inside = p.abs_().amax(dim=0) <= 1.0
            else:
                inside = torch.ones(hi - lo, dtype=torch.bool, device=dev)
                for c in check:
                    inside &= p[c].abs() <= 1.0
            squared = torch.where(inside, step_sq, 0.0)
            largest_sq = max(largest_sq, float(squared.max()))
            if n >= settled_after:
                unsettled += int(torch.count_nonzero(squared > SETTLED_MM ** 2))
                inside_count += int(torch.count_nonzero(inside))
            st = torch.gt(step_sq, frozen_sq, out=still[lo:hi])
            moving += int(torch.count_nonzero(st))
            converged_inside += int(torch.count_nonzero(inside & ~st))
            sb.copy_(new)
        residual = float(np.sqrt(largest_sq)) if m else 0.0
        logger.debug("field inversion, iteration %d: %d points, largest step %.3g mm, %d still moving", n, m,
                     residual, moving)
        if residual < tol_mm:
            break
        if n >= settled_after and unsettled <= settled_fraction * (frozen_inside + inside_count):
            break
        # a point whose step fell below FROZEN_MM has converged: it leaves the iteration (each point's
        # iteration is independent of the others'), once that spares a fifth of the points; the others move
        # to the front of the arrays (block by block, in place)
        if 5 * moving <= 4 * m:
            first = index is None
            if first:
                index = torch.empty(total, dtype=torch.int64, device=dev)
            frozen_inside += converged_inside
            out = 0
            for lo in range(0, m, block):
                hi = min(lo + block, m)
                # every point's w (those still moving are written again later): no selection of the converged ones
                store(lo, hi, None if first else index)
                keep = torch.nonzero(still[lo:hi]).squeeze(1)
                k = int(keep.numel())
                for arr in (base, s):
                    arr[:, out:out + k] = arr[:, lo:hi].index_select(1, keep)
                index[out:out + k] = keep + lo if first else index[lo:hi].index_select(0, keep)
                out += k
            m = out
    for lo in range(0, m, block):
        store(lo, min(lo + block, m), index)
    if residual >= tol_mm and n == max_iterations:
        logger.warning("field inversion stopped after %d iterations with a largest grid residual of %.3g mm "
                       "(the field may fold or be too steep to invert exactly)", n, residual)
    # float64, channels last in memory: the (3, Z, Y, X) array is a view that ITK's vector image takes as it is
    return np.moveaxis(w.cpu().numpy().reshape(*shape, 3), -1, 0), n, residual


def _quadratic_form(d: torch.Tensor, terms: list) -> torch.Tensor:
    """``Σ g · d_i · d_j`` over ``terms`` ``[(i, j, g), ...]`` (the diagonal ones first) for ``d`` ``(3, M)``."""
    i, j, g = terms[0]
    out = torch.mul(d[i], d[j]).mul_(g)
    for i, j, g in terms[1:]:
        out.addcmul_(d[i], d[j], value=g)
    return out


def _linearized_start(un: torch.Tensor, size: np.ndarray, passes: int = START_PASSES, slab: int = 8) -> torch.Tensor:
    """The first guess of :func:`invert_field`'s ``s`` (normalized units, ``(3, Z, Y, X)``, a new tensor).

    The fixed point ``s = un(b - s)`` linearized at the grid point ``b``, ``s = un - J s`` with ``J = ∂un/∂b``,
    iterated ``passes`` times from ``s = un`` (the plain start, ``w = -u(z)``). ``J`` comes from one-sided
    differences on the side the point moves to (towards ``b - s``: the slope of the trilinear interpolant over the
    first voxel on that side; the outer grid points take the one difference they have), computed in slabs of
    ``slab`` z-slices (small temporaries). On the bundled pair, the 2 mm synthetic pair and the 2 mm trunk CT two
    passes start 13, 7 and 18× closer to the fixed point than ``s = un`` (mean; one pass 9, 5 and 12×), so that
    fewer points need a second sampling."""
    if passes < 1:
        return un.clone()
    out = torch.empty_like(un)
    for z0 in range(0, un.shape[1], slab):
        _upwind_passes(un, out, size, z0, min(z0 + slab, un.shape[1]), passes)
    return out


def _upwind_passes(un: torch.Tensor, out: torch.Tensor, size: np.ndarray, z0: int, z1: int, passes: int) -> None:
    """``passes`` times ``s ← un - J s`` from ``s = un`` on z-slices ``[z0, z1)``, into ``out`` (see
    :func:`_linearized_start`), all ``(3, Z, Y, X)``. A pass is point-wise in ``s`` (``J``'s differences are of
    ``un``), so the passes of a slab follow each other on the slab's own differences."""
    nz = un.shape[1]
    lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
    part = un[:, lo:hi]  # the slab with one z-slice more on each side where there is one
    own = part[:, z0 - lo:z1 - lo]
    # per axis (x: array dim 3, y: dim 2, z: dim 1) the slices of the differences v[i+1] - v[i] behind and ahead of
    # each point: (where, back, ahead) for the points with both neighbours, and the outer points' one difference
    axes = []
    for c, dim in ((0, 3), (1, 2), (2, 1)):
        n = int(size[c])
        if n < 2:
            continue
        factor = -(n - 1) / 2.0  # a difference per index step in normalized units, subtracted
        spans = []
        if dim == 1:
            diff = part[:, 1:] - part[:, :-1]  # diff[t] = v[lo + t + 1] - v[lo + t]
            first, last = max(z0, 1), min(z1, nz - 1)  # slices with both neighbours
            if last > first:
                spans.append(((1, first - z0, last - first), diff[:, first - 1 - lo:last - 1 - lo],
                              diff[:, first - lo:last - lo]))
            if z0 == 0:
                spans.append(((1, 0, 1), diff[:, :1], None))
            if z1 == nz:
                spans.append(((1, z1 - z0 - 1, 1), diff[:, -1:], None))
        else:
            diff = own.narrow(dim, 1, n - 1) - own.narrow(dim, 0, n - 1)  # diff[i] = v[i + 1] - v[i]
            if n > 2:
                spans.append(((dim, 1, n - 2), diff.narrow(dim, 0, n - 2), diff.narrow(dim, 1, n - 2)))
            spans.append(((dim, 0, 1), diff.narrow(dim, 0, 1), None))
            spans.append(((dim, n - 1, 1), diff.narrow(dim, n - 2, 1), None))
        axes.append((c, factor, spans))
    guess = own
    for k in range(passes):
        acc = out[:, z0:z1] if k == passes - 1 else torch.empty_like(own)
        acc.copy_(own)
        for c, factor, spans in axes:
            for (dim, start, length), back, ahead in spans:
                comp = guess[c:c + 1].narrow(dim, start, length)
                slope = back if ahead is None else torch.where(comp > 0, back, ahead)
                acc.narrow(dim, start, length).addcmul_(slope, comp, value=factor)
        guess = acc


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
        array: Image ``(Z, Y, X)`` on ``grid`` (float; integers of up to 16 bits are taken as their float32 values).
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
        if a.dtype.kind in "iu" and a.dtype.itemsize <= 2:  # an int16 CT kept as read: its float32 values (exact),
            a = a.astype(np.float32)  # so the percentile and the threshold are the float32 image's, to the bit
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
