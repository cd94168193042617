#!/usr/bin/env python3
"""Warp cost benchmark: CPU seconds (one thread) and wall seconds (two threads) of ``resampling.warp_image`` for
the engine at a baseline revision and the engine of this checkout, on the same transform, with the outputs
compared bit for bit.

    python benchmarks/warp_cost.py [--baseline REV] [--cases demo ct_2mm ct_0.75mm] [--repeats 3]
        [--threads 1 2] [--large-fov-cases DIR] [--out benchmarks/results-warp-cost]

Each case is registered once (this checkout, two threads, default settings) and its ``transform.h5`` kept; then
every variant, repeat and thread count runs in a fresh process (``revisions.run_rows``: baseline / current
alternating, ABBA) that reads the images and the transform and times three warps as the pipeline does them:
- ``full``: the moving image onto the fixed grid, linear, into the moving file's pixel type (``warped.nii.gz``;
  int16 for the CTs, float32 for the demo pair);
- ``labels``: the moving labels onto the fixed grid, nearest (the label evaluation), where the case has them;
- ``working``: the moving image onto the registration's 2 mm working grid (``preprocess.working_grid``, centred on
  the fixed box), linear, float32 (report.png).
Kept per run: the CPU seconds (``time.process_time``) and wall seconds of each warp and a SHA-1 of each output
array (the same in both variants: the same bits).

Cases: ``demo`` (the bundled sample pair and labels), ``ct_2mm`` / ``ct_0.75mm`` (the trunk CT pairs of
``large_fov.py``, 4.6 M / 86.5 M fixed voxels, read from ``--large-fov-cases``; ``large_fov.py --out DIR`` writes them
into ``DIR/cases``; skipped when absent).

Runtime on a 2-core machine: the registrations ~1-2 min (once; kept in ``--out``), then per repeat, variant and
thread count ~3 s (demo), ~8 s (ct_2mm), ~30 s (ct_0.75mm, reading its images and the baseline worktree
included): 2 repeats took 6.5 min, the defaults (3) ~10 min. Writes ``warp_cost.json`` and ``warp_cost.md`` into
``--out``; exits 1 when an output differs between the variants.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "DeepRegistration" / "Resources" / "SampleData"
WARPS = ("full", "labels", "working")
sys.path.insert(0, str(HERE))
import large_fov  # noqa: E402
import revisions  # noqa: E402


CHILD = r'''
import hashlib, json, sys, time
import numpy as np, SimpleITK as sitk, torch
from DeepRegistrationLib.io.images import read_image, read_label_image, stored_integer_type
from DeepRegistrationLib.registration.preprocess import working_grid
from DeepRegistrationLib.spatial.resampling import warp_image
from DeepRegistrationLib.spatial.transforms import SpatialTransform

fixed_path, moving_path, labels_path, transform_path, threads = sys.argv[1:6]
torch.set_num_threads(int(threads))
fixed, moving = read_image(fixed_path), read_image(moving_path)
transform = SpatialTransform.from_sitk(sitk.ReadTransform(transform_path))
g = fixed.grid
working = working_grid(g, 2.0)  # the registration's working grid (2 mm, centred on the fixed box)
jobs = {"full": (moving, g, "linear", stored_integer_type(moving_path))}
if labels_path:
    jobs["labels"] = (read_label_image(labels_path), g, "nearest", None)
jobs["working"] = (moving, working, "linear", None)
row = {"cpu_s": {}, "wall_s": {}, "sha1": {}, "voxels": {}}
for name, (image, grid, interpolation, dtype) in jobs.items():
    c0, w0 = time.process_time(), time.perf_counter()
    out = warp_image(image, grid, transform, interpolation, dtype=dtype).array
    row["cpu_s"][name] = time.process_time() - c0
    row["wall_s"][name] = time.perf_counter() - w0
    row["sha1"][name] = hashlib.sha1(np.ascontiguousarray(out).tobytes()).hexdigest()[:16] + f":{out.dtype}"
    row["voxels"][name] = int(out.size)
    del out
print("ROW " + json.dumps(row))
'''


def _case_paths(case: str, args) -> tuple[Path, Path, Path | None] | None:
    if case == "demo":
        return SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz", SAMPLE / "moving_labels.nii.gz"
    d = args.large_fov_cases / case
    if not (d / "fixed.nii.gz").exists():
        print(f"{case}: no {d}/fixed.nii.gz (run benchmarks/large_fov.py first); skipped", file=sys.stderr)
        return None
    labels = d / "moving_labels.nii.gz"
    return d / "fixed.nii.gz", d / "moving.nii.gz", labels if labels.exists() else None


def _register(case: str, paths, out: Path) -> Path:
    """``transform.h5`` of registering ``case`` with this checkout (two threads, default settings), once."""
    path = out / "transforms" / case / "transform.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys, SimpleITK as sitk; from DeepRegistrationLib.io.images import read_image; "
                "from DeepRegistrationLib.core.config import RegistrationConfig; "
                "from DeepRegistrationLib.registration.pipeline import register; "
                "r = register(read_image(sys.argv[1]), read_image(sys.argv[2]), RegistrationConfig(threads=2)); "
                "sitk.WriteTransform(r.transform.to_sitk(), sys.argv[3])")
        env = dict(os.environ, PYTHONPATH=str(REPO / "DeepRegistration"))
        subprocess.run([sys.executable, "-c", code, str(paths[0]), str(paths[1]), str(path)], check=True, env=env)
    return path


def _summary(rows: list[dict], threads: list[int]) -> tuple[dict, list[str]]:
    summary, md = {}, []
    md.append("| case | warp | voxels | threads | baseline CPU s | current CPU s | baseline wall s | current wall s | "
              "current / baseline | same bits |")
    md.append("|---|---|---|---|---|---|---|---|---|---|")
    for case in dict.fromkeys(r["case"] for r in rows):
        for warp in WARPS:
            for t in threads:
                sel = {v: [r for r in rows if r["case"] == case and r["variant"] == v and r["threads"] == t and r["ok"]
                           and warp in r["cpu_s"]] for v in ("baseline", "current")}
                if not all(sel.values()):
                    continue
                med = {v: {k: statistics.median(r[k][warp] for r in rs) for k in ("cpu_s", "wall_s")}
                       for v, rs in sel.items()}
                same = len({r["sha1"][warp] for rs in sel.values() for r in rs}) == 1
                key = "cpu_s" if t == 1 else "wall_s"
                ratio = med["current"][key] / med["baseline"][key]
                summary[f"{case}/{warp}/{t}"] = dict(med, ratio=ratio, same_bits=same)
                md.append(f"| {case} | {warp} | {sel['current'][0]['voxels'][warp]:,} | {t} | "
                          f"{med['baseline']['cpu_s']:.2f} | {med['current']['cpu_s']:.2f} | "
                          f"{med['baseline']['wall_s']:.2f} | {med['current']['wall_s']:.2f} | "
                          f"{ratio:.2f} ({key.split('_')[0]}) | {'yes' if same else 'NO'} |")
    return summary, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="57b695f", metavar="REV",
                   help="revision to compare with (default: %(default)s, before the slice-by-slice warp)")
    p.add_argument("--cases", nargs="+", default=["demo", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-warp-cost")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case in args.cases:
        paths = _case_paths(case, args)
        if paths is not None:
            cases[case] = (*paths, _register(case, paths, args.out))
    rows = []
    base = revisions.resolve(args.baseline)
    with revisions.baseline_worktree(base) as tree:
        trees = {"baseline": tree, "current": REPO}
        for t in args.threads:
            command = lambda case, rep, variant, t=t: ["-c", CHILD, *[str(x or "") for x in cases[case]], str(t)]
            for row in revisions.run_rows(trees, list(cases), args.repeats, command, threads=t):
                rows.append(dict(row, threads=t))
    summary, md = _summary(rows, args.threads)
    environment = {"baseline": base, "current": revisions.resolve("HEAD"), "machine": platform.processor()
                   or platform.machine(), "cpus": os.cpu_count(), "repeats": args.repeats}
    (args.out / "warp_cost.json").write_text(json.dumps({"environment": environment, "summary": summary,
                                                         "rows": rows}, indent=1))
    header = [f"# warp_image cost: {base[:10]} vs {environment['current'][:10]}", "",
              "CPU s at 1 thread, wall s at 2 threads (medians of the repeats; ratio: CPU at 1 thread, wall at 2)."
              " Same bits: one SHA-1 of the output array over every run of both variants.", ""]
    (args.out / "warp_cost.md").write_text("\n".join(header + md) + "\n")
    print("\n".join(md))
    return 0 if all(s["same_bits"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
