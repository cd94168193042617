#!/usr/bin/env python3
"""Concurrent I/O benchmark: wall and CPU seconds and peak memory of ``run_registration``'s reading and output
stages (read, write and evaluate, ``report.png``) with the inputs read in parallel and the outputs written on a
background thread (``run.CONCURRENT_IO``), against the same stages at a baseline revision and in this checkout
with ``CONCURRENT_IO = False``, all on the same registration result and with the same number of threads.

    python benchmarks/concurrent_io.py [--baseline REV] [--cases demo ct_2mm ct_0.75mm] [--repeats 2]
        [--threads 2] [--large-fov-cases DIR] [--out benchmarks/results-concurrent-io]

Each case is registered once (this checkout) and the ``RegistrationResult`` is pickled; then every variant and
repeat runs in a fresh process (alternating the variants' order between repeats: ABC, CBA, ...): it calls
``run_registration`` on the case's files with the registration itself answered by the pickled result, so what
is measured is everything else (reading and checking the inputs, the transforms, warped image, inverse,
Jacobian, the evaluation, ``report.json`` and ``report.png``). Kept per run: wall seconds of the call, CPU
seconds (user + system of all threads, ``time.process_time``), the peak resident memory during the call (the
high-water mark reset before it, ``/proc/self/clear_refs``), the report's ``read`` and ``write_and_evaluate``
timings, and a hash of every output (transforms by their parameters) to show that the variants write the same.

Cases: ``demo`` (the bundled pair with its labels), ``ct_2mm`` / ``ct_0.75mm`` (the trunk CT pairs of
``large_fov.py``, 4.6 M / 86.5 M fixed voxels, read from ``--large-fov-cases``; skipped when absent).
Runtime: the registrations ~1-2 min each on two idle cores (more on a loaded machine), then per run ~2 s (demo),
~6 s (ct_2mm), ~25 s (ct_0.75mm, ~2.5 GB peak). Writes ``concurrent_io.json`` and ``concurrent_io.md``.
"""
from __future__ import annotations

import argparse
import hashlib
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
VARIANTS = ("baseline", "serial", "concurrent")
sys.path.insert(0, str(HERE))
import revisions  # noqa: E402


def _case_paths(case: str, cases_dir: Path) -> dict | None:
    if case == "demo":
        return {"fixed_path": str(SAMPLE / "fixed.nii.gz"), "moving_path": str(SAMPLE / "moving.nii.gz"),
                "fixed_labels": str(SAMPLE / "fixed_labels.nii.gz"),
                "moving_labels": str(SAMPLE / "moving_labels.nii.gz")}
    d = cases_dir / case
    if not (d / "fixed.nii.gz").exists():
        print(f"{case}: no {d}/fixed.nii.gz (run benchmarks/large_fov.py first); skipped", file=sys.stderr)
        return None
    return {"fixed_path": str(d / "fixed.nii.gz"), "moving_path": str(d / "moving.nii.gz")}


def _env(tree: Path, threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=f"{tree / 'DeepRegistration'}{os.pathsep}{HERE}",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _register_child(pkl: str, paths: str, threads: str) -> None:
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.registration.pipeline import register

    p = json.loads(paths)
    cfg = RegistrationConfig(threads=int(threads))
    result = register(read_image(p["fixed_path"], "fixed image"), read_image(p["moving_path"], "moving image"), cfg)
    with open(pkl, "wb") as f:
        pickle.dump((cfg, result), f, protocol=4)


def _digest(out: Path) -> str:
    """One hash of every output file: bytes (of a ``.gz`` file, the decompressed bytes: the same NIfTI file may be
    compressed differently), except the transforms (their parameters; HDF5 files carry creation metadata),
    report.json (without its id, timings and paths) and report.png (its text shows the time)."""
    import gzip

    import numpy as np
    import SimpleITK as sitk

    h = hashlib.sha256()
    for p in sorted(q for q in out.rglob("*") if q.is_file()):
        h.update(p.relative_to(out).as_posix().encode())
        if p.suffix == ".h5":
            tx = sitk.CompositeTransform(sitk.ReadTransform(str(p)))
            for i in range(tx.GetNumberOfTransforms()):
                h.update(np.asarray(tx.GetNthTransform(i).GetParameters()).tobytes())
                h.update(np.asarray(tx.GetNthTransform(i).GetFixedParameters()).tobytes())
        elif p.name == "report.json":
            r = json.loads(p.read_text())
            for key in ("result_id", "timings_s", "inputs"):
                r.pop(key, None)
            r.get("initialization", {}).pop("seconds", None)
            h.update(json.dumps(r, sort_keys=True).encode())
        elif p.suffix == ".gz":
            with gzip.open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        elif p.suffix != ".png":
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure_child(pkl: str, paths: str, variant: str) -> None:
    """``run_registration`` answered by the pickled result; prints one ``ROW {json}`` line."""
    import shutil
    import time

    from DeepRegistrationLib.registration import run as R

    with open(pkl, "rb") as f:
        cfg, result = pickle.load(f)
    if variant == "serial":
        R.CONCURRENT_IO = False
    R.register = lambda *args, **kwargs: result
    parent = Path(tempfile.mkdtemp(prefix="concurrent-io-"))
    try:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass
        c0, w0 = time.process_time(), time.perf_counter()
        summary = R.run_registration(config=cfg, out_dir=parent / "out", **json.loads(paths))
        wall, cpu, peak = time.perf_counter() - w0, time.process_time() - c0, _peak_mb()
        digest = _digest(parent / "out")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    t = summary.report["timings_s"]
    print("ROW " + json.dumps({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "peak_mb": round(peak),
                               "read_s": t["read"], "write_and_evaluate_s": t["write_and_evaluate"],
                               "outputs": digest}))


def _summary(rows: list[dict]) -> list[str]:
    lines = ["| case | variant | runs | wall s (min / median) | CPU s (min) | read s (min) | write+evaluate s (min) "
             "| peak MB (max) | outputs |", "|---" * 9 + "|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for variant in VARIANTS:
            rs = [r for r in rows if r["case"] == case and r["variant"] == variant and r["ok"]]
            if not rs:
                continue
            walls = sorted(r["wall_s"] for r in rs)
            lines.append(f"| {case} | {variant} | {len(rs)} | {walls[0]:.2f} / {walls[len(walls) // 2]:.2f} | "
                         f"{min(r['cpu_s'] for r in rs):.2f} | {min(r['read_s'] for r in rs):.2f} | "
                         f"{min(r['write_and_evaluate_s'] for r in rs):.2f} | {max(r['peak_mb'] for r in rs)} | "
                         f"{', '.join(sorted(set(r['outputs'] for r in rs)))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_register":
        _register_child(*argv[1:4])
        return 0
    if argv and argv[0] == "--_measure":
        _measure_child(*argv[1:4])
        return 0
    import large_fov  # here, not at the top: the measuring children need none of it

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="fd3f28b^", metavar="REV",
                   help="baseline revision (default: before the concurrent reads and writes)")
    p.add_argument("--cases", nargs="+", default=["demo", "ct_2mm", "ct_0.75mm"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--large-fov-cases", type=Path, default=large_fov.CASES)
    p.add_argument("--out", type=Path, default=HERE / "results-concurrent-io")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rev = revisions.resolve(args.baseline)
    cases = {c: paths for c in args.cases if (paths := _case_paths(c, args.large_fov_cases)) is not None}
    for case, paths in cases.items():
        pkl = args.out / f"{case}.pkl"
        if not pkl.exists():
            subprocess.run([sys.executable, __file__, "--_register", str(pkl), json.dumps(paths), str(args.threads)],
                           check=True, env=_env(REPO, args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"baseline": revisions.baseline_archive(rev, Path(tmp) / "baseline"), "serial": REPO,
                 "concurrent": REPO}
        assert list(trees) == list(VARIANTS)
        rows = revisions.run_rows(trees, list(cases), args.repeats, lambda case, rep, variant: [
            __file__, "--_measure", str(args.out / f"{case}.pkl"), json.dumps(cases[case]), variant],
            threads=args.threads)
    env = {"baseline": rev, "current": revisions.resolve("HEAD"),
           "threads": args.threads, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    md = [f"# Concurrent I/O ({args.threads} threads; reading + writing/evaluating + report of one registration "
          f"result; {args.repeats} runs per variant, alternating)", "",
          f"baseline {rev[:10]}, current {env['current'][:10]} (serial: CONCURRENT_IO = False); load average at the "
          f"end {env['load_avg'][0]:.1f} on {env['cpus']} CPUs", "", *_summary(rows)]
    revisions.write_results(args.out, "concurrent_io", env, rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
