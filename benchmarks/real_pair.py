#!/usr/bin/env python3
"""Real inter-subject anatomy: ICBM152 2009a (fixed) vs Colin27 (moving), this engine vs ANTs SyN vs elastix.

The synthetic benchmark (:mod:`run_benchmark`) knows the true transform but its deformations are smooth
random fields. Here the two brains are different people's anatomy (the ICBM152 2009a nonlinear symmetric
T1 average from the ``nilearn`` wheel on PyPI, and Colin27 ``ch2bet`` from Debian ``mricron-data``), both
1 mm, skull-stripped, roughly MNI-aligned. There is no ground truth, so the score is tissue overlap:

- fixed labels: ICBM152 grey / white matter probability maps > 0.5 (1 = GM, 2 = WM);
- moving labels: a 3-class k-means (CSF / GM / WM) of Colin27's intensities inside the brain.

Both label sets are crude, and the same for every method, so the comparison is fair even if the absolute
Dice is not a gold-standard figure. Each method runs as one whole process (as in :mod:`run_benchmark`);
evaluation: moving labels → fixed grid (nearest neighbour) with each method's full transform, Dice for GM
and WM, folding % of det J on the fixed grid.

Usage::

    python benchmarks/real_pair.py --out benchmarks/results-real [--methods deepreg ants elastix]
        [--peer-python /path/to/python] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_benchmark as rb  # noqa: E402
import synthetic_pairs as sp  # noqa: E402

logger = logging.getLogger("real_pair")
NILEARN = "nilearn==0.14.1"
ICBM = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def icbm_files(cache: Path) -> dict[str, Path]:
    """ICBM152 2009a T1 / GM / WM from the nilearn wheel (downloaded from PyPI into ``cache`` once)."""
    out = {k: cache / Path(ICBM.format(k)).name for k in ("t1", "gm", "wm")}
    if all(p.exists() for p in out.values()):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", NILEARN, "--no-deps", "-q", "-d", str(cache)],
                   check=True)
    wheel = next(cache.glob("nilearn-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for k, p in out.items():
            p.write_bytes(z.read(ICBM.format(k)))
    return out


def build_pair(out: Path, cache: Path, templates: str | None) -> SimpleNamespace:
    """Writes fixed/moving images and tissue labels into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    icbm = icbm_files(cache)
    t1 = sitk.Cast(sitk.ReadImage(str(icbm["t1"])), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(icbm["gm"]))).astype(float)
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(icbm["wm"]))).astype(float)
    scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0  # the wheel stores the maps as uint8
    lab = np.zeros(gm.shape, np.uint8)
    lab[(gm > 0.5 * scale) & (gm >= wm)] = 1
    lab[(wm > 0.5 * scale) & (wm > gm)] = 2
    fixed_labels = sitk.GetImageFromArray(lab)
    fixed_labels.CopyInformation(t1)

    ch2 = sitk.ReadImage(str(sp.find_templates(templates, download_to=cache / "mricron") / "ch2bet.nii.gz"),
                         sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(ch2)
    brain = a > 0.05 * np.percentile(a, 99)
    values = a[brain]
    centers = np.percentile(values, [15, 50, 85]).astype(float)
    for _ in range(50):  # 1-D k-means: CSF < GM < WM on T1
        k = np.argmin(np.abs(values[:, None] - centers[None]), 1)
        centers = np.array([values[k == i].mean() for i in range(3)])
    k = np.argmin(np.abs(a[..., None] - centers), -1)
    mlab = np.zeros(a.shape, np.uint8)
    mlab[brain & (k == 1)] = 1
    mlab[brain & (k == 2)] = 2
    moving_labels = sitk.GetImageFromArray(mlab)
    moving_labels.CopyInformation(ch2)

    pair = SimpleNamespace(fixed=out / "fixed.nii.gz", moving=out / "moving.nii.gz",
                           fixed_labels=out / "fixed_labels.nii.gz", moving_labels=out / "moving_labels.nii.gz")
    for img, p in ((t1, pair.fixed), (ch2, pair.moving), (fixed_labels, pair.fixed_labels),
                   (moving_labels, pair.moving_labels)):
        sitk.WriteImage(img, str(p), True)
    return pair


def evaluate(method: str, run_dir: Path, pair: SimpleNamespace) -> dict:
    """Tissue Dice (GM, WM) and folding % of one method's transform."""
    fixed_lab = sitk.ReadImage(str(pair.fixed_labels))
    moving_lab = sitk.ReadImage(str(pair.moving_labels))
    t = rb.load_transform(method, run_dir)
    warped = sitk.Resample(moving_lab, fixed_lab, t, sitk.sitkNearestNeighbor, 0, moving_lab.GetPixelID())
    fa = sitk.GetArrayFromImage(fixed_lab).astype(np.int64)
    wa = sitk.GetArrayFromImage(warped).astype(np.int64)
    dice = rb.dice_per_label(fa, wa, np.array([1, 2]))
    disp = sitk.TransformToDisplacementField(t, sitk.sitkVectorFloat64, fixed_lab.GetSize(), fixed_lab.GetOrigin(),
                                             fixed_lab.GetSpacing(), fixed_lab.GetDirection())
    jac = sp.jacobian_determinant(disp)
    return {"dice_gm": float(dice[0]), "dice_wm": float(dice[1]), "dice_mean": float(np.mean(dice)),
            "folding_pct": float(100.0 * np.mean(jac <= 0)), "jacobian_min": float(jac.min())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results-real"))
    ap.add_argument("--methods", nargs="+", default=list(rb.METHODS), choices=rb.METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-python", default=sys.executable, help="Python with antspyx and itk-elastix")
    ap.add_argument("--deepreg-cli", help="path of the deepregistration executable")
    ap.add_argument("--deepreg-args", default="")
    ap.add_argument("--templates", help="mricron templates folder")
    ap.add_argument("--cache", default=str(HERE.parent / ".cache"), help="download cache (nilearn wheel, mricron)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    pair = build_pair(out / "pair", Path(args.cache), args.templates)
    env = rb.thread_env(args.threads)
    rows = [{"method": "none", **evaluate("none", out, pair)}]
    for method in args.methods:
        run_dir = out / "runs" / method
        cmd, _ = rb.method_commands(method, pair, run_dir, args, seed=0)
        if method == "elastix":  # elastix's transform is evaluated from its exported field
            _, export = rb.method_commands(method, pair, run_dir, args, seed=0)
        res = rb.run_measured(cmd, out / "runs" / f"{method}.log", env, args.timeout)  # not inside run_dir: the
        # engine replaces its output folder as a whole
        if res.returncode != 0:
            logger.error("%s failed:\n%s", method, res.log)
            continue
        if method == "elastix":
            subprocess.run(export, env=env, check=True, cwd=run_dir, capture_output=True)
        row = {"method": method, **evaluate(method, run_dir, pair), "time_s": res.wall_s,
               "peak_mb": res.peak_rss_mb}
        logger.info("%s", row)
        rows.append(row)
    ants_time = next((r["time_s"] for r in rows if r["method"] == "ants"), None)
    lines = ["# Real anatomy: ICBM152 2009a (fixed) vs Colin27 (moving), 1 mm", "",
             f"{args.threads} threads per method; tissue Dice against crude labels (see benchmarks/real_pair.py).", "",
             "| method | Dice GM | Dice WM | folding % | time s | peak MB | time / ANTs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("time_s")
        ratio = f"{t / ants_time:.2f}" if t and ants_time else "–"
        lines.append(f"| {r['method']} | {r['dice_gm']:.4f} | {r['dice_wm']:.4f} | {r['folding_pct']:.4f} | "
                     f"{t:.1f} | {r['peak_mb']:.0f} | {ratio} |" if t else
                     f"| {r['method']} | {r['dice_gm']:.4f} | {r['dice_wm']:.4f} | {r['folding_pct']:.4f} | – | – | – |")
    (out / "real_results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "real_results.json").write_text(json.dumps({"rows": rows, "environment": rb.environment(args)}, indent=2),
                                           encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
