#!/usr/bin/env python3
"""Inverse consistency and landmark guidance on the bundled pair, this engine beside ANTs SyN, in one run.

Rows (all on the bundled Colin27 pair, 3 mm voxels, CPU), the engine at each ``--spacing`` (default 2 and 4 mm):

1. **Inverse** of one registration: ``|T(T⁻¹(y)) - y|`` (mm, mean / 95th percentile) over the moving image's
   foreground: the ``inverse.h5`` that ``register`` writes (default: fixed-point inversion; ``--diffeomorphic``
   and ``--symmetric``: the negated velocity); ANTs SyN: its own ``fwdtransforms`` ∘ ``invtransforms``.
2. **Swapped pair**: register A→B and B→A separately; ``|T_AB(T_BA(y)) - y|`` over B's foreground
   (95th percentile, mm): how far two independent runs are from being each other's inverse (and the linear
   parts' share, ``A_AB A_BA``); with the mean Dice of both directions (AAL labels), the time of both runs and
   the folding (engine: % det J <= 0). Engine default, engine ``--symmetric``, ANTs SyN (antspyx defaults).
3. **Landmark guidance** (first spacing): the moving image rotated by 60° (exact: its direction and origin, no
   resampling); 6 well-spread guide landmarks (farthest-point order), TRE on the 42 others. Engine default
   without guide points, engine (default and ``--symmetric``) with ``--guide-landmarks`` (their rigid
   least-squares fit as start and their term in the objectives, default ``--guide-weight``), ANTs SyN
   (images only), each without guide points also on the unrotated pair.

Each method's time is its own registration call in this process (ANTs: antspyx in the same process), wall
and CPU seconds. Runtime unattended with the defaults (1 thread): about 3.5 minutes of CPU time (4-5 minutes
on a quiet machine; 12-21 minutes on a loaded 2-core one), half of it the ``--symmetric`` runs.

Usage::

    python benchmarks/inverse_guidance.py [--out benchmarks/results_inverse_guidance] [--threads 1]
        [--spacing 2 4] [--iterations N] [--affine-iterations N] [--diffeomorphic] [--no-guidance] [--no-ants]
"""
from __future__ import annotations

import argparse
import dataclasses
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


def _timed(fn, *a, **kw):
    """``(fn(*a, **kw), wall s, CPU s of this process)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _affine_swap(t_ab: SpatialTransform, t_ba: SpatialTransform, points: np.ndarray) -> dict:
    """|A_AB A_BA y - y| (mm): the linear stages' share of the swapped-pair error."""
    a = t_ab.affine @ t_ba.affine
    return stats(np.linalg.norm(points @ a[:3, :3].T + a[:3, 3] - points, axis=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results_inverse_guidance")
    ap.add_argument("--threads", type=int, default=1, help="engine and ITK threads (1: CPU s compare across methods)")
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--spacing", type=float, nargs="+", default=[2.0, 4.0],
                    help="engine working spacings in mm, each a set of engine rows (the bundled pair has 3 mm "
                         "voxels; the landmark rows use the first)")
    ap.add_argument("--iterations", type=int, default=None, help="deformable iterations (default: the engine's)")
    ap.add_argument("--affine-iterations", type=int, default=None, help="linear iterations (default: the engine's)")
    ap.add_argument("--diffeomorphic", action="store_true", help="also the --diffeomorphic rows")
    ap.add_argument("--no-guidance", action="store_true", help="leave out the landmark-guidance rows")
    args = ap.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="invguide-"))
    fixed, moving = SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz"
    overrides = {k: v for k, v in (("iterations", args.iterations), ("affine_iterations", args.affine_iterations))
                 if v is not None}

    def config(spacing: float, **extra) -> RegistrationConfig:
        return RegistrationConfig(device="cpu", threads=args.threads, spacing=spacing, **overrides, **extra)

    mov_img = read_image(moving, "moving")
    ymov = foreground_points(mov_img.array, mov_img.grid)
    rows: dict = {"inverse": {}, "swapped": {}, "guidance": {}}

    # 1 + 2: inverse of one run (the inverse.h5 register writes), swapped pair; every spacing
    flab, mlab = SAMPLE / "fixed_labels.nii.gz", SAMPLE / "moving_labels.nii.gz"
    variants = (("engine default", {}),) + ((("engine --diffeomorphic", {"diffeomorphic": True}),)
                                            if args.diffeomorphic else ()) + (("engine --symmetric", {"symmetric": True}),)
    for spacing in args.spacing:
        for n, (base, extra) in enumerate(variants):
            name = f"{base}, {spacing:g} mm"
            c = config(spacing, **extra)
            (ab, sec), _, cpu = _timed(engine_run, fixed, moving, work / f"ab-{spacing}-{n}", c, (flab, mlab))
            inv, t_ab = ab.report["inverse"], ab.result.transform
            rows["inverse"][name] = {"mean_mm": round(inv["consistency_mm"]["mean_mm"], 4),
                                     "p95_mm": round(inv["consistency_mm"]["p95_mm"], 4), "method": inv["method"],
                                     "iterations": inv["iterations"], "register_s": round(sec, 1),
                                     "cpu_s": round(cpu, 1), "folding_percent": ab.result.folding_percent}
            (ba, sec2), _, cpu2 = _timed(engine_run, moving, fixed, work / f"ba-{spacing}-{n}", c, (mlab, flab))
            t_ba = ba.result.transform
            dice = [r.report["metrics"]["labels"]["after"]["dice_mean"] for r in (ab, ba)]
            # T_AB: A(fixed) -> B(moving) points; T_BA: B -> A. T_AB ∘ T_BA over B's foreground
            rows["swapped"][name] = {
                **stats(np.linalg.norm(t_ab.map_points(t_ba.map_points(ymov)) - ymov, axis=1)),
                "affine_p95_mm": _affine_swap(t_ab, t_ba, ymov)["p95_mm"],
                "dice_mean": round(float(np.mean(dice)), 4), "register_s": round(sec + sec2, 1),
                "cpu_s": round(cpu + cpu2, 1),
                "folding_percent": max(ab.result.folding_percent, ba.result.folding_percent)}
            print(f"{name}: swapped p95 {rows['swapped'][name]['p95_mm']} mm, Dice {rows['swapped'][name]['dice_mean']}, "
                  f"{rows['swapped'][name]['register_s']} s", flush=True)
    if not args.no_ants:
        (fwd, bwd, sec), _, cpu = _timed(ants_syn, fixed, moving)
        rows["inverse"]["ANTs SyN"] = {**stats(np.linalg.norm(fwd(bwd(ymov)) - ymov, axis=1)),
                                       "method": "SyN inverse field", "register_s": round(sec, 1),
                                       "cpu_s": round(cpu, 1)}
        (fwd2, _, sec2), _, cpu2 = _timed(ants_syn, moving, fixed)
        dice = [ants_dice(fixed, flab, mlab, fwd.fwd), ants_dice(moving, mlab, flab, fwd2.fwd)]
        rows["swapped"]["ANTs SyN"] = {**stats(np.linalg.norm(fwd(fwd2(ymov)) - ymov, axis=1)),
                                       "dice_mean": round(float(np.mean(dice)), 4),
                                       "register_s": round(sec + sec2, 1), "cpu_s": round(cpu + cpu2, 1),
                                       "folding_percent": None}
        print(f"ANTs SyN: swapped p95 {rows['swapped']['ANTs SyN']['p95_mm']} mm", flush=True)

    # 3: landmark guidance on a 60° rotation (first spacing)
    if not args.no_guidance:
        guidance_rows(rows, fixed, moving, work, config(args.spacing[0]), args.no_ants)
    rows["setup"] = {"engine_spacings_mm": args.spacing, "threads": args.threads, "cpu_count": os.cpu_count(),
                     "pair": "bundled Colin27 pair, 3 mm", **overrides}
    (args.out / "INVERSE_GUIDANCE.json").write_text(json.dumps(rows, indent=2))
    write_markdown(rows, args.out / "INVERSE_GUIDANCE.md")
    plot(rows, args.out / "inverse_guidance.png")
    print((args.out / "INVERSE_GUIDANCE.md").read_text())
    return 0


def guidance_rows(rows: dict, fixed: Path, moving: Path, work: Path, cfg: RegistrationConfig, no_ants: bool) -> None:
    """The moving image rotated by 60°; 6 guide points (farthest-point order), TRE on the held-out others."""
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
    read_guide_landmarks(work / "gf.csv", work / "gm.csv")  # checks the points
    guided = dict(guide_fixed_landmarks=work / "gf.csv", guide_moving_landmarks=work / "gm.csv")
    symmetric = dataclasses.replace(cfg, symmetric=True)
    for case, mov, targets in (("unrotated", moving, m_all), ("rotated 60°", rotated, m_rot)):
        runs = [(f"engine default, {case}", cfg, {})]
        if case != "unrotated":
            runs += [(f"engine + 6 guide landmarks, {case}", cfg, guided),
                     (f"engine --symmetric + 6 guide landmarks, {case}", symmetric, guided)]
        for name, c, kw in runs:
            (t, sec, fold), _, cpu = _timed(engine, fixed, mov, work / f"g-{len(rows['guidance'])}", c, **kw)
            rows["guidance"][name] = {
                "tre_mean_mm": round(float(point_distances(t.map_points, f_all[held], targets[held]).mean()), 3),
                "register_s": round(sec, 1), "cpu_s": round(cpu, 1), "folding_percent": fold,
                **({"guide_weight": c.guide_weight} if kw else {})}
        if not no_ants:
            (fwd, _, sec), _, cpu = _timed(ants_syn, fixed, mov)
            rows["guidance"][f"ANTs SyN, {case}"] = {
                "tre_mean_mm": round(float(np.linalg.norm(fwd(f_all[held]) - targets[held], axis=1).mean()), 3),
                "register_s": round(sec, 1), "cpu_s": round(cpu, 1)}
    rows["tre_before_rotated_mm"] = round(float(np.linalg.norm(f_all[held] - m_rot[held], axis=1).mean()), 2)
    rows["setup_guidance"] = {"engine_spacing_mm": cfg.spacing, "guide_points": len(chosen),
                              "held_out_points": len(held)}


def write_markdown(rows: dict, path: Path) -> None:
    setup = rows["setup"]
    its = ", ".join(f"{k} {v}" for k, v in setup.items() if k in ("iterations", "affine_iterations")) or \
        "the engine's default iterations"
    lines = ["# Inverse consistency and landmark guidance (bundled pair, CPU, one run)", "",
             f"Engine working spacings {', '.join(f'{s:g}' for s in setup['engine_spacings_mm'])} mm, "
             f"{its}, {setup['threads']} thread(s) (engine and ITK), {setup['cpu_count']} CPUs. "
             "s: wall time of each call; CPU s: this process's CPU time (ANTs runs in it too).", "",
             "## Inverse of one registration: |T(T⁻¹(y)) − y| over the moving foreground", "",
             "| method | mean mm | p95 mm | inversion | register s | CPU s |", "|---|---|---|---|---|---|"]
    for k, v in rows["inverse"].items():
        how = f"{v.get('method')} ({v['iterations']} it)" if v.get("iterations") else v.get("method")
        lines.append(f"| {k} | {v['mean_mm']} | {v['p95_mm']} | {how} | {v['register_s']} | {v.get('cpu_s')} |")
    lines += ["", "## Swapped pair: |T_AB ∘ T_BA − id| over B's foreground (two independent runs)", "",
              "affine p95: the same for the linear parts alone (A_AB A_BA).", "",
              "| method | mean mm | p95 mm | affine p95 mm | Dice (mean of both) | folding % | both runs s | CPU s |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in rows["swapped"].items():
        fold = "n/a" if v.get("folding_percent") is None else v["folding_percent"]
        lines.append(f"| {k} | {v['mean_mm']} | {v['p95_mm']} | {v.get('affine_p95_mm', 'n/a')} | "
                     f"{v.get('dice_mean')} | {fold} | {v['register_s']} | {v.get('cpu_s')} |")
    if rows["guidance"]:
        g = rows["setup_guidance"]
        lines += ["", f"## Landmark guidance: 60° rotation, {g['guide_points']} guide points, TRE on the "
                  f"{g['held_out_points']} held-out points (before: {rows['tre_before_rotated_mm']} mm; engine at "
                  f"{g['engine_spacing_mm']:g} mm)", "",
                  "| method | held-out TRE mm | s | CPU s |", "|---|---|---|---|"]
        for k, v in rows["guidance"].items():
            lines.append(f"| {k} | {v['tre_mean_mm']} | {v['register_s']} | {v.get('cpu_s')} |")
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
        if not names:
            ax.set_visible(False)
            continue
        ax.barh(names, [rows[key][n][metric] for n in names], color="tab:blue")
        ax.set_title(title)
        ax.set_xscale("log" if key != "guidance" else "linear")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
