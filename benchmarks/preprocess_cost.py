#!/usr/bin/env python3
"""Preprocessing of large inputs, a baseline revision against this checkout: ``registration.preprocess.prepare`` of
a case's two images at 2 mm, CPU seconds on one thread, alternating (ABAB), each run in a fresh process.

    python benchmarks/preprocess_cost.py [--baseline 7ebca63] [--repeats 3] [--threads 1]
        [--cases ct_0.75mm brain_1mm demo ct_2mm] [--large-fov-cases benchmarks/results-large-fov/cases]
        [--pair] [--out benchmarks/results-preprocess-cost]

Reading is excluded. The working images (and their grids) of both variants are compared bit for bit (sha1 of the
arrays) and by their largest difference (normalized intensities in [0, 1]; the exit status is 1 above
``MAX_DIFFERENCE``, float32 rounding). With ``--threads N`` the runs use N threads (ITK's default thread count, OpenMP and MKL, so torch's products too) and the wall time is the
figure to read; ``--pair`` has both variants prepare the two images at once (``preprocess.prepare_pair``, two
threads; a baseline without it prepares them one after the other). Cases: ``ct_0.75mm``/``ct_2mm`` from ``large_fov.py``'s case
folder (skipped when absent); ``brain_1mm``: ICBM152 2009a T1 (fixed) and Colin27 ``ch2bet`` (moving), both 1 mm,
from ``.cache`` (as ``real_pair.py`` fetches them; skipped when absent); ``demo``: the bundled pair. Runtime: about 3 min with the four
cases and 3 repeats on one core. Writes ``preprocess_cost.json`` and ``.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "DeepRegistration" / "Resources" / "SampleData"
sys.path.insert(0, str(HERE))
import large_fov  # noqa: E402
import revisions  # noqa: E402
import run_benchmark as rb  # noqa: E402
import numpy as np  # noqa: E402

#: Largest difference of two variants' normalized working images (intensities in [0, 1]) still taken as the same
#: values: float32 rounding (the anti-aliasing as one map per axis against SimpleITK's passes: ~1e-7).
MAX_DIFFERENCE = 1e-5

CHILD = r'''
import hashlib, json, os, sys, time
lib, fixed, moving, pair, keep = sys.argv[1:6]
sys.path.insert(0, lib)
import numpy as np, SimpleITK as sitk
threads = int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1"))
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import preprocess
f, m = read_image(fixed, "fixed"), read_image(moving, "moving")
t, w = time.process_time(), time.perf_counter()
if pair == "1" and hasattr(preprocess, "prepare_pair"):
    ws = preprocess.prepare_pair(f, m, 2.0)
else:
    ws = [preprocess.prepare(im, 2.0) for im in (f, m)]
cpu, wall = time.process_time() - t, time.perf_counter() - w
check = [hashlib.sha1(x.array.tobytes() + repr(x.grid).encode()).hexdigest() for x in ws]
if keep:
    np.save(keep, np.concatenate([x.array.ravel() for x in ws]))
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "check": check}))
'''


def case_files(name: str, large_fov_cases: Path) -> tuple[Path, Path] | None:
    """The (fixed, moving) files of a case, or None when they are not here."""
    if name == "demo":
        files = SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz"
    elif name == "brain_1mm":
        cache = REPO / ".cache"
        files = (cache / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                 cache / "mricron-data" / "usr" / "share" / "mricron" / "templates" / "ch2bet.nii.gz")
    else:
        files = large_fov_cases / name / "fixed.nii.gz", large_fov_cases / name / "moving.nii.gz"
    return files if all(p.is_file() for p in files) else None


def run_one(lib: Path, files, threads: int, pair: bool = False, keep: Path | None = None) -> dict:
    """One fresh process's ``prepare``: CPU and wall s, the working images' sha1 (and the images into ``keep``)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(lib), str(files[0]), str(files[1]), str(int(pair)),
                           str(keep or "")],
                          capture_output=True, text=True, env=rb.thread_env(threads), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="7ebca63", help="revision to compare with (default: %(default)s; "
                   "f6e706e preprocessed over the whole input)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pair", action="store_true", help="both variants prepare the two images at once "
                   "(preprocess.prepare_pair, two threads, where the variant has it)")
    p.add_argument("--cases", nargs="+", default=["ct_0.75mm", "brain_1mm", "demo", "ct_2mm"])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-preprocess-cost")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, diffs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = revisions.baseline_archive(args.baseline, Path(tmp) / "base", "DeepRegistration/DeepRegistrationLib")
        libs = {"baseline": base / "DeepRegistration", "current": REPO / "DeepRegistration"}
        for case in args.cases:
            files = case_files(case, args.large_fov_cases)
            if files is None:
                print(f"skipping {case}: its files are not here (large_fov.py builds the CT cases, real_pair.py "
                      "fetches the brains)")
                continue
            kept = {v: Path(tmp) / f"{case}-{v}.npy" for v in libs}
            for rep in range(args.repeats):
                for variant in revisions.alternating(list(libs), rep):
                    row = {"case": case, "variant": variant, "repeat": rep,
                           **run_one(libs[variant], files, args.threads, args.pair, kept[variant] if rep == 0 else None)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            a, b = (np.load(kept[v]) for v in libs)
            diffs[case] = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("nan")
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        sel = {v: [r for r in rows if r["case"] == case and r["variant"] == v] for v in libs}
        med = {(v, k): statistics.median(r[k] for r in sel[v]) for v in sel for k in ("cpu_s", "wall_s")}
        checks = {v: {json.dumps(r["check"]) for r in sel[v]} for v in sel}
        summary.append({"case": case, **{f"{v}_{k}": med[(v, k)] for v, k in med},
                        "identical": checks["baseline"] == checks["current"] and len(checks["current"]) == 1,
                        "max_abs_difference": diffs[case]})
    (args.out / "preprocess_cost.json").write_text(json.dumps({"baseline": args.baseline, "threads": args.threads,
                                                               "pair": args.pair,
                                                               "rows": rows, "summary": summary}, indent=1))
    lines = [f"# prepare (both images, 2 mm): {args.baseline} vs this checkout", "",
             f"{args.threads} thread(s){', prepare_pair' if args.pair else ''}, median of {args.repeats} alternating runs, each in a fresh process.", "",
             "| case | baseline CPU s | current CPU s | ratio | baseline wall s | current wall s | identical | max abs difference |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['case']} | {s['baseline_cpu_s']:.3f} | {s['current_cpu_s']:.3f} | "
                     f"{s['current_cpu_s'] / max(s['baseline_cpu_s'], 1e-9):.2f} | {s['baseline_wall_s']:.3f} | "
                     f"{s['current_wall_s']:.3f} | {'yes' if s['identical'] else 'no'} | {s['max_abs_difference']:.2e} |")
    (args.out / "preprocess_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["max_abs_difference"] <= MAX_DIFFERENCE for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
