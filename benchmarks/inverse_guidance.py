#!/usr/bin/env python3
"""Inverse consistency and landmark guidance on the bundled pair, this engine beside ANTs SyN, in one run.

Rows (all on the bundled Colin27 pair, 3 mm, CPU):

1. **Inverse** of one registration: ``|T(T⁻¹(y)) - y|`` (mm, mean / 95th percentile) over the moving image's
   foreground: the ``inverse.h5`` that ``register`` writes (default: fixed-point inversion; ``--diffeomorphic``
   and ``--symmetric``: the negated velocity); ANTs SyN: its own ``fwdtransforms`` ∘ ``invtransforms``.
2. **Swapped pair**: register A→B and B→A separately; ``|T_AB(T_BA(y)) - y|`` over B's foreground
   (95th percentile, mm): how far two independent runs are from being each other's inverse; with the mean
   Dice of both directions (AAL labels), the time of both runs and the folding (engine: % det J <= 0).
3. **Landmark guidance**: the moving image rotated by 60° (exact: its direction and origin, no resampling);
   6 well-spread guide landmarks (farthest-point order), TRE on the 42 others. Engine default without
   guide points, engine with ``--guide-landmarks`` (their rigid least-squares fit as start and their term
   in the objectives, default ``--guide-weight``), ANTs SyN (images only), each also on the unrotated pair.

Each method's time is its own registration call in this process (ANTs: antspyx in the same process).

Usage::

    python benchmarks/inverse_guidance.py --out benchmarks/results_inverse_guidance [--threads 2] [--spacing 4]
        [--diffeomorphic] [--no-ants]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "DeepRegistration"))

from DeepRegistrationLib.core.config import RegistrationConfig  # noqa: E402
from DeepRegistrationLib.core.grid import Grid  # noqa: E402
from DeepRegistrationLib.registration.guidance import point_distances, read_guide_landmarks  # noqa: E402
from DeepRegistrationLib.spatial.inverse import foreground_points  # noqa: E402
from DeepRegistrationLib.io.images import read_image  # noqa: E402
from DeepRegistrationLib.io.landmarks import Landmarks, match_landmarks, read_landmarks, write_landmarks_csv  # noqa: E402
from DeepRegistrationLib.registration.run import run_registration  # noqa: E402
from DeepRegistrationLib.spatial.transforms import SpatialTransform, rotation_matrix  # noqa: E402

SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"


def engine(fixed, moving, out: Path, cfg: RegistrationConfig, **kw):
    t0 = time.perf_counter()
    summary = run_registration(fixed, moving, out, cfg, write_png=False, **kw)
    return summary.result.transform, time.perf_counter() - t0, summary.report["deformation"]["folding_percent"]


def engine_run(fixed, moving, out: Path, cfg: RegistrationConfig, labels):
    """A registration with labels: (summary, seconds)."""
    t0 = time.perf_counter()
    summary = run_registration(fixed, moving, out, cfg, write_png=False, fixed_labels=labels[0],
                               moving_labels=labels[1])
    return summary, time.perf_counter() - t0


def ants_dice(fixed, fixed_labels, moving_labels, fwd) -> float:
    """Mean Dice of ANTs' warped moving labels (nearest neighbour) against the fixed labels."""
    import ants

    from DeepRegistrationLib.evaluation.metrics import mean_dice

    warped = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving_labels)), fwd,
                                   interpolator="nearestNeighbor")
    return float(mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(str(fixed_labels))),
                           np.transpose(warped.numpy(), (2, 1, 0))))


def ants_syn(fixed, moving):
    """ANTs SyN (antspyx defaults): forward and inverse as point maps (LPS), seconds."""
    import ants

    t0 = time.perf_counter()
    reg = ants.registration(ants.image_read(str(fixed)), ants.image_read(str(moving)), type_of_transform="SyN")
    seconds = time.perf_counter() - t0
    fwd, inv = list(reg["fwdtransforms"]), list(reg["invtransforms"])

    # checked on the bundled landmarks: fwdtransforms applied to fixed points land on the moving ones
    def forward(points):  # fixed -> moving
        return ants.apply_transforms_to_points(3, _points_frame(points), fwd)[["x", "y", "z"]].to_numpy()

    def backward(points):  # moving -> fixed: SyN's inverse warp and the inverted affine
        return ants.apply_transforms_to_points(3, _points_frame(points), inv,
                                               whichtoinvert=[True, False])[["x", "y", "z"]].to_numpy()

    forward.fwd = fwd
    return forward, backward, seconds


def _points_frame(points):
    import pandas as pd

    return pd.DataFrame(np.asarray(points, dtype=float), columns=["x", "y", "z"])


def stats(err) -> dict:
    err = np.asarray(err)
    return {"mean_mm": round(float(err.mean()), 4), "p95_mm": round(float(np.percentile(err, 95)), 4)}


def rotated_copy(path: Path, rot: np.ndarray, centre: np.ndarray, out: Path) -> None:
    image = sitk.ReadImage(str(path))
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    image.SetDirection(tuple((rot @ d).ravel()))
    image.SetOrigin(tuple(rot @ (np.asarray(image.GetOrigin()) - centre) + centre))
    sitk.WriteImage(image, str(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results_inverse_guidance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--spacing", type=float, default=RegistrationConfig().spacing,
                    help="engine working spacing in mm (the bundled pair has 3 mm voxels)")
    ap.add_argument("--diffeomorphic", action="store_true", help="also the --diffeomorphic rows")
    args = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="invguide-"))
    fixed, moving = SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz"
    cfg = RegistrationConfig(device="cpu", threads=args.threads, spacing=args.spacing)
    mov_img, fix_img = read_image(moving, "moving"), read_image(fixed, "fixed")
    ymov = foreground_points(mov_img.array, mov_img.grid)
    yfix = foreground_points(fix_img.array, fix_img.grid)
    rows: dict = {"inverse": {}, "swapped": {}, "guidance": {}}

    # 1 + 2: inverse of one run (the inverse.h5 register writes), swapped pair
    flab, mlab = SAMPLE / "fixed_labels.nii.gz", SAMPLE / "moving_labels.nii.gz"
    variants = (("engine default", {}),) + ((("engine --diffeomorphic", {"diffeomorphic": True}),)
                                            if args.diffeomorphic else ()) + (("engine --symmetric", {"symmetric": True}),)
    for n, (name, extra) in enumerate(variants):
        c = RegistrationConfig(device="cpu", threads=args.threads, spacing=args.spacing, **extra)
        ab, sec = engine_run(fixed, moving, work / f"ab-{n}", c, (flab, mlab))
        inv, t_ab = ab.report["inverse"], ab.result.transform
        rows["inverse"][name] = {"mean_mm": round(inv["consistency_mm"]["mean_mm"], 4),
                                 "p95_mm": round(inv["consistency_mm"]["p95_mm"], 4), "method": inv["method"],
                                 "iterations": inv["iterations"], "register_s": round(sec, 1),
                                 "folding_percent": ab.result.folding_percent}
        ba, sec2 = engine_run(moving, fixed, work / f"ba-{n}", c, (mlab, flab))
        t_ba = ba.result.transform
        dice = [r.report["metrics"]["labels"]["after"]["dice_mean"] for r in (ab, ba)]
        # T_AB: A(fixed) -> B(moving) points; T_BA: B -> A. T_AB ∘ T_BA over B's foreground
        rows["swapped"][name] = {**stats(np.linalg.norm(t_ab.map_points(t_ba.map_points(ymov)) - ymov, axis=1)),
                                 "dice_mean": round(float(np.mean(dice)), 4), "register_s": round(sec + sec2, 1),
                                 "folding_percent": max(ab.result.folding_percent, ba.result.folding_percent)}
    if not args.no_ants:
        fwd, bwd, sec = ants_syn(fixed, moving)
        rows["inverse"]["ANTs SyN"] = {**stats(np.linalg.norm(fwd(bwd(ymov)) - ymov, axis=1)),
                                       "method": "SyN inverse field", "register_s": round(sec, 1)}
        fwd2, _, sec2 = ants_syn(moving, fixed)
        dice = [ants_dice(fixed, flab, mlab, fwd.fwd), ants_dice(moving, mlab, flab, fwd2.fwd)]
        rows["swapped"]["ANTs SyN"] = {**stats(np.linalg.norm(fwd(fwd2(ymov)) - ymov, axis=1)),
                                       "dice_mean": round(float(np.mean(dice)), 4),
                                       "register_s": round(sec + sec2, 1), "folding_percent": None}

    # 3: landmark guidance on a 60° rotation
    f_all, m_all, labels = match_landmarks(read_landmarks(SAMPLE / "fixed_landmarks.csv"),
                                           read_landmarks(SAMPLE / "moving_landmarks.csv"))
    chosen = [int(np.argmax(np.linalg.norm(f_all - f_all.mean(0), axis=1)))]
    while len(chosen) < 6:
        chosen.append(int(np.argmax(np.min(np.linalg.norm(f_all[:, None] - f_all[chosen][None], axis=2), axis=1))))
    held = [n for n in range(len(f_all)) if n not in chosen]
    centre = Grid.from_sitk(sitk.ReadImage(str(moving))).center()
    axis = np.array([0.2, 0.3, 1.0]) / np.linalg.norm([0.2, 0.3, 1.0])
    import torch

    rot = rotation_matrix(torch.as_tensor(axis * np.deg2rad(60.0), dtype=torch.float64)).numpy()
    rotated = work / "moving_rot.nii.gz"
    rotated_copy(moving, rot, centre, rotated)
    m_rot = (m_all - centre) @ rot.T + centre
    write_landmarks_csv(Landmarks([labels[n] for n in chosen], f_all[chosen]), work / "gf.csv")
    write_landmarks_csv(Landmarks([labels[n] for n in chosen], m_rot[chosen]), work / "gm.csv")
    guide = read_guide_landmarks(work / "gf.csv", work / "gm.csv")  # checks the points
    for case, mov, targets in (("unrotated", moving, m_all), ("rotated 60°", rotated, m_rot)):
        t, sec, fold = engine(fixed, mov, work / f"g-plain-{case[:3]}", cfg)
        rows["guidance"][f"engine default, {case}"] = {
            "tre_mean_mm": round(float(point_distances(t.map_points, f_all[held], targets[held]).mean()), 3),
            "register_s": round(sec, 1), "folding_percent": fold}
        if case != "unrotated":
            t, sec, fold = engine(fixed, mov, work / "g-guided", cfg, guide_fixed_landmarks=work / "gf.csv",
                                  guide_moving_landmarks=work / "gm.csv")
            rows["guidance"][f"engine + 6 guide landmarks, {case}"] = {
                "tre_mean_mm": round(float(point_distances(t.map_points, f_all[held], targets[held]).mean()), 3),
                "register_s": round(sec, 1), "folding_percent": fold, "guide_weight": cfg.guide_weight}
        if not args.no_ants:
            fwd, _, sec = ants_syn(fixed, mov)
            rows["guidance"][f"ANTs SyN, {case}"] = {
                "tre_mean_mm": round(float(np.linalg.norm(fwd(f_all[held]) - targets[held], axis=1).mean()), 3),
                "register_s": round(sec, 1)}
    rows["tre_before_rotated_mm"] = round(float(np.linalg.norm(f_all[held] - m_rot[held], axis=1).mean()), 2)
    rows["setup"] = {"engine_spacing_mm": args.spacing, "threads": args.threads, "cpu_count": os.cpu_count(), "pair": "bundled Colin27 pair, 3 mm",
                     "guide_points": len(chosen), "held_out_points": len(held)}
    (args.out / "INVERSE_GUIDANCE.json").write_text(json.dumps(rows, indent=2))
    write_markdown(rows, args.out / "INVERSE_GUIDANCE.md")
    plot(rows, args.out / "inverse_guidance.png")
    print((args.out / "INVERSE_GUIDANCE.md").read_text())
    return 0


def write_markdown(rows: dict, path: Path) -> None:
    lines = ["# Inverse consistency and landmark guidance (bundled pair, CPU, one run)", "",
             f"Engine working spacing {rows['setup']['engine_spacing_mm']} mm, {rows['setup']['threads']} threads.", "",
             "## Inverse of one registration: |T(T⁻¹(y)) − y| over the moving foreground", "",
             "| method | mean mm | p95 mm | inversion | register s |", "|---|---|---|---|---|"]
    for k, v in rows["inverse"].items():
        how = f"{v.get('method')} ({v['iterations']} it)" if v.get("iterations") else v.get("method")
        lines.append(f"| {k} | {v['mean_mm']} | {v['p95_mm']} | {how} | {v['register_s']} |")
    lines += ["", "## Swapped pair: |T_AB ∘ T_BA − id| over B's foreground (two independent runs)", "",
              "| method | mean mm | p95 mm | Dice (mean of both) | folding % | both runs s |",
              "|---|---|---|---|---|---|"]
    for k, v in rows["swapped"].items():
        fold = "n/a" if v.get("folding_percent") is None else v["folding_percent"]
        lines.append(f"| {k} | {v['mean_mm']} | {v['p95_mm']} | {v.get('dice_mean')} | {fold} | {v['register_s']} |")
    lines += ["", f"## Landmark guidance: 60° rotation, 6 guide points, TRE on the held-out points "
              f"(before: {rows['tre_before_rotated_mm']} mm)", "",
              "| method | held-out TRE mm | s |", "|---|---|---|"]
    for k, v in rows["guidance"].items():
        lines.append(f"| {k} | {v['tre_mean_mm']} | {v['register_s']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, metric, title in ((axes[0], "inverse", "p95_mm", "|T(T⁻¹(y)) − y| p95 (mm)"),
                                   (axes[1], "swapped", "p95_mm", "|T_AB∘T_BA − id| p95 (mm)"),
                                   (axes[2], "guidance", "tre_mean_mm", "held-out TRE (mm)")):
        names = list(rows[key])
        ax.barh(names, [rows[key][n][metric] for n in names], color="tab:blue")
        ax.set_title(title)
        ax.set_xscale("log" if key != "guidance" else "linear")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
