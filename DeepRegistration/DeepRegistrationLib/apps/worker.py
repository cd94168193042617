"""Background registration process used by the Slicer module: ``python -m DeepRegistrationLib.apps.worker JOB.json``.

The job file (JSON) holds::

    {"fixed": PATH, "moving": PATH, "out_dir": PATH, "config": {RegistrationConfig fields},
     "fixed_mask": PATH, "moving_mask": PATH, "fixed_labels": PATH, "moving_labels": PATH,
     "fixed_landmarks": PATH, "moving_landmarks": PATH, "overwrite": false, "explain": false,
     "uncertainty": false, "warped": "full"}

(everything after ``config`` optional). The worker runs :func:`~DeepRegistrationLib.registration.run.run_registration`
(no ``report.png``); ``warped`` is its ``warped=`` (``"full"``, the default, whatever the size: the Slicer module
loads ``warped.nii.gz`` into its output volume; ``"none"`` when it has none to fill). Two more job kinds run the multi-image workflows (no PNGs either)::

    {"kind": "sequence", "sequence": FOLDER_OR_4D_FILE, "out_dir": PATH, "config": {...},
     "reference": "0" | "mean", "chain": false}
    {"kind": "template", "images": [PATH, ...], "out_dir": PATH, "config": {...}, "iterations": 3,
     "labels": [PATH, ...] | null}

(:func:`~DeepRegistrationLib.workflows.sequence.register_sequence`, progress messages prefixed with the frame;
:func:`~DeepRegistrationLib.workflows.template.build_template`). The worker writes the protocol of
:mod:`DeepRegistrationLib.core.jobs` on stdout (one JSON object per line, flushed at once):

- ``{"kind": "progress", "fraction": 0.42, "message": "deformable level 2"}`` while it works;
- ``{"kind": "message", "level": "warning", "message": TEXT}`` for a warning the user should see;
- ``{"kind": "result", "result": {"out_dir": PATH, "report": {...}}}`` at the end (report = report.json);
- ``{"kind": "error", "error": "input" | "cancelled" | "internal", "message": TEXT}`` on failure.

Exit status as the command line: 0 success; 2 bad input (one message, nothing written); 130 cancelled or
interrupted; 1 unexpected internal error (traceback on stderr). Started by :class:`~DeepRegistrationLib.core.jobs.Job`
(the Slicer module), the worker ends itself when its stdin closes (the parent cancelled or went away), within
half a second when the interpreter is free, else the parent kills its process group. The output folder
appears only when complete, so a stopped worker leaves nothing behind but its parent's temporary folder.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from ..core import jobs
from ..core.errors import Cancelled, DeepRegistrationError, InputError

JOB_KINDS = {"register": ("fixed", "moving", "out_dir"), "sequence": ("sequence", "out_dir"),
             "template": ("images", "out_dir")}
"""Job kinds and the keys each needs."""

OPTIONAL_INPUTS = ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks",
                   "guide_fixed_landmarks", "guide_moving_landmarks")
OPTIONAL_OUTPUTS = ("explain", "uncertainty")
"""Job flags passed on to run_registration when true: the explanation maps (``OUT/explain/``) and the
restart-spread uncertainty (``OUT/uncertainty.nii.gz``)."""


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
    kind = job.get("kind", "register")
    if kind not in JOB_KINDS:
        raise InputError(f"job file '{p}': unknown kind {kind!r}; known: {', '.join(JOB_KINDS)}.")
    missing = [k for k in JOB_KINDS[kind] if not job.get(k)]
    if missing:
        raise InputError(f"job file '{p}' misses {', '.join(missing)}.")
    return job


def make_config(options: dict):
    """RegistrationConfig from a dict, refusing unknown keys with the list of known ones."""
    from dataclasses import fields

    from ..core.config import RegistrationConfig

    known = {f.name for f in fields(RegistrationConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown registration option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    opts = dict(options)
    if "intensity_percentiles" in opts:
        opts["intensity_percentiles"] = tuple(opts["intensity_percentiles"])
    return RegistrationConfig(**opts).validate()


def run_job(job: dict, stream=None) -> dict:
    """Runs one job, reporting progress on ``stream`` (default stdout, or a :class:`~.jobs.Emitter`); returns
    the report. Raises Cancelled when the parent cancels."""
    kind = job.get("kind", "register")
    if kind != "register":
        return run_workflow_job(job, stream if isinstance(stream, jobs.Emitter) else jobs.Emitter(stream))
    from ..registration.run import run_registration

    options = dict(job.get("config") or {})
    predictor, mode = None, job.get("model_mode") or "init"
    if job.get("model"):
        from ..learning.model_files import working_spacing
        from ..learning.registry import load
        from ..registration.predictors import check_predictor_use

        check_predictor_use(options.get("mode", "deformable"), mode)  # a model needs the deformable mode
        loaded = load(job["model"])  # InputError for unknown, corrupt or tampered models
        predictor = loaded.predictor()  # runs at the model's own spacing
        options["spacing"] = working_spacing(loaded, options.get("spacing"))
    config = make_config(options)
    out = stream if isinstance(stream, jobs.Emitter) else jobs.Emitter(stream)
    out.progress(0.0, "starting")
    if predictor is not None:
        from ..learning.registry import usage_warning

        warning = usage_warning(loaded.card, config.similarity)
        if warning:
            logging.getLogger(__name__).warning(warning)
            out.message(warning, "warning")
    summary = run_registration(job["fixed"], job["moving"], job["out_dir"], config,
                               overwrite=bool(job.get("overwrite", False)), write_png=False,
                               progress=out, predictor=predictor, predictor_mode=mode,
                               **{k: job.get(k) for k in OPTIONAL_INPUTS},
                               **{k: True for k in OPTIONAL_OUTPUTS if job.get(k)},
                               warped=job.get("warped", "full"))
    return summary.report


class _FrameMessages:
    """Progress callback that prefixes the engine's messages with the frame being registered ("frame 2: ...")."""

    def __init__(self, out: jobs.Emitter):
        self.out, self.frame = out, ""

    def __call__(self, fraction: float, message: str = "") -> bool:
        if message.startswith("frame ") or message == "done":
            self.frame = "" if message == "done" else message
        elif self.frame:
            message = f"{self.frame}: {message}"
        return self.out(fraction, message)


def run_workflow_job(job: dict, out: jobs.Emitter) -> dict:
    """Runs a ``sequence`` or ``template`` job (see the module docstring); returns ``sequence.json`` /
    ``report.json`` as a dict."""
    config = make_config(dict(job.get("config") or {}))
    out.progress(0.0, "starting")
    if job["kind"] == "sequence":
        from ..workflows.sequence import register_sequence

        result = register_sequence(job["sequence"], job["out_dir"], config, reference=str(job.get("reference", "0")),
                                   chain=bool(job.get("chain", False)), write_png=False, progress=_FrameMessages(out))
        return json.loads((result.out_dir / "sequence.json").read_text())
    from ..workflows.template import build_template

    result = build_template(job["images"], job["out_dir"], config, iterations=int(job.get("iterations", 3)),
                            labels=job.get("labels") or None, write_png=False, progress=out)
    return json.loads((result.out_dir / "report.json").read_text())


WAIT_FOR_JOB = "--wait-for-job"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    ``worker JOB.json`` runs that job. ``worker --wait-for-job [IDLE_SECONDS]`` is a worker started ahead of
    need: it imports torch and the engine, says ``{"kind": "message", "level": "debug", "message": "ready"}``,
    then waits for the path of a job file on its stdin (one line, from :meth:`~.jobs.Job.send`) and runs it
    like ``worker JOB.json``; without a job within IDLE_SECONDS (default 600) it exits with status 0.
    """
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    out = jobs.Emitter(sys.stdout)
    if argv[:1] == [WAIT_FOR_JOB] and len(argv) <= 2:
        import queue

        lines: queue.Queue = queue.Queue()
        jobs.watch_stdin(grace=0.5, on_line=lines.put)  # the job path arrives on stdin; EOF = cancel
        from ..registration import run as outputs
        from ..learning import registry  # noqa: F401 - the slow imports (torch), done before the job comes

        out.message("ready", "debug")
        try:
            argv = [lines.get(timeout=float(argv[1]) if len(argv) > 1 else 600.0)]
        except queue.Empty:
            return 0  # nobody needed this worker
    else:
        jobs.watch_stdin(grace=0.5)  # started by a Job: end when the parent cancels or goes away
    if len(argv) != 1:
        out.error("usage: python -m DeepRegistrationLib.apps.worker JOB.json", "input")
        return 2
    try:
        job = read_job(argv[0])
        report = run_job(job, out)
    except Cancelled as exc:
        out.error(str(exc), "cancelled")
        return 130
    except DeepRegistrationError as exc:
        out.error(str(exc), "input")
        return 2
    except KeyboardInterrupt:
        out.error("registration interrupted; nothing was written.", "cancelled")
        return 130
    except MemoryError:
        out.error("out of memory: use a coarser working spacing (e.g. 3 mm) or a GPU.", "input")
        return 2
    except Exception as exc:  # noqa: BLE001 - the parent needs one line, the traceback goes to stderr
        traceback.print_exc(file=sys.stderr)
        out.error(f"internal error ({type(exc).__name__}: {exc}). Please report it with the log.", "internal")
        return 1
    out.result({"out_dir": str(job["out_dir"]), "report": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
