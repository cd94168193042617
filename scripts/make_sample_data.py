#!/usr/bin/env python3
"""Builds the bundled sample pair ``DeepRegistration/Resources/SampleData/`` from Debian mricron-data.

The pair is made by :func:`benchmarks.synthetic_pairs.make_pair` (Colin27 ch2bet + AAL, a known random
affine + smooth deformation, an intensity change) at 2.5 mm if everything fits in ``--max-mb`` (3 MB),
else at 3 mm, with a fixed seed. The fixed image is stored LPS, the moving one RAS (``diag(-1,-1,1)``
direction) so that orientation handling is exercised. Writes ``README.md`` (provenance, drawn parameters,
how to regenerate) and ``LICENSE-mricron-data.txt``, then checks the result and prints the checks.

Usage::

    .venv/bin/python scripts/make_sample_data.py [--templates DIR] [--seed 42] [--out DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_pairs as sp  # noqa: E402

logger = logging.getLogger("make_sample_data")
DEFAULT_OUT = ROOT / "DeepRegistration" / "Resources" / "SampleData"
PAIR_FILES = ("fixed.nii.gz", "fixed_labels.nii.gz", "moving.nii.gz", "moving_labels.nii.gz",
              "fixed_landmarks.csv", "moving_landmarks.csv", "fixed_landmarks.mrk.json",
              "moving_landmarks.mrk.json", "gt_moving_to_fixed.h5", "pair.json")


def debian_version(templates_dir: Path) -> str:
    """Version of the mricron-data package the templates came from (from its changelog.Debian.gz)."""
    ch = templates_dir.parents[1] / "doc" / "mricron-data" / "changelog.Debian.gz"
    if ch.exists():
        m = re.match(r"\S+ \(([^)]+)\)", gzip.open(ch, "rt").readline())
        if m:
            return m.group(1)
    return "unknown"


def dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of ``a`` (nanmean; a label missing from both is skipped)."""
    vals = []
    for lab in np.unique(a[a > 0]):
        x, y = a == lab, b == lab
        s = x.sum() + y.sum()
        vals.append(2.0 * np.logical_and(x, y).sum() / s if s else np.nan)
    return float(np.nanmean(vals))


def run_checks(out: Path, templates: Path) -> dict:
    """Sanity checks of a written pair; returns the numbers (Dice, NCC, landmark distances)."""
    fixed = sitk.ReadImage(str(out / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(out / "moving.nii.gz"))
    flab = sitk.ReadImage(str(out / "fixed_labels.nii.gz"))
    mlab = sitk.ReadImage(str(out / "moving_labels.nii.gz"))
    gt = sitk.ReadTransform(str(out / "gt_moving_to_fixed.h5"))
    fa, ma = sitk.GetArrayViewFromImage(flab), sitk.GetArrayViewFromImage(mlab)
    # no registration: moving labels seen on the fixed grid in physical space
    m_on_f = sitk.Resample(mlab, flab, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    # ground truth: fixed labels pulled through S onto the moving grid (two nearest-neighbour steps)
    f_on_m = sitk.Resample(flab, mlab, gt, sitk.sitkNearestNeighbor, 0)
    # ground truth from the 1 mm AAL (how moving_labels was made): must be identical
    aal = sitk.ReadImage(str(templates / "aal.nii.gz"))
    aal_on_m = sitk.Resample(aal, mlab, gt, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # intensities: fixed through S vs moving (the moving image also carries gamma/bias/noise)
    fi_on_m = sitk.GetArrayFromImage(sitk.Resample(fixed, moving, gt, sitk.sitkLinear, 0.0))
    mi = sitk.GetArrayFromImage(moving)
    fi_id = sitk.GetArrayFromImage(sitk.Resample(fixed, moving, sitk.Transform(), sitk.sitkLinear, 0.0))
    ncc = lambda a, b: float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])  # noqa: E731
    fpts = np.loadtxt(out / "fixed_landmarks.csv", delimiter=",", skiprows=2, usecols=(1, 2, 3))
    mpts = np.loadtxt(out / "moving_landmarks.csv", delimiter=",", skiprows=2, usecols=(1, 2, 3))
    mapped = np.array([gt.TransformPoint([float(v) for v in p]) for p in mpts])
    checks = {
        "fixed_size_xyz": list(fixed.GetSize()), "moving_size_xyz": list(moving.GetSize()),
        "spacing_mm": list(fixed.GetSpacing()),
        "fixed_direction": [round(v, 3) for v in fixed.GetDirection()],
        "moving_direction": [round(v, 3) for v in moving.GetDirection()],
        "n_labels_fixed": int(len(np.unique(fa)) - 1), "n_labels_moving": int(len(np.unique(ma)) - 1),
        "dice_no_registration": round(dice_mean(fa, sitk.GetArrayViewFromImage(m_on_f)), 4),
        "dice_fixed_labels_through_gt_vs_moving_labels": round(dice_mean(sitk.GetArrayViewFromImage(f_on_m), ma), 4),
        "dice_aal_1mm_through_gt_vs_moving_labels": round(dice_mean(sitk.GetArrayViewFromImage(aal_on_m), ma), 4),
        "ncc_fixed_through_gt_vs_moving": round(ncc(fi_on_m, mi), 4),
        "ncc_no_registration": round(ncc(fi_id, mi), 4),
        "n_landmarks": int(len(fpts)),
        "landmark_distance_no_registration_mm_mean": round(float(np.linalg.norm(fpts - mpts, axis=1).mean()), 3),
        "landmark_gt_residual_mm_max": float(f"{np.linalg.norm(mapped - fpts, axis=1).max():.3g}"),
    }
    return checks


def write_readme(out: Path, meta: dict, checks: dict, version: str, seed: int, spacing: float) -> None:
    """README.md of the sample data: provenance, license, how the pair was made, how to regenerate it."""
    p = meta["parameters"]
    total_kb = sum((out / f).stat().st_size for f in PAIR_FILES if (out / f).exists()) / 1024
    text = f"""# Sample data: a synthetic Colin27 registration pair

A small fixed/moving brain MRI pair with a **known** ground-truth transform, label maps and landmarks, used by
`make demo`, the tests and the module's sample-data button. Total size of the pair: {total_kb:.0f} kB.

## Provenance and license
- Source: Debian package **mricron-data {version}** (`apt-get download mricron-data && dpkg -x
  mricron-data_*.deb DIR`), folder `usr/share/mricron/templates/`:
  - `ch2bet.nii.gz`: Colin27 ("ch2") single-subject T1 MRI, brain extracted, 181×217×181, 1 mm;
  - `aal.nii.gz` + `aal.nii.txt`: the 116-region AAL atlas on the same grid (region names used as labels).
- License: BSD-3-clause (MRIcron, Copyright 2006-2010 Chris Rorden); the Debian copyright file is copied
  here as `LICENSE-mricron-data.txt`.

## Files (LPS millimetres everywhere)
| file | content |
|---|---|
| `fixed.nii.gz` | ch2bet, Gaussian anti-aliased (σ = {p['antialias_sigma_mm']} mm) and resampled to {spacing} mm, cropped to the brain + 8 mm; float32; stored **LPS** (identity direction) |
| `fixed_labels.nii.gz` | AAL on the fixed grid (nearest neighbour), uint8 |
| `moving.nii.gz` | the same anatomy through the known transform S, with an intensity change (below); float32; its own grid, stored **RAS** (direction diag(-1,-1,1)) |
| `moving_labels.nii.gz` | AAL through S on the moving grid (nearest neighbour), uint8 |
| `gt_moving_to_fixed.h5` | S, moving → fixed (LPS): ITK CompositeTransform [AffineTransform, BSplineTransform], S(y) = A(y + d(y)) |
| `fixed_landmarks.csv` / `.mrk.json` | {checks['n_landmarks']} centroids of the most compact AAL regions (LPS mm) |
| `moving_landmarks.csv` / `.mrk.json` | the same points mapped into moving space: S⁻¹(x) by fixed-point iteration (residual {p['landmark_inverse_residual_mm']} mm) |
| `pair.json` | every drawn parameter, both grids |

`moving(y) = fixed(S(y))`: resampling `fixed.nii.gz` with `gt_moving_to_fixed.h5` onto the moving grid
reproduces `moving.nii.gz` before its intensity change. A registration result T (fixed → moving, the
resampling direction) should approximate S⁻¹: T(fixed landmark) ≈ moving landmark.

## How the pair was made (seed {seed}, spacing {spacing} mm)
- Affine A about the brain centre {p['affine_center_mm']} mm: rotations (x, y, z) {p['rotation_deg_xyz']}°,
  translation {p['translation_mm_xyz']} mm, scales {p['scales_xyz']}, shears (xy, xz, yz)
  {p['shears_xy_xz_yz']} (drawn from ±10°, ±10 mm, 0.92–1.08, ±0.04).
- Smooth displacement d: cubic B-spline on a {p['control_spacing_mm']} mm control grid over the moving
  grid, Gaussian-smoothed random coefficients (σ = 1 control point), scaled to a maximum of
  {p['max_displacement_mm']} mm (drawn from 5–7 mm). Minimum det J of S: {p['min_jacobian_S']}.
- Moving grid: covers A⁻¹(brain) + d + 8 mm, origin moved outwards by {p['moving_origin_shift_mm']} mm.
  Moving intensities are resampled from the 1 mm original (smoothed once), not from the fixed image.
- Intensity change: gamma {p['gamma']} (drawn from 0.8–1.25), smooth multiplicative bias field
  ±{int(p['bias_amplitude'] * 100)} %, Gaussian noise σ = {p['noise_sigma']} (2 % of the 99th percentile).

## Checks (computed by the script)
- Label regions: {checks['n_labels_fixed']} on the fixed grid, {checks['n_labels_moving']} on the moving grid.
- Mean Dice of the label maps without registration: **{checks['dice_no_registration']}**.
- Fixed labels pulled through S onto the moving grid vs `moving_labels` (two nearest-neighbour steps):
  Dice {checks['dice_fixed_labels_through_gt_vs_moving_labels']}; the 1 mm AAL through S: Dice
  {checks['dice_aal_1mm_through_gt_vs_moving_labels']}.
- NCC of the fixed image through S vs the moving image: {checks['ncc_fixed_through_gt_vs_moving']}
  (without registration {checks['ncc_no_registration']}).
- Landmarks: mean distance without registration {checks['landmark_distance_no_registration_mm_mean']} mm;
  max |S(moving landmark) − fixed landmark| = {checks['landmark_gt_residual_mm_max']} mm.

## Regenerate
```
apt-get download mricron-data && dpkg -x mricron-data_*.deb /tmp/mri/d   # if not installed
.venv/bin/python scripts/make_sample_data.py --templates /tmp/mri/d/usr/share/mricron/templates --seed {seed}
```
(`--spacing {spacing}` forces the voxel size; without it the script takes 2.5 mm when the pair stays
≤ 3 MB, else 3 mm.) The same generator makes the benchmark pairs (`benchmarks/synthetic_pairs.py`).
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--templates", help="mricron templates folder (default: search)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--spacing", type=float, help="force a voxel size (mm)")
    ap.add_argument("--max-mb", type=float, default=3.0, help="size budget for the 2.5 mm choice (MB)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    templates = sp.find_templates(args.templates)
    out = Path(args.out)
    spacings = [args.spacing] if args.spacing else [2.5, 3.0]
    for spacing in spacings:
        with tempfile.TemporaryDirectory() as tmp:
            sp.make_pair(templates, spacing, args.seed, tmp, fixed_orientation="LPS",
                                 moving_orientation="RAS")
            mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
            print(f"spacing {spacing} mm: pair is {mb:.2f} MB")
            if mb > args.max_mb and spacing != spacings[-1]:
                continue
            out.mkdir(parents=True, exist_ok=True)
            for f in PAIR_FILES:
                shutil.copy(Path(tmp) / f, out / f)
            break
    copyright_file = templates.parents[1] / "doc" / "mricron-data" / "copyright"
    if copyright_file.exists():
        shutil.copy(copyright_file, out / "LICENSE-mricron-data.txt")
    else:
        logger.warning("Debian copyright file not found at %s", copyright_file)
    checks = run_checks(out, templates)
    meta = json.loads((out / "pair.json").read_text())
    write_readme(out, meta, checks, debian_version(templates), args.seed, spacing)
    print(json.dumps(checks, indent=2))
    total = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"total size of {out}: {total:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
