#!/usr/bin/env python3
"""The evaluation around the registration, baseline revision against this checkout: CPU seconds per part, one
thread, alternating (ABBA), each run in a fresh process, on the very same registration state.

    python benchmarks/evaluation_cost.py [--baseline 7ebca63] [--repeats 3] [--cases demo ct_2mm]
        [--large-fov-cases benchmarks/results-large-fov/cases] [--out benchmarks/results-evaluation-cost]
        [--current DeepRegistration]

First this checkout registers each case once (one thread) and keeps what ``pipeline._finish`` receives: the working
images, the affine matrix, the displacement (and velocity), the plan. Then, per repeat and variant, a child process
with that variant's engine first on ``sys.path`` (one thread: ``torch.set_num_threads(1)``, ITK's and OpenMP's
thread counts 1) rebuilds the levels from those working images (``pipeline._prepare_levels`` with ``prepare_pair``
handing them over) and runs what follows the optimization, timing each part with ``time.process_time``:

- ``similarity_before``: ``pipeline._evaluate`` at the identity (in ``_prepare_levels``); ``level_setup``: the rest of
  ``_prepare_levels`` (the pooled levels, no preprocessing);
- ``finish``: ``pipeline._finish``, of it ``similarity_after`` (``_evaluate``), ``jacobian``
  (``metrics.jacobian_determinant``), ``padded_field`` (``_padded_field``) and ``sdlogj``;
- ``run_evaluate``: ``explain.working_pair`` (handed over) and ``quality.signals_from_result`` (of it ``measure``,
  ``explain.measure``), as ``run._evaluate`` calls them;
- ``write_report``: ``run._write_report`` (``report.json`` and ``report.png``, the timings fixed so that the figure's
  text is the same in every run).

In the replay the similarity after always finds fresh LNCC statistics (no optimization ran in the child), so its
per-voxel map is always handed to ``measure``; in a whole run that is so when the finest level was not optimized
(the 2 mm trunk CT), else ``measure`` computes its own (the bundled pair at 2 mm). Each child also prints hashes of what the parts produce (similarities, NCCs, the Jacobian, the exported field, the
quality signals, the report's similarity/deformation/quality entries, the figure's pixels); the table says whether
they are the same for both variants in every run. Cases: ``demo`` (the bundled pair) and ``ct_2mm``/``ct_0.75mm`` from
``large_fov.py``'s case folder (skipped when absent). Runtime: about 3 min with ``demo`` and ``ct_2mm`` and 3 repeats
on one core (most of it the two registrations that make the states). Writes ``evaluation_cost.json`` and
``evaluation_cost.md`` into ``--out``; prints one JSON line per run.
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
sys.path.insert(0, str(HERE))
import large_fov  # noqa: E402
import preprocess_cost  # noqa: E402
import revisions  # noqa: E402
import run_benchmark as rb  # noqa: E402

PARTS = ("similarity_before", "level_setup", "finish", "similarity_after", "jacobian", "padded_field", "sdlogj",
         "run_evaluate", "measure", "write_report")

# The registration state of a case, made once by this checkout: what pipeline._finish receives.
STATE = r'''
import pickle, sys
lib, fixed, moving, out = sys.argv[1:5]
sys.path.insert(0, lib)
import torch
torch.set_num_threads(1)
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import pipeline
state = {}
finish = pipeline._finish
def capture(p, cfg, affine, u, v, init_info, timings, device):
    state.update(fw=p.fw, mw=p.mw, cfg=cfg, affine=affine, u=u, v=v, init_info=init_info, plan=list(p.plan))
    return finish(p, cfg, affine, u, v, init_info, timings, device)
pipeline._finish = capture
pipeline.register(read_image(fixed), read_image(moving), RegistrationConfig(threads=1))
with open(out, "wb") as f:
    pickle.dump(state, f, protocol=4)
'''

# One variant on one state: prints "ROW {json}" with the CPU seconds per part and the hashes of what they produce.
CHILD = r'''
import hashlib, json, pickle, sys, tempfile, time
lib, state_path, fixed_path, moving_path, scratch = sys.argv[1:6]
sys.path.insert(0, lib)
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(1)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
from pathlib import Path
from DeepRegistrationLib.core.progress import Progress
from DeepRegistrationLib.evaluation import explain, metrics, quality
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration import pipeline, run
from DeepRegistrationLib.spatial.resampling import warp_image
with open(state_path, "rb") as f:
    s = pickle.load(f)
fixed, moving = read_image(fixed_path), read_image(moving_path)
cfg = s["cfg"]
cpu = {}
def timed(name, fn):
    def wrapper(*a, **k):
        t = time.process_time()
        out = fn(*a, **k)
        cpu.setdefault(name, []).append(time.process_time() - t)
        return out
    return wrapper
pipeline.prepare_pair = lambda *a, **k: (s["fw"], s["mw"])  # the state's working images
pipeline._evaluate = timed("evaluate", pipeline._evaluate)
pipeline._padded_field = timed("padded_field", pipeline._padded_field)
metrics.jacobian_determinant = timed("jacobian", metrics.jacobian_determinant)
metrics.sdlogj = timed("sdlogj", metrics.sdlogj)
explain.measure = timed("measure", explain.measure)
device = torch.device("cpu")
p = timed("prepare_levels", pipeline._prepare_levels)(fixed, moving, cfg, None, None, None, device)
p.plan.extend(s["plan"])
res = timed("finish", pipeline._finish)(p, cfg, s["affine"], s["u"], s["v"], s["init_info"], {}, device)
def evaluate():
    pair = explain.working_pair(fixed, moving, res.transform, cfg, None, None, prepared=res.working_images)
    return quality.signals_from_result(res, fixed, moving, None, None, pair=pair)
signals = timed("run_evaluate", evaluate)()
# the inputs of the report as run.py has them (not timed)
integer = np.int16 if moving.array.dtype == np.int16 else None
warped = warp_image(moving, fixed.grid, res.transform, "linear", dtype=integer)
outputs = run._Outputs(warped, run.jacobian_image(res, fixed.grid), None, [])
evaluation = run._Evaluation({}, quality.assess(signals), None, None, None, {}, 0.0)
inputs = run._Inputs(fixed, moving, None, None, None, None, None, None, None, None, 0.0)
tmp = Path(tempfile.mkdtemp(dir=scratch))
report = timed("write_report", run._write_report)(tmp, inputs, res, "fixed", "moving", outputs, evaluation,
                                                  {"stage": 1.0}, True, Progress(None))
before, after = cpu.pop("evaluate")
parts = {"similarity_before": before, "level_setup": cpu["prepare_levels"][0] - before, "similarity_after": after}
parts.update({k: sum(v) for k, v in cpu.items() if k != "prepare_levels"})
h = lambda a: hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
from PIL import Image as PILImage
check = {"similarity": [p.sim_before, p.ncc_before, res.similarity_after, res.ncc_after],
         "jacobian": h(res.jacobian), "folding": res.folding_percent, "sdlogj": res.sdlogj,
         "transform": [h(res.transform.affine), None if res.transform.field is None else h(res.transform.field)],
         "velocity": None if res.velocity is None else h(res.velocity), "signals": signals,
         "report": {k: report[k] for k in ("similarity", "deformation", "quality")},
         "report_png": h(np.asarray(PILImage.open(tmp / "report.png")))}
print("ROW " + json.dumps({"cpu_s": parts, "check": check}))
'''


def _baseline_tree(rev: str, dest: Path) -> Path:
    """The engine package of ``rev`` extracted under ``dest``; returns the folder to put on ``sys.path``."""
    return revisions.baseline_archive(rev, dest, "DeepRegistration/DeepRegistrationLib") / "DeepRegistration"


def _child(code: str, args: list, what: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=rb.thread_env(1), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="7ebca63", help="revision to compare with (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=["demo", "ct_2mm"])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-evaluation-cost")
    p.add_argument("--current", type=Path, default=REPO / "DeepRegistration",
                   help="the folder holding the engine to compare (default: this checkout's %(default)s)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        libs = {"baseline": _baseline_tree(args.baseline, tmp / "base"), "current": args.current.absolute()}
        for case in args.cases:
            files = preprocess_cost.case_files(case, args.large_fov_cases)
            if files is None:
                print(f"skipping {case}: no case files under {args.large_fov_cases} (run benchmarks/large_fov.py)")
                continue
            state = tmp / f"{case}.pkl"
            _child(STATE, [libs["current"], *files, state], f"registering {case}")
            for rep in range(args.repeats):
                for variant in revisions.alternating(list(libs), rep):
                    scratch = Path(tempfile.mkdtemp(dir=tmp))
                    out = _child(CHILD, [libs[variant], state, *files, scratch], f"{case} {variant}")
                    res = json.loads([ln for ln in out.splitlines() if ln.startswith("ROW ")][-1][4:])
                    row = {"case": case, "variant": variant, "repeat": rep, **res}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        sel = {v: [r for r in rows if r["case"] == case and r["variant"] == v] for v in libs}
        checks = {v: {json.dumps(r["check"], sort_keys=True) for r in sel[v]} for v in sel}
        same = len(checks["baseline"]) == 1 and checks["baseline"] == checks["current"]
        for part in PARTS:
            med = {v: statistics.median(r["cpu_s"].get(part, 0.0) for r in sel[v]) for v in sel}
            summary.append({"case": case, "part": part, "baseline_cpu_s": med["baseline"],
                            "current_cpu_s": med["current"], "identical": same})
    environment = {"baseline": args.baseline, "repeats": args.repeats, "threads": 1}
    md = [f"# Evaluation around the registration: {args.baseline} vs this checkout", "",
          f"One thread, CPU s (user + system), median of {args.repeats} alternating runs, each in a fresh process, "
          "on the same registration state. `finish` includes similarity_after, jacobian, padded_field and sdlogj; "
          "`run_evaluate` includes measure.", "",
          "| case | part | baseline | current | saved | identical outputs |", "|---|---|---|---|---|---|"]
    for s in summary:
        md.append(f"| {s['case']} | {s['part']} | {s['baseline_cpu_s']:.3f} | {s['current_cpu_s']:.3f} | "
                  f"{s['baseline_cpu_s'] - s['current_cpu_s']:+.3f} | {'yes' if s['identical'] else '**no**'} |")
    revisions.write_results(args.out, "evaluation_cost", {**environment, "summary": summary}, rows, md)
    return 0 if all(s["identical"] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
