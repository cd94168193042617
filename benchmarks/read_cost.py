#!/usr/bin/env python3
"""Reading and preprocessing as ``register`` does them, int16 inputs read as float32 (``read_image``'s default) against
read as stored (``read_image(..., keep_integer=True)``): CPU seconds, wall seconds and peak memory of reading both
images and ``preprocess.prepare_pair`` at 2 mm, alternating (ABAB), each run in a fresh process.

    python benchmarks/read_cost.py [--repeats 3] [--threads 1] [--cases ct_0.75mm ct_2mm demo]
        [--large-fov-cases benchmarks/results-large-fov/cases] [--out benchmarks/results-read-cost]

With ``--threads 1`` the images are read and prepared one after the other on one thread (CPU s is the figure to
read); with ``--threads N > 1`` they are read in two threads and prepared in two (as ``run._read_inputs`` and
``pipeline.register`` do), ITK and OpenMP on N threads, and the wall time is the figure. Peak memory is the child's
``VmHWM`` (Linux). The working images (arrays and grids) of both variants are compared bit for bit (sha1). Cases:
``ct_0.75mm``/``ct_2mm`` from ``large_fov.py``'s case folder (skipped when absent), ``demo``: the bundled pair
(float32 files: both variants are the same reads). Runtime: about 2 min with the three cases and 3 repeats on one
core. Writes ``read_cost.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import large_fov  # noqa: E402
import revisions  # noqa: E402
import run_benchmark as rb  # noqa: E402
from preprocess_cost import case_files  # noqa: E402

CHILD = r'''
import hashlib, json, os, sys, time
lib, fixed, moving, keep, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
sys.path.insert(0, lib)
import numpy as np, SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
from DeepRegistrationLib.io.background import run_parallel
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import preprocess

def hwm_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None

base = hwm_mb()
t, w = time.process_time(), time.perf_counter()
kw = {"keep_integer": True} if keep else {}
f, m = run_parallel([lambda _: read_image(fixed, "fixed image", **kw),
                     lambda _: read_image(moving, "moving image", **kw)], 2, threads > 1)
read_cpu, read_wall = time.process_time() - t, time.perf_counter() - w
t, w = time.process_time(), time.perf_counter()
ws = preprocess.prepare_pair(f, m, 2.0, concurrent=threads > 1)
prep_cpu, prep_wall = time.process_time() - t, time.perf_counter() - w
check = [hashlib.sha1(x.array.tobytes() + repr(x.grid).encode()).hexdigest() for x in ws]
print(json.dumps({"dtype": str(m.array.dtype), "read_cpu_s": read_cpu, "read_wall_s": read_wall,
                  "prepare_cpu_s": prep_cpu, "prepare_wall_s": prep_wall, "cpu_s": read_cpu + prep_cpu,
                  "wall_s": read_wall + prep_wall, "peak_mb": hwm_mb(), "start_mb": base, "check": check}))
'''
VARIANTS = {"float32": "0", "kept": "1"}  # read_image's default; keep_integer=True


def run_one(files, keep: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "DeepRegistration"), str(files[0]), str(files[1]),
                           keep, str(threads)], capture_output=True, text=True, env=rb.thread_env(threads),
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"read/prepare failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", nargs="+", default=["ct_0.75mm", "ct_2mm", "demo"])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-read-cost")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        files = case_files(case, args.large_fov_cases)
        if files is None:
            print(f"skipping {case}: its files are not here (large_fov.py builds the CT cases)")
            continue
        for rep in range(args.repeats):
            for variant in revisions.alternating(list(VARIANTS), rep):
                row = {"case": case, "variant": variant, "repeat": rep, **run_one(files, VARIANTS[variant],
                                                                                  args.threads)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    keys = ("read_cpu_s", "prepare_cpu_s", "cpu_s", "wall_s", "peak_mb")
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        sel = {v: [r for r in rows if r["case"] == case and r["variant"] == v] for v in VARIANTS}
        med = {f"{v}_{k}": statistics.median(r[k] for r in sel[v]) for v in sel for k in keys}
        checks = {v: {json.dumps(r["check"]) for r in sel[v]} for v in sel}
        summary.append({"case": case, "dtype": sel["kept"][0]["dtype"], **med,
                        "identical": checks["float32"] == checks["kept"] and len(checks["kept"]) == 1})
    (args.out / "read_cost.json").write_text(json.dumps({"threads": args.threads, "rows": rows, "summary": summary},
                                                        indent=1))
    lines = ["# read + prepare_pair (2 mm): int16 read as float32 vs kept as read", "",
             f"{args.threads} thread(s), median of {args.repeats} alternating runs, each in a fresh process; "
             "CPU s (read / prepare / both), wall s (both), peak MB (VmHWM).", "",
             "| case | kept dtype | float32: read, prepare, both CPU s | kept: read, prepare, both CPU s | "
             "wall s float32 → kept | peak MB float32 → kept | identical |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        f = lambda v: " / ".join(f"{s[f'{v}_{k}']:.2f}" for k in ("read_cpu_s", "prepare_cpu_s", "cpu_s"))
        lines.append(f"| {s['case']} | {s['dtype']} | {f('float32')} | {f('kept')} | {s['float32_wall_s']:.2f} → "
                     f"{s['kept_wall_s']:.2f} | {s['float32_peak_mb']:.0f} → {s['kept_peak_mb']:.0f} | "
                     f"{'yes' if s['identical'] else '**no**'} |")
    (args.out / "read_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["identical"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
