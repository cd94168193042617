#!/usr/bin/env python3
"""Inverse cost benchmark: CPU seconds of ``spatial.inverse.invert`` as ``run.py`` calls it for ``inverse.h5`` (the
written inverse's tolerance and settled rule), one thread, for the engine at a baseline revision and the engine of
this checkout, on the same forward transform; and how exact each inverse is.

    python benchmarks/inverse_cost.py [--baseline REV] [--cases demo syn2 ct_2mm ct_0.75mm] [--repeats 3]
        [--large-fov-cases DIR] [--out benchmarks/results-inverse-cost]

Each case is registered once with this checkout (``output_cost.py``'s registration pickle, one thread, reused when
it is there); its forward field, affine and moving-space consistency points are saved on their own, and every
variant and repeat inverts that field in a fresh process, alternating baseline / current (ABBA). Kept per run: CPU
seconds (``time.process_time``) and wall seconds of ``invert``, its iterations and reported grid residual, and,
recomputed here in float64 the same way for both variants, the residual ``|w(z) + u(z + w(z))|`` of the returned
field at the grid points whose ``z + w`` lies in the grid (max, mean, 99.9th percentile) and the consistency error
``|T(T⁻¹(y)) - y|`` at the report's moving points (mean, p95, max).

Cases as ``output_cost.py`` (``demo``, ``syn2``, ``ct_2mm``, ``ct_0.75mm``; the CT pairs from ``--large-fov-cases``,
skipped when absent; the 0.75 mm CT's field is on the same 2 mm working grid as the 2 mm CT's). Runtime on one loaded
core: the registrations ~1 min per case (once), then ~5 s per run (ct_2mm; ~15 s for ct_0.75mm's moving points).
Writes ``inverse_cost.json`` and ``inverse_cost.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import revisions  # noqa: E402


def _field_pickle(case: str, args) -> Path | None:
    """The forward transform's arrays and the consistency points of ``case`` (from output_cost's registration)."""
    out = args.out / f"{case}_field.pkl"
    if out.exists():
        return out
    import output_cost

    reg = output_cost._register(case, argparse.Namespace(out=args.out, large_fov_cases=args.large_fov_cases))
    if reg is None:
        return None
    sys.path.insert(0, str(REPO / "DeepRegistration"))
    from DeepRegistrationLib.spatial.inverse import foreground_points

    with open(reg, "rb") as f:
        _fixed, _moving, _cfg, inputs, result = pickle.load(f)
    t, mmask = result.transform, inputs.moving_mask
    g = t.field_grid
    pts = foreground_points(inputs.moving.array, inputs.moving.grid, None if mmask is None else mmask.array > 0)
    with open(out, "wb") as f:
        pickle.dump({"field": t.field, "affine": t.affine, "grid": (g.shape, g.spacing, g.origin, g.direction),
                     "points": pts, "velocity": getattr(result, "velocity", None)}, f, protocol=4)
    return out


def _measure_child(pkl: str) -> None:
    """Inverts the pickled field as run.py does; prints one ``ROW {json}`` line."""
    import time

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from DeepRegistrationLib.core.grid import Grid
    from DeepRegistrationLib.spatial import inverse as I
    from DeepRegistrationLib.spatial import warp as W
    from DeepRegistrationLib.spatial.transforms import SpatialTransform

    with open(pkl, "rb") as f:
        d = pickle.load(f)
    grid = Grid(*d["grid"])
    forward = SpatialTransform(d["affine"], d["field"], grid)
    c0, w0 = time.process_time(), time.perf_counter()
    inv = I.invert(forward, velocity=d["velocity"], tol_mm=I.WRITE_TOL_MM, settled_after=I.WRITE_SETTLED_AFTER,
                   settled_fraction=I.WRITE_SETTLED_FRACTION)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    # the returned field's own residual, float64, ITK's field rule, where z + w lies in the grid
    z = W.grid_points(grid, dtype=torch.float64).reshape(-1, 3)
    wt = torch.as_tensor(np.moveaxis(inv.field, 0, -1).reshape(-1, 3))
    target = z + wt
    inside = W.world_to_normalized(target, grid).abs().amax(dim=-1) <= 1.0
    u_at = W.sample_field(torch.as_tensor(d["field"], dtype=torch.float64)[None], grid, target.view(1, -1, 1, 1, 3))
    res = (wt + u_at.view(3, -1).t()).norm(dim=1)[inside].numpy()
    print("ROW " + json.dumps({
        "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "method": inv.method, "iterations": inv.iterations,
        "grid_residual_reported_mm": inv.residual_max_mm,
        "residual_mm": {"max": float(res.max()), "mean": float(res.mean()),
                        "p999": float(np.percentile(res, 99.9))},
        "consistency_mm": I.consistency_error(forward, inv, d["points"])}))


def _summary(rows: list[dict]) -> list[str]:
    lines = ["| case | variant | runs | CPU s (least / median) | iterations | reported grid residual mm | "
             "field residual max / mean / p99.9 mm | consistency mean / p95 / max mm |", "|---" * 8 + "|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for variant in ("baseline", "current"):
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and "cpu_s" in r]
            if not rs:
                continue
            cpu = sorted(r["cpu_s"] for r in rs)
            r, res, ce = rs[0], rs[0]["residual_mm"], rs[0]["consistency_mm"]
            lines.append(f"| {case} | {variant} | {len(rs)} | {cpu[0]:.2f} / {cpu[len(cpu) // 2]:.2f} | "
                         f"{r['iterations']} | {r['grid_residual_reported_mm']:.5f} | {res['max']:.5f} / "
                         f"{res['mean']:.7f} / {res['p999']:.5f} | {ce['mean_mm']:.6f} / {ce['p95_mm']:.6f} / "
                         f"{ce['max_mm']:.6f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_measure":
        _measure_child(argv[1])
        return 0
    import tempfile

    import large_fov  # here, not at the top: the measuring children need none of it

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="7ebca63", metavar="REV",
                   help="baseline revision (default: before the linearized start and the blocked iteration)")
    p.add_argument("--cases", nargs="+", default=["demo", "syn2", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-inverse-cost")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rev = revisions.resolve(args.baseline)
    pickles = {c: pk for c in args.cases if (pk := _field_pickle(c, args)) is not None}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": revisions.baseline_archive(rev, Path(tmp) / "baseline"), "current": REPO}
        rows = revisions.run_rows(trees, list(pickles), args.repeats,
                                  lambda case, rep, _variant: [__file__, "--_measure", str(pickles[case])])
    env = {"baseline": rev, "current": revisions.resolve("HEAD"), "threads": 1, "cpu": os.uname().machine}
    md = [f"# Inverse cost (invert as run.py calls it; 1 thread, CPU s over {args.repeats} runs per variant)", "",
          f"baseline {rev[:10]}, current {env['current'][:10]}", "", *_summary(rows)]
    revisions.write_results(args.out, "inverse_cost", env, rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
