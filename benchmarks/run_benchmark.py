#!/usr/bin/env python3
"""Benchmark: DeepRegistration vs ANTs SyN vs elastix on synthetic Colin27 pairs with known transforms.

For every spacing × seed a pair is built (:mod:`synthetic_pairs`); every method then runs on it as one
whole, separate process (wall-clock time and peak RSS of that process, imports included):

- ``deepreg``: ``<venv>/bin/deepregistration register FIXED MOVING -o OUT --overwrite --no-png -q --threads N``
- ``ants``:    ``PEER_PYTHON benchmarks/run_ants.py register ...`` (antspyx SyN defaults)
- ``elastix``: ``PEER_PYTHON benchmarks/run_elastix.py register ...`` (default affine + B-spline maps)
- ``deepreg+model``: ``deepregistration register ... --model NAME`` (the learned model's prediction starts
  a finest-level-only optimization, at the model's working spacing) — the learned default preset;
- ``model``: the same with ``--model-mode replace`` (affine stage + the model alone, no optimization).
  Both need ``--model NAME|PATH``.

All methods are then evaluated the same way in this process, from each method's full fixed → moving
transform read with SimpleITK (deepreg ``transform.h5``; ANTs ``[affine.mat, warp.nii.gz]`` as a
CompositeTransform; elastix: its transformix displacement field on the fixed grid): the moving labels are
resampled onto the fixed grid (nearest neighbour) → Dice / HD95 per AAL label; the transform is sampled
as a displacement field on the fixed grid → det J by central differences (direction-aware) → folding %;
fixed landmarks are mapped by the transform → TRE to the moving landmarks. A row ``none`` (identity)
gives the values before registration, a row ``gt`` (the exact inverse of the known transform) a reference
for what these label maps allow (nearest-neighbour label resampling on both grids limits Dice; a method
can land slightly above it).

Usage::

    python benchmarks/run_benchmark.py --spacings 2 1 --seeds 0 1 2 --out benchmarks/results \
        [--methods deepreg ants elastix] [--threads 2] [--peer-python /path/to/python]

Writes ``OUT/results.json``, ``OUT/results.md``, ``OUT/results.png`` (+ ``OUT/pairs/``, ``OUT/runs/``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as _md
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic_pairs as sp  # noqa: E402

logger = logging.getLogger("benchmark")
METHODS = ("deepreg", "ants", "elastix", "deepreg+model", "model")
DEEPREG_FAMILY = ("deepreg", "deepreg+model", "model")  # same CLI, same transform.h5
TARGETS_NOTE = "targets (issue): Dice >= ANTs at 2 and 1 mm; folding <= 0.05 %; time <= 1/3 of ANTs; peak memory at 1 mm < 4 GB"


# --------------------------------------------------------------------------------------------------
# Running one method as a measured process
# --------------------------------------------------------------------------------------------------
@dataclass
class ProcessResult:
    """A finished child process: exit code, wall-clock seconds, peak RSS in MB (VmHWM, see run_measured), and
    CPU seconds (user + system of the child and the processes it waited for, from ``wait4``: on a shared machine the
    wall time grows with the load, the CPU time much less, so compare methods by both)."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    log: str
    cpu_s: float = float("nan")


def _vm_hwm_kb(pid: int) -> float | None:
    """``VmHWM`` (peak resident set size of the process's current image, kB) from ``/proc``; None if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str], timeout_s: float) -> ProcessResult:
    """Runs ``cmd`` as one child process; time from spawn to exit, peak RSS of the child.

    Peak memory is the child's ``VmHWM`` read from ``/proc`` every 20 ms (a high-water mark, so the last
    read is the peak up to a few ms before exit). ``ru_maxrss`` from ``wait4`` is not used on Linux: the
    kernel carries the high-water mark across ``fork`` + ``exec``, so it would include this (large) parent
    process. Elsewhere ``ru_maxrss`` is the fallback.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        t0 = time.perf_counter()
        # the log's folder as working folder: stray files of a tool never land in the caller's folder
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)
        deadline = t0 + timeout_s
        hwm_kb = None
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            hwm_kb = _vm_hwm_kb(proc.pid) or hwm_kb
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kb = hwm_kb if hwm_kb is not None else ru.ru_maxrss
    return ProcessResult(proc.returncode, wall, peak_kb / 1024.0, log_path.read_text()[-3000:],
                         ru.ru_utime + ru.ru_stime)


def thread_env(threads: int) -> dict[str, str]:
    """Environment with the same thread limits for every method (ITK, OpenMP, BLAS)."""
    env = dict(os.environ)
    for key in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def deepreg_command(args: argparse.Namespace) -> list[str]:
    """The engine's CLI: ``deepregistration`` next to this Python, else ``python -m DeepRegistrationLib.apps.cli``."""
    if args.deepreg_cli:
        return [args.deepreg_cli]
    exe = Path(sys.executable).parent / "deepregistration"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "DeepRegistrationLib.apps.cli"]


def method_commands(method: str, pair: sp.PairFiles, run_dir: Path, args: argparse.Namespace, seed: int
                    ) -> tuple[list[str], list[str] | None]:
    """(timed registration command, untimed export command or None) for one method."""
    f, m = str(pair.fixed), str(pair.moving)
    if method in DEEPREG_FAMILY:
        cmd = deepreg_command(args) + ["register", f, m, "-o", str(run_dir), "--overwrite", "--no-png", "-q",
                                       "--threads", str(args.threads)] + args.deepreg_args.split()
        if method != "deepreg":
            if not args.model:
                raise ValueError(f"method {method} needs --model NAME|PATH")
            cmd += ["--model", args.model, "--model-mode", "init" if method == "deepreg+model" else "replace"]
        return cmd, None
    if method == "ants":
        runner = [args.peer_python, str(HERE / "run_ants.py")]
        return (runner + ["register", f, m, str(run_dir), "--seed", str(seed), "--threads", str(args.threads)],
                runner + ["warp-labels", f, str(pair.moving_labels), str(run_dir)])
    if method == "elastix":
        runner = [args.peer_python, str(HERE / "run_elastix.py")]
        return (runner + ["register", f, m, str(run_dir), "--threads", str(args.threads)],
                runner + ["export", f, m, str(pair.moving_labels), str(run_dir), "--threads", str(args.threads)])
    raise ValueError(f"unknown method {method!r}")


def load_transform(method: str, run_dir: Path) -> sitk.Transform:
    """Each method's full fixed → moving transform (LPS mm) as a SimpleITK transform."""
    if method == "none":
        return sitk.Transform(3, sitk.sitkIdentity)
    if method in DEEPREG_FAMILY:
        return sitk.ReadTransform(str(run_dir / "transform.h5"))
    if method == "ants":
        aff = sitk.ReadTransform(str(run_dir / "affine.mat"))
        warp = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(run_dir / "warp.nii.gz")),
                                                         sitk.sitkVectorFloat64))
        return sitk.CompositeTransform([aff, warp])  # docs/CONVENTIONS.md §2: fwdtransforms [warp, affine] reversed
    if method == "elastix":
        return sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(run_dir / "displacement.nii.gz")),
                                                         sitk.sitkVectorFloat64))
    raise ValueError(method)


# --------------------------------------------------------------------------------------------------
# Metrics (one implementation for every method)
# --------------------------------------------------------------------------------------------------
def dice_per_label(fixed: np.ndarray, warped: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Dice per label (same order as ``labels``); NaN where a label is absent from both maps."""
    n = int(max(fixed.max(), warped.max(), labels.max())) + 1
    inter = np.bincount(fixed[fixed == warped].ravel(), minlength=n)
    a = np.bincount(fixed.ravel(), minlength=n)
    b = np.bincount(warped.ravel(), minlength=n)
    den = (a + b)[labels].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2.0 * inter[labels] / den, np.nan)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (the volume border counts as outside)."""
    p = np.pad(mask, 1)
    inner = p[1:-1, 1:-1, 1:-1].copy()
    for ax in range(3):
        for sh in (-1, 1):
            inner &= np.roll(p, sh, axis=ax)[1:-1, 1:-1, 1:-1]
    return mask & ~inner


def hd95_per_label(fixed: np.ndarray, warped: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, ...]
                   ) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (mm) per label: max of the two directed 95th percentiles
    of surface-voxel → nearest other-surface-voxel Euclidean distances. NaN if a label is missing in either map.
    """
    out = np.full(len(labels), np.nan)
    for n, lab in enumerate(labels):
        a, b = fixed == lab, warped == lab
        if not a.any() or not b.any():
            continue
        idx = np.nonzero(a | b)
        lo = [max(int(i.min()) - 2, 0) for i in idx]
        hi = [int(i.max()) + 3 for i in idx]
        sl = tuple(slice(l, h) for l, h in zip(lo, hi))
        sa, sb = _surface(a[sl]), _surface(b[sl])
        d = []
        for src, dst in ((sa, sb), (sb, sa)):
            img = sitk.GetImageFromArray(dst.astype(np.uint8))
            img.SetSpacing([float(s) for s in spacing_zyx[::-1]])
            dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=False,
                                                                       squaredDistance=False, useImageSpacing=True))
            d.append(np.percentile(np.abs(dist[src]), 95))
        out[n] = max(d)
    return out


def gt_inverse_transform(pair: sp.PairFiles, tol_mm: float = 1e-3, max_iter: int = 25) -> sitk.Transform:
    """The exact answer S⁻¹ (fixed → moving) as a displacement field on the fixed grid.

    ``S(y) = A(y + d(y))`` (``gt_moving_to_fixed.h5``), so ``y = S⁻¹(x)`` solves ``y = A⁻¹(x) − d(y)``;
    iterated for every fixed voxel at once: ``u ← (A⁻¹(x) − x) − d(x + u)`` until max change < ``tol_mm``.
    Near the fixed grid's corners (outside the anatomy) points leave the B-spline's domain (the moving
    grid), where ITK's B-spline is the identity: the iteration may not settle there and det J can be <= 0.
    """
    ref = sitk.ReadImage(str(pair.fixed_labels))
    gt = sitk.CompositeTransform(sitk.ReadTransform(str(pair.gt_transform)))
    affine = sitk.AffineTransform(gt.GetNthTransform(0))
    bsp = gt.GetNthTransform(1)
    geo = (ref.GetSize(), ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
    a = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(affine.GetInverse(), sitk.sitkVectorFloat64, *geo))
    u = a.copy()
    for _ in range(max_iter):
        uimg = sitk.GetImageFromArray(u, isVector=True)
        uimg.CopyInformation(ref)
        q = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
            sitk.CompositeTransform([bsp, sitk.DisplacementFieldTransform(uimg)]), sitk.sitkVectorFloat64, *geo))
        new = a - (q - u)  # q - u = d(x + u)
        change = float(np.abs(new - u).max())
        u = new
        if change < tol_mm:
            break
    uimg = sitk.GetImageFromArray(u, isVector=True)
    uimg.CopyInformation(ref)
    return sitk.DisplacementFieldTransform(uimg)


def evaluate(method: str, run_dir: Path, pair: sp.PairFiles, transform: sitk.Transform | None = None) -> dict:
    """Uniform evaluation of one method's transform on one pair (see the module docstring)."""
    fixed_lab = sitk.ReadImage(str(pair.fixed_labels))
    moving_lab = sitk.ReadImage(str(pair.moving_labels))
    t = transform if transform is not None else load_transform(method, run_dir)
    warped = sitk.Resample(moving_lab, fixed_lab, t, sitk.sitkNearestNeighbor, 0, moving_lab.GetPixelID())
    fa = sitk.GetArrayFromImage(fixed_lab).astype(np.int64)
    wa = sitk.GetArrayFromImage(warped).astype(np.int64)
    labels = np.unique(fa[fa > 0])
    dice = dice_per_label(fa, wa, labels)
    hd = hd95_per_label(fa, wa, labels, fixed_lab.GetSpacing()[::-1])
    disp = sitk.TransformToDisplacementField(t, sitk.sitkVectorFloat64, fixed_lab.GetSize(), fixed_lab.GetOrigin(),
                                             fixed_lab.GetSpacing(), fixed_lab.GetDirection())
    jac = sp.jacobian_determinant(disp)
    del disp
    fpts = _read_points(pair.fixed_landmarks_csv)
    mpts = _read_points(pair.moving_landmarks_csv)
    mapped = np.array([t.TransformPoint([float(v) for v in p]) for p in fpts])
    tre = np.linalg.norm(mapped - mpts, axis=1)
    row = {"dice_mean": float(np.nanmean(dice)), "dice_p30": float(np.nanpercentile(dice, 30)),
           "hd95_mean_mm": float(np.nanmean(hd)), "folding_pct": float(100.0 * np.mean(jac <= 0)),
           "jacobian_min": float(jac.min()), "sdlogj": float(np.std(np.log(np.clip(jac[jac > 0], 1e-9, None)))),
           "tre_mean_mm": float(tre.mean()), "n_labels": int(len(labels)),
           "dice_per_label": [round(float(v), 5) for v in dice], "labels": [int(v) for v in labels]}
    native = run_dir / "warped_labels.nii.gz"
    if method in ("ants", "elastix") and native.exists():  # cross-check against the tool's own resampling
        na = sitk.GetArrayFromImage(sitk.ReadImage(str(native))).astype(np.int64)
        if na.shape == wa.shape:
            row["agreement_with_native_warp_dice"] = float(np.nanmean(dice_per_label(na, wa, labels)))
    if method in DEEPREG_FAMILY and (run_dir / "jacobian.nii.gz").exists():
        ej = sitk.GetArrayFromImage(sitk.ReadImage(str(run_dir / "jacobian.nii.gz")))
        row["engine_reported_folding_pct"] = float(100.0 * np.mean(ej <= 0))
    return row


def _read_points(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", comments="#", skiprows=2, usecols=(1, 2, 3), ndmin=2)


# --------------------------------------------------------------------------------------------------
# Environment, summaries, outputs
# --------------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args: argparse.Namespace) -> dict:
    """Machine and software versions (main Python and the peer Python)."""
    mem_gb = float("nan")
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        pass
    peer = {}
    try:
        code = ("import importlib.metadata as m, json\nout={}\nfor d in ('antspyx','itk-elastix','itk-core',"
                "'SimpleITK','numpy'):\n    try: out[d]=m.version(d)\n    except Exception: out[d]='not installed'\n"
                "print(json.dumps(out))")
        peer = json.loads(subprocess.run([args.peer_python, "-c", code], capture_output=True, text=True,
                                         timeout=120).stdout)
    except Exception as exc:  # noqa: BLE001 - versions are informative only
        peer = {"error": str(exc)}
    return {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu_model(),
            "memory_gb": round(mem_gb, 1), "threads_per_method": args.threads,
            "moving_contrast": args.moving_contrast, "model": args.model, "deepreg_args": args.deepreg_args,
            "main_python": sys.executable, "peer_python": args.peer_python,
            "versions": {"deepregistration": _version("deepregistration"), "torch": _version("torch"),
                         "SimpleITK": _version("SimpleITK"), "numpy": _version("numpy")},
            "peer_versions": peer}


def summarize(rows: list[dict]) -> dict:
    """Per spacing and method: means over pairs (Dice sd over pairs; p30 over all labels of all pairs)."""
    out: dict = {}
    for spacing in sorted({r["spacing_mm"] for r in rows}, reverse=True):
        out[str(spacing)] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["spacing_mm"] == spacing and r["method"] == method and r.get("ok")]
            if not rs:
                continue
            dices = [r["dice_mean"] for r in rs]
            pooled = np.concatenate([np.asarray(r["dice_per_label"], float) for r in rs])
            s = {"n_pairs": len(rs), "dice_mean": float(np.mean(dices)),
                 "dice_sd": float(np.std(dices, ddof=1)) if len(rs) > 1 else 0.0,
                 "dice_p30": float(np.nanpercentile(pooled, 30)),
                 "hd95_mean_mm": float(np.mean([r["hd95_mean_mm"] for r in rs])),
                 "tre_mean_mm": float(np.mean([r["tre_mean_mm"] for r in rs])),
                 "folding_pct": float(np.mean([r["folding_pct"] for r in rs])),
                 "folding_pct_max": float(np.max([r["folding_pct"] for r in rs]))}
            if all("wall_s" in r for r in rs):
                s["time_s"] = float(np.mean([r["wall_s"] for r in rs]))
                s["peak_mb"] = float(np.max([r["peak_rss_mb"] for r in rs]))
            out[str(spacing)][method] = s
        ants = out[str(spacing)].get("ants")
        for method, s in out[str(spacing)].items():
            if ants and "time_s" in s:
                s["time_ratio_vs_ants"] = s["time_s"] / ants["time_s"]
    return out


def targets(summary: dict) -> list[dict]:
    """The issue's targets for ``deepreg``, each marked met / not met / not measured."""
    res = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        res.append({"target": name, "status": "not measured" if ok is None else ("met" if ok else "not met"),
                    "detail": detail})

    for sp_mm in ("2.0", "1.0"):
        s = summary.get(sp_mm, {})
        d, a = s.get("deepreg"), s.get("ants")
        add(f"Dice >= ANTs at {float(sp_mm):g} mm", None if not (d and a) else d["dice_mean"] >= a["dice_mean"],
            f"{d['dice_mean']:.4f} vs {a['dice_mean']:.4f}" if d and a else "")
    folds = [s["deepreg"]["folding_pct_max"] for s in summary.values() if "deepreg" in s]
    add("folding <= 0.05 %", None if not folds else max(folds) <= 0.05,
        f"max over pairs {max(folds):.4f} %" if folds else "")
    for sp_mm, s in summary.items():
        d, a = s.get("deepreg"), s.get("ants")
        add(f"time <= 1/3 ANTs at {float(sp_mm):g} mm", None if not (d and a) else d["time_s"] <= a["time_s"] / 3,
            f"{d['time_s']:.1f} s vs {a['time_s']:.1f} s (ratio {d['time_s'] / a['time_s']:.2f})" if d and a else "")
    d1 = summary.get("1.0", {}).get("deepreg")
    add("peak memory at 1 mm < 4 GB", None if not d1 else d1["peak_mb"] < 4096,
        f"{d1['peak_mb']:.0f} MB" if d1 else "")
    # the learned engine's targets (model issue), measured only when the model methods ran
    for sp_mm, s in summary.items():
        d, a = s.get("deepreg+model"), s.get("ants")
        if d and a:
            add(f"learned preset: Dice >= ANTs at {float(sp_mm):g} mm", d["dice_mean"] >= a["dice_mean"],
                f"{d['dice_mean']:.4f} vs {a['dice_mean']:.4f}")
            add(f"learned preset: folding <= 0.05 % at {float(sp_mm):g} mm", d["folding_pct_max"] <= 0.05,
                f"max {d['folding_pct_max']:.4f} %")
            if sp_mm == "2.0":
                add("learned preset: time <= 1/10 ANTs at 2 mm", d["time_s"] <= a["time_s"] / 10,
                    f"{d['time_s']:.1f} s vs {a['time_s']:.1f} s (ratio {d['time_s'] / a['time_s']:.2f})")
    return res


def write_markdown(path: Path, summary: dict, tgt: list[dict], env: dict, rows: list[dict]) -> None:
    """results.md: one table per spacing, the targets, the environment."""
    lines = ["# Registration benchmark: DeepRegistration vs ANTs SyN vs elastix", "",
             f"{env['date_utc']}; {env['cpu_model']} ({env['cpu_affinity']} usable CPUs), {env['threads_per_method']} "
             f"threads per method; torch {env['versions']['torch']}, antspyx "
             f"{env['peer_versions'].get('antspyx', '?')}, itk-elastix {env['peer_versions'].get('itk-elastix', '?')}.",
             "Synthetic Colin27 (ch2bet + 116 AAL labels) pairs with a known random affine + smooth deformation "
             "and an intensity change (benchmarks/synthetic_pairs.py). Dice/HD95 over AAL labels, TRE over "
             "AAL-centroid landmarks, folding = % of fixed-grid voxels with det J <= 0; time = wall-clock of the "
             "whole process (imports included), peak = max RSS of that process. `none` = before registration; `gt` = the exact known transform (reference: what nearest-neighbour label maps allow; a method can land slightly above it).", ""]
    for spacing, ms in summary.items():
        lines += [f"## {float(spacing):g} mm ({next(iter(ms.values()))['n_pairs']} pairs)", "",
                  "| method | Dice mean ± sd | p30 Dice | HD95 mm | TRE mm | folding % | time s | peak MB | time / ANTs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, s in ms.items():
            tr = f"{s['time_ratio_vs_ants']:.2f}" if "time_ratio_vs_ants" in s else "–"
            ts = f"{s['time_s']:.1f}" if "time_s" in s else "–"
            pm = f"{s['peak_mb']:.0f}" if "peak_mb" in s else "–"
            lines.append(f"| {m} | {s['dice_mean']:.4f} ± {s['dice_sd']:.4f} | {s['dice_p30']:.4f} | "
                         f"{s['hd95_mean_mm']:.2f} | {s['tre_mean_mm']:.2f} | {s['folding_pct']:.4f} | {ts} | {pm} | {tr} |")
        lines.append("")
    lines += ["## Targets (DeepRegistration)", "", "| target | status | detail |", "|---|---|---|"]
    lines += [f"| {t['target']} | **{t['status']}** | {t['detail']} |" for t in tgt]
    failed = [r for r in rows if not r.get("ok")]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['method']} {r['spacing_mm']:g} mm seed {r['seed']}: {r.get('error', '')[:300]}" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, summary: dict, rows: list[dict]) -> None:
    """results.png: Dice vs time per method and spacing; bars of time and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(m in s for s in summary.values())]
    colors = {"deepreg": "tab:red", "ants": "tab:blue", "elastix": "tab:green", "deepreg+model": "tab:purple",
              "model": "tab:orange"}
    markers = {"2.0": "o", "1.0": "s"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for r in rows:
        if r.get("ok") and r["method"] in colors:
            axes[0].scatter(r["wall_s"], r["dice_mean"], c=colors[r["method"]],
                            marker=markers.get(str(float(r["spacing_mm"])), "^"), alpha=0.8)
    for m in methods:
        axes[0].scatter([], [], c=colors[m], label=m)
    for k, mk in markers.items():
        axes[0].scatter([], [], c="gray", marker=mk, label=f"{float(k):g} mm")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("wall-clock time per pair (s, whole process)")
    axes[0].set_ylabel("mean Dice (AAL labels)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("accuracy vs time")
    spacings = list(summary)
    width = 0.8 / max(len(methods), 1)
    for j, (key, ax, label) in enumerate(((("time_s"), axes[1], "time (s)"), ("peak_mb", axes[2], "peak RSS (MB)"))):
        for i, m in enumerate(methods):
            vals = [summary[s].get(m, {}).get(key, np.nan) for s in spacings]
            ax.bar(np.arange(len(spacings)) + i * width, vals, width, color=colors[m], label=m)
        ax.set_xticks(np.arange(len(spacings)) + width * (len(methods) - 1) / 2)
        ax.set_xticklabels([f"{float(s):g} mm" for s in spacings])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        if key == "peak_mb":
            ax.axhline(4096, color="k", ls="--", lw=0.8)
            ax.set_title("peak memory (dashed: 4 GB target)")
        else:
            ax.set_title("time per pair")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TARGETS_NOTE)
    ap.add_argument("--spacings", type=float, nargs="+", default=[2.0, 1.0], help="voxel sizes in mm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pair per seed and spacing")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2, help="threads for every method (ITK, OpenMP, torch)")
    ap.add_argument("--peer-python", default=sys.executable, help="Python with antspyx and itk-elastix")
    ap.add_argument("--deepreg-cli", help="path of the deepregistration executable (default: next to python)")
    ap.add_argument("--deepreg-args", default="", help="extra arguments for 'deepregistration register'")
    ap.add_argument("--model", help="learned model (registry name or card path) for deepreg+model / model")
    ap.add_argument("--moving-contrast", default="same", choices=("same", "inverted"),
                    help="'inverted': a T2-like synthetic contrast for the moving image (multimodal case; "
                         "give --deepreg-args '--similarity mi')")
    ap.add_argument("--templates", help="mricron templates folder (default: search; else apt-get download)")
    ap.add_argument("--fixed-orientation", default="LPS")
    ap.add_argument("--moving-orientation", default="RAS")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per method run")
    ap.add_argument("--no-gt-row", action="store_true", help="skip the ground-truth (exact inverse) row")
    ap.add_argument("--keep-runs", action="store_true", help="keep every method's output folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    templates = sp.find_templates(args.templates, download_to=HERE.parent / ".cache" / "mricron-data")
    env = environment(args)
    penv = thread_env(args.threads)
    logger.info("methods %s, spacings %s, seeds %s, %d threads; output %s", args.methods, args.spacings,
                args.seeds, args.threads, out)
    rows: list[dict] = []
    for spacing in args.spacings:
        for seed in args.seeds:
            tag = f"s{spacing:g}mm_seed{seed}"
            pair = sp.make_pair(templates, spacing, seed, out / "pairs" / tag,
                                fixed_orientation=args.fixed_orientation, moving_orientation=args.moving_orientation,
                                moving_contrast=args.moving_contrast)
            base = {"spacing_mm": spacing, "seed": seed, "pair": str(pair.out_dir)}
            rows.append({**base, "method": "none", "ok": True, **evaluate("none", out, pair)})
            if not args.no_gt_row:  # the exact S^-1: reference for what these label maps allow
                rows.append({**base, "method": "gt", "ok": True,
                             **evaluate("gt", out, pair, gt_inverse_transform(pair))})
            for method in args.methods:
                run_dir = out / "runs" / tag / method
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                cmd, export = method_commands(method, pair, run_dir, args, seed)
                logger.info("%s: %s", tag, method)
                res = run_measured(cmd, out / "runs" / tag / f"{method}.log", penv, args.timeout)
                row = {**base, "method": method, "wall_s": res.wall_s, "peak_rss_mb": res.peak_rss_mb,
                       "returncode": res.returncode, "ok": res.returncode == 0}
                if res.returncode != 0:
                    row["error"] = res.log[-1500:]
                    logger.error("%s %s failed (rc %d):\n%s", tag, method, res.returncode, res.log[-1500:])
                else:
                    try:
                        if export:
                            ex = run_measured(export, out / "runs" / tag / f"{method}.export.log", penv, args.timeout)
                            if ex.returncode != 0:
                                raise RuntimeError(f"export failed: {ex.log[-800:]}")
                        row.update(evaluate(method, run_dir, pair))
                    except Exception as exc:  # noqa: BLE001 - a failed evaluation is a result too
                        row.update(ok=False, error=f"evaluation: {exc}")
                        logger.exception("%s %s evaluation failed", tag, method)
                if row.get("ok"):
                    logger.info("%s %-8s Dice %.4f HD95 %.2f mm TRE %.2f mm folding %.4f %% time %.1f s peak %.0f MB",
                                tag, method, row["dice_mean"], row["hd95_mean_mm"], row["tre_mean_mm"],
                                row["folding_pct"], row["wall_s"], row["peak_rss_mb"])
                rows.append(row)
                if not args.keep_runs and run_dir.exists():
                    for p in run_dir.glob("*.nii.gz"):
                        if p.name not in ("warped.nii.gz",):
                            p.unlink()
                _write_all(out, args, env, rows)
    summary, tgt = _write_all(out, args, env, rows)
    print((out / "results.md").read_text())
    return 0 if all(r.get("ok") for r in rows) else 1


def _write_all(out: Path, args: argparse.Namespace, env: dict, rows: list[dict]) -> tuple[dict, list[dict]]:
    ratio = {}
    for r in rows:
        if r["method"] == "ants" and r.get("ok"):
            ratio[(r["spacing_mm"], r["seed"])] = r["wall_s"]
    for r in rows:
        a = ratio.get((r["spacing_mm"], r["seed"]))
        if a and "wall_s" in r:
            r["time_ratio_vs_ants"] = r["wall_s"] / a
    summary = summarize(rows)
    tgt = targets(summary)
    doc = {"environment": env, "config": {k: v for k, v in vars(args).items()}, "summary": summary,
           "targets": tgt, "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=True))
    write_markdown(out / "results.md", summary, tgt, env, rows)
    try:
        plot(out / "results.png", summary, rows)
    except Exception:  # noqa: BLE001 - the figure must not lose the numbers
        logger.exception("plot failed")
    return summary, tgt


if __name__ == "__main__":
    raise SystemExit(main())
