"""Preprocessing: working grids, anti-aliased resampling, intensity normalization, masks.

Each image is resampled onto a *working grid* that covers its own field of view with the working
voxel size (isotropic, in mm) and keeps its direction, so no part of either image is cut away before
the transform is known. Intensities are mapped to [0, 1] by robust percentiles.

The working image is SimpleITK's ``DiscreteGaussian`` anti-aliasing followed by its linear ``Resample``, to the
bit, computed with less work:

- the anti-aliasing is ``DiscreteGaussian`` in NumPy (:func:`smooth_like_sitk`: its own kernels, its order of
  passes and arithmetic, on as many threads as SimpleITK's filter; about half its CPU);
- where the working grid's axes are parallel to the image's to the last bit of ITK's index arithmetic
  (:func:`_linear_plan`: images whose direction has no oblique part, as the working grid keeps the direction), only
  what the linear interpolation reads is smoothed (along each axis the two source indices around each working
  voxel, ~2/3 of the indices from 0.75 to 2 mm): the first pass computes the kept slices only, the later ones run
  on the kept rows and cut their result, and the interpolation is ITK's ``LinearInterpolateImageFunction`` in NumPy
  (its float64 arithmetic along x, then y, then z, 0 outside; :func:`_interpolate_separable`). Other grids, and
  builds of SimpleITK other than x86-64 (``_SAME_ARITHMETIC``), keep ``Resample`` of the whole smoothed image;
- on those parallel grids the smoothing and the interpolation run in tasks of a few working slices
  (:func:`_resample_separable`): each smooths only the source slices its working slices read, from a slab view of
  the input, and interpolates them at once, so the intermediate arrays are a few slices (in the CPU caches, their
  memory reused) instead of fresh copies of most of the input (page faults, memory traffic); the normalization
  likewise runs in blocks through one small buffer.

``prepare`` of both images at 2 mm (one thread, CPU s, loaded machine, median of alternating runs,
``benchmarks/preprocess_cost.py``): 0.75 mm trunk CT (86 M + 67 M voxels) 8.45 -> 4.46 s (smoothing only what
the resampling reads), then 3.08 -> 2.31 s (in tasks of working slices; the same baseline measured 4.46 s before
on a busier machine), 1 mm brains (ICBM152 and Colin27) 0.76 -> 0.28 s (then 0.22 s both: few slices to
save), 2 mm trunk CT (nothing to smooth) 0.48 -> 0.39, then 0.30 -> 0.22 s; the working images identical.
:func:`prepare_pair` prepares the two images in two threads.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from ..io.background import run_parallel
from ..io.images import image_to_sitk, sitk_to_image

logger = logging.getLogger(__name__)


def working_grid(grid: Grid, spacing: float) -> Grid:
    """Isotropic grid over ``grid``'s field of view: voxel size ``max(spacing, finest input spacing)`` mm."""
    s = max(float(spacing), min(grid.spacing))
    return grid.with_spacing(s)


#: SimpleITK ``DiscreteGaussian`` settings of the anti-aliasing: maximum kernel width (voxels), maximum error.
GAUSSIAN_MAX_WIDTH = 32
GAUSSIAN_MAX_ERROR = 0.01
#: Elements per block of :func:`_correlate_axis` (its float64 sums stay in the CPU caches).
_BLOCK = 1 << 15


def gaussian_kernel(variance_mm2: float, spacing_mm: float) -> np.ndarray:
    """The 1-D kernel (float64, odd length, symmetric) of SimpleITK's ``DiscreteGaussian`` for this variance (mm²)
    and voxel size (mm) along one axis: read from SimpleITK's own filter applied to an impulse, so it is its
    ``GaussianOperator`` to the last bit."""
    n = 4 * GAUSSIAN_MAX_WIDTH + 1
    impulse = np.zeros((1, 1, n))
    impulse[0, 0, n // 2] = 1.0
    img = sitk.GetImageFromArray(impulse)
    img.SetSpacing((float(spacing_mm), 1.0, 1.0))
    out = sitk.GetArrayFromImage(sitk.DiscreteGaussian(img, [float(variance_mm2), 0.0, 0.0], GAUSSIAN_MAX_WIDTH,
                                                       GAUSSIAN_MAX_ERROR, True))[0, 0]
    nz = np.flatnonzero(out)
    return out[nz[0]:nz[-1] + 1].copy()


def _correlate_block(src: np.ndarray, dst: np.ndarray, kernel: np.ndarray, along: int,
                     keep: np.ndarray | None = None) -> None:
    """One block of :func:`_correlate_axis`: ``src``/``dst`` 2-D float32 (``src`` may hold integers exact in float32),
    correlated along axis ``along`` (``dst`` receives the indices ``keep`` of the result along it, when given)."""
    n, r = src.shape[along], len(kernel) // 2
    shape = list(src.shape)
    shape[along] = n + 2 * r
    padded = np.empty(shape)  # float64: src with its edges repeated r times, converted in one pass
    if along == 0:
        padded[r:r + n] = src
        padded[:r], padded[r + n:] = src[:1], src[-1:]
    else:
        padded[:, r:r + n] = src
        padded[:, :r], padded[:, r + n:] = src[:, :1], src[:, -1:]
    acc = tmp = None
    for k, c in enumerate(kernel):
        part = padded[k:k + n] if along == 0 else padded[:, k:k + n]
        if acc is None:
            acc = np.multiply(part, c)
            tmp = np.empty_like(acc)
            continue
        np.multiply(part, c, out=tmp)
        acc += tmp
    acc += 0.0  # ITK's sum starts at +0.0: a sum of -0.0 terms is +0.0 there
    dst[...] = acc if keep is None else np.take(acc, keep, axis=along)


def _correlate_axis(x: np.ndarray, kernel: np.ndarray, axis: int, threads: int = 1,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """``out[i] = float32(sum_k kernel[k] * x[i - r + k])`` along ``axis`` of a C-contiguous float32 ``(Z, Y, X)``
    array, edges repeated, the sum in float64 accumulated from ``k = 0``: what ITK's
    ``NeighborhoodOperatorImageFilter`` computes (zero-flux Neumann boundary). Computed in small 2-D blocks, on
    ``threads`` threads (NumPy releases the GIL; every block is computed the same way whatever the threads). With
    ``keep`` (sorted indices along ``axis``) the result is ``out`` taken at those indices, cut block by block."""
    n = x.shape[axis]
    x = np.ascontiguousarray(x)
    shape = list(x.shape)
    shape[axis] = n if keep is None else len(keep)
    out = np.empty(shape, np.float32)
    m = shape[axis]
    blocks = []
    if axis == 2:  # rows of the last axis
        src, dst = x.reshape(-1, n), out.reshape(-1, m)
        step = max(1, _BLOCK // n)
        blocks = [(src[a:a + step], dst[a:a + step], 1) for a in range(0, src.shape[0], step)]
    else:  # columns of 2-D (n, m) views: the whole volume (axis 0) or each z slice (axis 1)
        views = [(x.reshape(n, -1), out.reshape(m, -1))] if axis == 0 else list(zip(x, out))
        step = max(1, _BLOCK // n)
        for src, dst in views:
            blocks += [(src[:, a:a + step], dst[:, a:a + step], 0) for a in range(0, src.shape[1], step)]
    run_parallel([lambda _, b=b: _correlate_block(b[0], b[1], kernel, b[2], keep) for b in blocks], threads,
                 threads > 1 and x.size > 4 * _BLOCK)
    return out


def _correlate_slices(x: np.ndarray, kernel: np.ndarray, rows: np.ndarray, threads: int = 1) -> np.ndarray:
    """:func:`_correlate_axis` along axis 0 evaluated at the slices ``rows`` only (same arithmetic per value, so the
    same bits as its ``[rows]``): ``(len(rows), Y, X)`` float32. Each output slice sums its ``len(kernel)`` input
    slices in column blocks of ``_BLOCK`` (the input slices a block reads stay in the CPU caches from one output
    slice to the next, converted to float64 once)."""
    r, n = len(kernel) // 2, x.shape[0]
    src = np.ascontiguousarray(x).reshape(n, -1)
    out = np.empty((len(rows), src.shape[1]), np.float32)
    taps = [np.clip(np.asarray(rows) - r + k, 0, n - 1) for k in range(len(kernel))]

    def run(a: int) -> None:
        b = min(src.shape[1], a + _BLOCK)
        acc, tmp = np.empty(b - a), np.empty(b - a)
        rows64: dict[int, np.ndarray] = {}  # the input slices' block in float64, each converted once

        def row(i: int) -> np.ndarray:
            if i not in rows64:
                rows64[i] = src[i, a:b].astype(np.float64)
            return rows64[i]

        for o in range(len(rows)):
            for i in [i for i in rows64 if i < taps[0][o]]:
                del rows64[i]
            np.multiply(row(taps[0][o]), kernel[0], out=acc)
            for k in range(1, len(kernel)):
                np.multiply(row(taps[k][o]), kernel[k], out=tmp)
                acc += tmp
            acc += 0.0  # as _correlate_block
            out[o, a:b] = acc

    run_parallel([lambda _, a=a: run(a) for a in range(0, src.shape[1], _BLOCK)], threads, threads > 1)
    return out.reshape((len(rows),) + x.shape[1:])


def _sitk_threads() -> int:
    """SimpleITK's global default thread count (what its filters use), at least 1."""
    return max(1, int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))


def _kernels(variance: list[float], spacing: tuple[float, float, float]) -> dict:
    """The 1-D Gaussian kernels (:func:`gaussian_kernel`) of the axes ``d`` (0, 1, 2 = x, y, z) with a variance."""
    return {d: gaussian_kernel(variance[d], spacing[d]) for d in range(3) if variance[d] > 0}


def smooth_like_sitk(array: np.ndarray, spacing: tuple[float, float, float],
                     variance: list[float], keep: list[np.ndarray] | None = None) -> np.ndarray:
    """SimpleITK's ``DiscreteGaussian(img, variance, GAUSSIAN_MAX_WIDTH, GAUSSIAN_MAX_ERROR, useImageSpacing=True)``
    of a float32 image, bit for bit, in about half its CPU time: the same kernels (:func:`gaussian_kernel`) applied
    in the same order (z, then y, then x) with the same arithmetic (float64 sums, float32 between the passes).

    Args:
        array: ``(Z, Y, X)`` float32.
        spacing: voxel size (mm) along ``(x, y, z)``.
        variance: Gaussian variance (mm²) along ``(x, y, z)``; 0 leaves that axis alone.
        keep: Sorted indices along ``(x, y, z)`` to return (all when None): the result is the full smoothing's
            ``[np.ix_(keep[2], keep[1], keep[0])]``, same bits, with less work (:func:`_smooth_kept`).

    Returns:
        ``(Z, Y, X)`` float32 (``(len(keep[2]), len(keep[1]), len(keep[0]))`` with ``keep``).
    """
    x = np.asarray(array, dtype=np.float32)
    threads, kernels = _sitk_threads(), _kernels(variance, spacing)
    if keep is not None:
        return _smooth_kept(x, kernels, keep, threads)
    for d in (2, 1, 0):  # ITK index axis k, j, i = array axis 0, 1, 2
        if d in kernels:
            x = _correlate_axis(x, kernels[d], 2 - d, threads)
    return x


def _smooth_kept(x: np.ndarray, kernels: dict, keep: list[np.ndarray], threads: int) -> np.ndarray:
    """:func:`smooth_like_sitk` of the ``(Z, Y, X)`` ``x`` (float32, or integers exact in float32) with the 1-D
    ``kernels`` (axis ``d`` of ``(x, y, z)`` → :func:`gaussian_kernel`; an axis without one is left alone) at the
    sorted indices ``keep`` (along ``x, y, z``) only: ``(len(keep[2]), len(keep[1]), len(keep[0]))`` float32
    (``x``'s dtype when no axis has a kernel), the full smoothing's ``[np.ix_(keep[2], keep[1], keep[0])]`` to the
    bit. Each pass along an axis is independent per line along the other axes, so cutting another axis commutes with
    it: the z pass computes the kept slices only, from the slab of slices they read (a view), where the in-plane axes
    without a kernel are cut first; the y and x passes run on the kept rows and cut their own result. The work and
    memory therefore follow ``keep``: a few kept slices cost a few slices."""
    nz = x.shape[0]
    kz = np.asarray(keep[2])
    if min(len(k) for k in keep) == 0:
        return np.zeros((len(keep[2]), len(keep[1]), len(keep[0])), np.float32)

    def cut(v: np.ndarray, d: int) -> np.ndarray:
        if d in kernels or keep[d].size == v.shape[2 - d]:
            return v
        return np.take(v, keep[d], axis=2 - d)  # a contiguous copy

    if 2 in kernels:
        r = len(kernels[2]) // 2
        z0, z1 = max(0, int(kz[0]) - r), min(nz, int(kz[-1]) + r + 1)
        # the slab's edges are the image's where a kept slice's window reaches past them: the same repeated edges
        x = _correlate_slices(cut(cut(x[z0:z1], 1), 0), kernels[2], kz - z0, threads)
    else:
        x = cut(cut(x if kz.size == nz else np.take(x, kz, axis=0), 1), 0)
    for d in (1, 0):
        if d in kernels:
            x = _correlate_axis(x, kernels[d], 2 - d, threads, keep[d])
    return x


#: ITK's interpolation reproduced to the bit needs SimpleITK's own build to round every product and sum (no fused
#: multiply-add), as its x86-64 wheels do; elsewhere (e.g. arm64, whose compilers fuse ``a + (b - a) * t``) the
#: working image keeps SimpleITK's ``Resample``.
_SAME_ARITHMETIC = platform.machine().lower() in ("x86_64", "amd64")


def _itk_floor(x: np.ndarray) -> np.ndarray:
    """``itk::Math::Floor<int64>`` of float64 values as ITK's SSE2 build computes it: the nearest integer (ties to
    even) of ``2 x - 0.5``, shifted right by one (``2 x - 0.5`` is exact below 2^51, so this is ``floor`` there)."""
    return np.right_shift(np.rint(2.0 * x - 0.5).astype(np.int64), 1)


@dataclass
class _AxisPlan:
    """One axis of :func:`_linear_plan`: per target index its source base index, distance and flags."""

    base: np.ndarray  # int64, the source index ITK's interpolator starts from (>= 0)
    dist: np.ndarray  # float64, continuous index - base
    lerp: np.ndarray  # bool, interpolated with base + 1 (else base's value alone)
    inside: np.ndarray  # bool, inside the source's buffer (else the target voxel is 0)

    def needed(self) -> np.ndarray:
        """Sorted source indices this axis reads."""
        return np.union1d(self.base[self.inside], self.base[self.inside & self.lerp] + 1)


def _linear_plan(source: Grid, target: Grid) -> list[_AxisPlan] | None:
    """What SimpleITK's linear ``Resample`` (identity transform) of an image on ``source`` onto ``target`` reads and
    weighs, per axis ``(x, y, z)``, when that is separable to the last bit: every target voxel's continuous source
    index computed with ITK's arithmetic (``ResampleImageFilter``'s scan lines interpolated between the index of a
    line's first voxel and of the voxel one past its end; ``TransformIndexToPhysicalPoint``, the source's
    physical-to-index matrix read from SimpleITK, ``Math::Floor``), and its x component depending on ``i`` only, its y
    component on ``j`` only and its z component on ``k`` only. None when it is not (e.g. oblique grids, whose last
    bits mix the axes): the caller keeps SimpleITK's path."""
    zero = (0.0, 0.0, 0.0)
    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetSpacing(target.spacing)
    probe.SetDirection(target.direction)
    probe.SetOrigin(zero)
    to_point = np.array([probe.TransformIndexToPhysicalPoint(tuple(int(c == r) for c in range(3)))
                         for r in range(3)]).T  # column c: target index step c in mm (ITK's IndexToPhysicalPoint)
    probe.SetSpacing(source.spacing)
    probe.SetDirection(source.direction)
    to_index = np.array([probe.TransformPhysicalPointToContinuousIndex(tuple(float(c == r) for c in range(3)))
                         for r in range(3)]).T  # ITK's PhysicalPointToIndex (its own inverse, to the last bit)
    nz, ny, nx = target.shape
    o_t, o_s = np.asarray(target.origin), np.asarray(source.origin)
    j = np.arange(ny, dtype=np.float64)[None, :]
    k = np.arange(nz, dtype=np.float64)[:, None]

    def line_index(i: float) -> list[np.ndarray]:
        """Continuous source index (x, y, z), each ``(Z, Y)``, of target voxel ``(i, j, k)`` for every line."""
        p = [((o_t[r] + to_point[r, 0] * i) + to_point[r, 1] * j) + to_point[r, 2] * k - o_s[r] for r in range(3)]
        return [((0.0 + to_index[r, 0] * p[0]) + to_index[r, 1] * p[1]) + to_index[r, 2] * p[2] for r in range(3)]

    start, end = line_index(0.0), line_index(float(nx))
    step = [e - s for s, e in zip(start, end)]
    if (np.any(step[1] != 0) or np.any(step[2] != 0) or np.any(start[0] != start[0][0, 0])
            or np.any(step[0] != step[0][0, 0]) or np.any(start[1] != start[1][:1]) or np.any(start[2] != start[2][:, :1])):
        return None
    alpha = np.arange(nx, dtype=np.float64) / float(nx)
    cont = [start[0][0, 0] + alpha * step[0][0, 0], start[1][0] + 0.0, start[2][:, 0] + 0.0]
    plans = []
    for c, n in zip(cont, source.size):
        base = np.maximum(_itk_floor(c), 0)
        dist = c - base
        plans.append(_AxisPlan(base, dist, (dist > 0) & (base + 1 <= n - 1), (c >= -0.5) & (c < n - 1 + 0.5)))
    return plans


def _axis_weights(plan: _AxisPlan, have: np.ndarray) -> tuple:
    """Positions in ``have`` of each target index's base and upper source index, its distance (0 where it does not
    interpolate) and which target indices take the base value alone (a bool mask; None when none does)."""
    lerp = plan.inside & plan.lerp
    lo = np.searchsorted(have, np.where(plan.inside, plan.base, have[0]))
    hi = np.where(lerp, np.searchsorted(have, np.where(lerp, plan.base + 1, have[0])), lo)
    alone = None if lerp.all() else ~lerp
    return lo, hi, np.where(lerp, plan.dist, 0.0), alone, bool(lerp.any())


def _lerp(v: np.ndarray, w: tuple, along: int) -> np.ndarray:
    """One axis of ITK's interpolation on a 2-D array: ``a + (b - a) * distance`` in float64 along ``along``
    (the base value itself, bit for bit, where the axis does not interpolate: ``a + 0`` would turn -0.0 into
    +0.0)."""
    lo, hi, dist, alone, any_lerp = w
    a = np.take(v, lo, axis=along)
    if not any_lerp:
        return a
    res = np.take(v, hi, axis=along).astype(np.float64)
    res -= a
    res *= dist if along == 1 else dist[:, None]
    res += a
    if alone is not None:
        if along == 1:
            res[:, alone] = a[:, alone]
        else:
            res[alone] = a[alone]
    return res


def _interpolate_separable(values: np.ndarray, plans: list[_AxisPlan], kept: list[np.ndarray]) -> np.ndarray:
    """ITK's ``LinearInterpolateImageFunction`` (3-D) at every target voxel of separable ``plans``, as
    ``Resample`` stores it (float32, 0 outside): along x, then y, then z, ``a + (b - a) * distance`` in float64 where
    an axis interpolates (the value at the base index alone where not), which is ITK's per-voxel arithmetic with the
    x and y steps shared by the voxels that read the same source rows. Slice by slice (each source slice's x and y
    steps once, kept while the next target slices read it), so everything stays in the CPU caches.

    Args:
        values: ``(Z', Y', X')`` float32, the source at the indices ``kept`` (x, y, z) only.
        plans: :func:`_linear_plan` of the source and target grids.
        kept: Sorted source indices along (x, y, z) that ``values`` holds (each axis plan's ``needed`` among them).

    Returns:
        ``(Z, Y, X)`` float32 on the target grid.
    """
    wx, wy, wz = (_axis_weights(p, h) for p, h in zip(plans, kept))
    out = np.empty((len(plans[2].base), len(plans[1].base), len(plans[0].base)), np.float32)
    rows: dict[int, np.ndarray] = {}

    def row(z: int) -> np.ndarray:  # source slice z (a position in kept[2]) after the x and y steps
        if z not in rows:
            rows.clear() if len(rows) > 3 else None
            rows[z] = _lerp(_lerp(values[z], wx, 1), wy, 0)
        return rows[z]

    lo, hi, dist, alone, _ = wz
    skip = np.zeros(len(lo), bool) if alone is None else alone
    for k in range(len(lo)):
        a = row(int(lo[k]))
        if skip[k]:
            out[k] = a
            continue
        res = row(int(hi[k])).astype(np.float64)
        res -= a
        res *= dist[k]
        res += a
        out[k] = res
    for axis, plan in enumerate(plans):
        if not plan.inside.all():
            sel = [slice(None)] * 3
            sel[2 - axis] = ~plan.inside
            out[tuple(sel)] = 0.0
    return out


#: Working-grid slices per task of :func:`_resample_separable`.
_CHUNK_SLICES = 8


def _resample_separable(arr: np.ndarray, spacing: tuple[float, float, float], variance: list[float],
                        plans: list[_AxisPlan], kept: list[np.ndarray]) -> np.ndarray:
    """The anti-aliasing (``variance`` mm² along x, y, z; 0: none) and the linear interpolation of separable
    ``plans`` (:func:`_linear_plan`; ``kept``: each axis plan's ``needed``) of the ``(Z, Y, X)`` source ``arr``
    (float32, or integers of up to 16 bits: exact in float32, converted where read) with voxel size ``spacing`` (mm,
    x, y, z): the working image ``(Z', Y', X')`` float32, the same bits as :func:`_interpolate_separable` of
    :func:`smooth_like_sitk` at ``kept``. Computed in tasks of
    ``_CHUNK_SLICES`` working-grid slices (on SimpleITK's thread count): each smooths the source slices its slices
    read (:func:`_smooth_kept`) and interpolates them at once, so the intermediate arrays are a few slices (cache
    sized, reused) instead of fresh copies of most of the input (every value is computed as on the whole array)."""
    threads, kernels = _sitk_threads(), _kernels(variance, spacing)
    pz = plans[2]
    n = len(pz.base)
    out = np.empty((n, len(plans[1].base), len(plans[0].base)), np.float32)

    def run(k0: int) -> None:
        k1 = min(n, k0 + _CHUNK_SLICES)
        sub = _AxisPlan(pz.base[k0:k1], pz.dist[k0:k1], pz.lerp[k0:k1], pz.inside[k0:k1])
        have = [kept[0], kept[1], sub.needed()]
        if have[2].size == 0:  # these working slices lie outside the source
            out[k0:k1] = 0.0
            return
        values = _smooth_kept(arr, kernels, have, 1)
        out[k0:k1] = _interpolate_separable(values, [plans[0], plans[1], sub], have)

    starts = range(0, n, _CHUNK_SLICES)
    run_parallel([lambda _, k=k: run(k) for k in starts], threads, threads > 1)
    return out


def resample(image: Image, grid: Grid, interpolator: str = "linear", antialias: bool = True) -> Image:
    """Resamples ``image`` onto ``grid`` (identity transform): anti-aliasing, then SimpleITK's ``Resample``.

    Args:
        image: Source image.
        grid: Target grid (LPS).
        interpolator: ``"linear"`` or ``"nearest"`` (labels, masks).
        antialias: Gaussian-smooth first where the target voxels are larger than the source ones
            (sigma² = (s_new² − s_old²) / 4 per axis, in mm).

    Returns:
        Image on ``grid``, float32 for linear, the source dtype for nearest; 0 outside the source.
    """
    if interpolator == "linear":
        raw = np.asarray(image.array)
        var = [0.0, 0.0, 0.0]
        if antialias:
            target = min(grid.spacing)
            var = [max(target ** 2 - s ** 2, 0.0) / 4.0 for s in image.grid.spacing]
        plans = _linear_plan(image.grid, grid) if _SAME_ARITHMETIC else None
        if plans is not None:  # parallel axes: smooth and interpolate only what the resampling reads (same bits)
            kept = [p.needed() for p in plans]
            if min(k.size for k in kept) == 0:  # no target voxel inside the source
                return Image(np.zeros(grid.shape, np.float32), grid, image.name)
            # integers of up to 16 bits are exact in float32 (and in float64): the passes convert what they read,
            # the same values as from a float32 copy of the whole input, without that copy
            exact = raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2
            src = raw if exact else np.asarray(raw, dtype=np.float32)
            return Image(_resample_separable(src, image.grid.spacing, var, plans, kept), grid, image.name)
        arr = np.asarray(raw, dtype=np.float32)
        if max(var) > 0:
            arr = smooth_like_sitk(arr, image.grid.spacing, var)
        src = image_to_sitk(Image(arr, image.grid, image.name))
        interp = sitk.sitkLinear
    elif interpolator == "nearest":
        src = image_to_sitk(image)
        interp = sitk.sitkNearestNeighbor
    else:
        raise ValueError(f"unknown interpolator {interpolator!r}")
    ref = sitk.Image(grid.size, sitk.sitkUInt8)
    grid.apply_to_sitk(ref)
    out = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, src.GetPixelID())
    dtype = np.float32 if interpolator == "linear" else image.array.dtype
    return sitk_to_image(out, image.name, dtype=dtype)


def normalize_intensity(array: np.ndarray, mask: np.ndarray | None = None,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Maps intensities to [0, 1]: the low/high percentiles (within ``mask`` if given) go to 0/1, clipped.

    Raises:
        InputError: when the percentile range is empty (a constant image inside the mask).
    """
    values = array[mask] if mask is not None else array
    if values.size == 0:
        raise InputError("the mask selects no voxel of the image; give a mask that overlaps the image.")
    # a masked selection is already a copy: the percentiles may partition it in place (same values, same
    # minimum and maximum)
    lo, hi = np.percentile(values, percentiles, overwrite_input=mask is not None)
    if hi - lo <= 1e-8 * max(1.0, abs(hi)):
        lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        raise InputError("the image is constant inside its mask; nothing to register.")
    # (array - lo) / (hi - lo) clipped to [0, 1] in the dtype NumPy's subtraction gives (float64: lo is), then
    # rounded to float32: computed in blocks of _BLOCK values through one small buffer (cache-sized, no fresh
    # full-size float64 array), each value by the same operations
    src = np.ascontiguousarray(array).reshape(-1)
    res = np.empty(src.shape, np.float32)
    buf = np.empty(min(src.size, _BLOCK), np.subtract(src[:1], lo).dtype)
    for a in range(0, src.size, _BLOCK):
        b = min(src.size, a + _BLOCK)
        t = buf[:b - a]
        np.subtract(src[a:b], lo, out=t)
        np.divide(t, hi - lo, out=t)
        np.clip(t, 0.0, 1.0, out=t)
        res[a:b] = t
    return res.reshape(np.shape(array))


@dataclass
class WorkingImage:
    """An image prepared for optimization.

    Attributes:
        array: ``(Z, Y, X)`` float32 intensities in [0, 1] on ``grid``.
        grid: Working grid (isotropic, same field of view and direction as the input).
        mask: ``(Z, Y, X)`` bool on ``grid`` or None (everything counts).
    """

    array: np.ndarray
    grid: Grid
    mask: np.ndarray | None = None


def prepare(image: Image, spacing: float, mask: Image | None = None,
            percentiles: tuple[float, float] = (0.5, 99.5)) -> WorkingImage:
    """Resamples an image (and its optional mask) onto its working grid and normalizes intensities."""
    grid = working_grid(image.grid, spacing)
    resampled = resample(image, grid, "linear")
    m = None
    if mask is not None:
        m = resample(Image(mask.array.astype(np.uint8), mask.grid, mask.name), grid, "nearest").array > 0
        if not m.any():
            raise InputError(f"{mask.name}: after resampling onto the image's working grid the mask is empty; "
                             "it does not overlap its image. Check that the mask belongs to this image.")
    arr = normalize_intensity(resampled.array, m, percentiles)
    logger.info("%s: working grid %s", image.name, grid)
    return WorkingImage(arr, grid, m)


def prepare_pair(fixed: Image, moving: Image, spacing: float, fixed_mask: Image | None = None,
                 moving_mask: Image | None = None, percentiles: tuple[float, float] = (0.5, 99.5),
                 concurrent: bool = True) -> tuple[WorkingImage, WorkingImage]:
    """:func:`prepare` of the fixed and of the moving image (each with its optional mask), the two in two threads
    when ``concurrent`` (NumPy's passes release the GIL; each result is the same bits as alone).

    Raises:
        InputError: as :func:`prepare`; the fixed image's error first when both fail.
    """
    fw, mw = run_parallel([lambda _: prepare(fixed, spacing, fixed_mask, percentiles),
                           lambda _: prepare(moving, spacing, moving_mask, percentiles)], 2, concurrent)
    return fw, mw


def check_overlap(fixed: Grid, moving: Grid) -> None:
    """Raises InputError when the two fields of view do not intersect in LPS space."""
    if fixed.overlap_fraction(moving) <= 0.0:
        c_f, c_m = fixed.center(), moving.center()
        raise InputError(
            "the fixed and moving images do not overlap in physical space (fixed centre "
            f"{np.round(c_f, 1).tolist()} mm, moving centre {np.round(c_m, 1).tolist()} mm, LPS). Their "
            "origins or orientations disagree: correct the image headers (e.g. Slicer's Volumes > "
            "Volume Information > Center volume on both) and run again.")


def center_of_mass(array: np.ndarray, grid: Grid, mask: np.ndarray | None = None) -> np.ndarray:
    """Intensity-weighted centre of mass in LPS mm, shape ``(3,)``."""
    w = array if mask is None else array * mask
    total = float(w.sum())
    if total <= 0:
        return grid.center()
    idx = [np.arange(n, dtype=np.float64) for n in grid.shape]
    kz = (w.sum(axis=(1, 2)) * idx[0]).sum() / total
    jy = (w.sum(axis=(0, 2)) * idx[1]).sum() / total
    ix = (w.sum(axis=(0, 1)) * idx[2]).sum() / total
    m = grid.index_to_world
    return m[:3, :3] @ np.array([ix, jy, kz]) + m[:3, 3]
