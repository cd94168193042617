"""Unbiased groupwise template building (the ANTs / FireANTs recipe) on the registration run.

``template IMAGE... -o OUT [--iterations K] [--labels LABEL...]``:

1. **Affine average.** Every subject is registered affinely onto the first image; the affinely warped
   subjects are averaged on the first image's grid, and the average is resampled through the inverse of the
   mean affine matrix, so that the subjects' affine maps average to the identity.
2. **Deformable passes** (K, default 3). Every subject (moving) is registered onto the current template
   (fixed) with :func:`~DeepRegistrationLib.registration.run.run_registration`, starting from its previous affine
   (no new initialization search); the warped subjects are averaged; the
   mean displacement ``d̄(x) = mean_i (T_i(x) − x)`` is inverted (fixed point ``v(x) = −d̄(x + v(x))``) and the
   average is resampled through that inverse — the next template. The last pass writes the outputs and its
   mean displacement measures convergence (≈ 0 for a centred template).

Outputs (written in a temporary folder next to OUT, moved into place when complete):
``OUT/template.nii.gz`` (the template registered to in the last pass, on the first image's grid),
``OUT/subject_XXXX/`` (a ``register`` OUTDIR per subject: ``transform.h5`` maps template points to subject
points — the resampling direction that warps the subject onto the template — warped subject, Jacobian,
report), with ``--labels`` ``OUT/subject_XXXX/warped_labels.nii.gz`` and ``OUT/labels.nii.gz`` (majority vote
in template space, ties to the smaller label), ``OUT/report.json`` (per pass: mean/max displacement, template
change, each subject's quality verdict, time; label agreement; ``quality``: the last pass's verdict per subject
with its reasons, and their counts) and ``OUT/template.png`` (the template's three planes, one row per pass).
Under ``torchrun`` the subjects of each pass are split over the ranks and the averages gathered.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..spatial import warp as W
from ..core.config import RegistrationConfig
from ..core.errors import InputError
from ..core.image import Image
from ..io.images import read_image, read_label_image, write_image
from ..core.progress import Progress, ProgressCallback
from ..spatial.transforms import SpatialTransform
from .batch import all_gather, barrier, distributed, map_over_ranks, quality_counts, quality_fields, rank_config

logger = logging.getLogger(__name__)


@dataclass
class TemplateResult:
    """What :func:`build_template` wrote: ``out_dir``, one dict per pass (as in ``report.json``)."""

    out_dir: Path
    iterations: list[dict] = field(default_factory=list)
    label_agreement: dict | None = None


def inverse_displacement(d: torch.Tensor, grid, iterations: int = 20) -> torch.Tensor:
    """Displacement ``v`` of the inverse of ``x → x + d(x)``: ``v(x) = −d(x + v(x))`` by fixed-point iteration.

    Args:
        d: ``(1, 3, Z, Y, X)`` LPS mm on ``grid``.
        grid: The grid of ``d``.

    Returns:
        ``(1, 3, Z, Y, X)`` LPS mm on ``grid`` (converges for smooth fields with |∇d| < 1).
    """
    pts = W.grid_points(grid, d.device, d.dtype)
    v = -d
    for _ in range(iterations):
        v = -W.sample_field(d, grid, pts + torch.movedim(v, 1, -1))
    return v


def majority_vote(maps: list[np.ndarray]) -> np.ndarray:
    """Label fusion: the most frequent label per voxel (ties: the smaller label value)."""
    stack = np.stack(maps)
    values = np.unique(stack)
    counts = np.stack([(stack == v).sum(0) for v in values])
    return values[np.argmax(counts, axis=0)].astype(stack.dtype)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    labels = [v for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
    if not labels:
        return float("nan")
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / max(1, np.sum(a == v) + np.sum(b == v))
                          for v in labels]))


def label_agreement(maps: list[np.ndarray], fused: np.ndarray) -> dict:
    """Mean Dice of each warped label map with the fused map, and the mean pairwise Dice between subjects."""
    pairs = [_dice(maps[i], maps[j]) for i in range(len(maps)) for j in range(i + 1, len(maps))]
    return {"dice_to_fused_mean": float(np.mean([_dice(m, fused) for m in maps])),
            "pairwise_dice_mean": float(np.mean(pairs)), "subjects": len(maps)}


def _planes(arr: np.ndarray) -> list[np.ndarray]:
    z, y, x = (n // 2 for n in arr.shape)
    return [arr[z], arr[:, y], arr[:, :, x]]


def draw_template_report(rows: list[tuple[str, Image]], path) -> None:
    """The template's three central planes (array axes, flipped for display), one row per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (title, img) in enumerate(rows):
        sx, sy, sz = img.grid.spacing
        for c, (plane, aspect) in enumerate(zip(_planes(img.array), (sy / sx, sz / sx, sz / sy))):
            ax = axes[r][c]
            ax.imshow(plane[::-1], cmap="gray", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def build_template(images, out_dir, config: RegistrationConfig | None = None, *, iterations: int = 3,
                   labels=None, write_png: bool = True, progress: ProgressCallback | None = None) -> TemplateResult:
    """Builds an unbiased template of ``images``; see the module docstring.

    Args:
        images: At least 2 image files (any grids; the template lives on the first image's grid).
        out_dir: Output folder (must not exist).
        config: Settings of the deformable passes (the affine stage uses the same with ``mode="affine"``).
        iterations: Number of deformable passes (≥ 1).
        labels: Optional label map files, one per image on its grid: majority-vote fusion.
        write_png: Each subject's ``report.png`` and ``template.png``.
        progress: ``callback(fraction, message)``; returning False cancels (nothing is left written).

    Returns:
        :class:`TemplateResult`.
    """
    from ..registration.run import check_output_dir, run_registration
    from ..registration.pipeline import register
    from ..spatial.resampling import warp_image

    cfg = (config or RegistrationConfig()).validate()
    paths = [Path(p) for p in images]
    if len(paths) < 2:
        raise InputError(f"a template needs at least 2 images, got {len(paths)}. Give two or more subject images.")
    if not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"--iterations must be a whole number >= 1, got {iterations!r}.")
    if labels is not None and len(labels) != len(paths):
        raise InputError(f"--labels needs one label map per image: {len(paths)} images, {len(labels)} label maps.")
    subjects = [read_image(p, f"image {i + 1} ('{p.name}')") for i, p in enumerate(paths)]
    label_maps = None if labels is None else [
        read_label_image(lp, f"labels {i + 1} ('{Path(lp).name}')", subjects[i].grid) for i, lp in enumerate(labels)]
    out = check_output_dir(out_dir, overwrite=False)
    rank, world = distributed()
    cfg = rank_config(cfg, world)
    grid = subjects[0].grid
    n = len(subjects)
    tmp = out.parent / f".{out.name}.partial-template"
    prog = Progress(progress)
    steps = n * (iterations + 1)
    done = [0]

    def tick(i: int, message: str) -> None:
        prog((done[0] + i) / steps, message)

    try:
        barrier(world)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / ".work").mkdir(parents=True)
        barrier(world)
        history: list[dict] = []
        pictures: list[tuple[str, Image]] = []

        # 1. affine average
        t0 = time.perf_counter()
        aff_cfg = dataclasses.replace(cfg, mode="affine")

        def affine_one(i: int, subject: Image):
            tick(i, f"affine: subject {i + 1}/{n}")
            res = register(subjects[0], subject, aff_cfg)
            return res.transform.affine, warp_image(subject, grid, res.transform, "linear").array

        aff = map_over_ranks(subjects, affine_one, world, rank)
        done[0] += n
        a_bar = np.mean([a for a, _ in aff], axis=0)
        mean0 = Image(np.mean([w for _, w in aff], axis=0).astype(np.float32), grid, "template")
        template = warp_image(mean0, grid, SpatialTransform(np.linalg.inv(a_bar)), "linear")
        history.append({"pass": 0, "kind": "affine average", "seconds": round(time.perf_counter() - t0, 3),
                        "mean_affine_lps": np.round(a_bar, 6).tolist()})
        pictures.append(("affine", template))
        # each pass starts every subject from its previous affine (no new initialization search)
        starts = [a @ np.linalg.inv(a_bar) for a, _ in aff]

        # 2. deformable passes
        final_runs: list = []
        for k in range(1, iterations + 1):
            t0 = time.perf_counter()
            last = k == iterations
            tpath = tmp / ".work" / f"template_{k}.nii.gz"
            if rank == 0:
                write_image(template, tpath)
                (tmp / ".work" / f"pass_{k}").mkdir()
            barrier(world)

            def deform_one(i: int, path: Path, k=k, last=last, tpath=tpath):
                tick(i, f"pass {k}/{iterations}: subject {i + 1}/{n}")
                folder = tmp / f"subject_{i:04d}" if last else tmp / ".work" / f"pass_{k}" / f"subject_{i:04d}"
                # warped.nii.gz in the subject folders of the last pass only (the passes warp the subject here)
                run = run_registration(tpath, path, folder, cfg, write_png=write_png and last,
                                       initial_affine=starts[i], warped="full" if last else "none")
                with torch.no_grad():
                    disp = run.result.transform.total_displacement(grid).numpy()
                warped = warp_image(subjects[i], grid, run.result.transform, "linear").array
                wl = None
                if last and label_maps is not None:
                    wl = warp_image(label_maps[i], grid, run.result.transform, "nearest")
                    write_image(wl, folder / "warped_labels.nii.gz")
                    wl = wl.array
                return (warped, disp, wl, run.report["similarity"]["ncc_after"], run.result.transform.affine,
                        quality_fields(run.report))

            results = map_over_ranks(paths, deform_one, world, rank)
            done[0] += n
            starts = [r[4] for r in results]
            d_bar = torch.as_tensor(np.mean([r[1] for r in results], axis=0))
            norm = d_bar.norm(dim=1)
            mean_img = Image(np.mean([r[0] for r in results], axis=0).astype(np.float32), grid, "template")
            entry = {"pass": k, "kind": "deformable", "mean_displacement_mm": float(norm.mean()),
                     "max_mean_displacement_mm": float(norm.max()),
                     "subject_displacement_mm": [float(np.linalg.norm(r[1], axis=1).mean()) for r in results],
                     "ncc_after": [r[3] for r in results], "quality": [r[5]["quality"] for r in results]}
            if last:
                final_runs = results
            else:
                v = inverse_displacement(d_bar, grid)
                new = warp_image(mean_img, grid, SpatialTransform(np.eye(4), v[0].numpy(), grid), "linear")
                entry["template_change_rms"] = float(np.sqrt(np.mean((new.array - template.array) ** 2)))
                template = new
                pictures.append((f"pass {k}", template))
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(entry)
            logger.info("template pass %d: mean displacement %.3f mm", k, entry["mean_displacement_mm"])

        agreement = None
        if rank == 0:
            write_image(template, tmp / "template.nii.gz")
            if label_maps is not None:
                maps = [r[2] for r in final_runs]
                fused = majority_vote(maps)
                write_image(Image(fused, grid, "labels"), tmp / "labels.nii.gz")
                agreement = label_agreement(maps, fused)
            report = {"subjects": [str(p) for p in paths], "labels": None if labels is None else [str(p) for p in labels],
                      "iterations": history, "label_agreement": agreement,
                      "quality": {"counts": quality_counts([r[5] for r in final_runs]),
                                  "subjects": [{"subject": i, **r[5]} for i, r in enumerate(final_runs)]}, "parameters": cfg.to_dict(),
                      "processes": world, "template_grid": grid.to_dict(),
                      "conventions": "subject_XXXX/transform.h5 maps template points to subject points (LPS mm); "
                                     "warping the subject with it puts it onto the template"}
            (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
            if write_png:
                draw_template_report(pictures, tmp / "template.png")
            shutil.rmtree(tmp / ".work")
            os.rename(tmp, out)
        agreement = all_gather(agreement, world)[0]
        barrier(world)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog(1.0, "done")
    return TemplateResult(out, history, agreement)
