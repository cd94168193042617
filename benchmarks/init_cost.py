#!/usr/bin/env python3
"""The initialization search, a baseline revision against this checkout: ``pipeline._initialize`` (the default
``--init search``) of a case's prepared pair, CPU seconds on one thread, alternating (ABBA), each run in a fresh
process.

    python benchmarks/init_cost.py [--baseline 7ebca63] [--repeats 3] [--threads 1]
        [--cases ct_2mm ct_0.75mm demo brain_1mm] [--large-fov-cases benchmarks/results-large-fov/cases]
        [--out benchmarks/results-init-cost]

Reading and preprocessing are excluded (each variant prepares the pair with its own code, untimed). The search's
result (winning start, score, candidates, and the sha1 of the float64 matrix bytes) of both
variants is compared: ``identical`` means the same winner, score and matrix bit for bit. Cases as
``preprocess_cost.py`` (the CT cases from ``large_fov.py``'s case folder, the brains from ``.cache``, each skipped
when absent; ``demo``: the bundled pair). Runtime: about 3 min with the four cases and 3 repeats on one core.
Writes ``init_cost.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import large_fov  # noqa: E402
import preprocess_cost  # noqa: E402
import revisions  # noqa: E402

CHILD = r'''
import hashlib, json, sys, time
fixed, moving, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch, SimpleITK as sitk
torch.set_num_threads(threads)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import pipeline
cfg = RegistrationConfig(threads=threads).validate()
f, m = read_image(fixed, "fixed"), read_image(moving, "moving")
prepared = pipeline._prepare_levels(f, m, cfg, None, None, None, torch.device("cpu"))
t, w = time.process_time(), time.perf_counter()
matrix, info = pipeline._initialize(prepared, cfg, None, None, {})
cpu, wall = time.process_time() - t, time.perf_counter() - w
info.pop("seconds", None)
result = {"start": info.get("start"), "score": info.get("score"), "candidates": info.get("candidates"),
          "matrix_sha1": hashlib.sha1(matrix.astype("float64").tobytes()).hexdigest()}
print("ROW " + json.dumps({"cpu_s": cpu, "wall_s": wall, "result": result}))
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="7ebca63", help="revision to compare with (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", nargs="+", default=["ct_2mm", "ct_0.75mm", "demo", "brain_1mm"])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-init-cost")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for case in args.cases:
        found = preprocess_cost.case_files(case, args.large_fov_cases)
        if found is None:
            print(f"skipping {case}: its files are not here (large_fov.py builds the CT cases, real_pair.py "
                  "fetches the brains)")
        else:
            files[case] = found
    with tempfile.TemporaryDirectory() as tmp:
        base = revisions.baseline_archive(args.baseline, Path(tmp) / "base", "DeepRegistration/DeepRegistrationLib")
        rows = revisions.run_rows({"baseline": base, "current": REPO}, list(files), args.repeats,
                                  lambda case, rep, variant: ["-c", CHILD, str(files[case][0]), str(files[case][1]),
                                                              str(args.threads)], args.threads)
    md = [f"# Initialization search: {args.baseline} vs this checkout", "",
          f"{args.threads} thread(s), CPU s of `pipeline._initialize`, median of {args.repeats} alternating runs, "
          "each in a fresh process.", "",
          "| case | baseline CPU s | current CPU s | ratio | start | score | identical |",
          "|---|---|---|---|---|---|---|"]
    ok = True
    for case in files:
        sel = {v: [r for r in rows if r["case"] == case and r["variant"] == v and r["ok"]]
               for v in ("baseline", "current")}
        if not all(sel.values()):
            md.append(f"| {case} | failed | | | | | |")
            ok = False
            continue
        cpu = {v: statistics.median(r["cpu_s"] for r in sel[v]) for v in sel}
        results = {v: {json.dumps(r["result"], sort_keys=True) for r in sel[v]} for v in sel}
        same = results["baseline"] == results["current"] and len(results["current"]) == 1
        ok = ok and same
        res = sel["current"][0]["result"]
        md.append(f"| {case} | {cpu['baseline']:.3f} | {cpu['current']:.3f} | "
                  f"{cpu['current'] / max(cpu['baseline'], 1e-9):.2f} | {res['start']} | {res['score']} | "
                  f"{'yes' if same else '**no**'} |")
    revisions.write_results(args.out, "init_cost", {"baseline": args.baseline, "threads": args.threads}, rows, md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
