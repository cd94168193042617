#!/usr/bin/env python3
"""How much work the registration stages do on a large grid: Dice and CPU seconds per stage of ``register`` on
the 2 mm trunk CT of ``large_fov.py`` (4.6 M working voxels) for different per-level iteration plans.

    python benchmarks/large_grid_plan.py [--case DIR] [--variants NAME ...] [--repeats 1] [--threads 1]
        [--out benchmarks/results-large-grid-plan]

Every variant runs in this one process (in-process ``register``, one thread by default), in turn, ``--repeats``
times (ABAB...); CPU seconds (``time.process_time``) per stage are the minimum over the repeats, the Dice is
the mean label Dice inside the true overlap, scored as ``large_fov.py`` does (``large_fov.score``: the moving
labels warped by the result's transform with SimpleITK, labels with >= 20 voxels there).

Variants (``--variants``; default ``lgv0 default``, the engine without and with its ``large_grid_voxels`` cap):
- ``lgv0`` (no cap) / ``default`` / ``lgvB`` (e.g. ``lgv3``): ``RegistrationConfig(large_grid_voxels=B)``;
- ``dK_lM[_cC]``: explicit plans (the exploration of docs/ENGINE.md, *Work on large grids*): deformable finest
  level ``K`` iterations (0 = the 4 mm level's field upsampled), linear stage's finest level (4 mm) ``M``
  iterations (0 = none at that level), coarser deformable levels ``C`` (default 20), the coarser linear level
  as planned (60), everything else the default configuration.

The case is built (and cached) by ``large_fov.py``: ``--case`` is its ``cases/ct_2mm`` folder (default
``benchmarks/results-large-fov/cases/ct_2mm``, ``large_fov.CASES``). Runtime: about
20-50 CPU s per variant and repeat on one thread. Writes ``large_grid_plan.json`` and ``large_grid_plan.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "DeepRegistration"))
sys.path.insert(0, str(HERE))

STAGES = ("preprocess", "initialization", "linear", "deformable", "evaluate")


def _explicit(name: str):
    m = re.fullmatch(r"d(\d+)_l(\d+)(?:_c(\d+))?", name)
    if not m:
        return None
    return {("deformable", 1): int(m[1]), ("linear", 2): int(m[2]),
            **({("deformable", f): int(m[3]) for f in (2, 4, 8)} if m[3] else {})}


def config_for(name: str, threads: int):
    from DeepRegistrationLib.core.config import RegistrationConfig

    if name == "default":
        return RegistrationConfig(threads=threads), None
    m = re.fullmatch(r"lgv([0-9.]+)", name)
    if m:
        return RegistrationConfig(threads=threads, large_grid_voxels=float(m[1])), None
    table = _explicit(name)
    if table is None:
        raise SystemExit(f"unknown variant {name!r}: use default, lgvB or dK_lM[_cC]")
    return RegistrationConfig(threads=threads, large_grid_voxels=0.0), table


def run_variant(name: str, fixed, moving, case: dict, threads: int) -> dict:
    """One in-process registration: CPU s per stage, the plan that ran, the Dice."""
    from DeepRegistrationLib.registration import pipeline as P
    import large_fov

    cfg, table = config_for(name, threads)
    cpu: dict[str, float] = {}
    saved = {k: getattr(P, k) for k in ("_prepare_levels", "_initialize", "_linear_stage", "_deformable_stage",
                                         "_finish", "_stage_plan")}

    def timed(fn, label):
        def wrapper(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[label] = cpu.get(label, 0.0) + time.process_time() - t
        return wrapper

    for key, label in (("_prepare_levels", "preprocess"), ("_initialize", "initialization"),
                       ("_linear_stage", "linear"), ("_deformable_stage", "deformable"), ("_finish", "evaluate")):
        setattr(P, key, timed(saved[key], label))
    if table is not None:
        def fixed_plan(stage, planned, voxels, finest_voxels, c):
            return {f: table.get((stage, f), n) for f, n in planned.items()}
        P._stage_plan = fixed_plan
    try:
        t = time.process_time()
        result = P.register(fixed, moving, cfg)
        total = time.process_time() - t
    finally:
        for k, fn in saved.items():
            setattr(P, k, fn)
    score = large_fov.score(case, result.transform.to_sitk(), folding=False)
    plan = {f"{e['stage'][0]}{e['factor']}": e["iterations"] for e in result.plan}
    return {"variant": name, "dice": score["dice_mean"], "cpu_s": {**cpu, "register": total}, "plan": plan,
            "similarity_after": result.similarity_after, "folding_percent": result.folding_percent}


def main(argv: list[str] | None = None) -> int:
    import large_fov

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=Path, default=large_fov.CASES / "ct_2mm")
    p.add_argument("--variants", nargs="+", default=["lgv0", "default"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results-large-grid-plan")
    args = p.parse_args(argv)
    if not (args.case / "case.json").exists():
        raise SystemExit(f"no case at {args.case}: run benchmarks/large_fov.py first (it builds cases/ct_2mm)")
    case = json.loads((args.case / "case.json").read_text())
    case.update({k: str(args.case / f"{k}.nii.gz") for k in ("fixed", "moving", "fixed_labels", "moving_labels",
                                                             "overlap")})
    import torch
    from DeepRegistrationLib.io.images import read_image

    torch.set_num_threads(args.threads)
    fixed, moving = read_image(case["fixed"]), read_image(case["moving"])
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {v: [] for v in args.variants}
    for rep in range(args.repeats):
        for name in args.variants:
            row = run_variant(name, fixed, moving, case, args.threads)
            rows[name].append(row)
            c = row["cpu_s"]
            print(f"[{rep}] {name:>14}: Dice {row['dice']:.4f} register {c['register']:.1f} s (linear "
                  f"{c['linear']:.1f}, deformable {c.get('deformable', 0):.1f}) plan {row['plan']}", flush=True)
    summary = []
    for name, runs in rows.items():
        best = {k: min(r["cpu_s"].get(k, 0.0) for r in runs) for k in (*STAGES, "register")}
        summary.append({"variant": name, "dice": runs[0]["dice"], "cpu_s": best, "plan": runs[0]["plan"],
                        "similarity_after": runs[0]["similarity_after"],
                        "folding_percent": runs[0]["folding_percent"], "runs": runs})
    (args.out / "large_grid_plan.json").write_text(json.dumps({"case": case, "threads": args.threads,
                                                               "repeats": args.repeats, "rows": summary}, indent=1))
    lines = [f"# Work plan on a large grid: {case['name']} ({case['fixed_voxels'] / 1e6:.1f} M fixed voxels)", "",
             f"{args.threads} thread(s), CPU s (process time, minimum of {args.repeats}), in-process `register`.", "",
             "| variant | plan (stage+factor: iterations) | Dice | linear | deformable | register |",
             "|---|---|---|---|---|---|"]
    for r in summary:
        c = r["cpu_s"]
        plan = ", ".join(f"{k} {v}" for k, v in r["plan"].items())
        lines.append(f"| {r['variant']} | {plan} | {r['dice']:.4f} | {c['linear']:.1f} | {c['deformable']:.1f} | "
                     f"{c['register']:.1f} |")
    (args.out / "large_grid_plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
