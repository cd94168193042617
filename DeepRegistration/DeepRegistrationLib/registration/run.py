"""Running a registration from files to a complete, atomically written output folder.

``run_registration(FIXED, MOVING, OUTDIR)`` reads and checks every input *before* any work, registers,
evaluates (Dice/HD95 with label maps, TRE with landmarks) and writes, inside a temporary folder next
to OUTDIR that is renamed into place only when everything succeeded:

- ``transform.h5``: ITK composite transform [affine, displacement field], fixed → moving, LPS.
- ``warped.nii.gz``: the moving image resampled onto the fixed image's full-resolution grid (float32; in the moving
  file's integer type, rounded, when that has 16 bits or more, e.g. a CT's int16). Written unless ``warped="none"``,
  or ``warped="auto"`` (the default) on a fixed grid of more than
  :data:`~DeepRegistrationLib.core.config.FULL_GRID_MAX_VOXELS` voxels, where
  ``report.json``'s ``outputs`` says it was not written and how to write it (``deepregistration apply``).
- ``inverse.h5`` (deformable mode): the inverse, moving → fixed (ITK composite [displacement, affine⁻¹],
  LPS; see :mod:`~DeepRegistrationLib.spatial.inverse`); ``report.json`` gives its inverse-consistency error.
- ``jacobian.nii.gz``: det of the Jacobian of the full transform, on the fixed grid (on the working grid, where it
  is computed, for a fixed grid of more than :data:`~DeepRegistrationLib.core.config.FULL_GRID_MAX_VOXELS`
  voxels).
- ``warped_labels.nii.gz``: the moving labels warped (nearest neighbour), when labels are given.
- ``explain/residual.nii.gz``, ``explain/local_similarity.nii.gz``, ``explain/displacement.nii.gz`` (with
  ``explain=True``): the explainability maps of :func:`~DeepRegistrationLib.evaluation.explain.explanation_maps`
  on the fixed image's full grid (its exact spacing, origin and direction).
- ``uncertainty.nii.gz`` (with ``uncertainty=True``): the spread (mm) of a few perturbed restarts, on the
  fixed grid (see :mod:`~DeepRegistrationLib.evaluation.uncertainty`).
- ``report.json`` / ``report.png``: figures, timings, parameters, versions; a visual check (drawn on the working
  grid from the registration's own working images when the fixed grid is large or ``warped.nii.gz`` is not
  written).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..evaluation import metrics
from ..core.config import FULL_GRID_MAX_VOXELS, RegistrationConfig, check_warped
from ..core.errors import InputError
from ..core.image import Image
from ..io.background import BackgroundWriter, run_parallel
from ..io.images import (image_to_sitk, owning_view, read_image, read_label_image, read_mask, stored_integer_type,
                         write_image, write_sitk_image)
from ..io.landmarks import match_landmarks, read_landmarks
from .pipeline import RegistrationResult, register
from ..core.progress import Progress, ProgressCallback
from ..spatial.resampling import sample_on_grid, warp_image
from ..spatial.transforms import SpatialTransform

logger = logging.getLogger(__name__)

#: The files every run writes on a fixed grid of up to FULL_GRID_MAX_VOXELS voxels with report.png on (a large grid
#: with the default ``warped="auto"`` has no warped.nii.gz; deformable mode adds inverse.h5).
OUTPUT_FILES = ("transform.h5", "warped.nii.gz", "jacobian.nii.gz", "report.json", "report.png")
#: The maps written into ``OUTDIR/explain/`` with ``explain=True`` (``<name>.nii.gz``).
EXPLAIN_FILES = ("residual", "local_similarity", "displacement")
#: The inputs are read in parallel threads and every output file is written on a background thread while the next
#: output is computed (SimpleITK reads and writes without Python's lock). False: all on the calling thread, in
#: order (the same files, bit for bit; for comparison).
CONCURRENT_IO = True
#: Threads reading the inputs (fixed and moving image, masks, label maps) at once.
READ_THREADS = 4


@dataclass
class RunSummary:
    """Result of :func:`run_registration`: where the outputs are, the report dict and the result."""

    out_dir: Path
    report: dict
    result: RegistrationResult


def versions() -> dict:
    """Versions of the software that produced a result (read from package metadata: importing MONAI
    just for its version would cost half a second)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(), "numpy": np.__version__, "SimpleITK": sitk.Version_VersionString(),
           "torch": torch.__version__}
    try:
        out["deepregistration"] = version("deepregistration")
    except PackageNotFoundError:  # running from a source tree or inside Slicer
        from .. import __version__

        out["deepregistration"] = __version__
    return out


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuses an existing OUTDIR unless ``overwrite``; checks that its parent can be written."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise InputError(f"output folder '{out}' already exists. Choose another folder, or pass --overwrite "
                         "to replace it (it is replaced only after the new outputs are complete).")
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}' exists and is a file, not a folder. Choose another output folder.")
    parent = out.parent
    if not parent.exists():
        raise InputError(f"the parent folder of the output, '{parent}', does not exist. Create it first.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write in '{parent}' (permission denied). Choose a writable output folder.")
    return out


def evaluate_labels(fixed_labels: Image, moving_labels: Image, transform: SpatialTransform) -> tuple[dict, Image]:
    """Dice and HD95 per label before (identity) and after registration; also the warped labels."""
    ident = SpatialTransform.identity()
    before = warp_image(moving_labels, fixed_labels.grid, ident, "nearest")
    after = warp_image(moving_labels, fixed_labels.grid, transform, "nearest")
    labels = sorted(int(v) for v in np.unique(fixed_labels.array) if v != 0)
    out = {}
    for tag, warped in (("before", before), ("after", after)):
        s = metrics.label_scores(fixed_labels.array, warped.array, fixed_labels.grid.spacing, labels)
        out[tag] = {"dice_mean": s["dice_mean"], "dice_p30": s["dice_p30"], "hd95_mean_mm": s["hd95_mean_mm"],
                    "dice_per_label": {str(k): round(float(v), 5) for k, v in s["dice_per_label"].items()},
                    "hd95_per_label_mm": {str(k): round(float(v), 4) for k, v in s["hd95_per_label_mm"].items()}}
    return out, after


def evaluate_landmarks(fixed_pts: np.ndarray, moving_pts: np.ndarray, transform: SpatialTransform) -> dict:
    """TRE in mm before (identity) and after registration (fixed landmarks mapped by the transform)."""
    return {"before": metrics.summarize(metrics.tre_mm(fixed_pts, moving_pts)),
            "after": metrics.summarize(metrics.tre_mm(transform.map_points(fixed_pts), moving_pts)),
            "n": int(len(fixed_pts))}


@dataclass
class _Inputs:
    """Everything :func:`run_registration` read and checked before any work (engine objects on their grids)."""

    fixed: Image
    moving: Image
    fixed_mask: Image | None
    moving_mask: Image | None
    fixed_labels: Image | None
    moving_labels: Image | None
    landmarks: tuple[np.ndarray, np.ndarray] | None  # (fixed, moving) evaluation landmarks, (N, 3) LPS mm
    guide: object | None  # guidance.GuideLandmarks
    guide_info: dict | None
    initial_affine: np.ndarray | None
    seconds: float
    moving_type: type | None = None  # the moving file's integer pixel type (16 bits or more), else None


@dataclass
class _Outputs:
    """What :func:`_write_outputs` wrote that the later stages reuse (images on the fixed grid)."""

    warped: Image | None  # None: warped.nii.gz not written
    jacobian: Image
    inverse_report: dict | None


@dataclass
class _Evaluation:
    """What :func:`_evaluate` measured: the ``report.json`` entries and the maps for ``report.png``."""

    metrics: dict
    quality: dict
    explain: dict | None
    uncertainty: dict | None
    guidance: dict | None
    maps: dict
    uncertainty_seconds: float
    pair: object = None  # evaluation.explain.WorkingPair: the working images the quality signals saw


def run_registration(fixed_path, moving_path, out_dir, config: RegistrationConfig | None = None, *,
                     fixed_mask=None, moving_mask=None, fixed_labels=None, moving_labels=None,
                     fixed_landmarks=None, moving_landmarks=None, guide_fixed_landmarks=None,
                     guide_moving_landmarks=None, overwrite: bool = False,
                     write_png: bool = True, progress: ProgressCallback | None = None,
                     predictor=None, predictor_mode: str = "init",
                     initial_affine: np.ndarray | None = None, explain: bool = False,
                     uncertainty: bool = False, warped: str = "auto") -> RunSummary:
    """Registers MOVING to FIXED (paths) and writes all outputs into ``out_dir`` atomically.

    Stages: :func:`_read_inputs` (everything checked before any work), the registration
    (:func:`~DeepRegistrationLib.registration.pipeline.register`), :func:`_write_outputs` (transforms, warped
    image, Jacobian), :func:`_evaluate` (Dice/HD95/TRE, maps, uncertainty, the quality verdict) and
    :func:`_write_report` (``report.json``, ``report.png``), all into a temporary folder that is moved into
    place at the end. With :data:`CONCURRENT_IO` the inputs are read in parallel and each output file is written
    on a background thread (:class:`~DeepRegistrationLib.io.background.BackgroundWriter`) while the next one is
    computed; every write has finished before ``report.json`` is written, and a failed write raises its own error
    with nothing moved into place.

    Args:
        fixed_path / moving_path: Image files or DICOM folders.
        out_dir: Output folder (must not exist unless ``overwrite``).
        config: Registration settings.
        fixed_mask / moving_mask: Optional mask files.
        fixed_labels / moving_labels: Optional label maps on their image's grid (adds Dice/HD95).
        fixed_landmarks / moving_landmarks: Optional landmark files (CSV, .mrk.json, .fcsv) (adds TRE).
        guide_fixed_landmarks / guide_moving_landmarks: Optional landmark files of corresponding points that
            guide the registration (see :mod:`~DeepRegistrationLib.registration.guidance`): their rigid least-squares fit starts the linear
            stage (unless ``initial_affine`` is given) and ``config.guide_weight`` weighs their term in the linear
            and deformable objectives. Checked before any work. Their mean residual after registration
            enters the quality verdict.
        overwrite: Replace an existing ``out_dir`` (only once the new outputs are complete).
        write_png: Also draw ``report.png``.
        progress: ``callback(fraction, message)``; returning False cancels with nothing written.
        predictor: Optional learned field predictor (see :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor`).
        predictor_mode: ``"init"`` (the prediction starts the finest-level optimization) or ``"replace"``.
        initial_affine: Optional 4×4 LPS matrix (fixed → moving points) that replaces the moments
            initialization; the result includes it.
        explain: Also write the explainability maps into ``out_dir/explain/`` (see the module docstring)
            and draw them as extra rows of ``report.png``.
        uncertainty: Also estimate a per-voxel uncertainty, the spread of a few perturbed restarts optimized
            in one batch (:func:`~DeepRegistrationLib.evaluation.uncertainty.restart_spread`):
            ``out_dir/uncertainty.nii.gz`` in mm on the fixed grid, its summary in ``report.json``
            (``uncertainty``); it feeds the quality verdict.
        warped: Whether ``warped.nii.gz`` is written: one of
            :data:`~DeepRegistrationLib.core.config.WARPED_CHOICES` (checked before any work).

    Returns:
        :class:`RunSummary`.
    """
    cfg = (config or RegistrationConfig()).validate()
    check_warped(warped)
    out = check_output_dir(out_dir, overwrite)
    prog = Progress(progress)
    done = 0.55 if uncertainty else 0.85  # share of the registration (the uncertainty takes about as long)
    inputs = _read_inputs(fixed_path, moving_path, cfg, fixed_mask, moving_mask, fixed_labels, moving_labels,
                          fixed_landmarks, moving_landmarks, guide_fixed_landmarks, guide_moving_landmarks,
                          initial_affine)
    write_warped = warped == "full" or (warped == "auto" and inputs.fixed.grid.num_voxels <= FULL_GRID_MAX_VOXELS)
    result = register(inputs.fixed, inputs.moving, cfg, fixed_mask=inputs.fixed_mask,
                      moving_mask=inputs.moving_mask, predictor=predictor, predictor_mode=predictor_mode,
                      initial_affine=inputs.initial_affine, guide=inputs.guide,
                      progress=Progress(progress, 0.0, done))
    prog(done + 0.01, "writing outputs")
    t0 = time.perf_counter()
    tmp = partial_folder(out)
    try:
        with BackgroundWriter(CONCURRENT_IO) as writer:  # joined (every file complete) when the block ends
            outputs = _write_outputs(tmp, inputs, result, prog.sub(done + 0.01, done + 0.02), writer,
                                     write_warped)
            evaluation = _evaluate(tmp, inputs, result, cfg, outputs, explain, uncertainty, prog,
                                   start=done + 0.03, writer=writer)
        timings = dict(read=inputs.seconds, **result.timings,
                       write_and_evaluate=time.perf_counter() - t0 - evaluation.uncertainty_seconds)
        if uncertainty:
            timings["uncertainty"] = evaluation.uncertainty_seconds
        report = _write_report(tmp, inputs, result, fixed_path, moving_path, outputs, evaluation, timings,
                               write_png, prog, warped, out)
        prog(0.99, "moving outputs into place")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog(1.0, "done")
    logger.info("outputs written to %s", out)
    return RunSummary(out, report, result)


def _read_inputs(fixed_path, moving_path, cfg: RegistrationConfig, fixed_mask, moving_mask, fixed_labels,
                 moving_labels, fixed_landmarks, moving_landmarks, guide_fixed_landmarks, guide_moving_landmarks,
                 initial_affine) -> _Inputs:
    """Reads and checks every input of :func:`run_registration` (InputError naming the problem)."""
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("labels need both --fixed-labels and --moving-labels (or neither).")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise InputError("landmarks need both --fixed-landmarks and --moving-landmarks (or neither).")
    t0 = time.perf_counter()
    # read in parallel (CONCURRENT_IO); the errors come in this order, as read one after the other: fixed, moving,
    # fixed mask, moving mask, fixed labels, moving labels (a mask or label map waits for its image's grid only
    # for its grid check)
    tasks = [lambda result: read_image(fixed_path, "fixed image", keep_integer=True),
             lambda result: read_image(moving_path, "moving image", keep_integer=True)]
    optional = {}
    for key, path, reader, name, of in (("fmask", fixed_mask, read_mask, "fixed mask", 0),
                                        ("mmask", moving_mask, read_mask, "moving mask", 1),
                                        ("flab", fixed_labels, read_label_image, "fixed labels", 0),
                                        ("mlab", moving_labels, read_label_image, "moving labels", 1)):
        if path is not None:
            optional[key] = len(tasks)
            tasks.append(lambda result, path=path, reader=reader, name=name, of=of:
                         reader(path, name, lambda: result(of).grid))
    read = run_parallel(tasks, READ_THREADS, CONCURRENT_IO)
    fixed, moving = read[0], read[1]
    fmask, mmask, flab, mlab = (read[optional[k]] if k in optional else None
                                for k in ("fmask", "mmask", "flab", "mlab"))
    lms = None
    if fixed_landmarks is not None:
        lms = match_landmarks(read_landmarks(fixed_landmarks), read_landmarks(moving_landmarks))
    guide, guide_info = None, None
    if guide_fixed_landmarks is not None or guide_moving_landmarks is not None:
        from .guidance import fit_linear, read_guide_landmarks

        guide = read_guide_landmarks(guide_fixed_landmarks, guide_moving_landmarks, fixed.grid, moving.grid)
        guide_info = {**guide.summary(), "weight_per_mm2": cfg.guide_weight, "start": "given initial affine"}
        if initial_affine is None:
            initial_affine = fit_linear(guide.fixed, guide.moving, "rigid")
            guide_info["start"] = "rigid least-squares fit of the guide landmarks"
    return _Inputs(fixed, moving, fmask, mmask, flab, mlab, lms, guide, guide_info, initial_affine,
                   time.perf_counter() - t0, stored_integer_type(moving_path))


def _write_outputs(tmp: Path, inputs: _Inputs, result: RegistrationResult, prog: Progress,
                   writer: BackgroundWriter | None = None, write_warped: bool = True) -> _Outputs:
    """``transform.h5``, ``warped.nii.gz`` (with ``write_warped``), ``inverse.h5`` (deformable) and
    ``jacobian.nii.gz`` into ``tmp`` (``prog`` covers this stage). Each file goes to ``writer`` once computed
    (written on its thread while the next is computed); without one, written at once. The largest,
    ``warped.nii.gz``, is computed first, with no write in flight (the full-resolution warp is this stage's memory
    peak: nothing is added to it)."""
    writer = writer or BackgroundWriter(enabled=False)
    fixed, moving, mmask = inputs.fixed, inputs.moving, inputs.moving_mask
    warped = None
    if write_warped:
        warped = _hand_over(writer, warped_image(moving, fixed.grid, result.transform, inputs.moving_type),
                            tmp / "warped.nii.gz")
    writer.submit(_write_transform, result.transform, tmp / "transform.h5")
    inverse_report = None
    if result.transform.field is not None:
        from ..spatial.inverse import (WRITE_SETTLED_AFTER, WRITE_SETTLED_FRACTION, WRITE_TOL_MM, consistency_error,
                                       foreground_points, invert)

        prog(0.5, "inverting the transform")
        inverse = invert(result.transform, velocity=getattr(result, "velocity", None), tol_mm=WRITE_TOL_MM,
                         settled_after=WRITE_SETTLED_AFTER, settled_fraction=WRITE_SETTLED_FRACTION)
        writer.submit(_write_transform, inverse, tmp / "inverse.h5")
        pts = foreground_points(moving.array, moving.grid, None if mmask is None else mmask.array > 0)
        inverse_report = {**inverse.summary(), "points": "moving mask" if mmask is not None else
                          "moving foreground (> 10 % of the 99th percentile)",
                          "consistency_mm": consistency_error(result.transform, inverse, pts)}
    jac = jacobian_image(result, fixed.grid)
    writer.submit(write_image, jac, tmp / "jacobian.nii.gz")
    return _Outputs(warped, jac, inverse_report)


def _hand_over(writer: BackgroundWriter, image: Image, path: Path) -> Image:
    """Gives ``image`` to ``writer`` as the SimpleITK image :func:`write_image` would write, and returns the same
    image as a read-only view of that SimpleITK image's buffer (the view keeps the image alive,
    :func:`~DeepRegistrationLib.io.images.owning_view`): one full-size copy in memory while the write runs, not two."""
    img = image_to_sitk(image)
    # the view first: GetArrayViewFromImage makes the image's buffer unique, which copies it in full when the
    # writer already holds the image (and races with that write)
    view = owning_view(img, sitk.GetArrayViewFromImage(img), writeable=False)
    writer.submit(write_sitk_image, img, path)
    return Image(view if image.array.dtype != bool else image.array, image.grid, image.name)


def warped_image(moving: Image, grid, transform: SpatialTransform, moving_type: type | None) -> Image:
    """``warped.nii.gz``'s image: ``moving`` (linear interpolation) on ``grid`` through ``transform``, in
    ``moving_type`` (the moving file's integer type of 16 bits or more,
    :func:`~DeepRegistrationLib.io.images.stored_integer_type`: an int16 CT is warped straight into int16, rounded,
    half the bytes to compress and no full-size float32 copy), else float32 (whatever the array's type: an int16
    array read as stored from a file that is not, e.g. a DICOM series, must not be rounded)."""
    return warp_image(moving, grid, transform, "linear", dtype=moving_type or np.float32)


def _write_transform(transform: SpatialTransform, path: Path) -> None:
    """An ITK transform file (``.h5``) of ``transform``."""
    sitk.WriteTransform(transform.to_sitk(), str(path))


def jacobian_image(result: RegistrationResult, fixed_grid) -> Image:
    """``jacobian.nii.gz``'s image: det J (float32) on the fixed grid, or on the working grid (where it was
    computed) when the fixed grid holds more than :data:`~DeepRegistrationLib.core.config.FULL_GRID_MAX_VOXELS`
    voxels — resampling it finer would only interpolate, at the cost of a full-resolution float image to compute
    and compress."""
    wg = result.working_grid
    if wg.same_as(fixed_grid, tol=1e-6):
        return Image(np.asarray(result.jacobian, dtype=np.float32), fixed_grid, "jacobian")
    if fixed_grid.num_voxels > FULL_GRID_MAX_VOXELS:
        return Image(np.asarray(result.jacobian, dtype=np.float32), wg, "jacobian")
    return Image(sample_on_grid(result.jacobian, wg, fixed_grid), fixed_grid, "jacobian")


def _evaluate(tmp: Path, inputs: _Inputs, result: RegistrationResult, cfg: RegistrationConfig, outputs: _Outputs,
              explain: bool, uncertainty: bool, prog: Progress, start: float = 0.88,
              writer: BackgroundWriter | None = None) -> _Evaluation:
    """Dice/HD95 and TRE (with ``warped_labels.nii.gz``), the explainability maps (``explain/``), the
    uncertainty (``uncertainty.nii.gz``), the guide landmarks' residual and the quality verdict; ``prog``
    is the whole run's, this stage reports from ``start`` to 0.93. Files go to ``writer`` as in
    :func:`_write_outputs`."""
    writer = writer or BackgroundWriter(enabled=False)
    from ..evaluation import explain as explaining
    from ..evaluation.quality import assess, signals_from_result, uncertainty_signals

    fixed, moving, fmask, mmask = inputs.fixed, inputs.moving, inputs.fixed_mask, inputs.moving_mask
    # the registration's own prepared working images (prepared again only for a result without them)
    pair = explaining.working_pair(fixed, moving, result.transform, cfg, fmask, mmask,
                                   prepared=result.working_images)
    maps: dict[str, Image] = {}
    explain_info = None
    if explain:
        prog(start, "explainability maps")
        # the residual map from warped.nii.gz's image whether or not that file is written (the same bits)
        warped = outputs.warped if outputs.warped is not None else \
            warped_image(moving, fixed.grid, result.transform, inputs.moving_type)
        maps = explaining.explanation_maps(fixed, moving, result.transform, cfg, pair=pair, warped=warped)
        del warped
        (tmp / "explain").mkdir()
        for name in EXPLAIN_FILES:
            maps[name] = _hand_over(writer, maps[name], tmp / "explain" / f"{name}.nii.gz")
        explain_info = explain_summary(maps, pair, cfg.similarity)
    unc_info, unc_seconds = None, 0.0
    if uncertainty:
        from ..evaluation.uncertainty import ITERATIONS, RESTARTS, restart_spread

        t0 = time.perf_counter()
        unc = restart_spread(fixed, moving, result.transform, cfg, fixed_mask=fmask, moving_mask=mmask,
                             seed=cfg.seed, device=result.device, progress=prog.sub(start + 0.01, 0.92),
                             prepared=result.working_images)
        maps["uncertainty"] = _hand_over(writer, unc.on_grid(fixed.grid), tmp / "uncertainty.nii.gz")
        unc_info = {**unc.summary(), "file": "uncertainty.nii.gz", "restarts": RESTARTS, "iterations": ITERATIONS,
                    "meaning": "per-voxel spread (mm) of the displacement over perturbed restarts of the result; "
                               "large where the images do not pin the correspondence down. Not an error bound: "
                               "it scales with the perturbation and misses errors every restart shares."}
        unc_seconds = time.perf_counter() - t0
    prog(0.93, "evaluating")
    evaluation: dict = {}
    if inputs.fixed_labels is not None:
        if fixed.grid.num_voxels > FULL_GRID_MAX_VOXELS:
            writer.join()  # a large grid: the full-resolution label warps run with no write's copy in memory
        evaluation["labels"], warped_labels = evaluate_labels(inputs.fixed_labels, inputs.moving_labels,
                                                              result.transform)
        writer.submit(write_image, warped_labels, tmp / "warped_labels.nii.gz")
    if inputs.landmarks is not None:
        evaluation["landmarks"] = evaluate_landmarks(inputs.landmarks[0], inputs.landmarks[1], result.transform)
    guide_info, residual = None, None
    if inputs.guide is not None:
        from .guidance import point_distances

        guide = inputs.guide
        guide_info = dict(inputs.guide_info)
        guide_info["distance_after_mm"] = metrics.summarize(
            point_distances(result.transform.map_points, guide.fixed, guide.moving))
        residual = guide_info["distance_after_mm"]["mean"]
    signals = signals_from_result(result, fixed, moving, fmask, mmask, landmark_residual_mm=residual, pair=pair)
    if unc_info is not None:
        signals.update(uncertainty_signals(unc_info))
    return _Evaluation(evaluation, assess(signals), explain_info, unc_info, guide_info, maps, unc_seconds, pair)


def _write_report(tmp: Path, inputs: _Inputs, result: RegistrationResult, fixed_path, moving_path,
                  outputs: _Outputs, evaluation: _Evaluation, timings: dict, write_png: bool,
                  prog: Progress, warped: str = "auto", out_dir: Path | None = None) -> dict:
    """``report.json`` (and ``report.png`` when ``write_png``) into ``tmp``; returns the report. ``warped``: the
    run's :data:`~DeepRegistrationLib.core.config.WARPED_CHOICES` entry and ``out_dir`` the final output folder,
    for ``report.json``'s ``outputs`` (None, for a caller outside a run: its command names the folder OUTDIR)."""
    report = build_report(result, fixed_path, moving_path, evaluation.metrics, timings)
    report["quality"] = evaluation.quality
    report["conventions"]["jacobian_grid"] = ("fixed" if outputs.jacobian.grid is inputs.fixed.grid else
                                              "working (the fixed grid is larger than "
                                              f"{FULL_GRID_MAX_VOXELS} voxels)")
    report["outputs"] = {"warped": warped_entry(warped, outputs.warped is not None, inputs.fixed.grid, moving_path,
                                                out_dir if out_dir is not None else Path("OUTDIR"))}
    for key, value in (("explain", evaluation.explain), ("uncertainty", evaluation.uncertainty),
                       ("inverse", outputs.inverse_report), ("guidance", evaluation.guidance)):
        if value is not None:
            report[key] = value
    (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    if write_png:
        prog(0.95, "drawing report.png")
        from ..evaluation.figures import draw_report

        maps = dict(evaluation.maps)
        if outputs.warped is not None and outputs.jacobian.grid is inputs.fixed.grid:
            fixed, warped, jacobian = _float32(inputs.fixed), outputs.warped, outputs.jacobian
            before = warp_image(inputs.moving, fixed.grid, SpatialTransform.identity(), "linear", dtype=np.float32)
        else:  # a large fixed grid or no warped image: drawn on the working grid (a figure needs no more)
            fixed, before, warped, jacobian = _working_figure_images(result, evaluation.pair, inputs.moving)
            grid = fixed.grid
            maps = {k: Image(sample_on_grid(v.array, v.grid, grid), grid, v.name) for k, v in maps.items()}
        if result.config.similarity == "mi" and "local_similarity" in maps:
            maps = {("local_mi" if k == "local_similarity" else k): v for k, v in maps.items()}
        draw_report(fixed, before, warped, jacobian, tmp / "report.png", summary_lines(report), maps=maps)
    return report


def _float32(image: Image) -> Image:
    """``image`` with float32 voxels (an int16 input kept as read: its exact float32 values, as report.png draws
    them)."""
    return image if image.array.dtype == np.float32 else Image(image.array.astype(np.float32), image.grid, image.name)


def warped_entry(choice: str, written: bool, fixed_grid, moving_path, out_dir: Path) -> dict:
    """``report.json``'s ``outputs.warped``: whether ``warped.nii.gz`` was written, and if not, why and the
    command that writes it into ``out_dir`` (``how``, shell-quoted: the same image, from ``transform.h5``)."""
    if written:
        return {"file": "warped.nii.gz", "grid": "fixed"}
    why = ("--warped none" if choice == "none" else
           f"the fixed grid has {fixed_grid.num_voxels / 1e6:.1f} M voxels, more than {FULL_GRID_MAX_VOXELS / 1e6:g} M "
           "(--warped auto)")
    words = ["deepregistration", "apply", os.path.abspath(moving_path), "-t", str(out_dir),
             "-o", str(out_dir / "warped.nii.gz"), "--interpolation", "linear"]  # never taken for a label map
    return {"file": None, "why": why, "how": " ".join(shlex.quote(w) for w in words)}


def _working_figure_images(result: RegistrationResult, pair, moving: Image) -> tuple[Image, Image, Image, Image]:
    """``report.png``'s fixed, moving before, moving after and Jacobian images on the fixed working grid, from the
    registration's own working images (intensities normalized to [0, 1]; the warped one 0 outside the moving field
    of view, as the similarity saw it): no full-resolution image is resampled for a figure. ``moving`` (the input)
    is resampled for the "before" column only for a result without working images."""
    grid = pair.grid
    if result.working_images is not None:
        m = result.working_images.moving
        moving = Image(m.array, m.grid, "moving")
    before = warp_image(moving, grid, SpatialTransform.identity(), "linear", dtype=np.float32)
    return (Image(pair.fixed[0, 0].cpu().numpy(), grid, "fixed"), before,
            Image(pair.warped[0, 0].cpu().numpy(), grid, "warped"),
            Image(np.asarray(result.jacobian, dtype=np.float32), result.working_grid, "jacobian"))


def explain_summary(maps: dict[str, Image], pair, similarity: str = "lncc") -> dict:
    """The ``report.json`` entry of the explainability maps: files, meaning, and their medians over the
    fixed foreground (working-grid voxels above :data:`~DeepRegistrationLib.evaluation.explain.FOREGROUND`,
    resampled onto the fixed grid)."""
    from ..evaluation.explain import FOREGROUND

    grid = maps["residual"].grid
    fg = sample_on_grid((pair.fixed[0, 0] > FOREGROUND).float().cpu().numpy(), pair.grid, grid) > 0.5
    med = lambda a: float(np.median(a[fg])) if fg.any() else float("nan")
    return {"files": {name: f"explain/{name}.nii.gz" for name in maps},
            "meaning": {"residual": "|fixed - warped| after each image's robust normalization to [0, 1]; "
                                    "0 outside the moving field of view",
                        "local_similarity": ("local mutual information (nats): the window mean of the pointwise MI "
                                             "of the optimizer's joint histogram" if similarity == "mi" else
                                             "LNCC cc2 in [0, 1] per voxel (the optimizer's window)")
                        + "; 0 where the fixed image is flat or outside the overlap",
                        "displacement": "|T(x) - x| in mm (linear part included)"},
            "foreground_median": {"residual": med(maps["residual"].array),
                                  "local_similarity": med(maps["local_similarity"].array),
                                  "displacement_mm": med(maps["displacement"].array)}}


def partial_folder(out: Path) -> Path:
    """A new, empty temporary folder next to ``out`` (``.NAME.partial-XXXXXXXX``) that becomes ``out`` once
    complete: made by a plain ``mkdir``, so it gets the permissions the user's umask gives any new folder (e.g.
    0755), not ``tempfile.mkdtemp``'s 0700, which would leave a result on a shared disk unreadable to the rest of
    a team."""
    while True:
        tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # taken (one in 4 billion): draw again
            continue


def _move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished temporary folder to ``out``; an old ``out`` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(result: RegistrationResult, fixed_path, moving_path, evaluation: dict, timings: dict) -> dict:
    """The content of ``report.json``; ``result_id`` is a random uuid4 hex (nothing derived from the data)
    that keys users' verdicts on this result (:mod:`~DeepRegistrationLib.workflows.feedback`)."""
    return {
        "result_id": uuid.uuid4().hex,
        "inputs": {"fixed": os.path.abspath(fixed_path), "moving": os.path.abspath(moving_path)},  # a result
        # folder read later (feedback, DatasetBuilder) finds its inputs whatever the current folder is then
        "conventions": {"world": "LPS mm", "transform": "fixed -> moving (resampling direction), "
                        "ITK CompositeTransform [affine, displacement]: T(x) = A(x + u(x))",
                        "jacobian": "det of the Jacobian of T (includes the affine part)"},
        "similarity": {"metric": result.config.similarity, "loss_before": result.similarity_before,
                       "loss_after": result.similarity_after, "ncc_before": result.ncc_before,
                       "ncc_after": result.ncc_after},
        "deformation": {"folding_percent": result.folding_percent, **result.sdlogj,
                        "jacobian_min": float(result.jacobian.min()), "jacobian_max": float(result.jacobian.max()),
                        "affine_lps": np.round(result.transform.affine, 6).tolist()},
        "initialization": result.initialization,
        "plan": result.plan,
        "metrics": evaluation,
        "timings_s": {k: round(float(v), 3) for k, v in timings.items()},
        "parameters": result.config.to_dict(),
        "working_grid": result.working_grid.to_dict(),
        "device": result.device,
        "versions": versions(),
    }


def summary_lines(report: dict) -> list[str]:
    """Short human-readable lines for the console and the PNG."""
    s = report["similarity"]
    lines = [f"NCC {s['ncc_before']:.3f} -> {s['ncc_after']:.3f}",
             f"folding {report['deformation']['folding_percent']:.4f} %"]
    ev = report["metrics"]
    if "labels" in ev:
        lines.append(f"Dice {ev['labels']['before']['dice_mean']:.3f} -> {ev['labels']['after']['dice_mean']:.3f}")
    if "landmarks" in ev:
        lines.append(f"TRE {ev['landmarks']['before']['mean']:.2f} -> {ev['landmarks']['after']['mean']:.2f} mm")
    if "uncertainty" in report:
        u = report["uncertainty"]
        lines.append(f"uncertainty {u['median_mm']:.2f} mm median in the anatomy "
                     f"(perturbation {u['perturbation_mm']:.1f} mm)")
    total = sum(v for k, v in report["timings_s"].items())
    lines.append(f"time {total:.1f} s on {report['device']}")
    if "quality" in report:
        from ..evaluation.quality import summary_line

        lines.append(summary_line(report["quality"]))
    return lines
