"""Registration wall time in the Slicer glue with and without a worker started ahead.

    .venv/bin/python benchmarks/warm_worker.py [--runs 3] [--preset Affine] [--threads 2] [--launcher PATH]

Runs the bundled sample pair through ``DeepRegistrationSlicerLib.run.RegistrationJob`` (real MRML from PyPI
``slicer-core``), timing ``start()`` → ``loadResults()`` returned, as the module sees it:
- cold: every registration starts its own worker (Python, torch and engine imports included);
- ready: the worker started ahead (``prepareWorker``, what the module keeps after each registration) is ready
  when the registration starts;
- worker_start_up: how long that worker took to get ready (Python start, torch and engine imports), i.e.
  what a cold registration spends before it works.
``--launcher`` runs the workers through a launcher, e.g. Slicer's ``PythonSlicer``. Prints a table and writes
``benchmarks/WARM_WORKER.json``. Wall-clock: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "DeepRegistration")]

from DeepRegistrationSlicerLib import nodes as N  # noqa: E402
from DeepRegistrationSlicerLib import run as R  # noqa: E402


def read(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    return node


def once(fixed, moving, preset, threads) -> float:
    t0 = time.perf_counter()
    job = R.RegistrationJob(fixed, moving, preset, threads=threads, applyToMoving=False, metricsTable=False).start()
    status = job.wait(timeout=600)
    assert status.state == "done", status.message
    result = job.loadResults()
    seconds = time.perf_counter() - t0
    fixed.GetScene().RemoveNode(result.transformNode)
    return seconds


def wait_ready(timeout=300.0) -> float:
    """Seconds the worker started ahead took to get ready (what a cold registration spends before working)."""
    t0 = time.perf_counter()
    ready = R._readyWorker[0]
    end = time.monotonic() + timeout
    while ("debug", "ready") not in ready.notes:
        assert not ready.finished and time.monotonic() < end, "the worker started ahead did not get ready"
        time.sleep(0.02)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="Affine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--launcher", help="start workers through this program (e.g. PythonSlicer)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "WARM_WORKER.json"))
    args = parser.parse_args()
    if args.launcher:
        R.pythonExecutable = lambda: args.launcher
    sample = ROOT / "DeepRegistration" / "Resources" / "SampleData"
    scene = N.makeScene()
    fixed, moving = read(scene, sample / "fixed.nii.gz"), read(scene, sample / "moving.nii.gz")
    times = {"cold": [], "ready": [], "worker_start_up": []}
    for _ in range(args.runs):  # alternate, so that load changes hit both alike
        R.KEEP_WORKER_READY = False
        times["cold"].append(once(fixed, moving, args.preset, args.threads))
        R.KEEP_WORKER_READY = True
        R.prepareWorker()
        times["worker_start_up"].append(wait_ready())
        times["ready"].append(once(fixed, moving, args.preset, args.threads))
        R.releaseWorker()
    summary = {k: {"median_s": round(statistics.median(v), 2), "runs_s": [round(x, 2) for x in v]}
               for k, v in times.items()}
    summary["saved_s"] = round(summary["cold"]["median_s"] - summary["ready"]["median_s"], 2)
    summary["setup"] = {"preset": args.preset, "threads": args.threads, "runs": args.runs,
                        "launcher": bool(args.launcher), "python": platform.python_version(),
                        "machine": platform.machine(), "system": platform.system()}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'':<16} {'median s':>9}  runs")
    for k in ("cold", "ready", "worker_start_up"):
        print(f"{k:<16} {summary[k]['median_s']:>9.2f}  {summary[k]['runs_s']}")
    print(f"saved per registration: {summary['saved_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
