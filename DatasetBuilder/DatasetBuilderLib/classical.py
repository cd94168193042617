"""Algorithmic ground truth: a pair's transform from classical registration (the engine's own optimization).

Flagged ``"kind": "algorithmic"`` in the pair's gold standard, never mistaken for expert or synthetic truth,
with its quality scores: global NCC before/after, % folding, and mean Dice of the pair's labels through the
transform when both cases have label maps. Stored as ITK ``.h5`` (fixed → moving, LPS) next to the pair.
ANTs / elastix are not used by this version.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)


@dataclass
class ClassicalOptions:
    """Engine settings for the algorithmic ground truth (kept small: it runs once per pair).

    Attributes:
        spacing: Working voxel size, mm. iterations / affine_iterations: optimizer iterations.
        threads: CPU threads (1 keeps runs reproducible and the machine usable).
    """

    spacing: float = 4.0
    iterations: int = 20
    affine_iterations: int = 30
    threads: int = 1


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels present in ``a`` (0 = background)."""
    scores = []
    for label in np.unique(a[a > 0]):
        x, y = a == label, b == label
        scores.append(2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1))
    return float(np.mean(scores)) if scores else float("nan")


def register_pair(out: Path, fixed: dict, moving: dict, transform_rel: str, opts: ClassicalOptions) -> dict:
    """Registers a pair of written cases, stores the transform and returns its gold-standard entry.

    Args:
        out: Dataset folder.
        fixed, moving: Dataset entries (``image``, optional ``label`` paths relative to ``out``).
        transform_rel: Where to store the ``.h5`` (relative to ``out``).
        opts: Engine settings.
    """
    from DeepRegistrationLib.config import RegistrationConfig
    from DeepRegistrationLib.io import read_image
    from DeepRegistrationLib.pipeline import register

    from .writer import write_transform

    config = RegistrationConfig(spacing=opts.spacing, iterations=opts.iterations,
                                affine_iterations=opts.affine_iterations, threads=opts.threads, device="cpu", seed=0)
    result = register(read_image(out / fixed["image"], "fixed image"), read_image(out / moving["image"], "moving image"),
                      config)
    transform = result.transform.to_sitk()
    write_transform(out / transform_rel, transform)
    quality = {"ncc_before": round(result.ncc_before, 6), "ncc_after": round(result.ncc_after, 6),
               "folding_percent": round(result.folding_percent, 6)}
    if "label" in fixed and "label" in moving:
        fl = sitk.ReadImage(str(out / fixed["label"]))
        ml = sitk.ReadImage(str(out / moving["label"]))
        warped = sitk.Resample(ml, fl, sitk.ReadTransform(str(out / transform_rel)), sitk.sitkNearestNeighbor, 0)
        fa = sitk.GetArrayFromImage(fl)
        moved_identity = sitk.Resample(ml, fl, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        quality["dice_before"] = round(_dice(fa, sitk.GetArrayFromImage(moved_identity)), 6)
        quality["dice_after"] = round(_dice(fa, sitk.GetArrayFromImage(warped)), 6)
    logger.info("classical ground truth: NCC %.3f -> %.3f", result.ncc_before, result.ncc_after)
    return {"kind": "algorithmic", "method": "DeepRegistration instance optimization", "transform": transform_rel,
            "direction": "fixed->moving", "frame": "LPS", "quality": quality,
            "settings": {"spacing_mm": opts.spacing, "iterations": opts.iterations,
                         "affine_iterations": opts.affine_iterations}}
