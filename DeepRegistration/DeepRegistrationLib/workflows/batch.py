"""Many registrations in one process, split over ``torchrun`` ranks: the machinery of every workflow.

``register-batch PAIRS.csv -o OUT`` reads a CSV (columns ``fixed,moving`` and optionally
``fixed_labels,moving_labels,fixed_landmarks,moving_landmarks,name``; relative paths start from the CSV's
folder), checks every row *before* any work, then registers each pair with
:func:`~DeepRegistrationLib.registration.run.run_registration` into ``OUT/<name>/`` (``name`` column, else
``pair_0001``, ``pair_0002``, ... by data row), exactly the files of a ``register`` OUTDIR. A pair that fails is
recorded (status ``failed`` and its error) and the others go on. ``OUT/summary.json`` and ``OUT/summary.csv``
list every pair's status, metrics, quality verdict (``quality``: ok | suspect | failed, with ``quality_reasons``;
see :mod:`~DeepRegistrationLib.evaluation.quality`) and time; ``summary.json``'s ``quality`` counts the verdicts. Rerunning the same command skips the pairs whose folder is
complete (each pair folder is moved into place only when complete) and retries the failed ones.

Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1) the rows are split round-robin over the ranks
(row ``i`` on rank ``i % WORLD_SIZE``), each rank on its own GPU (``LOCAL_RANK``) or, without CUDA, as a CPU
process; results are gathered over a ``gloo`` process group (the registrations themselves never
communicate) and rank 0 writes the summary. The same runtime (``torch.distributed``, started by
``torchrun``) as :mod:`DeepRegistrationLib.learning.training`; ``OUT`` must be on a file system every node sees.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.config import RegistrationConfig, check_warped
from ..core.errors import Cancelled, DeepRegistrationError, InputError
from ..core.progress import ProgressCallback

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("fixed", "moving")
OPTIONAL_COLUMNS = ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks", "name")
PATH_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")
MARKER = "batch.json"
SUMMARY_FIELDS = ("name", "status", "resumed", "fixed", "moving", "rank", "seconds", "quality", "quality_reasons",
                  "ncc_before", "ncc_after", "folding_percent", "dice_before", "dice_after", "tre_before_mm",
                  "tre_after_mm", "error")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------------ distributed
def distributed() -> tuple[int, int]:
    """``(rank, world_size)``; starts a ``gloo`` process group when launched by torchrun (``WORLD_SIZE`` > 1).

    The workflows exchange only small Python objects (summaries, template sums), so ``gloo`` serves both
    CPU and GPU processes; each rank's registrations run on its own device (:func:`rank_config`).
    """
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_config(config: RegistrationConfig, world: int) -> RegistrationConfig:
    """The settings for this rank: its own GPU (``LOCAL_RANK``) when CUDA is used; with several CPU
    processes on one machine and ``threads`` 0, the cores are shared out (``cpu_count // local ranks``)."""
    import dataclasses

    import torch

    if world <= 1:
        return config
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if config.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return config
    if config.threads == 0:
        return dataclasses.replace(config, threads=max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return config


def barrier(world: int) -> None:
    """Waits for every rank (no-op in one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj, world: int) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in one process)."""
    if world <= 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def map_over_ranks(items: Sequence, fn: Callable[[int, object], object], world: int, rank: int) -> list:
    """``[fn(i, item) for i, item in enumerate(items)]`` with item ``i`` computed on rank ``i % world``;
    every rank receives the full list, in item order."""
    local = {i: fn(i, item) for i, item in enumerate(items) if i % world == rank}
    merged: dict = {}
    for part in all_gather(local, world):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


# ------------------------------------------------------------------------------------------ the CSV
@dataclass
class Pair:
    """One row of PAIRS.csv: absolute paths (None where the column is empty) and its output folder name."""

    row: int
    name: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None

    def inputs(self) -> dict:
        return {k: getattr(self, k) for k in PATH_COLUMNS if getattr(self, k) is not None}


def read_pairs(csv_path: str | os.PathLike) -> list[Pair]:
    """Reads and checks PAIRS.csv; one :class:`InputError` listing every problem (unknown or missing
    columns, missing files, labels/landmarks given for one side only, bad or duplicate names)."""
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"pairs CSV '{path}' does not exist or is not a file. Give a CSV with the columns "
                         "fixed,moving (and optionally " + ",".join(OPTIONAL_COLUMNS) + ").")
    base = path.absolute().parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing_cols or unknown:
        raise InputError(f"pairs CSV '{path}': " + "; ".join(
            ([f"missing column(s) {', '.join(missing_cols)}"] if missing_cols else [])
            + ([f"unknown column(s) {', '.join(unknown)}"] if unknown else []))
            + ". The first line must name the columns: fixed,moving[," + ",".join(OPTIONAL_COLUMNS) + "].")
    rows = [r for r in rows if any(r.values())]  # blank lines
    if not rows:
        raise InputError(f"pairs CSV '{path}' has a header but no pairs. Add one line per pair: fixed,moving.")
    problems: list[str] = []
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    for n, r in enumerate(rows, start=1):
        values: dict = {}
        for col in PATH_COLUMNS:
            v = r.get(col) or None
            if v is not None:
                p = Path(v).expanduser()
                p = p if p.is_absolute() else base / p
                if not p.exists():
                    problems.append(f"row {n}, {col}: '{p}' does not exist")
                v = str(p)
            values[col] = v
        for a in ("fixed", "moving"):
            if values[a] is None:
                problems.append(f"row {n}: the {a} image is empty")
        for kind in ("labels", "landmarks"):
            if (values[f"fixed_{kind}"] is None) != (values[f"moving_{kind}"] is None):
                problems.append(f"row {n}: {kind} need both fixed_{kind} and moving_{kind} (or neither)")
        name = r.get("name") or f"pair_{n:04d}"
        if not _SAFE_NAME.match(name) or name in ("summary.json", "summary.csv", MARKER):
            problems.append(f"row {n}: name '{name}' is not a plain folder name (letters, digits, . _ -)")
        elif name in seen:
            problems.append(f"row {n}: name '{name}' repeats row {seen[name]}")
        seen.setdefault(name, n)
        pairs.append(Pair(row=n, name=name, **values))
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise InputError(f"pairs CSV '{path}' cannot be used:\n  " + "\n  ".join(shown)
                         + "\nFix these rows (relative paths start from the CSV's folder) and run again.")
    return pairs


# ------------------------------------------------------------------------------------------ the run
@dataclass
class BatchSummary:
    """What :func:`run_batch` did: one row per pair (see ``SUMMARY_FIELDS``), in CSV order."""

    out_dir: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "ok"]


def quality_fields(report: dict) -> dict:
    """A report's quality verdict as summary fields: ``{"quality": verdict, "quality_reasons": "a; b"}``
    (None for a report without one)."""
    q = report.get("quality") or {}
    return {"quality": q.get("verdict"), "quality_reasons": "; ".join(q.get("reasons") or [])}


def quality_counts(rows: Sequence[dict]) -> dict:
    """How many rows have each verdict: ``{"ok": n, "suspect": n, "failed": n}`` (rows without one left out)."""
    from ..evaluation.quality import VERDICTS

    return {v: sum(r.get("quality") == v for r in rows) for v in VERDICTS}


def _metrics(report: dict) -> dict:
    s, d, ev = report["similarity"], report["deformation"], report.get("metrics", {})
    out = {**quality_fields(report), "ncc_before": s["ncc_before"], "ncc_after": s["ncc_after"],
           "folding_percent": d["folding_percent"]}
    if "labels" in ev:
        out.update(dice_before=ev["labels"]["before"]["dice_mean"], dice_after=ev["labels"]["after"]["dice_mean"])
    if "landmarks" in ev:
        out.update(tre_before_mm=ev["landmarks"]["before"]["mean"], tre_after_mm=ev["landmarks"]["after"]["mean"])
    return out


def prepare_output(out_dir: str | os.PathLike, settings: dict, rank: int, world: int) -> Path:
    """Creates OUT (or accepts it for a resume: it holds ``batch.json`` with the same ``settings``).

    Raises:
        InputError: OUT exists and is not a batch folder, or was made with other settings.
    """
    out = Path(out_dir).absolute()
    marker = out / MARKER
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output '{out}' is a file. Choose an output folder.")
        if marker.exists():
            before = json.loads(marker.read_text()).get("settings")
            if before != json.loads(json.dumps(settings)):
                raise InputError(f"'{out}' holds a batch run with other settings; resuming would mix results. "
                                 "Use another output folder (or the same settings to resume).")
        elif any(out.iterdir()):
            raise InputError(f"output folder '{out}' exists and is not a batch folder (no {MARKER}). Choose "
                             "a new folder (an existing batch folder is resumed).")
    elif not out.parent.is_dir():
        raise InputError(f"the parent folder of the output, '{out.parent}', does not exist. Create it first.")
    barrier(world)  # every rank has checked before anything is written
    if rank == 0:
        out.mkdir(exist_ok=True)
        if not marker.exists():
            _write_atomic(marker, json.dumps({"settings": settings}, indent=2))
    barrier(world)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(summary: BatchSummary, extra: dict | None = None) -> None:
    """``summary.json`` (rows, totals and the count of each quality verdict) and ``summary.csv`` (one line
    per pair), each written atomically."""
    rows = summary.rows
    totals = {"pairs": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
              "failed": sum(r["status"] == "failed" for r in rows),
              "not_run": sum(r["status"] == "not run" for r in rows),
              "resumed": sum(bool(r.get("resumed")) for r in rows)}
    _write_atomic(summary.out_dir / "summary.json",
                  json.dumps({"totals": totals, "quality": quality_counts(rows), **(extra or {}), "pairs": rows}, indent=2, allow_nan=True))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})
    _write_atomic(summary.out_dir / "summary.csv", buf.getvalue())


def run_batch(pairs: Sequence[Pair], out_dir: str | os.PathLike, config: RegistrationConfig | None = None, *,
              write_png: bool = True, progress: ProgressCallback | None = None, predictor=None,
              predictor_mode: str = "init", register: Callable | None = None, warped: str = "auto") -> BatchSummary:
    """Registers every pair into ``out_dir/<name>/``, resumable, failures recorded; see the module docstring.

    Args:
        pairs: From :func:`read_pairs`.
        out_dir: The batch folder (created; an existing batch folder with the same settings is resumed).
        config: Registration settings, the same for every pair.
        write_png: Draw each pair's ``report.png``.
        progress: ``callback(fraction, message)`` over the whole batch (this rank's share); returning False
            stops the batch after writing the summary of what is done, then raises Cancelled.
        predictor / predictor_mode: A learned field predictor, loaded once for all pairs.
        register: The function that registers one pair (default
            :func:`~DeepRegistrationLib.registration.run.run_registration`), same signature.
        warped: Each pair's ``warped.nii.gz``: ``run_registration``'s ``warped=``
            (:data:`~DeepRegistrationLib.core.config.WARPED_CHOICES`).

    Returns:
        :class:`BatchSummary` (the full, gathered list on every rank).
    """
    from ..registration.run import run_registration

    register = register or run_registration
    cfg = (config or RegistrationConfig()).validate()
    check_warped(warped)  # before the batch folder is made
    rank, world = distributed()
    settings = {"config": cfg.to_dict(), "write_png": write_png,
                "predictor": None if predictor is None else f"{type(predictor).__name__}:{predictor_mode}"}
    if warped != "auto":  # recorded when it is not the default: batch folders from before it resume as they are
        settings["warped"] = warped
    out = prepare_output(out_dir, settings, rank, world)
    cfg = rank_config(cfg, world)
    mine = [p for i, p in enumerate(pairs) if i % world == rank]
    rows: dict[int, dict] = {}
    cancelled: Cancelled | None = None
    for k, pair in enumerate(mine):
        row = {"name": pair.name, "fixed": pair.fixed, "moving": pair.moving, "rank": rank, "resumed": False}
        folder = out / pair.name
        t0 = time.perf_counter()
        if cancelled is not None:
            rows[pair.row] = {**row, "status": "not run", "error": "cancelled"}
            continue
        if (folder / "report.json").exists():
            report = json.loads((folder / "report.json").read_text())
            rows[pair.row] = {**row, "status": "ok", "resumed": True,
                              "seconds": report.get("timings_s", {}) and round(sum(report["timings_s"].values()), 3),
                              **_metrics(report)}
            logger.info("%s: already complete, skipped", pair.name)
            continue

        def sub(f: float, m: str, k=k, name=pair.name):
            return None if progress is None else progress((k + f) / len(mine), f"{name}: {m}")

        try:
            summary = register(pair.fixed, pair.moving, folder, cfg, fixed_labels=pair.fixed_labels,
                               moving_labels=pair.moving_labels, fixed_landmarks=pair.fixed_landmarks,
                               moving_landmarks=pair.moving_landmarks, write_png=write_png,
                               progress=sub if progress is not None else None, predictor=predictor,
                               predictor_mode=predictor_mode, warped=warped)
            rows[pair.row] = {**row, "status": "ok", "seconds": round(time.perf_counter() - t0, 3),
                              **_metrics(summary.report)}
        except Cancelled as exc:
            cancelled = exc
            rows[pair.row] = {**row, "status": "not run", "error": "cancelled"}
        except (DeepRegistrationError, RuntimeError, ValueError, OSError, MemoryError) as exc:
            logger.warning("%s failed: %s", pair.name, exc)
            rows[pair.row] = {**row, "status": "failed", "seconds": round(time.perf_counter() - t0, 3),
                              "error": f"{type(exc).__name__}: {exc}"}
    gathered: dict[int, dict] = {}
    for part in all_gather(rows, world):
        gathered.update(part)
    result = BatchSummary(out, [gathered[p.row] for p in pairs])
    if rank == 0:
        write_summary(result, {"processes": world})
    barrier(world)
    if cancelled is not None:
        raise cancelled
    return result
