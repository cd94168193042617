#!/usr/bin/env python3
"""Output cost benchmark: CPU seconds of writing and evaluating a registration's outputs (``run._write_outputs``,
``run._evaluate``, ``run._write_report`` with ``report.png``), one thread, for the engine at a baseline revision
and the engine of this checkout, on the same registration result.

    python benchmarks/output_cost.py [--baseline REV] [--cases demo syn2 ct_2mm ct_0.75mm] [--repeats 2]
        [--large-fov-cases DIR] [--out benchmarks/results-output-cost]

Each case is registered once (this checkout, one thread) and the inputs and the ``RegistrationResult`` are pickled;
then every variant and repeat loads that pickle in a fresh process and writes the outputs into a temporary folder,
alternating baseline / current (ABAB). So both variants write the same result; the baseline must know the
result's classes (any revision since ``RegistrationResult.working_images``). Kept per run: CPU seconds (user +
system, ``time.process_time``) of the three functions, the peak resident memory, the output files' sizes, the
inverse's report (iterations, consistency error) and the quality signals (to check that results agree).

Cases:
- ``demo``: the bundled sample pair with its labels (as ``make demo``);
- ``syn2``: the synthetic Colin27 pair at 2 mm, seed 0 (``synthetic_pairs.py``, as ``regression.py``);
- ``ct_2mm`` / ``ct_0.75mm``: the trunk CT pairs of ``large_fov.py`` (4.6 M / 86.5 M fixed voxels), read from
  ``--large-fov-cases`` (``large_fov.py --out DIR`` writes them into ``DIR/cases``; skipped when absent).

Runtime on one loaded core: the registrations ~2.5 min (ct_2mm and ct_0.75mm ~1 min each), then per repeat and
variant ~2 s (demo, syn2), ~10 s (ct_2mm), ~30 s (ct_0.75mm, 3 GB peak). Writes ``output_cost.json`` and
``output_cost.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SAMPLE = REPO / "DeepRegistration" / "Resources" / "SampleData"
PARTS = ("write", "evaluate", "report", "total")
sys.path.insert(0, str(HERE))
import revisions  # noqa: E402


def _case_paths(case: str, args) -> tuple[str, str, str | None, str | None] | None:
    if case == "demo":
        return (str(SAMPLE / "fixed.nii.gz"), str(SAMPLE / "moving.nii.gz"), str(SAMPLE / "fixed_labels.nii.gz"),
                str(SAMPLE / "moving_labels.nii.gz"))
    if case == "syn2":
        sys.path.insert(0, str(HERE))
        import synthetic_pairs as sp

        templates = sp.find_templates(None, download_to=REPO / ".cache" / "mricron-data")
        pair = sp.make_pair(templates, 2.0, 0, args.out / "pairs" / "syn2")
        return str(pair.fixed), str(pair.moving), None, None
    d = args.large_fov_cases / case
    if not (d / "fixed.nii.gz").exists():
        print(f"{case}: no {d}/fixed.nii.gz (run benchmarks/large_fov.py first); skipped", file=sys.stderr)
        return None
    return str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"), None, None


def _register(case: str, args) -> Path | None:
    """Registers ``case`` once with this checkout (one thread) and pickles what writing the outputs needs."""
    paths = _case_paths(case, args)
    if paths is None:
        return None
    pkl = args.out / f"{case}.pkl"
    if not pkl.exists():
        subprocess.run([sys.executable, __file__, "--_register", str(pkl), *[p or "" for p in paths]], check=True,
                       env=_env(REPO))
    return pkl


def _env(tree: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(tree / "DeepRegistration")
    return env


def _register_child(pkl: str, fixed: str, moving: str, fixed_labels: str, moving_labels: str) -> None:
    import torch

    torch.set_num_threads(1)
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.registration import run as R
    from DeepRegistrationLib.registration.pipeline import register

    cfg = RegistrationConfig(threads=1).validate()
    inputs = R._read_inputs(fixed, moving, cfg, None, None, fixed_labels or None, moving_labels or None, None,
                            None, None, None, None)
    result = register(inputs.fixed, inputs.moving, cfg)
    with open(pkl, "wb") as f:
        pickle.dump((fixed, moving, cfg, inputs, result), f, protocol=4)


def _measure_child(pkl: str) -> None:
    """Writes the outputs of the pickled result into a temporary folder; prints one ``ROW {json}`` line."""
    import resource
    import shutil
    import time

    import torch

    torch.set_num_threads(1)
    from DeepRegistrationLib.core.progress import Progress
    from DeepRegistrationLib.registration import run as R

    with open(pkl, "rb") as f:
        fixed, moving, cfg, inputs, result = pickle.load(f)
    tmp = Path(tempfile.mkdtemp(prefix="output-cost-"))
    try:
        prog = Progress(None)
        c0 = time.process_time()
        outputs = R._write_outputs(tmp, inputs, result, prog)
        c1 = time.process_time()
        evaluation = R._evaluate(tmp, inputs, result, cfg, outputs, False, False, prog)
        c2 = time.process_time()
        # a constant write time: report.png prints the timings' total, so its pixel hash compares content
        # (the CPU seconds measured here are taken apart from it)
        timings = dict(read=inputs.seconds, **result.timings, write_and_evaluate=0.0)
        report = R._write_report(tmp, inputs, result, fixed, moving, outputs, evaluation, timings, True, prog)
        c3 = time.process_time()
        sizes = {p.name: round(p.stat().st_size / 1e6, 2) for p in sorted(tmp.iterdir()) if p.is_file()}
        hashes = _content_hashes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("ROW " + json.dumps({"cpu_s": dict(zip(PARTS, (c1 - c0, c2 - c1, c3 - c2, c3 - c0))),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "sizes_mb": sizes,
                      "inverse": report.get("inverse"), "quality_signals": report["quality"]["signals"],
                      "hashes": hashes}))


def _content_hashes(folder: Path) -> dict:
    """SHA-1 (first 16 hex digits) of what the outputs hold, not of the files' bytes (HDF5 and gzip headers
    carry dates): the voxel data and geometry of the NIfTI files, the parameters of the transforms, the pixels of
    ``report.png``."""
    import hashlib

    import numpy as np
    import SimpleITK as sitk
    from PIL import Image as PILImage

    digest = lambda *parts: hashlib.sha1(b"".join(np.ascontiguousarray(p).tobytes() for p in parts)).hexdigest()[:16]
    out = {}
    for p in sorted(folder.glob("*.nii.gz")):
        im = sitk.ReadImage(str(p))
        out[p.name] = digest(sitk.GetArrayViewFromImage(im), np.array(im.GetSpacing() + im.GetOrigin()
                                                                       + im.GetDirection()))
    for p in sorted(folder.glob("*.h5")):
        t = sitk.ReadTransform(str(p))
        parts = [t]
        if t.GetName() == "CompositeTransform":
            t = sitk.CompositeTransform(t)
            parts = [t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())]
        out[p.name] = digest(*[np.array(x.GetParameters() + x.GetFixedParameters()) for x in parts])
    if (folder / "report.png").exists():
        out["report.png"] = digest(np.asarray(PILImage.open(folder / "report.png")))
    return out


def _summary(rows: list[dict]) -> list[str]:
    lines = ["| case | variant | runs | write | evaluate | report (json + png) | total (min) | peak MB | "
             "inverse iterations | consistency mean / p95 mm | outputs as the baseline's |", "|---" * 11 + "|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for variant in ("baseline", "current"):
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and "cpu_s" in r]
            if not rs:
                continue
            best = min(rs, key=lambda r: r["cpu_s"]["total"])
            inv = best.get("inverse") or {}
            ce = inv.get("consistency_mm", {})
            cons = f"{ce['mean_mm']:.5f} / {ce['p95_mm']:.5f}" if ce else "-"
            lines.append(f"| {case} | {variant} | {len(rs)} | {best['cpu_s']['write']:.2f} | "
                         f"{best['cpu_s']['evaluate']:.2f} | {best['cpu_s']['report']:.2f} | "
                         f"{best['cpu_s']['total']:.2f} | {best['peak_mb']} | "
                         f"{inv.get('iterations', '-')} | {cons} | {_same(rows, case, best)} |")
    return lines


def _same(rows: list[dict], case: str, row: dict) -> str:
    """Whether every run of ``case`` wrote the same content (:func:`_content_hashes`) as the baseline's first run."""
    base = next((r.get("hashes") for r in rows if r["case"] == case and r["variant"] == "baseline" and "cpu_s" in r),
                None)
    runs = [r.get("hashes") for r in rows if r["case"] == case and r["variant"] == row["variant"] and "cpu_s" in r]
    if not base or not all(runs):
        return "-"
    differ = sorted({k for h in runs for k in base if h.get(k) != base[k]})
    return "identical" if not differ else "differ: " + ", ".join(differ)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_register":
        _register_child(*argv[1:6])
        return 0
    if argv and argv[0] == "--_measure":
        _measure_child(argv[1])
        return 0
    import large_fov  # here, not at the top: the measuring children need none of it

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="cb5da47^", metavar="REV",
                   help="baseline revision (default: the outputs before the cheaper inversion and warp)")
    p.add_argument("--cases", nargs="+", default=["demo", "syn2", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-output-cost")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rev = revisions.resolve(args.baseline)
    pickles = {c: pk for c in args.cases if (pk := _register(c, args)) is not None}
    with tempfile.TemporaryDirectory() as tmp:
        # the baseline's sources only (no worktree: nothing of this checkout's git state changes)
        trees = {"baseline": revisions.baseline_archive(rev, Path(tmp) / "baseline"), "current": REPO}
        rows = revisions.run_rows(trees, list(pickles), args.repeats,
                                  lambda case, rep, _variant: [__file__, "--_measure", str(pickles[case])])
    env = {"baseline": rev, "current": revisions.resolve("HEAD"),
           "threads": 1, "cpu": os.uname().machine}
    md = [f"# Output cost (1 thread, CPU s, least of {args.repeats} runs per variant)", "",
          f"baseline {rev[:10]}, current {env['current'][:10]}", "", *_summary(rows)]
    revisions.write_results(args.out, "output_cost", env, rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
