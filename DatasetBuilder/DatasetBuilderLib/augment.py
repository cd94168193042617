"""Augmentation with an exactly known ground-truth transform.

The augmented image lives on the original's grid and is ``aug(x) = orig(T(x))`` with
``T(x) = A (x + u(x))`` (fixed = augmented → moving = original, LPS mm, the resampling direction):
``A`` a random rotation / isotropic scale / translation about the image centre, ``u = exp(v)`` the
displacement of a smooth stationary velocity field ``v`` (Gaussian-smoothed noise tapered to 0 at the grid border, scaling and squaring:
diffeomorphic). ``T`` is saved as an ITK ``CompositeTransform [A, u]`` ``.h5``, so resampling the original
through the stored file with SimpleITK reproduces the augmented image (before the intensity change) and
exactly its labels (nearest neighbour). Plausibility: ``det J(T)`` over the grid must lie in
``[min_det, max_det]`` (no folding), else the draw is rejected and counted.

Intensity changes after the geometry: smooth multiplicative bias field, gamma on the [0, 1]-normalised
intensities, Gaussian noise (fraction of the intensity standard deviation).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import image_to_sitk
from DeepRegistrationLib.io.itk_transform import to_itk
from DeepRegistrationLib.evaluation.metrics import jacobian_determinant

logger = logging.getLogger(__name__)


@dataclass
class AugmentOptions:
    """Ranges of the random draws (uniform in ``[-x, x]`` unless said otherwise).

    Attributes:
        rotation_deg: Rotation about each axis, degrees.
        translation_mm: Translation per axis, mm.
        scale: Isotropic scale in ``[1 - scale, 1 + scale]``.
        svf_max_mm: Largest velocity magnitude, mm (0 = no elastic part).
        svf_sigma_mm: Smoothness (Gaussian sigma) of the velocity field, mm.
        min_det, max_det: Accepted range of the Jacobian determinant of ``T``.
        bias: Amplitude of the log bias field (0 = none); gamma: ``log(gamma)`` range; noise: noise std as a
            fraction of the image std.
        max_tries: Draws per augmented case before giving up.
    """

    rotation_deg: float = 10.0
    translation_mm: float = 5.0
    scale: float = 0.05
    svf_max_mm: float = 4.0
    svf_sigma_mm: float = 12.0
    min_det: float = 0.5
    max_det: float = 2.0
    bias: float = 0.2
    gamma: float = 0.2
    noise: float = 0.02
    max_tries: int = 5


@dataclass
class Augmented:
    """An augmented case: arrays on the original grid, the ground truth and what was drawn."""

    image: Image
    labels: np.ndarray | None
    mask: np.ndarray | None
    points: np.ndarray | None
    point_labels: list[str]
    transform: sitk.Transform
    det_range: tuple[float, float]
    rejected: int
    params: dict = field(default_factory=dict)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(rng: np.random.Generator, grid: Grid, opts: AugmentOptions) -> np.ndarray:
    """4×4 LPS matrix: rotation and isotropic scale about the grid centre, then a translation."""
    r = _rotation(np.deg2rad(rng.uniform(-opts.rotation_deg, opts.rotation_deg, 3)))
    s = rng.uniform(1 - opts.scale, 1 + opts.scale)
    c = grid.center()
    m = np.eye(4)
    m[:3, :3] = s * r
    m[:3, 3] = c - s * r @ c + rng.uniform(-opts.translation_mm, opts.translation_mm, 3)
    return m


def smooth_noise(rng: np.random.Generator, shape: tuple, spacing: tuple, sigma_mm: float) -> np.ndarray:
    """White noise ``shape`` ``(Z, Y, X)`` smoothed by a Gaussian of ``sigma_mm`` (spacing along x, y, z)."""
    img = sitk.GetImageFromArray(rng.standard_normal(shape))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm)))


def _border_taper(grid: Grid, width_mm: float) -> np.ndarray:
    """``(Z, Y, X)`` weight rising smoothly from 0 at the grid's faces to 1 at ``width_mm`` inside."""
    w = np.ones(grid.shape)
    for axis, (n, sp) in enumerate(zip(grid.shape, grid.spacing_zyx)):
        d = np.minimum(np.arange(n), np.arange(n)[::-1]) * sp
        ramp = np.clip(d / max(min(width_mm, n * sp / 4.0), 1e-6), 0, 1)
        shape = [1, 1, 1]
        shape[axis] = n
        w = w * (ramp * ramp * (3 - 2 * ramp)).reshape(shape)
    return w


def svf_displacement(rng: np.random.Generator, grid: Grid, opts: AugmentOptions, steps: int = 7) -> np.ndarray:
    """Displacement ``(3, Z, Y, X)`` (LPS mm, x y z) of ``exp(v)`` for a random smooth velocity ``v``."""
    import torch

    from DeepRegistrationLib.spatial.transforms import scaling_and_squaring

    v = np.stack([smooth_noise(rng, grid.shape, grid.spacing, opts.svf_sigma_mm) for _ in range(3)])
    v *= _border_taper(grid, 2.0 * opts.svf_sigma_mm)[None]  # v = 0 at the border: exp(v) stays inside
    peak = float(np.sqrt((v ** 2).sum(0)).max())
    v *= opts.svf_max_mm / max(peak, 1e-12)
    with torch.no_grad():
        u = scaling_and_squaring(torch.from_numpy(v[None]).double(), grid, steps)[0].numpy()
    return u


def _resample(array: np.ndarray, grid: Grid, transform: sitk.Transform, nearest: bool) -> np.ndarray:
    img = image_to_sitk(Image(array, grid))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(img, img, transform, interp, 0.0))


def invert_points(transform: sitk.Transform, affine: np.ndarray, points: np.ndarray, tol_mm: float = 1e-3,
                  iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``T⁻¹(p)`` by fixed-point iteration; returns the points ``(N, 3)`` and a mask of converged ones."""
    ainv = np.linalg.inv(affine[:3, :3])
    y = (points - affine[:3, 3]) @ ainv.T
    for _ in range(iterations):
        mapped = np.array([transform.TransformPoint(tuple(map(float, q))) for q in y])
        y = y + (points - mapped) @ ainv.T
    mapped = np.array([transform.TransformPoint(tuple(map(float, q))) for q in y])
    return y, np.linalg.norm(mapped - points, axis=1) < tol_mm


def _intensity(rng: np.random.Generator, array: np.ndarray, grid: Grid, opts: AugmentOptions) -> tuple[np.ndarray, dict]:
    a = array.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    params = {}
    if opts.gamma > 0 and hi > lo:
        gamma = float(np.exp(rng.uniform(-opts.gamma, opts.gamma)))
        a = lo + (hi - lo) * ((a - lo) / (hi - lo)) ** gamma
        params["gamma"] = gamma
    if opts.bias > 0:
        b = smooth_noise(rng, grid.shape, (1.0, 1.0, 1.0), max(grid.shape) / 4.0)
        b *= opts.bias / max(float(np.abs(b).max()), 1e-12)
        a = a * np.exp(b)
        params["bias_log_amplitude"] = opts.bias
    if opts.noise > 0:
        a = a + rng.normal(0.0, opts.noise * float(a.std()), a.shape)
        params["noise_std"] = opts.noise * float(a.std())
    return a.astype(np.float32), params


def augment_case(rng: np.random.Generator, image: Image, labels: np.ndarray | None, mask: np.ndarray | None,
                 points: np.ndarray | None, point_labels: list[str], opts: AugmentOptions,
                 intensity: bool = True) -> Augmented | None:
    """One augmented copy of a case, or None when every draw failed the plausibility check."""
    grid = image.grid
    rejected = 0
    for _ in range(opts.max_tries):
        affine = random_affine(rng, grid, opts)
        u = svf_displacement(rng, grid, opts) if opts.svf_max_mm > 0 else None
        det = (np.full(grid.shape, np.linalg.det(affine[:3, :3])) if u is None
               else jacobian_determinant(u, grid, affine))
        lo, hi = float(det.min()), float(det.max())
        if lo <= 0 or lo < opts.min_det or hi > opts.max_det:
            rejected += 1
            continue
        transform = to_itk(affine, u, grid)
        warped = _resample(image.array.astype(np.float32), grid, transform, nearest=False)
        params = {"affine_lps": affine.tolist(), "svf_max_mm": opts.svf_max_mm, "svf_sigma_mm": opts.svf_sigma_mm}
        if intensity:
            warped, iparams = _intensity(rng, warped, grid, opts)
            params.update(iparams)
        new_labels = _resample(labels, grid, transform, True).astype(np.int32) if labels is not None else None
        new_mask = _resample(mask, grid, transform, True).astype(np.uint8) if mask is not None else None
        new_points, new_point_labels = None, []
        if points is not None and len(points):
            inv, ok = invert_points(transform, affine, np.asarray(points, float))
            new_points = inv[ok]
            new_point_labels = [lab for lab, k in zip(point_labels, ok) if k]
        return Augmented(Image(warped, grid, "augmented"), new_labels, new_mask, new_points, new_point_labels,
                         transform, (lo, hi), rejected, params)
    logger.info("augmentation: %d draws rejected, none accepted", rejected)
    return None
