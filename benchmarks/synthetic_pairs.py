#!/usr/bin/env python3
"""Synthetic registration pairs with a known ground-truth transform, built from Colin27 (ch2bet) + AAL.

Source data: Debian ``mricron-data`` (BSD-3-clause), ``usr/share/mricron/templates/``:
``ch2bet.nii.gz`` (Colin27 T1 brain, 181×217×181, 1 mm) and ``aal.nii.gz`` (116 AAL labels, same grid),
``aal.nii.txt`` (``index name code`` per line).

A pair is the same anatomy seen twice:

- **fixed**: ch2bet Gaussian anti-aliased and resampled to ``spacing_mm`` on a grid cropped to the brain's
  bounding box + a margin; ``fixed_labels``: AAL, nearest neighbour on the same grid.
- **moving**: ch2bet (from the 1 mm original, smoothed once) seen through a known random transform
  ``S`` (moving space → fixed space, LPS mm): ``moving(y) = fixed(S(y))``, on its own grid (other origin,
  optionally another direction), then an intensity change (gamma, smooth multiplicative bias, Gaussian
  noise). ``moving_labels``: AAL through ``S``, nearest neighbour.

``S(y) = A(y + d(y))`` with ``A`` a random affine about the brain centre (rotations, scales, shears,
translation) and ``d`` a smooth random displacement (cubic B-spline on a coarse control grid, Gaussian-
smoothed random coefficients, rescaled to a drawn maximum magnitude in mm). ``S`` is written as
``gt_moving_to_fixed.h5``: an ITK CompositeTransform ``[AffineTransform, BSplineTransform]`` (ITK applies
the last one first, so ``S(y) = A(y + d(y))``); resampling the fixed image with it onto the moving grid
reproduces the moving image before the intensity change. (A B-spline is used instead of a dense
displacement field because it is the same smooth field in ~30 kB instead of several MB: ITK's HDF5
transform writer does not compress.)

Landmarks: centroids of compact AAL regions (LPS mm, in fixed space) and their exact pre-images
``S⁻¹(x)`` in moving space (fixed-point iteration, residual checked < 1e-4 mm), as CSV and Slicer
markups JSON.

Conventions: LPS millimetres everywhere; numpy arrays from SimpleITK are ``(Z, Y, X)``; vectors and
points are ``(x, y, z)`` LPS.

CLI::

    python benchmarks/synthetic_pairs.py --spacing 2 --seed 0 --out /tmp/pair \
        [--templates DIR] [--fixed-orientation native|LPS|RAS|...] [--moving-orientation same|RAS|...]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger("synthetic_pairs")

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
TEMPLATE_DIR_CANDIDATES = (
    "/usr/share/mricron/templates",
    "/tmp/mri/d/usr/share/mricron/templates",
)
# LPS unit vectors of the anatomical letters of an orientation code (axis i, j, k point *towards* them).
_LETTER_AXES = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


@dataclass
class PairParameters:
    """Everything that was drawn or chosen for one pair (all lengths in mm, angles in degrees)."""

    seed: int
    spacing_mm: float
    antialias_sigma_mm: float
    rotation_deg_xyz: list[float]
    translation_mm_xyz: list[float]
    scales_xyz: list[float]
    shears_xy_xz_yz: list[float]
    affine_center_mm: list[float]
    affine_matrix: list[list[float]]
    control_spacing_mm: float
    max_displacement_mm: float
    gamma: float
    bias_amplitude: float
    noise_sigma: float
    noise_sigma_fraction_of_p99: float
    moving_origin_shift_mm: list[float]
    fixed_orientation: str
    moving_orientation: str
    min_jacobian_S: float = float("nan")
    landmark_inverse_residual_mm: float = float("nan")
    n_landmarks: int = 0


@dataclass
class PairFiles:
    """Paths of the files written by :func:`make_pair` plus the drawn parameters."""

    out_dir: Path
    fixed: Path
    fixed_labels: Path
    moving: Path
    moving_labels: Path
    fixed_landmarks_csv: Path
    moving_landmarks_csv: Path
    fixed_landmarks_json: Path
    moving_landmarks_json: Path
    gt_transform: Path
    params_json: Path
    params: PairParameters = field(repr=False, default=None)  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------------
# Source data
# --------------------------------------------------------------------------------------------------
def find_templates(templates_dir: str | os.PathLike | None = None, *, download_to: str | os.PathLike | None = None
                   ) -> Path:
    """Returns the mricron ``templates`` folder holding ch2bet.nii.gz and aal.nii.gz.

    Looks at ``templates_dir``, ``$MRICRON_TEMPLATES``, the Debian install location and a previous
    extraction; if none exists and ``download_to`` is given, runs ``apt-get download mricron-data`` and
    ``dpkg -x`` into ``download_to`` (no root needed; ``apt-get update`` may be needed first).
    """
    cands = [templates_dir, os.environ.get("MRICRON_TEMPLATES"), *TEMPLATE_DIR_CANDIDATES]
    if download_to is not None:
        cands.append(Path(download_to) / "usr/share/mricron/templates")
    for c in cands:
        if c and (Path(c) / "ch2bet.nii.gz").exists() and (Path(c) / "aal.nii.gz").exists():
            return Path(c)
    if download_to is None:
        raise FileNotFoundError("mricron templates not found; install Debian mricron-data or give --templates "
                                "(apt-get download mricron-data && dpkg -x mricron-data_*.deb DIR)")
    dest = Path(download_to)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("downloading Debian mricron-data into %s", dest)
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp, check=True)
        deb = next(Path(tmp).glob("mricron-data_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
        shutil.copy(deb, dest / deb.name)
    return dest / "usr/share/mricron/templates"


def read_aal_names(templates_dir: str | os.PathLike) -> dict[int, str]:
    """AAL index → region name from ``aal.nii.txt`` (lines ``index name code``)."""
    names: dict[int, str] = {}
    p = Path(templates_dir) / "aal.nii.txt"
    if p.exists():
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    return names


# --------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------
def orientation_direction(code: str) -> np.ndarray:
    """3×3 LPS direction matrix (columns = index axes i, j, k) whose axes point towards ``code``'s letters.

    ``"LPS"`` is the identity; ``"RAS"`` is ``diag(-1, -1, 1)`` (NIfTI/Slicer-style storage).
    """
    code = code.upper()
    if len(code) != 3 or set(code) - set(_LETTER_AXES):
        raise ValueError(f"orientation code must be 3 letters from LRPAIS, got {code!r}")
    d = np.array([_LETTER_AXES[c] for c in code], dtype=float).T
    if abs(abs(np.linalg.det(d)) - 1.0) > 1e-9:
        raise ValueError(f"orientation code {code!r} does not name three different axes")
    return d


def index_to_physical(img: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """Continuous indices ``(N, 3)`` in ``(i, j, k)`` = ``(x, y, z)`` index order → LPS points ``(N, 3)`` mm."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (np.asarray(ijk, float) * np.asarray(img.GetSpacing())) @ d.T


def covering_grid(points: np.ndarray, direction: np.ndarray, spacing_mm: float, margin_mm: float,
                  shift_mm: np.ndarray | None = None) -> sitk.Image:
    """An empty uint8 reference image with ``direction`` and isotropic ``spacing_mm`` covering ``points`` (LPS).

    Args:
        points: ``(N, 3)`` LPS points to cover.
        direction: 3×3 direction (columns = index axes in LPS).
        spacing_mm: Voxel size.
        margin_mm: Extra extent on every side.
        shift_mm: Optional extra extent (mm) on the low side of each index axis (moves the origin).
    """
    q = np.asarray(points, float) @ direction  # coordinates along the index axes
    lo = q.min(axis=0) - margin_mm
    hi = q.max(axis=0) + margin_mm
    if shift_mm is not None:  # moves the low corner (origin) outwards only, so nothing is cut off
        lo = lo - np.abs(shift_mm)
    size = [int(math.ceil((h - l) / spacing_mm)) + 1 for l, h in zip(lo, hi)]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetDirection([float(v) for v in direction.ravel()])
    ref.SetOrigin([float(v) for v in direction @ lo])
    return ref


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in radians about the LPS x, y, z axes."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


def _smooth_random_image(rng: np.random.Generator, shape_zyx: tuple[int, ...], sigma_vox: float,
                         components: int = 1) -> np.ndarray:
    """Gaussian-smoothed standard-normal noise, shape ``(Z, Y, X)`` or ``(Z, Y, X, C)``."""
    out = []
    for _ in range(components):
        img = sitk.GetImageFromArray(rng.standard_normal(shape_zyx))
        if sigma_vox > 0:
            img = sitk.DiscreteGaussian(img, variance=float(sigma_vox) ** 2, useImageSpacing=False)
        out.append(sitk.GetArrayFromImage(img))
    return np.stack(out, axis=-1) if components > 1 else out[0]


def random_bspline_displacement(rng: np.random.Generator, ref: sitk.Image, control_spacing_mm: float,
                                max_displacement_mm: float) -> tuple[sitk.BSplineTransform, sitk.Image]:
    """A smooth random cubic B-spline displacement over ``ref``'s extent, max |d| = ``max_displacement_mm``.

    Returns the transform and its dense displacement field sampled on ``ref`` (vector float64, LPS mm).
    """
    extent = np.array(ref.GetSize()) * np.array(ref.GetSpacing())
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bsp = sitk.BSplineTransformInitializer(ref, mesh, 3)
    shape_xyz = tuple(int(n) for n in bsp.GetCoefficientImages()[0].GetSize())
    coef = _smooth_random_image(rng, shape_xyz[::-1], sigma_vox=1.0, components=3)  # (Z, Y, X, 3)
    params = np.concatenate([coef[..., c].ravel() for c in range(3)])  # ITK: all x, then all y, then all z
    bsp.SetParameters([float(v) for v in params])
    disp = sitk.TransformToDisplacementField(bsp, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                             ref.GetSpacing(), ref.GetDirection())
    mag = np.sqrt((sitk.GetArrayViewFromImage(disp) ** 2).sum(-1)).max()
    scale = max_displacement_mm / mag
    bsp.SetParameters([float(v) for v in params * scale])
    disp = sitk.TransformToDisplacementField(bsp, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                             ref.GetSpacing(), ref.GetDirection())
    return bsp, disp


def jacobian_determinant(disp: sitk.Image) -> np.ndarray:
    """det(I + ∂u/∂x) of a displacement field image (vectors LPS mm), array ``(Z, Y, X)``.

    Derivatives are central differences along the index axes (mm), rotated into LPS with the image
    direction, so any orientation is handled.
    """
    u = sitk.GetArrayViewFromImage(disp).astype(np.float32)  # (Z, Y, X, 3)
    sp = disp.GetSpacing()
    d = np.array(disp.GetDirection()).reshape(3, 3)
    # g[..., c, k] = du_c / dxi_k, xi_k = mm along index axis k (k = 0 -> i/x index, array axis 2)
    g = np.empty(u.shape[:3] + (3, 3), np.float32)
    for k, ax in enumerate((2, 1, 0)):
        g[..., :, k] = np.gradient(u, sp[k], axis=ax)
    jac = g @ d.T.astype(np.float32) + np.eye(3, dtype=np.float32)  # du/dx = du/dxi · D^T
    return np.linalg.det(jac)


# --------------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------------
def compact_label_centroids(labels: sitk.Image, names: dict[int, str], n_max: int = 48
                            ) -> list[tuple[str, np.ndarray]]:
    """Centroids (LPS mm) of the ``n_max`` most compact labels whose centroid voxel lies inside the label.

    Compactness = RMS distance to the centroid / that of a ball of the same volume (1 for a ball).
    Returns ``[(label_name, xyz)]`` sorted by label index; names are ``AAL<index>_<region>``.
    """
    arr = sitk.GetArrayViewFromImage(labels)
    flat = arr.ravel()
    nz = np.flatnonzero(flat)
    order = np.argsort(flat[nz], kind="stable")
    nz = nz[order]
    values, starts, counts = np.unique(flat[nz], return_index=True, return_counts=True)
    voxvol = float(np.prod(labels.GetSpacing()))
    cands = []
    for lab, s, c in zip(values, starts, counts):
        if c < 50:
            continue
        zyx = np.stack(np.unravel_index(nz[s:s + c], arr.shape), axis=1).astype(float)
        pts = index_to_physical(labels, zyx[:, ::-1])
        cen = pts.mean(axis=0)
        rms = math.sqrt(((pts - cen) ** 2).sum(1).mean())
        r_eq = (3.0 * c * voxvol / (4.0 * math.pi)) ** (1.0 / 3.0)
        ratio = rms / (math.sqrt(3.0 / 5.0) * r_eq)
        idx = labels.TransformPhysicalPointToIndex([float(v) for v in cen])
        inside = all(0 <= idx[a] < labels.GetSize()[a] for a in range(3)) and \
            int(arr[idx[2], idx[1], idx[0]]) == int(lab)
        if inside:
            cands.append((ratio, int(lab), cen))
    cands.sort(key=lambda t: t[0])
    chosen = sorted(cands[:n_max], key=lambda t: t[1])
    return [(f"AAL{lab:03d}_{names.get(lab, 'label')}", cen) for _, lab, cen in chosen]


def invert_points(transform: sitk.Transform, linear: np.ndarray, points: np.ndarray, tol_mm: float = 1e-4,
                  max_iter: int = 500) -> tuple[np.ndarray, float]:
    """Solves ``transform(y) = x`` for every ``x`` in ``points`` (``(N, 3)`` LPS mm) by fixed-point iteration.

    ``y ← y − L⁻¹ (transform(y) − x)`` with ``L`` the linear part of the affine (a preconditioned form of
    ``y ← y − (S(y) − x)`` with the same fixed point; it converges in a few steps for smooth ``d``).

    Returns:
        ``(y (N, 3), max residual |transform(y) − x| in mm)``.
    """
    linv = np.linalg.inv(linear)
    out = np.empty_like(points, dtype=float)
    worst = 0.0
    for n, x in enumerate(np.asarray(points, float)):
        y = x.copy()
        r = np.inf
        for _ in range(max_iter):
            res = np.asarray(transform.TransformPoint([float(v) for v in y])) - x
            r = float(np.linalg.norm(res))
            if r < tol_mm * 0.1:
                break
            y = y - linv @ res
        out[n] = y
        worst = max(worst, r)
    if worst >= tol_mm:
        raise RuntimeError(f"landmark inversion did not converge: residual {worst:.3g} mm")
    return out, worst


def write_landmarks_csv(path: Path, rows: list[tuple[str, np.ndarray]]) -> None:
    """CSV ``label,x,y,z`` (LPS mm) after a ``# coordinateSystem = LPS`` comment line."""
    with open(path, "w", newline="") as f:
        f.write("# coordinateSystem = LPS\n")
        w = csv.writer(f)
        w.writerow(["label", "x", "y", "z"])
        for name, p in rows:
            w.writerow([name] + [f"{v:.5f}" for v in p])


def write_markups_json(path: Path, rows: list[tuple[str, np.ndarray]], name: str) -> None:
    """Slicer point-list markups JSON (schema v1.0.3), ``coordinateSystem`` LPS."""
    cps = [{"id": str(i + 1), "label": lab, "description": "", "associatedNodeID": "",
            "position": [round(float(v), 5) for v in p],
            "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True, "positionStatus": "defined"}
           for i, (lab, p) in enumerate(rows)]
    doc = {"@schema": MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "name": name, "coordinateSystem": "LPS", "coordinateUnits": "mm",
                        "locked": False, "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                        "lastUsedControlPointNumber": len(cps), "controlPoints": cps, "measurements": []}]}
    path.write_text(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------------
def make_pair(templates_dir: str | os.PathLike, spacing_mm: float, seed: int, out_dir: str | os.PathLike, *,
              fixed_orientation: str = "native", moving_orientation: str = "same", n_landmarks: int = 48,
              fixed_margin_mm: float = 8.0, control_spacing_mm: float = 20.0,
              max_rotation_deg: float = 10.0, max_translation_mm: float = 10.0,
              scale_range: tuple[float, float] = (0.92, 1.08), max_shear: float = 0.04,
              displacement_range_mm: tuple[float, float] = (5.0, 7.0),
              gamma_range: tuple[float, float] = (0.8, 1.25), bias_amplitude: float = 0.15,
              noise_fraction: float = 0.02, max_origin_shift_mm: float = 4.0,
              moving_contrast: str = "same") -> PairFiles:
    """Builds one synthetic pair and writes it into ``out_dir`` (created if needed).

    Args:
        templates_dir: Folder with ch2bet.nii.gz, aal.nii.gz, aal.nii.txt (1 mm, same grid).
        spacing_mm: Isotropic voxel size of both images (mm).
        seed: Seed of every random draw.
        out_dir: Output folder.
        fixed_orientation: ``"native"`` (ch2bet's own direction, RAS-stored) or a 3-letter code (``"LPS"``).
        moving_orientation: ``"same"`` as the fixed one, or a 3-letter code (``"RAS"``, ``"LPS"``, ``"LIP"``...).
        n_landmarks: Maximum number of landmarks (the most compact AAL regions).
        moving_contrast: ``"same"`` (T1, like the fixed image) or ``"inverted"``: a synthetic second contrast
            for multimodal tests (inside the head the intensity order is reversed, T2-like: CSF bright, white
            matter dark; background stays dark), applied before gamma, bias and noise.
        The remaining keyword arguments bound the random draws (see the module docstring).

    Returns:
        :class:`PairFiles`.
    """
    rng = np.random.default_rng(seed)
    tdir = Path(templates_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t1 = sitk.ReadImage(str(tdir / "ch2bet.nii.gz"), sitk.sitkFloat32)
    aal = sitk.ReadImage(str(tdir / "aal.nii.gz"), sitk.sitkUInt8)
    names = read_aal_names(tdir)

    # --- fixed grid: brain bounding box + margin --------------------------------------------------
    brain = sitk.GetArrayViewFromImage(t1) > 0
    zyx = np.array(np.nonzero(brain))
    lo, hi = zyx.min(1), zyx.max(1)
    corners_ijk = np.array([[x, y, z] for x in (lo[2], hi[2]) for y in (lo[1], hi[1]) for z in (lo[0], hi[0])],
                           float)
    corners = index_to_physical(t1, corners_ijk)
    center = index_to_physical(t1, zyx[::-1].T.mean(0, keepdims=True))[0]
    src_dir = np.array(t1.GetDirection()).reshape(3, 3)
    f_dir = src_dir if fixed_orientation.lower() == "native" else orientation_direction(fixed_orientation)
    m_dir = f_dir if moving_orientation.lower() == "same" else orientation_direction(moving_orientation)
    fixed_ref = covering_grid(corners, f_dir, spacing_mm, fixed_margin_mm)

    # --- random affine A about the brain centre ------------------------------------------------------
    ang = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
    trans = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    scales = rng.uniform(*scale_range, 3)
    shears = rng.uniform(-max_shear, max_shear, 3)
    shear_m = np.array([[1, shears[0], shears[1]], [0, 1, shears[2]], [0, 0, 1]])
    mat = _rotation(*np.deg2rad(ang)) @ shear_m @ np.diag(scales)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in mat.ravel()])
    affine.SetCenter([float(v) for v in center])
    affine.SetTranslation([float(v) for v in trans])

    # --- moving grid: covers A^-1(brain) + displacement + margin, shifted origin, own direction ------
    dmax = float(rng.uniform(*displacement_range_mm))
    inv_aff = affine.GetInverse()
    brain_pts = index_to_physical(t1, zyx[::-1, ::17].T.astype(float))  # every 17th brain voxel is plenty
    pre = brain_pts @ np.linalg.inv(mat).T + np.asarray(inv_aff.TransformPoint([0.0, 0.0, 0.0]))  # A^-1(x)
    shift = rng.uniform(1.0, max_origin_shift_mm, 3)
    moving_ref = covering_grid(pre, m_dir, spacing_mm, dmax + fixed_margin_mm, shift_mm=shift)

    # --- smooth random displacement d on the moving grid; S(y) = A(y + d(y)) ----------------------------
    bsp, disp = random_bspline_displacement(rng, moving_ref, control_spacing_mm, dmax)
    gt = sitk.CompositeTransform([affine, bsp])  # ITK applies the last first: A(y + d(y))
    gt_path = out / "gt_moving_to_fixed.h5"
    sitk.WriteTransform(gt, str(gt_path))
    min_jac = float(jacobian_determinant(disp).min() * np.linalg.det(mat))
    if min_jac <= 0:
        raise RuntimeError(f"random transform folds (min det J = {min_jac:.3f}); lower the displacement")
    # the same mapping as a dense field (exact at the moving voxel centres), for fast resampling
    dense = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(sitk.Image(disp))])

    # --- images ---------------------------------------------------------------------------------------
    sigma = math.sqrt(max(spacing_mm ** 2 - max(t1.GetSpacing()) ** 2, 0.0)) / 2.3548  # FWHM = voxel size
    t1s = sitk.SmoothingRecursiveGaussian(t1, sigma) if sigma > 0 else t1
    fixed = sitk.Resample(t1s, fixed_ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_labels = sitk.Resample(aal, fixed_ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    moving_clean = sitk.Resample(t1s, moving_ref, dense, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving_labels = sitk.Resample(aal, moving_ref, dense, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    # --- intensity change on the moving image ---------------------------------------------------------
    m = sitk.GetArrayFromImage(moving_clean).astype(np.float64)
    p99 = float(np.percentile(m, 99))
    if moving_contrast == "inverted":
        inside = m > 0.1 * p99
        m = np.where(inside, 1.1 * p99 - np.clip(m, 0, 1.05 * p99), 0.0)
    elif moving_contrast != "same":
        raise ValueError(f"moving_contrast must be 'same' or 'inverted', not {moving_contrast!r}")
    gamma = float(rng.uniform(*gamma_range))
    m = p99 * (np.clip(m, 0, None) / p99) ** gamma
    extent = np.array(moving_ref.GetSize()) * spacing_mm
    coarse = sitk.GetImageFromArray(_smooth_random_image(rng, (5, 5, 5), sigma_vox=0.7))
    coarse.SetSpacing([float(e / 4.0) for e in extent])
    coarse.SetDirection(moving_ref.GetDirection())
    coarse.SetOrigin(moving_ref.GetOrigin())
    bias = sitk.GetArrayFromImage(sitk.Resample(coarse, moving_ref, sitk.Transform(), sitk.sitkBSpline, 0.0,
                                                sitk.sitkFloat64))
    bias -= bias.mean()
    bias = 1.0 + bias_amplitude * bias / np.abs(bias).max()
    noise_sigma = noise_fraction * p99
    m = m * bias + rng.normal(0.0, noise_sigma, m.shape)
    moving = sitk.GetImageFromArray(m.astype(np.float32))
    moving.CopyInformation(moving_ref)

    files = PairFiles(out, out / "fixed.nii.gz", out / "fixed_labels.nii.gz", out / "moving.nii.gz",
                      out / "moving_labels.nii.gz", out / "fixed_landmarks.csv", out / "moving_landmarks.csv",
                      out / "fixed_landmarks.mrk.json", out / "moving_landmarks.mrk.json", gt_path,
                      out / "pair.json")
    for img, p in ((fixed, files.fixed), (fixed_labels, files.fixed_labels), (moving, files.moving),
                   (moving_labels, files.moving_labels)):
        sitk.WriteImage(img, str(p), useCompression=True)

    # --- landmarks: compact AAL centroids (fixed) and S^-1 of them (moving) -----------------------------
    fixed_pts = compact_label_centroids(aal, names, n_landmarks)
    gt_read = sitk.ReadTransform(str(gt_path))  # exactly what users get
    moving_xyz, resid = invert_points(gt_read, mat, np.array([p for _, p in fixed_pts]))
    moving_pts = [(lab, y) for (lab, _), y in zip(fixed_pts, moving_xyz)]
    write_landmarks_csv(files.fixed_landmarks_csv, fixed_pts)
    write_landmarks_csv(files.moving_landmarks_csv, moving_pts)
    write_markups_json(files.fixed_landmarks_json, fixed_pts, "fixed_landmarks")
    write_markups_json(files.moving_landmarks_json, moving_pts, "moving_landmarks")

    params = PairParameters(
        seed=int(seed), spacing_mm=float(spacing_mm), antialias_sigma_mm=round(sigma, 5),
        rotation_deg_xyz=[round(float(v), 4) for v in ang], translation_mm_xyz=[round(float(v), 4) for v in trans],
        scales_xyz=[round(float(v), 5) for v in scales], shears_xy_xz_yz=[round(float(v), 5) for v in shears],
        affine_center_mm=[round(float(v), 4) for v in center], affine_matrix=np.round(mat, 6).tolist(),
        control_spacing_mm=control_spacing_mm, max_displacement_mm=round(dmax, 4), gamma=round(gamma, 5),
        bias_amplitude=bias_amplitude, noise_sigma=round(noise_sigma, 5), noise_sigma_fraction_of_p99=noise_fraction,
        moving_origin_shift_mm=[round(float(v), 4) for v in shift],
        fixed_orientation=fixed_orientation, moving_orientation=moving_orientation,
        min_jacobian_S=round(min_jac, 5), landmark_inverse_residual_mm=float(f"{resid:.3g}"),
        n_landmarks=len(fixed_pts))
    files.params = params
    meta = {"description": "synthetic pair: moving(y) = fixed(S(y)), S = gt_moving_to_fixed.h5 (LPS mm), "
                           "S(y) = A(y + d(y)); then gamma, bias field and noise on the moving image",
            "source": "Debian mricron-data: Colin27 ch2bet.nii.gz + aal.nii.gz (BSD-3-clause)",
            "parameters": asdict(params),
            "fixed_grid": _grid_dict(fixed), "moving_grid": _grid_dict(moving),
            "n_labels_fixed": int(len(np.unique(sitk.GetArrayViewFromImage(fixed_labels))) - 1),
            "n_labels_moving": int(len(np.unique(sitk.GetArrayViewFromImage(moving_labels))) - 1)}
    files.params_json.write_text(json.dumps(meta, indent=2))
    logger.info("pair seed %d at %.3g mm written to %s (fixed %s, moving %s, %d landmarks, min det J(S) %.3f)",
                seed, spacing_mm, out, fixed.GetSize(), moving.GetSize(), len(fixed_pts), min_jac)
    return files


def _grid_dict(img: sitk.Image) -> dict:
    return {"size_xyz": list(img.GetSize()), "spacing_mm": list(img.GetSpacing()),
            "origin_lps_mm": [round(v, 4) for v in img.GetOrigin()],
            "direction": [round(v, 6) for v in img.GetDirection()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", help="mricron templates folder (default: search, see find_templates)")
    ap.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--fixed-orientation", default="native", help="'native' (ch2bet's, RAS) or a code like LPS")
    ap.add_argument("--moving-orientation", default="same", help="'same' as fixed or a code like RAS")
    ap.add_argument("--n-landmarks", type=int, default=48)
    ap.add_argument("--download-to", help="if no templates are found, apt-get download mricron-data here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tdir = find_templates(args.templates, download_to=args.download_to)
    files = make_pair(tdir, args.spacing, args.seed, args.out, fixed_orientation=args.fixed_orientation,
                      moving_orientation=args.moving_orientation, n_landmarks=args.n_landmarks)
    print(json.dumps(asdict(files.params), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
