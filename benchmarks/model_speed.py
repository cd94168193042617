#!/usr/bin/env python3
"""How fast is a learned model alone? In-process timings after warm-up, on the CPU and (when present) CUDA.

The registration benchmark (``run_benchmark.py``) times whole processes, imports included. This one answers
the learned-engine targets that are about the model itself, on one pair (default: the 1 mm synthetic Colin27
pair of seed 0, built by :mod:`synthetic_pairs`):

- ``pipeline``: ``pipeline.register(..., predictor=model, predictor_mode="replace")`` on images already in
  memory: preprocessing + affine stage + the model + evaluation (no reading or writing of files);
- ``network``: the model's forward pass + scaling and squaring on the working grid, on inputs already on the
  device (``UNetFieldPredictor.predict``).

Each is run ``--warmup`` times untimed, then ``--repeats`` times timed: on the CPU with ``time.perf_counter``;
on CUDA with ``torch.cuda.Event(enable_timing=True)`` pairs around the call and ``torch.cuda.synchronize()``.
The median and the minimum are reported. Targets (learned-engine issue): model alone on a 1 mm pair on the
CPU < 2 s (``pipeline``); on a GPU < 0.1 s (``network``, CUDA events after warm-up).

Usage::

    python benchmarks/model_speed.py --out benchmarks/model_speed [--model default] [--pair DIR]
        [--devices cpu cuda] [--threads 2] [--repeats 10]

Writes ``OUT/model_speed.json``, ``OUT/model_speed.md`` and ``OUT/model_speed.png``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "DeepRegistration"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from DeepRegistrationLib.learning import registry  # noqa: E402
from DeepRegistrationLib.spatial import warp as W  # noqa: E402
from DeepRegistrationLib.core.config import RegistrationConfig  # noqa: E402
from DeepRegistrationLib.io.images import read_image  # noqa: E402
from DeepRegistrationLib.registration.pipeline import register  # noqa: E402
from DeepRegistrationLib.registration.preprocess import prepare  # noqa: E402
from run_benchmark import cpu_model  # noqa: E402

logger = logging.getLogger("model_speed")
CPU_TARGET_S = 2.0
GPU_TARGET_S = 0.1


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def measure(fixed, moving, loaded, device_name: str, warmup: int, repeats: int) -> dict:
    """Timings of one device: the in-memory pipeline with the model alone, and the network alone."""
    device = torch.device(device_name)
    spacing = loaded.working_spacing_mm or RegistrationConfig().spacing
    cfg = RegistrationConfig(spacing=spacing, device=device_name)
    predictor = loaded.predictor()
    loaded.model.to(device)
    pipeline = _timed(lambda: register(fixed, moving, cfg, predictor=predictor, predictor_mode="replace"),
                      device, warmup, repeats)
    fw, mw = prepare(fixed, spacing), prepare(moving, spacing)
    f = torch.as_tensor(fw.array, dtype=torch.float32, device=device)[None, None]
    m = torch.as_tensor(mw.array, dtype=torch.float32, device=device)[None, None]
    m = W.sample(m, mw.grid, W.grid_points(fw.grid, device))  # the moving image on the fixed working grid
    network = _timed(lambda: loaded.model.predict(f, m, fw.grid), device, warmup, repeats)
    return {"device": device_name,
            "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
            "threads": torch.get_num_threads(), "working_grid_shape_zyx": list(fw.grid.shape),
            "pipeline_s": {"median": statistics.median(pipeline), "min": min(pipeline), "all": pipeline},
            "network_s": {"median": statistics.median(network), "min": min(network), "all": network}}


def _read_pair(args: argparse.Namespace) -> tuple:
    """``(fixed, moving, description)`` of ``--pair``, or of the 1 mm synthetic pair of seed 0 (built in a
    temporary folder, removed afterwards)."""
    if args.pair:
        folder = Path(args.pair)
        return read_image(folder / "fixed.nii.gz", "fixed"), read_image(folder / "moving.nii.gz", "moving"), str(folder)
    import synthetic_pairs as sp

    with tempfile.TemporaryDirectory(prefix="model_speed_pair_") as tmp:
        sp.main(["--spacing", "1", "--seed", "0", "--out", tmp])
        return (read_image(Path(tmp) / "fixed.nii.gz", "fixed"), read_image(Path(tmp) / "moving.nii.gz", "moving"),
                "synthetic Colin27 pair, 1 mm, seed 0 (synthetic_pairs.py)")


def write_report(result: dict, out: Path) -> None:
    """``model_speed.json``, ``.md`` (a table with the targets) and ``.png`` (a bar chart) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_speed.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Learned model alone: speed ({result['model']})", "",
             f"{result['date_utc']}; pair: {result['pair']} (fixed grid {result['fixed_shape_zyx']} at "
             f"{result['fixed_spacing_mm']} mm); model working spacing {result['model_spacing_mm']} mm; "
             f"torch {result['torch']}; {result['warmup']} warm-up + {result['repeats']} timed runs each.", "",
             "| device | hardware | threads | working grid | pipeline median s | pipeline min s | network median s "
             "| network min s |", "|---|---|---|---|---|---|---|---|"]
    for r in result["devices"]:
        lines.append(f"| {r['device']} | {r['hardware']} | {r['threads']} | {r['working_grid_shape_zyx']} | "
                     f"{r['pipeline_s']['median']:.3f} | {r['pipeline_s']['min']:.3f} | "
                     f"{r['network_s']['median']:.4f} | {r['network_s']['min']:.4f} |")
    lines += ["", "| target | status | detail |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | **{t['status']}** | {t['detail']} |")
    lines += ["", "pipeline = preprocessing + affine stage + model + evaluation on images in memory; network = "
              "forward pass + scaling and squaring on the working grid. CUDA timings use CUDA events."]
    (out / "model_speed.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [r["device"] for r in result["devices"]]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["pipeline_s"]["median"] for r in result["devices"]], 0.4, label="pipeline")
    ax.bar([i + 0.2 for i in x], [r["network_s"]["median"] for r in result["devices"]], 0.4, label="network")
    ax.axhline(CPU_TARGET_S, color="gray", ls="--", lw=1, label="CPU target (pipeline)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"model '{result['model']}' alone, 1 mm pair")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "model_speed.png", dpi=120)
    plt.close(fig)


def targets(devices: list[dict]) -> list[dict]:
    """The model-alone targets, measured or not (no GPU: not measured)."""
    rows = []
    cpu = next((r for r in devices if r["device"] == "cpu"), None)
    gpu = next((r for r in devices if r["device"].startswith("cuda")), None)
    if cpu:
        v = cpu["pipeline_s"]["median"]
        rows.append({"target": f"CPU, 1 mm pair, model alone < {CPU_TARGET_S} s", "status":
                     "met" if v < CPU_TARGET_S else "not met", "detail": f"{v:.2f} s ({cpu['threads']} threads)"})
    if gpu:
        v = gpu["network_s"]["median"]
        rows.append({"target": f"GPU, model alone < {GPU_TARGET_S} s (CUDA events)", "status":
                     "met" if v < GPU_TARGET_S else "not met", "detail": f"{v * 1000:.1f} ms on {gpu['hardware']}"})
    else:
        rows.append({"target": f"GPU, model alone < {GPU_TARGET_S} s (CUDA events)", "status": "not measured",
                     "detail": "no CUDA device on this machine"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--pair", help="folder with fixed.nii.gz and moving.nii.gz (default: the 1 mm synthetic pair)")
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("DeepRegistrationLib").setLevel(logging.WARNING)  # one line per timed run otherwise
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--devices cuda: no CUDA device is available to PyTorch")
    fixed, moving, pair = _read_pair(args)
    loaded = registry.load(args.model)
    rows = []
    for d in devices:
        logger.info("timing on %s", d)
        rows.append(measure(fixed, moving, loaded, d, args.warmup, args.repeats))
    result = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "model": loaded.name,
              "model_spacing_mm": loaded.working_spacing_mm, "pair": pair, "torch": torch.__version__,
              "fixed_shape_zyx": list(fixed.grid.shape), "fixed_spacing_mm": list(fixed.grid.spacing),
              "warmup": args.warmup, "repeats": args.repeats, "devices": rows, "targets": targets(rows)}
    write_report(result, args.out)
    for t in result["targets"]:
        logger.info("%s: %s (%s)", t["target"], t["status"], t["detail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
