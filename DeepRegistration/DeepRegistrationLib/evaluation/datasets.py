"""Scoring registration methods on a Learn2Reg-layout dataset's pairs (``deepregistration evaluate --dataset``).

For every pair of a pair list (``registration_val`` by default; ``registration_test``,
``training_paired_images``) and every method — ``none`` (no registration), ``io`` (instance optimization
alone, the engine's settings), ``model`` (a learned model after the affine stage, no optimization) and
``model+io`` (the model's prediction starts the optimization) — the metrics of Learn2Reg are computed in
physical space on the fixed image's grid:

- ``dice``: mean Dice over the fixed labels present (moving labels warped with nearest neighbour);
- ``hd95``: mean over labels of the 95th-percentile symmetric surface distance, mm;
- ``tre``: mean distance between the fixed keypoints mapped into the moving image and the moving keypoints
  matched by ID, mm (``tre_before``: without the transform);
- ``folding_percent`` and ``sdlogj`` of the fixed → moving map (working grid);
- ``seconds``: wall time of the registration call.

The summary gives, per method and metric, mean, std, median, max and the **30th percentile** (Learn2Reg's
robustness figure for Dice: the score 30 % of the pairs do not reach). :func:`write_report` writes
``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` (per-pair Dice and TRE by method).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from ..core.config import RegistrationConfig
from ..core.errors import InputError
from ..core.image import Image
from .metrics import label_scores, summarize, tre_mm
from ..core.progress import Progress, ProgressCallback

logger = logging.getLogger(__name__)

METHODS = ("none", "io", "model", "model+io")
METRICS = ("dice", "hd95", "tre", "tre_before", "folding_percent", "sdlogj", "seconds")


def _image(item: dict, side: str) -> Image:
    return Image(item[side][0].numpy().astype(np.float32), item[f"{side}_grid"], f"{side} image")


def _labels(item: dict, side: str) -> Image | None:
    if f"{side}_label" not in item:
        return None
    return Image(item[f"{side}_label"].numpy().astype(np.int32), item[f"{side}_grid"], f"{side} labels")


def _score(method: str, item: dict, config: RegistrationConfig, model) -> dict:
    from ..registration.pipeline import register
    from ..spatial.resampling import warp_image
    from ..spatial.transforms import SpatialTransform

    fixed, moving = _image(item, "fixed"), _image(item, "moving")
    start = time.perf_counter()
    row: dict = {"method": method}
    if method == "none":
        transform = SpatialTransform.identity()
        row.update(folding_percent=0.0, sdlogj=0.0)
    else:
        kwargs = {}
        if method in ("model", "model+io"):
            kwargs = dict(predictor=model, predictor_mode="replace" if method == "model" else "init")
        result = register(fixed, moving, config, **kwargs)
        transform = result.transform
        row.update(folding_percent=float(result.folding_percent), sdlogj=float(result.sdlogj["sdlogj_l2r"]))
    row["seconds"] = time.perf_counter() - start
    flab, mlab = _labels(item, "fixed"), _labels(item, "moving")
    if flab is not None and mlab is not None:
        scores = label_scores(flab.array, warp_image(mlab, flab.grid, transform, "nearest").array, flab.grid.spacing)
        row["dice"], row["hd95"] = scores["dice_mean"], scores["hd95_mean_mm"]
    if "fixed_keypoints" in item and len(item["fixed_keypoints"]):
        fk, mk = item["fixed_keypoints"].numpy(), item["moving_keypoints"].numpy()
        row["tre"] = float(tre_mm(transform.map_points(fk), mk).mean())
        row["tre_before"] = float(tre_mm(fk, mk).mean())
    return row


def evaluate_dataset(root: str | Path, pairs: str = "registration_val", model=None,
                     config: RegistrationConfig | None = None, methods: tuple[str, ...] | None = None,
                     max_pairs: int | None = None, progress: ProgressCallback | None = None) -> dict:
    """Scores ``methods`` on the pairs of a Learn2Reg-layout dataset (see the module doc).

    Args:
        root: Dataset folder (``<TASK>_dataset.json``, as the DatasetBuilder writes it).
        pairs: Pair list: ``registration_val``, ``registration_test`` or ``training_paired_images``.
        model: A field predictor (``registry.load(...).predictor()``); needed by ``model`` and ``model+io``.
        config: Engine settings (default: the engine's defaults, or the model card's working spacing).
        methods: Subset of :data:`METHODS` (default: ``none``, ``io``, and with a model ``model``, ``model+io``).
        max_pairs: Score only the first N pairs.
        progress: ``callback(fraction, message)``; returning False cancels.

    Returns:
        ``{"dataset", "pairs_list", "methods", "config", "pairs": [{fixed, moving, results: [...]}],
        "summary": {method: {metric: summarize(values)}}}``.

    Raises:
        InputError: no such pair list / no pairs, unknown method, a model method without a model.
        Cancelled: the callback asked to stop.
    """
    from ..learning.l2r_dataset import L2RPairDataset

    try:
        data = L2RPairDataset(root, pairs)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"cannot read the dataset at {root}: {exc}") from None
    if len(data) == 0:
        raise InputError(f"the dataset at {root} has no '{pairs}' pairs; choose another list "
                         "(registration_val, registration_test, training_paired_images)")
    methods = tuple(methods or (METHODS if model is not None else ("none", "io")))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if model is None and any(m.startswith("model") for m in methods):
        raise InputError("methods 'model' and 'model+io' need a model (--model NAME|PATH)")
    config = (config or RegistrationConfig()).validate()
    count = min(len(data), max_pairs) if max_pairs else len(data)
    prog = Progress(progress)
    rows = []
    for n in range(count):
        item = data[n]
        entry = {"fixed": data.pairs[n]["fixed"], "moving": data.pairs[n]["moving"],
                 "gold_standard": item["gold_standard"], "results": []}
        for k, method in enumerate(methods):
            prog((n * len(methods) + k) / (count * len(methods)), f"pair {n + 1}/{count}: {method}")
            entry["results"].append(_score(method, item, config, model))
        rows.append(entry)
        logger.info("pair %d/%d: %s", n + 1, count,
                    ", ".join(f"{r['method']} Dice {r.get('dice', float('nan')):.3f}" for r in entry["results"]))
    prog(1.0, "done")
    summary = {m: {metric: summarize([r[metric] for e in rows for r in e["results"]
                                      if r["method"] == m and metric in r])
                   for metric in METRICS}
               for m in methods}
    return {"dataset": str(Path(root).resolve()), "pairs_list": pairs, "methods": list(methods),
            "config": {"spacing_mm": config.spacing, "iterations": config.iterations, "mode": config.mode,
                       "similarity": config.similarity},
            "pairs": rows, "summary": summary}


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """The evaluation as a Markdown report (summary table, then one row per pair and method)."""
    lines = [f"# Evaluation on `{Path(result['dataset']).name}` ({result['pairs_list']}, "
             f"{len(result['pairs'])} pairs)", "",
             f"Engine settings: {result['config']}. Dice p30 = the 30th percentile of the per-pair mean Dice "
             "(Learn2Reg's robustness figure); TRE before = without registration.", "",
             "| method | Dice mean | Dice p30 | HD95 mm | TRE mm (before) | folding % | SDlogJ | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        s = result["summary"][m]
        lines.append(f"| {m} | {_fmt(s['dice']['mean'])} | {_fmt(s['dice']['p30'])} | {_fmt(s['hd95']['mean'], 2)} | "
                     f"{_fmt(s['tre']['mean'], 2)} ({_fmt(s['tre_before']['mean'], 2)}) | "
                     f"{_fmt(s['folding_percent']['mean'], 4)} | {_fmt(s['sdlogj']['mean'])} | "
                     f"{_fmt(s['seconds']['mean'], 2)} |")
    lines += ["", "## Per pair", "", "| fixed | moving | method | Dice | HD95 mm | TRE mm | folding % | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for e in result["pairs"]:
        for r in e["results"]:
            lines.append(f"| {Path(e['fixed']).name} | {Path(e['moving']).name} | {r['method']} | "
                         f"{_fmt(r.get('dice'))} | {_fmt(r.get('hd95'), 2)} | {_fmt(r.get('tre'), 2)} | "
                         f"{_fmt(r.get('folding_percent'), 4)} | {_fmt(r.get('seconds'), 2)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Per-pair Dice and TRE by method (box plots with the points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("dice", "tre"), ("mean Dice (higher is better)", "TRE mm (lower is better)")):
        values = [[r[metric] for e in result["pairs"] for r in e["results"] if r["method"] == m and metric in r
                   and math.isfinite(r[metric])] for m in result["methods"]]
        if any(values):
            ax.boxplot([v if v else [float("nan")] for v in values], showfliers=False)
            for i, v in enumerate(values, start=1):
                ax.plot(np.full(len(v), i) + np.linspace(-0.08, 0.08, len(v)), v, "o", alpha=0.6, ms=4)
            ax.set_xticks(range(1, len(result["methods"]) + 1), result["methods"])
        else:
            ax.text(0.5, 0.5, f"no {metric.upper()} (pairs without labels/keypoints)", ha="center",
                    transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(result['dataset']).name}: {result['pairs_list']} ({len(result['pairs'])} pairs)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def _strict(value):
    """The result with NaN / infinity (a metric that does not apply) as None: strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


REPORT_FILES = ("evaluation.json", "evaluation.md", "evaluation.png")


def check_report_folder(out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """The report's paths in ``out_dir``; raises InputError when one exists and ``overwrite`` is False
    (call it before a long evaluation so it fails first)."""
    paths = [Path(out_dir) / name for name in REPORT_FILES]
    existing = [p.name for p in paths if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{out_dir} already holds {', '.join(existing)}; choose another folder or pass --overwrite")
    return paths


def write_report(result: dict, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Writes ``evaluation.json`` (strict JSON: metrics that do not apply are null), ``evaluation.md`` and
    ``evaluation.png`` into ``out_dir``.

    Raises:
        InputError: a report already exists there and ``overwrite`` is False (nothing is written).
    """
    import json

    out = Path(out_dir)
    paths = check_report_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tmp = [p.with_name(".tmp-" + p.name) for p in paths]
    tmp[0].write_text(json.dumps(_strict(result), indent=2, allow_nan=False) + "\n")
    tmp[1].write_text(markdown(result))
    plot(result, tmp[2])
    for t, p in zip(tmp, paths):
        t.replace(p)
    return paths


__all__ = ["METHODS", "check_report_folder", "evaluate_dataset", "markdown", "plot", "write_report"]
