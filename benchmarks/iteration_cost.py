#!/usr/bin/env python3
"""Iteration cost benchmark: CPU seconds of one optimizer iteration (forward + backward + step) of the deformable
and the linear stage, one thread, for the engine at a baseline revision and the engine of this checkout, with the
split by kernel (``torch.profiler``, self CPU time per operator).

    python benchmarks/iteration_cost.py [--baseline HEAD] [--current-tree DIR] [--cases syn2 ct2mm demo]
        [--repeats 2] [--iters 4] [--cases-dir benchmarks/results-large-fov/cases] [--out benchmarks/results-iteration-cost]

The iterations are the pipeline's own: ``pipeline._optimize_field`` (deformable, default settings: LNCC radius
4, two 3³ smoothing passes, diffusion regularizer, CosineAdam) and ``pipeline._optimize_linear`` (affine) called
with ``--iters`` iterations on the levels ``pipeline._prepare_levels`` builds; the time per iteration is the call's
CPU time (``time.process_time``) divided by ``--iters`` (it includes the call's final evaluation, as the pipeline
pays it too). The deformable stage starts from a smooth random field (≈1 mm, seeded) after the centre-of-mass
affine; each stage runs once to warm up (fills the LNCC cache) before it is timed. Stages:
``deformable_f1`` / ``deformable_f2`` (finest and next level), ``linear_f2`` (the finest linear level of the
default deformable mode) and ``linear_f1`` (full resolution, on the box-smoothed images, as the affine mode).

Cases: ``demo``: the bundled pair (``DeepRegistration/Resources/SampleData``, 2 mm working grid, 0.2 M voxels);
``syn2``: the synthetic Colin27 pair of ``synthetic_pairs.py`` at 2 mm, seed 0 (as ``regression.py``; 91×109×91);
``ct2mm``: ``large_fov.py``'s 2 mm contrast CT (4.6 M voxels, moving covers 78 % of the fixed range; built and
cached under ``--cases-dir`` on first use, which downloads TotalSegmentator's example CT).

Every case runs in a fresh process per variant and repeat, alternating baseline / current (ABAB); the minimum over
repeats is reported. Runtime (one core, a loaded machine): about 0.5 min per process for ``syn2`` and 2–3 min for
``ct2mm`` (half that with ``--no-split``), so the default run (2 repeats, 2 variants) takes about 12 min.
Writes ``iteration_cost.json`` and ``iteration_cost.md``; prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import revisions  # noqa: E402
STAGES = ("deformable_f1", "deformable_f2", "linear_f2", "linear_f1")


def _pair(case: str, cases_dir: Path):
    from DeepRegistrationLib.io.images import read_image

    if case == "demo":
        d = REPO / "DeepRegistration" / "Resources" / "SampleData"
        return read_image(d / "fixed.nii.gz"), read_image(d / "moving.nii.gz")
    if case == "ct2mm":
        import large_fov

        c = large_fov.build_case(cases_dir, REPO / ".cache", 2.0)
        return read_image(c["fixed"]), read_image(c["moving"])
    if case == "syn2":
        import synthetic_pairs as sp

        templates = sp.find_templates(None, download_to=REPO / ".cache" / "mricron-data")
        pair = sp.make_pair(templates, 2.0, 0, REPO / ".cache" / "iteration_cost" / "syn2_0")
        return read_image(pair.fixed), read_image(pair.moving)
    raise SystemExit(f"unknown case {case!r}; choose demo, syn2 or ct2mm")


def _kernel_split(fn, top: int = 14) -> list:
    """``[(operator, self CPU s), ...]`` of one call of ``fn`` under ``torch.profiler``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, round(e.self_cpu_time_total / 1e6, 4)) for e in rows[:top]]


def child(case: str, iters: int, cases_dir: Path, split: bool) -> dict:
    """Runs in the variant's process (``PYTHONPATH`` = its tree)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.core.progress import Progress
    from DeepRegistrationLib.registration import pipeline as P
    from DeepRegistrationLib.spatial.filters import box_filter

    cfg = RegistrationConfig(threads=1)
    fixed, moving = _pair(case, cases_dir)
    device = torch.device("cpu")
    p = P._prepare_levels(fixed, moving, cfg, None, None, None, device)
    affine = torch.as_tensor(P._initial_affine(RegistrationConfig(initialization="moments"), p.fw, p.mw),
                             dtype=torch.float32)
    center = torch.as_tensor(P.center_of_mass(p.fw.array, p.fw.grid, p.fw.mask), dtype=torch.float32)
    quiet = Progress(None)

    def field_init(lv):
        g = torch.Generator().manual_seed(0)
        u = torch.randn((1, 3, *lv.fgrid.shape), generator=g)
        for _ in range(3):
            u = box_filter(u, 2)
        return u * (1.0 / u.std())  # ≈1 mm, smooth

    def full_res_level():
        return P._Level(box_filter(p.f_t, 1), p.fw.grid, box_filter(p.m_t, 1), p.mw.grid, 1, p.fmask, p.mmask)

    runs = {}
    for f in (1, 2):
        lv = p.levels[f]
        init = field_init(lv)
        runs[f"deformable_f{f}"] = (lambda n, lv=lv, init=init: P._optimize_field(lv, affine, init, n, p.sim, cfg,
                                                                                 quiet))
    runs["linear_f2"] = lambda n: P._optimize_linear(p.levels[2], affine, "affine", center, n, p.sim, quiet, p.frame)
    lv1 = full_res_level()
    runs["linear_f1"] = lambda n: P._optimize_linear(lv1, affine, "affine", center, n, p.sim, quiet, p.frame)
    row = {"voxels": int(np.prod(p.fw.grid.shape)), "grid_zyx": list(p.fw.grid.shape)}
    checks = {}
    for name, fn in runs.items():
        fn(1)  # warm-up: allocator, LNCC cache
        t = time.process_time()
        out = fn(iters)
        row[name] = round((time.process_time() - t) / iters, 4)
        res = out[0] if isinstance(out, tuple) else out
        checks[name] = float(res.double().abs().sum())
        if split:
            row[f"{name}_kernels"] = _kernel_split(lambda: fn(1))
    row["checksums"] = checks  # equal between variants iff the results are (to float64 printing)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD", metavar="REV", help="baseline revision (default HEAD: the "
                   "committed engine against the working tree)")
    p.add_argument("--cases", nargs="+", default=["syn2", "ct2mm"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--no-split", action="store_true", help="skip the per-kernel profile")
    p.add_argument("--current-tree", type=Path, default=REPO, help="the checkout measured as 'current' (default: "
                   "this one)")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=DIR", help="more checkouts to measure side by side")
    p.add_argument("--cases-dir", type=Path, help="the CT cases' folder (default: large_fov.py's, "
                   "benchmarks/results-large-fov/cases)")
    p.add_argument("--out", type=Path, default=HERE / "results-iteration-cost")
    p.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cases_dir is None:  # (a child always gets it: large_fov is imported only where needed)
        import large_fov

        args.cases_dir = large_fov.CASES
    if args.child:
        print("ROW " + json.dumps(child(args.child, args.iters, args.cases_dir, not args.no_split)))
        return 0
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rev = revisions.resolve(args.baseline)
    with revisions.baseline_worktree(rev) as base:
        trees = {"baseline": base, "current": args.current_tree.resolve()}
        trees.update({e.split("=", 1)[0]: Path(e.split("=", 1)[1]).resolve() for e in args.extra})
        rows = revisions.run_rows(trees, args.cases, args.repeats, lambda case, rep, _variant: [
            str(Path(__file__).resolve()), "--iters", str(args.iters), "--cases-dir", str(args.cases_dir),
            "--child", case] + (["--no-split"] if args.no_split or rep else []))
    (out / "iteration_cost.json").write_text(json.dumps({"baseline": rev, "rows": rows}, indent=1))
    lines = [f"# Iteration cost, 1 thread, CPU s per iteration (min of {args.repeats} processes; baseline "
             f"{rev[:10]} vs {args.current_tree})", "", "| case | voxels | variant | n | " + " | ".join(STAGES) +
             " | same results as baseline |", "|---" * (len(STAGES) + 5) + "|"]
    for case in args.cases:
        sums = {}
        names = list(dict.fromkeys(r["variant"] for r in rows))
        for variant in names:
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and r["ok"]]
            if rs:
                sums[variant] = rs[0]["checksums"]
        for variant in names:
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and r["ok"]]
            if not rs:
                continue
            same = "–" if "baseline" not in sums or variant == "baseline" else \
                ("yes" if sums["baseline"] == sums.get(variant) else "no")
            lines.append(f"| {case} | {rs[0]['voxels']} | {variant} | {len(rs)} | " +
                         " | ".join(f"{min(r[k] for r in rs):.3f}" for k in STAGES) + f" | {same} |")
        for variant in names:
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and r["ok"] and
                  "deformable_f1_kernels" in r]
            if rs:
                lines += ["", f"{case} {variant}, deformable_f1 (one iteration under the profiler), self CPU s: " +
                          ", ".join(f"{k} {v:.3f}" for k, v in rs[0]["deformable_f1_kernels"])]
    (out / "iteration_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
