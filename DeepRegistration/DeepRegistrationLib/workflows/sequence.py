"""Motion correction of a 4D sequence: every frame registered onto a reference, each warm-started.

``register-sequence SEQUENCE -o OUT [--reference N|mean] [--chain]``. SEQUENCE is a 4D image (NIfTI, NRRD,
MetaImage; a 3D vector image such as a Slicer ``.seq.nrrd`` counts its components as frames) or a folder of
3D volumes of one geometry, sorted naturally (``f2`` before ``f10``). Frame ``t`` (moving) is registered onto
the reference (fixed) by :func:`~DeepRegistrationLib.registration.run.run_registration`; its affine and its field start
from the neighbouring frame's result nearer the reference (``t-1`` after the reference frame, ``t+1`` before
it: a warm start, which also skips the coarse levels). With ``chain`` frame ``t`` is first registered onto
that neighbour and the result composed with the neighbour's transform (for large motion), then refined
against the reference from that start.

Outputs (written to a temporary folder next to OUT, moved into place when complete):
``OUT/frame_0000/`` ... (each a ``register`` OUTDIR: transform reference → frame, the frame warped onto the
reference, Jacobian, report), ``OUT/sequence.json`` (per-frame similarity, folding, largest displacement,
quality verdict and its reasons, time; ``quality``: the count of each verdict), ``OUT/warped.nii.gz`` (the motion-corrected 4D image on the reference grid), ``OUT/report.png``
(similarity and largest displacement over time), and ``OUT/reference.nii.gz`` for ``--reference mean``.
Under ``torchrun`` the frames are split into contiguous blocks, one per rank (warm starts within a block).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..spatial import warp as W
from ..core.config import RegistrationConfig
from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from ..io.images import read_image, sitk_to_image, write_image, write_sitk_image
from ..core.progress import Progress, ProgressCallback
from ..spatial.transforms import SpatialTransform
from .batch import all_gather, barrier, distributed, quality_counts, quality_fields, rank_config

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ------------------------------------------------------------------------------------------ reading
def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def same_geometry(a: Grid, b: Grid, tol: float = 1e-4) -> bool:
    """True when two grids have the same shape and (within ``tol`` mm / direction units) spacing, origin
    and direction."""
    return (tuple(a.shape) == tuple(b.shape) and np.allclose(a.spacing, b.spacing, atol=tol)
            and np.allclose(a.origin, b.origin, atol=tol) and np.allclose(a.direction, b.direction, atol=tol))


def read_sequence(path: str | os.PathLike) -> list[Image]:
    """The frames of a sequence (see the module docstring), each an :class:`Image` on one common grid.

    Raises:
        InputError: not found, a 3D image, fewer than 2 frames, frames of different geometry, unreadable.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"sequence: '{p}' does not exist. Give a 4D image file or a folder of 3D volumes.")
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)),
                       key=lambda f: _natural_key(f.name))
        frames = [read_image(f, f"sequence frame '{f.name}'") for f in files]
        if len(frames) < 2:
            raise InputError(f"sequence: folder '{p}' holds {len(frames)} 3D image(s) ({', '.join(IMAGE_SUFFIXES)});"
                             " a sequence needs at least 2 frames.")
        for f, img in zip(files[1:], frames[1:]):
            if not same_geometry(img.grid, frames[0].grid):
                raise InputError(f"sequence: frame '{f.name}' has another geometry (size {img.grid.shape[::-1]}, "
                                 f"spacing {tuple(round(s, 4) for s in img.grid.spacing)}) than '{files[0].name}' "
                                 f"(size {frames[0].grid.shape[::-1]}, spacing "
                                 f"{tuple(round(s, 4) for s in frames[0].grid.spacing)}). All frames must share one "
                                 "grid: resample them first.")
        return frames
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"sequence: '{p}' is not a readable image ({str(exc).strip().splitlines()[-1]}).") from None
    if img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() > 1:
        frames = [sitk.VectorIndexSelectionCast(img, c, sitk.sitkFloat32) for c in
                  range(img.GetNumberOfComponentsPerPixel())]
    elif img.GetDimension() == 4:
        size = list(img.GetSize())
        frames = [sitk.Extract(img, size[:3] + [0], [0, 0, 0, t]) for t in range(size[3])]
    elif img.GetDimension() == 3:
        raise InputError(f"sequence: '{p}' is a 3D image (size {img.GetSize()}), not a sequence. Give a 4D image "
                         "or a folder of 3D frames; to register two 3D images use 'deepregistration register'.")
    else:
        raise InputError(f"sequence: '{p}' is a {img.GetDimension()}D image; give a 4D image (x, y, z, t).")
    if len(frames) < 2:
        raise InputError(f"sequence: '{p}' has {len(frames)} frame; a sequence needs at least 2.")
    out = [sitk_to_image(sitk.Cast(f, sitk.sitkFloat32), f"frame {t}") for t, f in enumerate(frames)]
    for t, f in enumerate(out):
        if not np.isfinite(f.array).all():
            raise InputError(f"sequence: frame {t} of '{p}' has NaN or infinite voxels. Fix the data first.")
    return out


# ------------------------------------------------------------------------------------------ warm start
class TransformStart:
    """A :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor` that returns a known transform's field: the
    warm start of a registration from a neighbouring result (or a composition of results).

    Args:
        transforms: Fixed → moving transforms applied in order, ``T = T_n ∘ ... ∘ T_1`` (``T_1`` first).
        affine: The 4×4 LPS matrix given as ``initial_affine`` to the same registration; the field returned
            on a grid is ``u(x) = affine⁻¹ T(x) − x`` (LPS mm), so ``affine (x + u(x)) = T(x)``.
    """

    def __init__(self, transforms: list[SpatialTransform], affine: np.ndarray):
        self.transforms = transforms
        self.affine = np.asarray(affine, dtype=np.float64)

    def map(self, points: torch.Tensor) -> torch.Tensor:
        """``T`` at LPS points ``(1, Z, Y, X, 3)`` (float64)."""
        out = points
        for t in self.transforms:
            u = None if t.field is None else torch.as_tensor(t.field, dtype=torch.float64)[None]
            out = W.map_points(out, torch.as_tensor(t.affine, dtype=torch.float64), u, t.field_grid)
        return out

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor:
        pts = W.grid_points(grid, None, torch.float64)
        inv = torch.as_tensor(np.linalg.inv(self.affine), dtype=torch.float64)
        u = W.apply_affine(self.map(pts), inv) - pts
        return torch.movedim(u, -1, 1).to(device=fixed.device, dtype=torch.float32)

    def composed_affine(self) -> np.ndarray:
        """The product of the affine parts (``A_n ... A_1``), a natural ``initial_affine``."""
        out = np.eye(4)
        for t in self.transforms:
            out = t.affine @ out
        return out


def max_displacement_mm(transform: SpatialTransform, grid: Grid) -> float:
    """Largest ``|T(x) − x|`` (mm) over the voxel centres of ``grid``."""
    with torch.no_grad():
        return float(transform.total_displacement(grid).norm(dim=1).max())


# ------------------------------------------------------------------------------------------ the run
@dataclass
class SequenceResult:
    """What :func:`register_sequence` wrote: ``out_dir`` and one dict per frame (as in ``sequence.json``)."""

    out_dir: Path
    frames: list[dict] = field(default_factory=list)
    reference: str = "0"


def frame_order(n: int, ref: int) -> list[tuple[int, int | None]]:
    """``(frame, neighbour)`` in processing order: the reference frame, the frames after it, then those
    before it walking backwards; ``neighbour`` is the already processed frame next to it (None first)."""
    order: list[tuple[int, int | None]] = [(ref, None)]
    order += [(t, t - 1) for t in range(ref + 1, n)]
    order += [(t, t + 1) for t in range(ref - 1, -1, -1)]
    return order


def _parse_reference(reference, n: int) -> int | None:
    if str(reference).lower() == "mean":
        return None
    try:
        r = int(reference)
    except (TypeError, ValueError):
        raise InputError(f"--reference must be a frame index (0..{n - 1}) or 'mean', got {reference!r}.") from None
    if not 0 <= r < n:
        raise InputError(f"--reference {r} is outside the sequence's {n} frames (0..{n - 1}).")
    return r


def register_sequence(sequence, out_dir, config: RegistrationConfig | None = None, *, reference="0",
                      chain: bool = False, write_png: bool = True, progress: ProgressCallback | None = None,
                      predictor=None, predictor_mode: str = "init", warm_start: bool = True) -> SequenceResult:
    """Registers every frame of ``sequence`` onto the reference; see the module docstring.

    Args:
        sequence: 4D image file or folder of 3D frames (or a list of :class:`Image` on one grid).
        out_dir: Output folder (must not exist).
        config: Registration settings for every frame.
        reference: Frame index (0-based) or ``"mean"``.
        chain: Register each frame onto its neighbour and compose, then refine against the reference.
        write_png: Draw each frame's ``report.png`` and the sequence's ``report.png``.
        progress: ``callback(fraction, message)``, one message per frame; returning False cancels
            (nothing is left written).
        predictor / predictor_mode: A learned field predictor for the frames without a warm start.
        warm_start: Start each frame from its neighbour's result (default); False registers every frame
            from scratch (for comparison).

    Returns:
        :class:`SequenceResult`.
    """
    from ..registration.run import check_output_dir, run_registration

    cfg = (config or RegistrationConfig()).validate()
    frames = sequence if isinstance(sequence, list) else read_sequence(sequence)
    n = len(frames)
    ref = _parse_reference(reference, n)
    out = check_output_dir(out_dir, overwrite=False)
    rank, world = distributed()
    cfg = rank_config(cfg, world)
    tmp = out.parent / f".{out.name}.partial-sequence"
    prog = Progress(progress)
    try:
        barrier(world)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / ".frames").mkdir(parents=True)
            if chain:
                (tmp / ".chain").mkdir()
            for t, f in enumerate(frames):
                write_image(f, tmp / ".frames" / f"frame_{t:04d}.nii.gz", compress=False)
            if ref is None:
                mean = Image(np.mean([f.array for f in frames], axis=0).astype(np.float32), frames[0].grid, "mean")
                write_image(mean, tmp / "reference.nii.gz")
        barrier(world)
        ref_path = tmp / "reference.nii.gz" if ref is None else tmp / ".frames" / f"frame_{ref:04d}.nii.gz"
        order = frame_order(n, 0 if ref is None else ref)
        if ref is None:
            order[0] = (order[0][0], None)
        blocks = np.array_split(np.arange(n), world)
        mine = [order[i] for i in blocks[rank]]
        local: dict[int, SpatialTransform] = {}
        rows: dict[int, dict] = {}
        for k, (t, nbr) in enumerate(mine):
            sub = prog.sub(k / len(mine), (k + 1) / len(mine))
            sub(0.0, f"frame {t}")
            frame_path = tmp / ".frames" / f"frame_{t:04d}.nii.gz"
            t0 = time.perf_counter()
            start, init_affine, mode = None, None, predictor_mode
            prev = local.get(nbr) if (warm_start and nbr is not None) else None
            if prev is not None and chain:
                hop = run_registration(tmp / ".frames" / f"frame_{nbr:04d}.nii.gz", frame_path,
                                       tmp / ".chain" / f"frame_{t:04d}", cfg, write_png=False,
                                       progress=sub.sub(0.0, 0.5), warped="none")  # only its transform is used
                start = TransformStart([prev, hop.result.transform], np.eye(4))
                start.affine = init_affine = start.composed_affine()
            elif prev is not None:
                start, init_affine = TransformStart([prev], prev.affine), prev.affine
            # the previous frame's field starts this one's in the deformable mode; a linear mode starts from its
            # matrix alone (initial_affine): a field has no place there
            field_start = start if cfg.mode == "deformable" else None
            run = run_registration(ref_path, frame_path, tmp / f"frame_{t:04d}", cfg, write_png=write_png,
                                   progress=sub.sub(0.5 if (chain and start is not None) else 0.0, 1.0),
                                   predictor=field_start if field_start is not None else predictor,
                                   predictor_mode="init" if field_start is not None else mode,
                                   initial_affine=init_affine, warped="full")  # the frame of OUT/warped.nii.gz
            local[t] = run.result.transform
            rep = run.report
            rows[t] = {"frame": t, "warm_start_from": None if start is None else nbr, "rank": rank,
                       "ncc_before": rep["similarity"]["ncc_before"], "ncc_after": rep["similarity"]["ncc_after"],
                       "loss_before": rep["similarity"]["loss_before"], "loss_after": rep["similarity"]["loss_after"],
                       "folding_percent": rep["deformation"]["folding_percent"],
                       **quality_fields(rep),
                       "max_displacement_mm": max_displacement_mm(run.result.transform, run.result.working_grid),
                       "seconds": round(time.perf_counter() - t0, 3)}
        gathered: dict[int, dict] = {}
        for part in all_gather(rows, world):
            gathered.update(part)
        table = [gathered[t] for t in range(n)]
        if rank == 0:
            warped = [sitk.ReadImage(str(tmp / f"frame_{t:04d}" / "warped.nii.gz")) for t in range(n)]
            write_sitk_image(sitk.JoinSeries(warped), tmp / "warped.nii.gz")
            info = {"frames": table, "reference": "mean" if ref is None else ref, "chain": chain,
                    "warm_start": warm_start, "processes": world, "quality": quality_counts(table),
                    "total_seconds": round(sum(r["seconds"] for r in table), 3),
                    "conventions": "frame_XXXX/transform.h5 maps reference points to frame points (LPS mm)"}
            (tmp / "sequence.json").write_text(json.dumps(info, indent=2, allow_nan=True))
            if write_png:
                draw_sequence_report(table, tmp / "report.png")
            shutil.rmtree(tmp / ".frames")
            shutil.rmtree(tmp / ".chain", ignore_errors=True)
            os.rename(tmp, out)
        barrier(world)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog(1.0, "done")
    return SequenceResult(out, table, "mean" if ref is None else str(ref))


def draw_sequence_report(table: list[dict], path) -> None:
    """Similarity (NCC before/after) and largest displacement per frame, two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["frame"] for r in table]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a.plot(t, [r["ncc_before"] for r in table], "o--", label="before")
    a.plot(t, [r["ncc_after"] for r in table], "o-", label="after")
    a.set_ylabel("NCC with reference")
    a.legend()
    b.plot(t, [r["max_displacement_mm"] for r in table], "o-", color="C3")
    b.set_ylabel("max displacement (mm)")
    b.set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
