"""Background registration process used by the Slicer module: ``python -m DeepRegistrationLib.worker JOB.json``.

The job file (JSON) holds::

    {"fixed": PATH, "moving": PATH, "out_dir": PATH, "config": {RegistrationConfig fields},
     "fixed_mask": PATH, "moving_mask": PATH, "fixed_labels": PATH, "moving_labels": PATH,
     "fixed_landmarks": PATH, "moving_landmarks": PATH, "overwrite": false}

(everything after ``config`` optional). The worker runs :func:`~DeepRegistrationLib.outputs.run_registration`
(no ``report.png``) and writes one JSON object per line on stdout, flushed at once:

- ``{"progress": 0.42, "message": "deformable level 2"}`` while it works;
- ``{"done": true, "out_dir": PATH, "report": {...}}`` at the end (the content of report.json);
- ``{"error": "message a user can act on", "kind": "input" | "cancelled" | "internal"}`` on failure.

Exit status as the command line: 0 success; 2 bad input (one message, nothing written); 130 interrupted;
1 unexpected internal error (traceback on stderr). The parent stops the work by killing the process; the
output folder appears only when complete, so a killed worker leaves nothing behind but a temporary folder.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

from .errors import Cancelled, DeepRegistrationError, InputError

OPTIONAL_INPUTS = ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")


def emit(stream, **message) -> None:
    """Writes one JSON line (NaN/Inf become null: strict JSON readers accept it)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    stream.write(json.dumps(clean(message)) + "\n")
    stream.flush()


class _Reporter:
    """Progress callback printing JSON lines; at most one line per 0.1 s unless the fraction jumps by 1 %."""

    def __init__(self, stream):
        self.stream = stream
        self.last_time = 0.0
        self.last_fraction = -1.0

    def __call__(self, fraction: float, message: str) -> bool:
        now = time.monotonic()
        if now - self.last_time >= 0.1 or fraction - self.last_fraction >= 0.01 or fraction >= 1.0:
            emit(self.stream, progress=round(float(fraction), 4), message=message)
            self.last_time, self.last_fraction = now, fraction
        return True


def read_job(path: str | Path) -> dict:
    """Reads and checks a job file; raises InputError with a clear message."""
    p = Path(path)
    try:
        job = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"job file '{p}' does not exist.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"job file '{p}' cannot be read as JSON ({exc}).") from None
    if not isinstance(job, dict):
        raise InputError(f"job file '{p}' must hold a JSON object.")
    missing = [k for k in ("fixed", "moving", "out_dir") if not job.get(k)]
    if missing:
        raise InputError(f"job file '{p}' misses {', '.join(missing)}.")
    return job


def make_config(options: dict):
    """RegistrationConfig from a dict, refusing unknown keys with the list of known ones."""
    from dataclasses import fields

    from .config import RegistrationConfig

    known = {f.name for f in fields(RegistrationConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown registration option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    opts = dict(options)
    if "intensity_percentiles" in opts:
        opts["intensity_percentiles"] = tuple(opts["intensity_percentiles"])
    return RegistrationConfig(**opts).validate()


def run_job(job: dict, stream=sys.stdout) -> dict:
    """Runs one job, reporting progress on ``stream``; returns the report."""
    from .outputs import run_registration

    options = dict(job.get("config") or {})
    predictor, mode = None, job.get("model_mode") or "init"
    if job.get("model"):
        from .registry import load

        loaded = load(job["model"])  # InputError for unknown, corrupt or tampered models
        predictor = loaded.predictor()  # runs at the model's own spacing
        options.setdefault("spacing", loaded.working_spacing_mm or 2.0)  # a model works at its own spacing
    config = make_config(options)
    emit(stream, progress=0.0, message="starting")
    if predictor is not None:
        from .registry import usage_warning

        warning = usage_warning(loaded.card, config.similarity)
        if warning:
            logging.getLogger(__name__).warning(warning)
            emit(stream, progress=0.0, message=f"warning: {warning}")
    summary = run_registration(job["fixed"], job["moving"], job["out_dir"], config,
                               overwrite=bool(job.get("overwrite", False)), write_png=False,
                               progress=_Reporter(stream), predictor=predictor, predictor_mode=mode,
                               **{k: job.get(k) for k in OPTIONAL_INPUTS})
    return summary.report


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    out = sys.stdout
    if len(argv) != 1:
        emit(out, error="usage: python -m DeepRegistrationLib.worker JOB.json", kind="input")
        return 2
    try:
        job = read_job(argv[0])
        report = run_job(job, out)
    except Cancelled as exc:
        emit(out, error=str(exc), kind="cancelled")
        return 130
    except DeepRegistrationError as exc:
        emit(out, error=str(exc), kind="input")
        return 2
    except KeyboardInterrupt:
        emit(out, error="registration interrupted; nothing was written.", kind="cancelled")
        return 130
    except MemoryError:
        emit(out, error="out of memory: use a coarser working spacing (e.g. 3 mm) or a GPU.", kind="input")
        return 2
    except Exception as exc:  # noqa: BLE001 - the parent needs one line, the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        emit(out, error=f"internal error ({type(exc).__name__}: {exc}). Please report it with the log.",
             kind="internal")
        return 1
    emit(out, done=True, out_dir=str(job["out_dir"]), report=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
