"""Registration of MRML nodes in a background process that can be killed.

:class:`RegistrationJob` writes the inputs to a temporary folder, starts ``python -m DeepRegistrationLib.apps.worker
JOB.json`` (``PythonSlicer`` inside Slicer, ``sys.executable`` elsewhere), reads its JSON progress lines through
:meth:`~RegistrationJob.poll` without blocking (the GUI polls it from a timer), and loads the results into nodes
with :meth:`~RegistrationJob.loadResults`. Nothing is added to the scene before the results are loaded, so
:meth:`~RegistrationJob.cancel` (which returns at once and stops the worker for real, through the
``PythonSlicer`` launcher too: see :mod:`DeepRegistrationLib.core.jobs`) leaves the scene as it was.

The background mechanics (job folder, worker process, polling, cancel, job state) are :class:`BackgroundJob`'s,
shared by :class:`RegistrationJob` and the sequence and template jobs of :mod:`.sequences`.
:func:`register` does all of it and blocks: the console API (:func:`runBlocking` for every job kind).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer

from DeepRegistrationLib.core import jobs
from DeepRegistrationLib.core.errors import Cancelled, DeepRegistrationError, InputError

from . import nodes as N

logger = logging.getLogger(__name__)

MODULE_DIR = Path(__file__).resolve().parents[1]  # the folder holding DeepRegistrationLib

PRESETS = {
    "Rigid": {"mode": "rigid"},
    "Affine": {"mode": "affine"},
    "Deformable — fast": {"mode": "deformable"},  # the engine defaults: 2 mm working grid
    "Deformable — accurate": {"mode": "deformable", "spacing": 1.5, "iterations": 20},
}
"""Preset name → engine options (RegistrationConfig fields); keyword options override them."""

OPTION_NAMES = {"similarity": "similarity", "regularizationWeight": "reg_weight", "spacing": "spacing",
                "iterations": "iterations", "diffeomorphic": "diffeomorphic", "device": "device",
                "threads": "threads", "regularization": "regularization", "levels": "levels",
                "affineIterations": "affine_iterations", "jacobianWeight": "jacobian_weight",
                "initialization": "initialization", "seed": "seed", "symmetric": "symmetric",
                "guideWeight": "guide_weight"}
"""Module option names (camelCase) → engine RegistrationConfig fields; engine names are accepted as they are."""

DEVICE_NAMES = {"auto": "auto", "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}


def engineConfig(preset: str = "Deformable — fast", **options) -> dict:
    """Engine options of a preset with keyword overrides (None = keep the preset's value)."""
    key = preset.replace("-", "—") if preset not in PRESETS else preset
    matches = [p for p in PRESETS if p.lower() == key.lower()]
    if not matches:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    config = dict(PRESETS[matches[0]])
    for name, value in options.items():
        if value is None:
            continue
        engineName = OPTION_NAMES.get(name, name)
        if engineName == "device":
            value = DEVICE_NAMES.get(str(value).lower(), value)
        config[engineName] = value
    return config


def availableModels(withDescriptions: bool = False):
    """Names of the usable learned models (shipped, then the user's), read from their cards without torch;
    with ``withDescriptions`` a list of ``(name, one-line description)`` (card description, spacing, source)."""
    from DeepRegistrationLib.learning.registry import list_models

    entries = list_models(include_broken=False)
    if not withDescriptions:
        return [e.name for e in entries]
    out = []
    for e in entries:
        s = e.summary()
        out.append((e.name, f"{s['description'] or e.name} ({e.source}; working spacing "
                             f"{s['working_spacing_mm'] or '?'} mm)"))
    return out


def pythonExecutable() -> str:
    """The Python that runs the worker: ``PythonSlicer`` inside Slicer (it has Slicer's packages)."""
    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
        home = getattr(slicer.app, "slicerHome", None)
        for name in ("PythonSlicer", "PythonSlicer.exe"):
            candidate = Path(home or "") / "bin" / name
            if home and candidate.exists():
                return str(candidate)
    return sys.executable


KEEP_WORKER_READY: bool | None = None
"""Keep one worker started ahead (torch and the engine already imported, waiting for a job) after each
registration, so that the next one does not wait for them; it exits after :data:`READY_WORKER_IDLE_S` seconds
without a job. None (default): inside Slicer only."""

READY_WORKER_IDLE_S = 600.0

_readyWorker: tuple | None = None  # (jobs.Job, monotonic start time, command + environment key)


def keepWorkerReady() -> bool:
    return hasattr(slicer, "app") if KEEP_WORKER_READY is None else bool(KEEP_WORKER_READY)


def _workerCommand() -> list:
    return [pythonExecutable(), "-m", "DeepRegistrationLib.apps.worker"]


def _workerEnvironment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def prepareWorker() -> None:
    """Starts a worker ahead of need, if none is ready (e.g. when the module is entered); the next
    registration then skips the worker's start-up (Python, torch, engine imports)."""
    global _readyWorker
    command, env = _workerCommand(), _workerEnvironment()
    key = (tuple(command), env.get("PYTHONPATH"))
    if _readyWorker is not None:
        job, started, oldKey = _readyWorker
        if not job.finished and oldKey == key and time.monotonic() - started < READY_WORKER_IDLE_S - 60:
            return
        job.cancel(0.5)
    job = jobs.Job(command + ["--wait-for-job", str(READY_WORKER_IDLE_S)], env=env, log_dir=_temporaryFolder())
    _readyWorker = (job, time.monotonic(), key)
    logger.info("DeepRegistration: worker %d started ahead", job.pid)


def releaseWorker() -> None:
    """Stops the worker started ahead, if any (returns at once)."""
    global _readyWorker
    ready, _readyWorker = _readyWorker, None
    if ready is not None:
        ready[0].cancel(0.5)


def _takeReadyWorker(jobPath, tempPaths) -> "jobs.Job | None":
    """The worker started ahead, given ``jobPath``; None when there is none that can still take it."""
    global _readyWorker
    ready, _readyWorker = _readyWorker, None
    if ready is None:
        return None
    job, started, key = ready
    usable = not job.finished and key == (tuple(_workerCommand()), _workerEnvironment().get("PYTHONPATH")) and \
        time.monotonic() - started < READY_WORKER_IDLE_S - 60  # well before it gives up waiting
    if usable:
        job.adopt(tempPaths)
        usable = job.send(str(jobPath))
    if not usable:
        job.cancel(0.5)
        return None
    return job


def _temporaryFolder() -> str | None:
    """Slicer's temporary folder (Application settings → Temporary directory) inside Slicer, else None
    (the system's)."""
    app = getattr(slicer, "app", None)
    path = getattr(app, "temporaryPath", None) if app is not None else None
    if path:
        os.makedirs(path, exist_ok=True)
        return str(path)
    return None


@dataclass
class JobStatus:
    """What :meth:`RegistrationJob.poll` returns.

    Attributes:
        state: ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        progress: Fraction 0..1 of the whole registration.
        message: The worker's last progress message, or the error message when failed.
    """

    state: str
    progress: float
    message: str

    @property
    def finished(self) -> bool:
        return self.state != "running"


@dataclass
class SceneRegistrationResult:
    """Output of a registration in the scene.

    Attributes:
        transformNode: Fixed → moving (FromParent = resampling direction); put moving nodes under it to align them.
        inverseTransformNode: Moving → fixed (the engine's ``inverse.h5``; put fixed-space nodes under it to bring
            them onto the moving image), or None unless asked for with ``createInverse``.
        outputVolumeNode: Moving volume resampled on the fixed grid, or None.
        jacobianVolumeNode: det of the Jacobian on the fixed grid, or None.
        metricsTableNode: Metrics table (Metric, Before, After, Unit, Note; the quality verdict and its
            reasons first), or None.
        metrics: Summary numbers, e.g. ``ncc_before``, ``ncc_after``, ``folding_percent_after``, ``dice_after``.
        report: The engine's full report (report.json).
        quality: ``{"verdict": "ok" | "suspect" | "failed", "reasons": [...]}`` (the engine's automatic quality
            control, see :func:`~DeepRegistrationSlicerLib.nodes.qualityOf`), or None from an engine without it.
        mapVolumeNodes: Explanation maps asked for with ``explain`` (name → volume node on the fixed grid, names
            in :data:`~DeepRegistrationSlicerLib.nodes.MAP_NAMES`), each with its colour table; the node's
            ``DeepRegistration.output`` attribute says how it is shown (``local_mi`` for the local similarity of
            an MI registration: mutual information in nats).
        pendingFeedback: What a user's Accept / Reject needs (the registered images, transform, report: held
            in memory, nothing written; see :mod:`~DeepRegistrationSlicerLib.feedback`), or None.
        seconds: Wall time from start to loaded results.
    """

    transformNode: object
    inverseTransformNode: object = None
    outputVolumeNode: object = None
    jacobianVolumeNode: object = None
    metricsTableNode: object = None
    metrics: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    quality: dict | None = None
    mapVolumeNodes: dict = field(default_factory=dict)
    pendingFeedback: object = None
    seconds: float = 0.0


class BackgroundJob:
    """A job of the engine's worker (``python -m DeepRegistrationLib.apps.worker JOB.json``) in a background
    process that can be killed: the part every Slicer job shares.

    :meth:`start` makes the job folder (in Slicer's temporary folder), has :meth:`writeInputs` fill it, and starts
    the worker (or hands the job to the one started ahead); :meth:`poll` reads its progress without blocking;
    :meth:`wait` blocks; :meth:`cancel` stops it for real and returns at once; the folder is removed when the
    job ends (:meth:`stopped` tells when). Nothing is added to the scene before :meth:`loadResults`.

    Subclasses (:class:`RegistrationJob`, :class:`~.sequences.SequenceJob`, :class:`~.sequences.TemplateJob`)
    check their inputs, call ``BackgroundJob.__init__`` and define :meth:`writeInputs` (the job dict),
    :meth:`loadResults` (the scene changes; starts with :meth:`_requireDone`, ends with :meth:`_cleanup`) and
    :meth:`_nodes`.

    Args:
        scene: The MRML scene the results go into.
        config: Engine options (RegistrationConfig fields), e.g. from :func:`engineConfig`.
        preset: The preset's name (recorded on the results).
        keepFiles: Keep the temporary folder (for debugging).

    Attributes:
        state: ``"new"``, ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        progress, message: The worker's last report (fraction 0..1, text).
        report: The worker's result (the engine's report) once it succeeded, else None.
        process: The worker (:class:`DeepRegistrationLib.core.jobs.Job`) once started.
        workDir: The job folder once started.
    """

    what = "job"
    """The job's name in messages ("the ... was cancelled")."""

    def __init__(self, scene, config: dict, preset: str, keepFiles: bool = False):
        self.scene = scene
        self.config, self.preset, self.keepFiles = config, preset, keepFiles
        self._resetJobState()

    def _nodes(self) -> list:
        """Every node the job reads or fills."""
        raise NotImplementedError

    def writeInputs(self, folder: Path) -> dict:
        """Writes the job's inputs into ``folder`` and returns the worker's job dict."""
        raise NotImplementedError

    def loadResults(self):
        """Puts the finished worker's outputs into the scene (call after :meth:`poll` says ``done``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- start
    def start(self) -> "BackgroundJob":
        """Exports the inputs and starts the worker process (returns at once).

        The inputs go to a new folder in Slicer's temporary folder (Application settings), the worker's log
        next to it; both are removed when the job ends, except the log of a failed run (:attr:`logPath`).
        """
        if self.state != "new":
            raise RuntimeError(f"a {type(self).__name__} runs once; create a new one")
        self._startTime = time.perf_counter()
        base = _temporaryFolder()
        jobs.sweep_stale("DeepRegistration-", base)  # folders (patient images) of a Slicer that crashed
        self.workDir = jobs.make_temp_folder("DeepRegistration-", base)
        try:
            job = self.writeInputs(self.workDir)
            jobPath = self.workDir / "job.json"
            jobPath.write_text(json.dumps(job, indent=2))
            temp = [] if self.keepFiles else [self.workDir]
            self.process = _takeReadyWorker(jobPath, temp) if keepWorkerReady() else None
            if self.process is None:
                self.process = jobs.Job(_workerCommand() + [str(jobPath)], env=_workerEnvironment(), log_dir=base,
                                        temp_paths=temp)
        except BaseException:
            if not self.keepFiles:
                jobs.remove_tree(self.workDir, timeout=5.0)
            raise
        self.state, self.message = "running", "starting"
        logger.info("DeepRegistration: worker %d started in %s", self.process.pid, self.workDir)
        return self

    @property
    def logPath(self) -> Path | None:
        """The worker's log (stderr: warnings, traceback) while it runs and after a failure, for a "Show log";
        None after a success or a cancel (removed)."""
        return None if self.process is None else self.process.log_path

    # ------------------------------------------------------------------------------------------- poll
    def poll(self) -> JobStatus:
        """Reads what the worker reported so far (never blocks)."""
        if self.state != "running":
            return JobStatus(self.state, self.progress, self.message)
        process = self.process
        self.progress, self.message = process.fraction, process.message
        self._handleLine(None)
        code = process.poll()
        if code is not None:
            if process.succeeded and self.report is not None:
                self.state, self.progress, self.message = "done", 1.0, "done"
            else:
                self.state, self.message = "failed", self._error or self._crashMessage(code)
                if process.cancelled or (process.error and process.error.get("error") == "cancelled"):
                    self.state = "cancelled"
            if keepWorkerReady() and self.state != "cancelled":
                prepareWorker()  # for the next registration
        return JobStatus(self.state, self.progress, self.message)

    _error: str | None = None

    def _handleLine(self, raw=None) -> None:
        """Takes the worker's result, error and warnings from the protocol messages read so far."""
        process = self.process
        if process.result is not None and self.report is None:
            self.report = process.result.get("report") or {}
        if process.error is not None:
            self._error = process.error["message"]
            self.message = self._error
        seen = self.__dict__.get("_notesSeen", 0)
        notes, self._notesSeen = process.notes[seen:], len(process.notes)
        for level, text in notes:
            if level != "debug":
                logger.log(logging.WARNING if level == "warning" else logging.INFO, "DeepRegistration worker: %s",
                           text)
            if level == "warning":
                self.warnings.append(text)

    @property
    def warnings(self) -> list:
        """The worker's messages for the user (e.g. a model used outside its training contrast)."""
        if self.__dict__.get("_warnings") is None:
            self._warnings = []
        return self._warnings

    def _crashMessage(self, code: int) -> str:
        tail = self.process.error_message() if self.process is not None else ""
        where = f" The log is in {self.logPath}." if self.logPath else ""
        return f"the registration process stopped unexpectedly (exit status {code}): {tail}.{where}"

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> JobStatus:
        """Blocks until the worker finished (or ``timeout`` seconds passed, then cancels and raises)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.poll()
            if status.finished:
                return status
            if end is not None and time.monotonic() > end:
                self.cancel()
                raise TimeoutError(f"registration did not finish within {timeout} s; it was cancelled.")
            time.sleep(interval)

    # ------------------------------------------------------------------------------------------- cancel
    def cancel(self, grace: float = 2.0) -> None:
        """Stops the worker and returns at once (a few ms); the scene is left as it was.

        The worker's stdin is closed, so it ends itself (also through the ``PythonSlicer`` launcher); after
        ``grace`` seconds its whole process group is killed. Its temporary folder is removed once every
        process of the job is gone (in a background thread); :meth:`stopped` tells when.
        """
        if self.state in ("running", "new"):
            self.state, self.message = "cancelled", "cancelled"
        if self.process is not None:
            self.process.cancel(grace)
        self._cleanup()

    def stopped(self, timeout: float = 0.0) -> bool:
        """True when no process of the job runs any more and its temporary files are removed (waits up to
        ``timeout`` seconds)."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _cleanup(self) -> None:
        """Removes the temporary folder once the worker has stopped (at once when it has)."""
        if self.process is not None and not self.keepFiles:
            self.process.remove_when_stopped()
        elif self.process is None and self.workDir is not None and not self.keepFiles:
            jobs.remove_tree(self.workDir, timeout=5.0)

    # ------------------------------------------------------------------------------------------- state
    def _resetJobState(self) -> None:
        """The state of a new job: no worker, no folder, nothing reported."""
        self.process: jobs.Job | None = None
        self.workDir: Path | None = None
        self.state, self.progress, self.message = "new", 0.0, ""
        self.report: dict | None = None
        self._startTime = 0.0

    def _requireDone(self, what: str | None = None) -> None:
        """Raises unless the job has finished: ``InputError`` (its failure), ``Cancelled``, or
        ``RuntimeError`` while it still runs. ``what`` names the job in the messages (default :attr:`what`)."""
        what = what or self.what
        if self.state == "failed":
            raise InputError(self.message)
        if self.state == "cancelled":
            raise Cancelled(f"the {what} was cancelled; nothing was changed.")
        if self.state != "done":
            raise RuntimeError(f"the {what} has not finished yet")


class RegistrationJob(BackgroundJob):
    """One background registration of MRML nodes (a :class:`BackgroundJob`).

    Args:
        fixedVolume / movingVolume: Scalar volume nodes.
        preset: One of :data:`PRESETS`.
        fixedMask / movingMask: Optional segmentation or labelmap nodes (all segments / non-zero = inside).
        initialTransform: Optional linear transform node that roughly aligns the moving nodes (its ToParent
            is applied to them); the output transform includes it.
        fixedSegmentation / movingSegmentation: Optional segmentations or labelmaps: adds Dice and HD95
            (segments paired by name).
        fixedLandmarks / movingLandmarks: Optional fiducial markups nodes: adds TRE (paired by label or order).
        guideFixedLandmarks / guideMovingLandmarks: Optional fiducial markups nodes of corresponding points that
            guide the registration (a least-squares point fit starts the registration; paired by label as for TRE;
            at least 3 pairs), separate from the evaluation landmarks.
        createInverse: Also create a transform node holding the inverse (moving → fixed) of a deformable result.
        outputTransform: Transform node to fill, or None for a new one.
        outputVolume: Volume node to fill, True for a new one, False/None for none.
        jacobianVolume: Same, for the Jacobian determinant.
        metricsTable: Table node to fill, True (default) for a new one, False/None for none.
        applyToMoving: Make the moving volume follow the output transform when done.
        useParentTransform: Start from the moving volume's current (linear) parent transforms and keep them: the
            result goes on top of them (the volume ends under ``result ∘ parent``) instead of replacing them
            (see :func:`~DeepRegistrationSlicerLib.nodes.movingFrame`). Ignored with an ``initialTransform``.
        scene: The MRML scene (default ``slicer.mrmlScene``).
        keepFiles: Keep the temporary folder (for debugging).
        explain: Also ask the engine for the explanation maps (residual, local similarity, displacement
            magnitude) and, unless ``uncertainty`` is False, the restart-spread uncertainty (mm); they are
            loaded as volumes on the fixed grid (:attr:`SceneRegistrationResult.mapVolumeNodes`).
        uncertainty: Ask for the uncertainty map (default: as ``explain``).
        model: Optional learned model (registry name or card path, see :func:`availableModels`) whose
            prediction starts the deformable optimization (``modelMode="init"``) or replaces it
            (``"replace"``); without an explicit ``spacing`` option the model's working spacing is used.
        **options: Engine options overriding the preset (see :data:`OPTION_NAMES`).
    """

    what = "registration"

    def __init__(self, fixedVolume, movingVolume, preset: str = "Deformable — fast", *, fixedMask=None,
                 movingMask=None, initialTransform=None, fixedSegmentation=None, movingSegmentation=None,
                 fixedLandmarks=None, movingLandmarks=None, guideFixedLandmarks=None, guideMovingLandmarks=None,
                 createInverse: bool = False, outputTransform=None, outputVolume=None,
                 jacobianVolume=None, metricsTable=True, applyToMoving: bool = True, scene=None,
                 keepFiles: bool = False, model: str | None = None, modelMode: str = "init",
                 useParentTransform: bool = True, explain: bool = False, uncertainty: bool | None = None,
                 **options):
        if fixedVolume is None or movingVolume is None:
            raise InputError("select a fixed volume and a moving volume.")
        if fixedVolume == movingVolume:
            raise InputError("the fixed and moving volumes are the same node; select two different volumes.")
        for node in (outputVolume, jacobianVolume):
            if node not in (None, True, False) and node in (fixedVolume, movingVolume):
                raise InputError("an output volume must differ from the fixed and moving volumes.")
        if (fixedSegmentation is None) != (movingSegmentation is None):
            raise InputError("Dice needs both a fixed and a moving segmentation (or neither).")
        if (fixedLandmarks is None) != (movingLandmarks is None):
            raise InputError("TRE needs both fixed and moving landmarks (or neither).")
        if (guideFixedLandmarks is None) != (guideMovingLandmarks is None):
            raise InputError("guiding with landmarks needs both a fixed and a moving landmark list (or neither).")
        BackgroundJob.__init__(self, scene or fixedVolume.GetScene() or slicer.mrmlScene,
                               engineConfig(preset, **options), preset, keepFiles)
        self.fixedVolume, self.movingVolume = fixedVolume, movingVolume
        self.inputs = dict(fixedMask=fixedMask, movingMask=movingMask, fixedSegmentation=fixedSegmentation,
                           movingSegmentation=movingSegmentation, fixedLandmarks=fixedLandmarks,
                           movingLandmarks=movingLandmarks, guideFixedLandmarks=guideFixedLandmarks,
                           guideMovingLandmarks=guideMovingLandmarks)
        self.createInverse = bool(createInverse)
        self.initialTransform = initialTransform
        self.outputTransform, self.outputVolume, self.jacobianVolume = outputTransform, outputVolume, jacobianVolume
        self.metricsTable, self.applyToMoving = metricsTable, applyToMoving
        self.explain = bool(explain)
        self.uncertainty = self.explain if uncertainty is None else bool(uncertainty)
        self.model, self.modelMode = None, modelMode
        if model:
            from DeepRegistrationLib.learning.model_files import working_spacing
            from DeepRegistrationLib.learning.registry import read_card, resolve

            from DeepRegistrationLib.registration.predictors import check_predictor_use

            check_predictor_use(self.config.get("mode", "deformable"), modelMode)  # InputError naming the fix
            self.model = str(resolve(model))  # InputError naming the available models
            # the one rule (learning.model_files.working_spacing): an explicit spacing option, else the card's,
            # else the preset's (the engine default when the preset has none)
            self.config["spacing"] = working_spacing(read_card(self.model), options.get("spacing"),
                                                     self.config.get("spacing"))
        # "world": moving-side nodes read where they are shown, result placed on top of their transforms;
        # "local": read in local coordinates moved by movingMatrix, moving volume placed directly under the result
        self.movingFrame, self.movingMatrix = N.movingFrame(movingVolume, fixedVolume, outputTransform,
                                                            initialTransform, useParentTransform)
        if outputTransform is not None and outputTransform.IsA("vtkMRMLLinearTransformNode") and \
                self.config.get("mode") == "deformable":
            raise InputError(f"the output transform '{outputTransform.GetName()}' is a linear transform node and "
                             "cannot hold a deformable result. Select a transform node or create a new one.")

    @property
    def _fillsOutputVolume(self) -> bool:
        """Whether the result fills an output volume (the job asks the worker for ``warped.nii.gz`` only then)."""
        return self.outputVolume not in (None, False)

    def _nodes(self) -> list:
        """Every node the job reads or fills."""
        nodes = [self.fixedVolume, self.movingVolume, self.initialTransform, self.outputTransform,
                 self.outputVolume, self.jacobianVolume, self.metricsTable] + list(self.inputs.values())
        return [n for n in nodes if n is not None and not isinstance(n, bool)]

    # ------------------------------------------------------------------------------------------- start
    def writeInputs(self, folder: Path) -> dict:
        """Writes volumes, masks, labels and landmarks (engine frame: LPS) and returns the job dict."""
        from DeepRegistrationLib.io.images import write_image

        fixed = N.volumeToImage(self.fixedVolume, "fixed volume", world=True)
        movingWorld = self.movingFrame == "world"
        moving = N.volumeToImage(self.movingVolume, "moving volume", world=movingWorld, extraMatrix=self.movingMatrix)
        write_image(fixed, folder / "fixed.nii.gz", compress=False)
        write_image(moving, folder / "moving.nii.gz", compress=False)
        self._registered = (fixed, moving)  # kept for a user's verdict (feedback.PendingResult)
        job = {"fixed": str(folder / "fixed.nii.gz"), "moving": str(folder / "moving.nii.gz"),
               "out_dir": str(folder / "result"), "config": self.config,
               # warped.nii.gz only for an output volume to fill (the scene shows the moving volume through the
               # transform without it; at 0.75 mm its warp and gzip cost more than the registration)
               "warped": "full" if self._fillsOutputVolume else "none"}
        if self.model:
            job.update(model=self.model, model_mode=self.modelMode)
        if self.explain:
            job["explain"] = True
        if self.uncertainty:
            job["uncertainty"] = True
        grids = {"fixed": (self.fixedVolume, fixed.grid), "moving": (self.movingVolume, moving.grid)}
        for side in ("fixed", "moving"):
            mask = self.inputs[f"{side}Mask"]
            if mask is not None:
                array = N.labelArrayOnVolume(mask, grids[side][0], what=f"{side} mask", scene=self.scene) > 0
                if not array.any():
                    raise InputError(f"the {side} mask '{mask.GetName()}' is empty on the {side} volume's grid.")
                N.writeLabelImage(array, grids[side][1], str(folder / f"{side}_mask.nii.gz"))
                job[f"{side}_mask"] = str(folder / f"{side}_mask.nii.gz")
        fseg, mseg = self.inputs["fixedSegmentation"], self.inputs["movingSegmentation"]
        if fseg is not None:
            ids = (None, None)
            if fseg.IsA("vtkMRMLSegmentationNode") and mseg.IsA("vtkMRMLSegmentationNode"):
                ids = N.matchSegments(fseg, mseg)
            for side, node, segIds in (("fixed", fseg, ids[0]), ("moving", mseg, ids[1])):
                array = N.labelArrayOnVolume(node, grids[side][0], segIds, what=f"{side} segmentation",
                                             scene=self.scene)
                N.writeLabelImage(array, grids[side][1], str(folder / f"{side}_labels.nii.gz"))
                job[f"{side}_labels"] = str(folder / f"{side}_labels.nii.gz")
        # evaluation landmarks and guide landmarks: both point lists as LPS CSV (the moving one in its own frame)
        for prefix, fixedKey, movingKey in (("", "fixedLandmarks", "movingLandmarks"),
                                            ("guide_", "guideFixedLandmarks", "guideMovingLandmarks")):
            if self.inputs[fixedKey] is None:
                continue
            for side, node, world, extra in (("fixed", self.inputs[fixedKey], True, None),
                                             ("moving", self.inputs[movingKey], movingWorld, self.movingMatrix)):
                points, labels = N.markupsToLpsPoints(node, world=world, extraMatrix=extra)
                name = f"{prefix}{side}_landmarks"
                N.writeLandmarksCsv(points, labels, str(folder / f"{name}.csv"))
                job[name] = str(folder / f"{name}.csv")
        return job

    def loadResults(self) -> SceneRegistrationResult:
        """Loads the finished worker's outputs into nodes (call after :meth:`poll` says ``done``)."""
        self._requireDone()
        from DeepRegistrationLib.io.images import read_image

        out = self.workDir / "result"
        try:
            affine, field, grid = N.readItkTransform(str(out / "transform.h5"))
            inverse = None
            if self.createInverse and field is not None:
                if not (out / "inverse.h5").is_file():
                    raise InputError("the engine wrote no inverse.h5, so no inverse transform can be created; "
                                     "update DeepRegistration or untick 'Create inverse transform'.")
                inverse = N.readItkInverseTransform(str(out / "inverse.h5"))
            scene = self.scene
            warped = jac = None
            if self._fillsOutputVolume:
                warped = read_image(out / "warped.nii.gz", "warped")
            if self.jacobianVolume not in (None, False):
                jac = read_image(out / "jacobian.nii.gz", "jacobian") if _varies(out / "jacobian.nii.gz") else \
                    _readConstant(out / "jacobian.nii.gz")
            maps = self._readMaps(out)
            from .feedback import PendingResult

            fixedImage, movingImage = self.__dict__.pop("_registered", (None, None))
            pending = None if fixedImage is None else PendingResult(
                fixedImage, movingImage, (out / "transform.h5").read_bytes(), dict(self.report),
                (out / "inverse.h5").read_bytes() if (out / "inverse.h5").is_file() else None)
            gone = [n.GetName() for n in self._nodes() if n.GetScene() is not scene]
            if gone:
                raise InputError(f"'{gone[0]}' was deleted during the registration; nothing was changed.")
            # everything read: now change the scene
            transformNode = self.outputTransform or scene.AddNewNodeByClass(
                "vtkMRMLTransformNode", scene.GenerateUniqueName(f"{self.movingVolume.GetName()} registered"))
            N.setTransformNodeFromEngine(transformNode, affine, field, grid, self.movingMatrix)
            if transformNode.GetParentTransformNode() is not None:  # the result maps from world coordinates
                transformNode.SetAndObserveTransformNodeID(None)
            transformNode.SetAttribute(N.FRAME_ATTRIBUTE, self.movingFrame)
            N.setRegistrationReferences(transformNode, self.fixedVolume, self.movingVolume)
            transformNode.SetAttribute(N.RESULT_ATTRIBUTE, self.preset)
            transformNode.SetAttribute("DeepRegistration.config", json.dumps(self.config))
            if self.model:
                transformNode.SetAttribute("DeepRegistration.model", f"{Path(self.model).stem} ({self.modelMode})")
            result = SceneRegistrationResult(transformNode, report=self.report, metrics=N.flatMetrics(self.report),
                                             quality=N.qualityOf(self.report), pendingFeedback=pending)
            if self.createInverse:
                inverseNode = scene.AddNewNodeByClass(
                    "vtkMRMLTransformNode", scene.GenerateUniqueName(f"{self.movingVolume.GetName()} inverse"))
                if inverse is not None:
                    N.setInverseTransformNodeFromEngine(inverseNode, *inverse, self.movingMatrix)
                else:  # linear: the exact matrix inverse
                    N.setInverseTransformNodeFromEngine(inverseNode, np.linalg.inv(affine), None, None,
                                                        self.movingMatrix)
                inverseNode.SetAttribute(N.FRAME_ATTRIBUTE, self.movingFrame)
                inverseNode.SetAttribute(N.RESULT_ATTRIBUTE, f"{self.preset} (inverse)")
                N.setRegistrationReferences(inverseNode, self.movingVolume, self.fixedVolume)
                transformNode.SetNodeReferenceID("DeepRegistrationInverse", inverseNode.GetID())
                result.inverseTransformNode = inverseNode
            if warped is not None:
                node = None if self.outputVolume is True else self.outputVolume
                result.outputVolumeNode = N.imageToVolume(
                    warped, node, scene.GenerateUniqueName(f"{self.movingVolume.GetName()} warped"), scene)
                result.outputVolumeNode.SetNodeReferenceID("spatialRegistrationTransform", transformNode.GetID())
                result.outputVolumeNode.SetAttribute(N.OUTPUT_ATTRIBUTE, "warped")
            if jac is not None:
                node = None if self.jacobianVolume is True else self.jacobianVolume
                result.jacobianVolumeNode = N.imageToVolume(
                    jac, node, scene.GenerateUniqueName(f"{self.movingVolume.GetName()} Jacobian"), scene)
                N.showAsJacobian(result.jacobianVolumeNode)
                result.jacobianVolumeNode.SetAttribute(N.OUTPUT_ATTRIBUTE, "jacobian")
            if self.metricsTable not in (None, False):
                table = self.metricsTable if self.metricsTable is not True else scene.AddNewNodeByClass(
                    "vtkMRMLTableNode", scene.GenerateUniqueName(f"{self.movingVolume.GetName()} registration metrics"))
                N.updateMetricsTable(table, result.metrics, result.quality)
                transformNode.SetNodeReferenceID("DeepRegistrationMetrics", table.GetID())
                result.metricsTableNode = table
            for name, image in maps.items():
                kind = "local_mi" if name == "local_similarity" and self.config.get("similarity") == "mi" else name
                node = N.imageToVolume(image, None, scene.GenerateUniqueName(
                    f"{self.movingVolume.GetName()} {N.MAP_TITLES[kind]}"), scene)
                N.showAsMap(node, kind, image.array)
                node.SetNodeReferenceID("DeepRegistrationTransform", transformNode.GetID())
                result.mapVolumeNodes[name] = node
            if self.applyToMoving:
                applyTransformToNodes(transformNode, [self.movingVolume])
            result.seconds = time.perf_counter() - self._startTime
            return result
        finally:
            self._cleanup()


    def _readMaps(self, out: Path) -> dict:
        """The explanation maps asked for, read from the engine's outputs (name → engine Image)."""
        wanted = ([n for n in N.MAP_NAMES if n != "uncertainty"] if self.explain else []) + \
            (["uncertainty"] if self.uncertainty else [])
        maps = {}
        for name in wanted:
            path = out / "uncertainty.nii.gz" if name == "uncertainty" else out / "explain" / f"{name}.nii.gz"
            if not path.is_file():
                raise InputError(f"the engine wrote no {path.relative_to(out)}, so the {N.MAP_TITLES[name]} map "
                                 "cannot be shown; update DeepRegistration or untick 'Explain'.")
            maps[name] = _readConstant(path, name)
        return maps


def _varies(path: Path) -> bool:
    import SimpleITK as sitk

    a = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    return float(a.max() - a.min()) > 1e-6 * max(1.0, abs(float(a.max())))


def _readConstant(path: Path, name: str = "jacobian"):
    """An image that may be constant (the Jacobian of an affine result, a map of zeros), which read_image
    would refuse."""
    import SimpleITK as sitk

    from DeepRegistrationLib.io.images import sitk_to_image

    return sitk_to_image(sitk.ReadImage(str(path)), name)


def register(fixedVolume, movingVolume, preset: str = "Deformable — fast", progressCallback=None,
             **kwargs) -> SceneRegistrationResult:
    """Registers and blocks until the results are in the scene (console API).

    ``progressCallback(fraction, message)`` is called while waiting; returning False cancels (raises Cancelled).
    Other keywords: see :class:`RegistrationJob`. Raises InputError with the worker's message on failure.
    """
    return runBlocking(RegistrationJob(fixedVolume, movingVolume, preset, **kwargs), progressCallback,
                       "registration")


def runBlocking(job: BackgroundJob, progressCallback=None, what: str = "registration"):
    """Starts ``job`` (a :class:`BackgroundJob`: registration, sequence or template), waits for it and returns its
    ``loadResults()``. ``progressCallback(fraction, message)`` returning False cancels (raises Cancelled); any
    exception while waiting cancels the job too. Raises InputError with the worker's message on failure."""
    job.start()
    try:
        while True:
            status = job.poll()
            if status.finished:
                break
            if progressCallback is not None and progressCallback(status.progress, status.message) is False:
                job.cancel()
                raise Cancelled(f"{what} cancelled; nothing was changed.")
            time.sleep(0.1)
    except BaseException:
        job.cancel()
        raise
    if status.state != "done":
        raise InputError(status.message)
    return job.loadResults()


def applyTransformToNodes(transformNode, nodesToMove) -> int:
    """Makes nodes of the moving image (volumes, segmentations, markups) follow a registration result as the
    moving volume does; returns how many follow it. A result made in the moving volume's world coordinates
    (:func:`~DeepRegistrationSlicerLib.nodes.movingFrame`) goes on top of each node's own transforms; other
    transforms become the node's parent (replacing its transforms, which the result includes)."""
    world = transformNode.GetAttribute(N.FRAME_ATTRIBUTE) == "world"
    count = 0
    for node in nodesToMove:
        if node is None or not node.IsA("vtkMRMLTransformableNode") or node == transformNode:
            continue
        if world:
            N.placeOnTop(node, transformNode)
        else:
            node.SetAndObserveTransformNodeID(transformNode.GetID())
        count += 1
    return count
