#!/usr/bin/env python3
"""Apply cost benchmark: ``deepregistration apply`` against SimpleITK ``Resample`` and antspyx ``apply_transforms``
applying the same ``register`` result, side by side in one run.

    python benchmarks/apply_cost.py [--cases demo ct_2mm ct_0.75mm] [--large-fov-cases DIR] [--threads 1]
        [--repeats 2] [--methods deepreg sitk ants] [--out benchmarks/results-apply-cost] [--deepreg-cli PATH]

Each case is registered once (``deepregistration register --warped full --no-png``, default settings, ``--threads``);
then two tasks are run by every method, each run one whole separate process (imports, reading, resampling,
writing a ``.nii.gz``), methods alternating in a rotated order per repeat (ABC, BCA, ...):

- ``image``: the moving image onto the fixed grid with ``transform.h5``, linear (``warped.nii.gz``);
- ``labels_inverse``: the fixed labels onto the moving grid with ``inverse.h5``, nearest neighbour.

Methods (same thread limits: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``/``OMP_NUM_THREADS`` = ``--threads``):
``deepreg`` = ``deepregistration apply INPUT -t RESULT -o OUT [--inverse] --threads N -q`` (the reference is the
result's recorded fixed / moving image, header only); ``sitk`` = ``sitk.ReadTransform`` + ``sitk.Resample`` onto the
reference's header grid in the input's pixel type + ``sitk.WriteImage`` (ITK's gzip); ``ants`` =
``ants.apply_transforms(reference, input, [transform file], interpolator=linear|nearestNeighbor)`` +
``ants.image_write`` (antspyx reads images as float32: its output is float32). Kept per run: wall s, CPU s (user +
system of the process, ``wait4``), peak RSS (``VmHWM``). Agreement, per task: ``deepreg``'s output against
``register``'s ``warped.nii.gz`` (``image``: bytes identical or not) and against each peer's output (largest
absolute difference, fraction of voxels that differ, and for images by more than 1).

Cases: ``demo`` (the bundled pair), ``ct_2mm`` / ``ct_0.75mm`` (the trunk CT pairs of ``large_fov.py``, read from
``--large-fov-cases``; skipped when absent). Runtime with 1 thread on a loaded machine: registrations ~2 min
(0.75 mm ~1.5 min), then per repeat demo ~10 s, ct_2mm ~30 s, ct_0.75mm ~3 min (SimpleITK and ANTs are the slower
there); ~12 min in all with 2 repeats. Writes ``OUT/apply_cost.json`` and ``OUT/apply_cost.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "DeepRegistration" / "Resources" / "SampleData"
sys.path.insert(0, str(HERE))
from run_benchmark import deepreg_command, run_measured, thread_env  # noqa: E402

METHODS = ("deepreg", "sitk", "ants")
TASKS = ("image", "labels_inverse")
LARGE_FOV_CASES = HERE / "results-large-fov" / "cases"

SITK_SCRIPT = """
import sys, SimpleITK as sitk
inp, tx, ref, out, interp = sys.argv[1:6]
image = sitk.ReadImage(inp)
r = sitk.ImageFileReader(); r.SetFileName(ref); r.ReadImageInformation()
grid = sitk.Image(r.GetSize(), sitk.sitkUInt8)
grid.SetOrigin(r.GetOrigin()); grid.SetSpacing(r.GetSpacing()); grid.SetDirection(r.GetDirection())
method = sitk.sitkLinear if interp == "linear" else sitk.sitkNearestNeighbor
sitk.WriteImage(sitk.Resample(image, grid, sitk.ReadTransform(tx), method, 0, image.GetPixelID()), out, True)
"""
ANTS_SCRIPT = """
import sys, ants
inp, tx, ref, out, interp = sys.argv[1:6]
warped = ants.apply_transforms(ants.image_read(ref), ants.image_read(inp), transformlist=[tx],
                               interpolator="linear" if interp == "linear" else "nearestNeighbor")
ants.image_write(warped, out)
"""


def case_files(name: str, large_fov_cases: Path) -> dict | None:
    """fixed, moving, fixed_labels of a case, or None when they are not here."""
    folder = SAMPLE if name == "demo" else large_fov_cases / name
    files = {k: folder / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_labels")}
    return files if all(p.is_file() for p in files.values()) else None


def command(method: str, task: str, files: dict, result: Path, out: Path, args: argparse.Namespace) -> list[str]:
    inverse = task == "labels_inverse"
    inp = files["fixed_labels"] if inverse else files["moving"]
    ref = files["moving"] if inverse else files["fixed"]
    tx = result / ("inverse.h5" if inverse else "transform.h5")
    interp = "nearest" if inverse else "linear"
    if method == "deepreg":
        cmd = deepreg_command(args) + ["apply", str(inp), "-t", str(result), "-o", str(out), "--threads",
                                       str(args.threads), "-q", "--overwrite", "--interpolation", interp]
        return cmd + (["--inverse"] if inverse else [])
    script = SITK_SCRIPT if method == "sitk" else ANTS_SCRIPT
    return [sys.executable, "-c", script, str(inp), str(tx), str(ref), str(out), interp]


def agreement(task: str, ours: Path, theirs: Path) -> dict:
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours))).astype(np.float64)
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(theirs))).astype(np.float64)
    if a.shape != b.shape:
        return {"shape_differs": True}
    d = np.abs(a - b)
    out = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
    out["fraction_differing"] = float(np.mean(d > 0))
    if task == "image":  # an int16 CT: ITK's Resample truncates to the pixel type, apply rounds (as register)
        out["fraction_over_1"] = float(np.mean(d > 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["demo", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--large-fov-cases", type=Path, default=LARGE_FOV_CASES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", type=Path, default=HERE / "results-apply-cost")
    p.add_argument("--deepreg-cli", help="path of the deepregistration executable (default: next to python)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = thread_env(args.threads)
    rows, notes = [], {}
    for case in args.cases:
        files = case_files(case, args.large_fov_cases)
        if files is None:
            print(f"{case}: files not found, skipped", flush=True)
            continue
        run_dir = args.out / "runs" / case
        result = run_dir / "result"
        reg = run_measured(deepreg_command(args) + ["register", str(files["fixed"]), str(files["moving"]), "-o",
                                                    str(result), "--overwrite", "--no-png", "-q", "--warped", "full",
                                                    "--threads", str(args.threads)],
                           run_dir / "register.log", env, 3600)
        if reg.returncode != 0:
            raise SystemExit(f"{case}: register failed:\n{reg.log}")
        notes[case] = {"register_wall_s": round(reg.wall_s, 2), "register_cpu_s": round(reg.cpu_s, 2)}
        print(f"{case}: registered in {reg.wall_s:.1f} s", flush=True)
        for task in TASKS:
            for repeat in range(args.repeats):
                k = repeat % len(args.methods)
                for method in args.methods[k:] + args.methods[:k]:  # rotated order: ABC, BCA, ...
                    out = run_dir / f"{task}_{method}.nii.gz"
                    out.unlink(missing_ok=True)
                    r = run_measured(command(method, task, files, result, out, args),
                                     run_dir / f"{task}_{method}_{repeat}.log", env, 3600)
                    row = {"case": case, "task": task, "method": method, "repeat": repeat, "rc": r.returncode,
                           "wall_s": round(r.wall_s, 2), "cpu_s": round(r.cpu_s, 2),
                           "peak_rss_mb": round(r.peak_rss_mb)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if r.returncode != 0:
                        print(r.log, flush=True)
            ours = run_dir / f"{task}_deepreg.nii.gz"
            agree = {}
            if ours.is_file():
                if task == "image":
                    agree["deepreg_vs_register_warped_bytes_identical"] = (
                        ours.read_bytes() == (result / "warped.nii.gz").read_bytes())
                for method in args.methods:
                    theirs = run_dir / f"{task}_{method}.nii.gz"
                    if method != "deepreg" and theirs.is_file():
                        agree[f"deepreg_vs_{method}"] = agreement(task, ours, theirs)
            notes.setdefault(case, {})[task] = agree
            print(case, task, json.dumps(agree), flush=True)
    summary = {}
    for row in rows:
        if row["rc"] == 0:
            summary.setdefault((row["case"], row["task"], row["method"]), []).append(row)
    doc = {"threads": args.threads, "repeats": args.repeats, "rows": rows, "cases": notes,
           "median": [{"case": c, "task": t, "method": m,
                       **{k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}}
                      for (c, t, m), rs in summary.items()]}
    (args.out / "apply_cost.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# apply cost ({args.threads} thread(s), {args.repeats} repeats, medians; one process per run)", "",
             "| case | task | method | wall s | CPU s | peak MB |", "|---|---|---|---|---|---|"]
    for m in doc["median"]:
        lines.append(f"| {m['case']} | {m['task']} | {m['method']} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    lines += ["", "## agreement", "", "```", json.dumps(notes, indent=2), "```"]
    (args.out / "apply_cost.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'apply_cost.md'}")


if __name__ == "__main__":
    main()
