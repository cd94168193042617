#!/usr/bin/env python3
"""Fixed costs of a run, baseline revision against this checkout: CPU seconds, one thread, alternating (ABAB).

    python benchmarks/fixed_costs.py [--baseline 1e44abc] [--repeats 3] [--cases demo ct_2mm ct_0.75mm]
        [--large-fov-cases benchmarks/results-large-fov/cases] [--out benchmarks/results-fixed-costs]

Parts, each in a fresh process per variant and repeat (the engine of that variant first on ``sys.path``), one
thread everywhere (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``/``OMP_NUM_THREADS`` = 1, ``torch.set_num_threads(1)``):

- ``prepare``: ``registration.preprocess.prepare`` of the case's two images at 2 mm (reading excluded); the
  working images of both variants are compared bit for bit (sha1 of the arrays): against a baseline before d01a8f1
  (the anti-aliasing as one map per axis, SimpleITK's values up to float32 rounding) ct_0.75mm's differ by design
  (``preprocess_cost.py`` measures by how much) and the exit status is then 1;
- ``figure``: ``evaluation.figures.draw_report`` with the import of its module (fixed image, moving image resampled
  as it lies, the fixed image as "after", a Jacobian of ones with a fold; on the 2 mm working grid for the 0.75 mm
  case, as ``run.py`` draws it);
- ``jacobian``: ``evaluation.metrics.jacobian_determinant`` of a smooth field on the fixed 2 mm working grid (the
  values of both variants compared);
- ``process`` (``demo`` only): the whole ``deepregistration register`` process of ``make demo`` (labels, landmarks,
  report.png) from spawn to exit, CPU of the child (``wait4``): the baseline through ``sys.exit(main())``, the
  checkout through ``console_main()`` when it has one (the console script's entry).

Cases: ``demo`` (the bundled pair); ``ct_2mm`` and ``ct_0.75mm`` from ``large_fov.py``'s case folder (built by a
run of ``benchmarks/large_fov.py``; skipped when absent). Runtime: about 4 min with the three cases and 3 repeats
on one core. Writes ``fixed_costs.json`` and ``fixed_costs.md`` into ``--out``; prints one JSON line per run.
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

PARTS = ("prepare", "figure", "jacobian")

# One part in a child process: prints {"cpu_s": ..., "check": ...} as its last line.
CHILD = r'''
import hashlib, json, sys, time
lib, part, fixed, moving = sys.argv[1:5]
sys.path.insert(0, lib)
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(1)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import read_image
f, m = read_image(fixed, "fixed"), read_image(moving, "moving")
check = None
if part == "prepare":
    from DeepRegistrationLib.registration.preprocess import prepare
    t = time.process_time()
    ws = [prepare(im, 2.0) for im in (f, m)]
    cpu = time.process_time() - t
    check = [hashlib.sha1(w.array.tobytes()).hexdigest() for w in ws]
else:
    grid = f.grid.with_spacing(2.0) if min(f.grid.spacing) < 1.5 else f.grid
    def on(im):
        ref = sitk.Image(grid.size, sitk.sitkFloat32); grid.apply_to_sitk(ref)
        src = sitk.GetImageFromArray(np.ascontiguousarray(im.array, dtype=np.float32)); im.grid.apply_to_sitk(src)
        return Image(sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0)), grid,
                     im.name)
    fixed_g, before = on(f), on(m)
    if part == "figure":
        jac = np.ones(grid.shape, np.float32)
        c = [n // 2 for n in grid.shape]
        jac[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = -0.5
        t = time.process_time()
        from DeepRegistrationLib.evaluation.figures import draw_report
        draw_report(fixed_g, before, fixed_g, Image(jac, grid, "jacobian"), sys.argv[5] + "/report.png",
                    ["NCC 0.800 -> 0.990", "folding 0.0100 %", "quality: ok"])
        cpu = time.process_time() - t
    else:
        from DeepRegistrationLib.evaluation.metrics import jacobian_determinant
        rng = np.random.default_rng(0)
        coarse = torch.as_tensor(rng.normal(size=(1, 3, 6, 6, 6)) * 3.0)
        u = torch.nn.functional.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)[0]
        u = u.numpy().astype(np.float32)
        a = np.eye(4); a[:3, :3] *= 1.05
        t = time.process_time()
        det = jacobian_determinant(u, grid, a)
        cpu = time.process_time() - t
        check = hashlib.sha1(det.tobytes()).hexdigest()
print(json.dumps({"cpu_s": cpu, "check": check}))
'''


def _baseline_tree(rev: str, dest: Path) -> Path:
    """The engine package of ``rev`` extracted under ``dest``; returns the folder to put on ``sys.path``."""
    return revisions.baseline_archive(rev, dest, "DeepRegistration/DeepRegistrationLib") / "DeepRegistration"


def _case_files(name: str, large_fov: Path) -> tuple[Path, Path] | None:
    if name == "demo":
        return SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz"
    folder = large_fov / name
    files = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    return files if all(p.is_file() for p in files) else None


def _part(lib: Path, part: str, files, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(lib), part, str(files[0]), str(files[1]), str(scratch)],
                          capture_output=True, text=True, env=rb.thread_env(1), timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{part} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _process(lib: Path, scratch: Path) -> float:
    """CPU s (user + system) of a whole ``register`` process of ``make demo``, spawn to exit."""
    out = scratch / "demo-out"
    entry = ("from DeepRegistrationLib.apps.cli import console_main; console_main()"
             if "def console_main" in (lib / "DeepRegistrationLib" / "apps" / "cli.py").read_text() else
             "from DeepRegistrationLib.apps.cli import main; sys.exit(main())")
    code = f"import sys; sys.path.insert(0, {str(lib)!r}); sys.argv = ['deepregistration', *sys.argv[1:]]; {entry}"
    s = SAMPLE
    args = ["register", s / "fixed.nii.gz", s / "moving.nii.gz", "-o", out, "--overwrite", "--threads", "1", "-q",
            "--fixed-labels", s / "fixed_labels.nii.gz", "--moving-labels", s / "moving_labels.nii.gz",
            "--fixed-landmarks", s / "fixed_landmarks.csv", "--moving-landmarks", s / "moving_landmarks.csv"]
    # the log in ``scratch``: the child runs there (its working folder), as before
    res = rb.run_measured([sys.executable, "-c", code, *map(str, args)], scratch / "register.log", rb.thread_env(1),
                          timeout_s=1800)
    if res.returncode != 0:
        raise RuntimeError(f"register failed: {res.log[-2000:]}")
    return res.cpu_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="1e44abc", help="revision to compare with (default: %(default)s, the engine "
                   "before the fixed-cost work)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=["demo", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-fixed-costs")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        libs = {"baseline": _baseline_tree(args.baseline, tmp / "base"), "current": REPO / "DeepRegistration"}
        for case in args.cases:
            files = _case_files(case, args.large_fov_cases)
            if files is None:
                print(f"skipping {case}: no case files under {args.large_fov_cases} (run benchmarks/large_fov.py)")
                continue
            parts = PARTS + (("process",) if case == "demo" else ())
            for part in parts:
                for rep in range(args.repeats):
                    for variant, lib in libs.items():  # alternating
                        scratch = Path(tempfile.mkdtemp(dir=tmp))
                        if part == "process":
                            res = {"cpu_s": _process(lib, scratch), "check": None}
                        else:
                            res = _part(lib, part, files, scratch)
                        row = {"case": case, "part": part, "variant": variant, "repeat": rep, **res}
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    summary = []
    for case in dict.fromkeys(r["case"] for r in rows):
        for part in dict.fromkeys(r["part"] for r in rows if r["case"] == case):
            sel = {v: [r for r in rows if r["case"] == case and r["part"] == part and r["variant"] == v]
                   for v in ("baseline", "current")}
            med = {v: statistics.median(r["cpu_s"] for r in sel[v]) for v in sel}
            checks = {v: {json.dumps(r["check"]) for r in sel[v]} for v in sel}
            same = None if part in ("figure", "process") else checks["baseline"] == checks["current"]
            summary.append({"case": case, "part": part, "baseline_cpu_s": med["baseline"],
                            "current_cpu_s": med["current"], "identical": same})
    (args.out / "fixed_costs.json").write_text(json.dumps({"baseline": args.baseline, "rows": rows,
                                                            "summary": summary}, indent=1))
    lines = [f"# Fixed costs: {args.baseline} vs this checkout", "",
             f"One thread, CPU s (user + system), median of {args.repeats} alternating runs, each in a fresh process.",
             "", "| case | part | baseline | current | ratio | identical output |", "|---|---|---|---|---|---|"]
    for s in summary:
        ident = "n/a" if s["identical"] is None else ("yes" if s["identical"] else "**no**")
        lines.append(f"| {s['case']} | {s['part']} | {s['baseline_cpu_s']:.3f} | {s['current_cpu_s']:.3f} | "
                     f"{s['current_cpu_s'] / max(s['baseline_cpu_s'], 1e-9):.2f} | {ident} |")
    (args.out / "fixed_costs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(s["identical"] in (None, True) for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
