#!/usr/bin/env python3
"""Regression benchmark: the engine at a baseline commit against the engine of this checkout, on the existing
benchmark sets, in one run.

    python benchmarks/regression.py --baseline REV [--out benchmarks/results-regression] [--threads 2]
        [--repeats 1] [--sets synthetic multimodal real]

The baseline's sources are checked out into a temporary ``git worktree`` (removed at the end) and run by the same
Python, with ``PYTHONPATH`` pointing at that worktree's ``DeepRegistration/`` (so the same torch, SimpleITK, ...
serve both). Every case runs ``deepregistration register FIXED MOVING -o OUT --no-png -q --threads N`` once per
variant and repeat, alternating baseline / current (ABAB: a drift in the machine's load hits both alike). Scored
like the original benchmarks (``run_benchmark.evaluate``: AAL Dice, HD95, TRE, folding; ``real_pair.evaluate``:
tissue Dice), timed as whole processes: wall clock and CPU (user + system) seconds, peak RSS.

Sets (the pairs of RESULTS.md, MULTIMODAL_RESULTS.md and REAL_RESULTS.md):
- ``synthetic``: synthetic Colin27 pairs at 2 mm and 1 mm, seeds 0, 1, 2;
- ``multimodal``: the same at 2 mm with an inverted second contrast, ``--similarity mi``;
- ``real``: ICBM152 2009a (fixed) vs Colin27 (moving) at 1 mm.

Writes ``regression.json``, ``regression.md`` (per set: Dice, TRE, time and the current/baseline ratios) and
``regression.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import real_pair  # noqa: E402
import run_benchmark as rb  # noqa: E402
import revisions  # noqa: E402
import synthetic_pairs as sp  # noqa: E402

VARIANTS = ("baseline", "current")


def cases(out: Path, sets: list[str]) -> list[dict]:
    """The benchmark pairs: name, set, fixed/moving paths, extra register arguments, scorer."""
    templates = sp.find_templates(None, download_to=REPO / ".cache" / "mricron-data")
    found: list[dict] = []
    if "synthetic" in sets:
        for spacing in (2.0, 1.0):
            for seed in (0, 1, 2):
                pair = sp.make_pair(templates, spacing, seed, out / "pairs" / f"syn_{spacing:g}mm_{seed}")
                found.append({"name": f"syn_{spacing:g}mm_seed{seed}", "set": f"synthetic {spacing:g} mm",
                              "pair": pair, "args": [], "score": "synthetic"})
    if "multimodal" in sets:
        for seed in (0, 1, 2):
            pair = sp.make_pair(templates, 2.0, seed, out / "pairs" / f"mm_2mm_{seed}", moving_contrast="inverted")
            found.append({"name": f"mm_2mm_seed{seed}", "set": "multimodal 2 mm (MI)", "pair": pair,
                          "args": ["--similarity", "mi"], "score": "synthetic"})
    if "real" in sets:
        pair = real_pair.build_pair(out / "pairs" / "real", REPO / ".cache", None)
        found.append({"name": "icbm_colin_1mm", "set": "real ICBM vs Colin27 1 mm", "pair": pair, "args": [],
                      "score": "real"})
    return found


def run_one(case: dict, variant: str, tree: Path, run_dir: Path, args) -> dict:
    pair = case["pair"]
    module = ("DeepRegistrationLib.apps.cli" if (tree / "DeepRegistration/DeepRegistrationLib/apps/cli.py").exists()
              else "DeepRegistrationLib.cli")  # the layout before the engine's layer subpackages
    cmd = [sys.executable, "-m", module, "register", str(pair.fixed), str(pair.moving),
           "-o", str(run_dir), "--overwrite", "--no-png", "-q", "--threads", str(args.threads)] + case["args"]
    env = rb.thread_env(args.threads)
    env["PYTHONPATH"] = str(tree / "DeepRegistration")
    res = rb.run_measured(cmd, run_dir.parent / f"{run_dir.name}.log", env, args.timeout)
    row = {"case": case["name"], "set": case["set"], "variant": variant, "wall_s": res.wall_s, "cpu_s": res.cpu_s,
           "peak_mb": res.peak_rss_mb, "ok": res.returncode == 0}
    if res.returncode != 0:
        row["error"] = res.log[-800:]
        return row
    if case["score"] == "synthetic":
        ev = rb.evaluate("deepreg", run_dir, pair)
        row.update(dice_mean=ev["dice_mean"], tre_mean_mm=ev["tre_mean_mm"], folding_pct=ev["folding_pct"])
    else:
        ev = real_pair.evaluate("deepreg", run_dir, pair)
        row.update(dice_mean=ev["dice_mean"], folding_pct=ev["folding_pct"])
    return row


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for s in dict.fromkeys(r["set"] for r in rows):
        per = {}
        for v in VARIANTS:
            rs = [r for r in rows if r["set"] == s and r["variant"] == v and r["ok"]]
            if not rs:
                continue
            per[v] = {k: float(np.mean([r[k] for r in rs if k in r])) for k in
                      ("dice_mean", "tre_mean_mm", "folding_pct", "wall_s", "cpu_s", "peak_mb") if
                      any(k in r for r in rs)}
            per[v]["n"] = len(rs)
        if len(per) == 2:
            per["ratio"] = {k: per["current"][k] / per["baseline"][k] for k in ("wall_s", "cpu_s", "peak_mb")}
            per["dice_change"] = per["current"]["dice_mean"] - per["baseline"]["dice_mean"]
        out[s] = per
    return out


def write(out: Path, rows: list[dict], args, baseline_rev: str, current_rev: str) -> None:
    summary = summarize(rows)
    (out / "regression.json").write_text(json.dumps({"baseline": baseline_rev, "current": current_rev,
                                                     "threads": args.threads, "cpu_model": rb.cpu_model(),
                                                     "summary": summary, "rows": rows}, indent=1, default=str))
    lines = [f"# Regression: engine at {baseline_rev[:10]} (baseline) vs {current_rev[:10]} (current)", "",
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; {rb.cpu_model()}; "
             f"{args.threads} threads; every case once per variant and repeat, alternating. Time = whole process "
             "(imports included): wall clock and CPU (user + system) seconds; the ratios are current / baseline.", "",
             "| set | n | Dice baseline | Dice current | TRE mm b / c | folding % b / c | wall s b / c | CPU s b / c | "
             "wall ratio | CPU ratio | peak MB b / c |", "|---" * 11 + "|"]
    for s, per in summary.items():
        if "ratio" not in per:
            continue
        b, c = per["baseline"], per["current"]
        tre = (f"{b['tre_mean_mm']:.2f} / {c['tre_mean_mm']:.2f}" if "tre_mean_mm" in b else "–")
        lines.append(f"| {s} | {c['n']} | {b['dice_mean']:.4f} | {c['dice_mean']:.4f} | {tre} | "
                     f"{b['folding_pct']:.4f} / {c['folding_pct']:.4f} | {b['wall_s']:.1f} / {c['wall_s']:.1f} | "
                     f"{b['cpu_s']:.1f} / {c['cpu_s']:.1f} | {per['ratio']['wall_s']:.2f} | "
                     f"{per['ratio']['cpu_s']:.2f} | {b['peak_mb']:.0f} / {c['peak_mb']:.0f} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{r['case']} ({r['variant']})" for r in failed)]
    (out / "regression.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [s for s, per in summary.items() if "ratio" in per]
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
        x = np.arange(len(names))
        for i, v in enumerate(VARIANTS):
            ax[0].bar(x + i * 0.4, [summary[s][v]["dice_mean"] for s in names], 0.4, label=v)
            ax[1].bar(x + i * 0.4, [summary[s][v]["cpu_s"] for s in names], 0.4, label=v)
        for a, title in zip(ax, ("mean Dice", "whole-process CPU time (s)")):
            a.set_xticks(x + 0.2)
            a.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            a.set_title(title)
        ax[0].set_ylim(0.5, 1.0)
        ax[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "regression.png", dpi=90)
        plt.close(fig)
    except Exception as exc:  # plotting is a convenience
        print(f"plot skipped: {exc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, metavar="REV", help="git revision of the baseline engine")
    p.add_argument("--out", type=Path, default=HERE / "results-regression")
    p.add_argument("--sets", nargs="+", default=["synthetic", "multimodal", "real"],
                   choices=("synthetic", "multimodal", "real"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rev, current = revisions.resolve(args.baseline), revisions.resolve("HEAD")
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "DeepRegistration"],
                           capture_output=True, text=True).stdout.strip()
    if dirty:
        current += "+uncommitted"
    todo = cases(out, args.sets)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="regression-") as tmp, \
            revisions.baseline_worktree(rev, Path(tmp)) as base_tree:
        trees = {"baseline": base_tree, "current": REPO}
        for rep in range(args.repeats):
            for case in todo:
                order = VARIANTS if (len(rows) // 2) % 2 == 0 else VARIANTS[::-1]
                for v in order:
                    run_dir = out / "runs" / case["name"] / f"{v}_{rep}"
                    if run_dir.exists():
                        shutil.rmtree(run_dir)
                    run_dir.parent.mkdir(parents=True, exist_ok=True)
                    row = run_one(case, v, trees[v], run_dir, args)
                    row["repeat"] = rep
                    rows.append(row)
                    print(f"{case['name']:>18} {v:>8}: Dice {row.get('dice_mean', float('nan')):.4f} "
                          f"wall {row['wall_s']:.1f} s CPU {row['cpu_s']:.1f} s", flush=True)
                    for big in run_dir.glob("*.nii.gz"):
                        big.unlink()
                    write(out, rows, args, rev, current)
    print((out / "regression.md").read_text())
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
