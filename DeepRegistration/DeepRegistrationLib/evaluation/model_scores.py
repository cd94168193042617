"""Scoring a learned model (``deepregistration evaluate --model``): on seeded synthetic pairs and on one
labelled pair of images against the engine's other modes.

Dice is the mean over the fixed labels of :func:`~DeepRegistrationLib.evaluation.metrics.label_scores`
(moving labels warped with nearest neighbour onto the fixed image's grid); folding in % of the working grid.
"""
from __future__ import annotations

import time

import torch

from ..core.config import RegistrationConfig
from ..core.image import Image
from ..spatial.resampling import warp_image
from ..spatial.transforms import SpatialTransform
from .metrics import label_scores

__all__ = ["evaluate_synthetic", "evaluate_pair"]


def evaluate_synthetic(model, cfg_shape, spacing: float, pairs: int, seed: int = 123, same_contrast: bool = False,
                       max_displacement_mm: float = 8.0) -> dict:
    """Mean Dice (identity and model alone), folding % and seconds per pair on seeded synthetic pairs
    (one contrast per pair with ``same_contrast``, else one per image: multimodal).

    Args:
        model: The network (:class:`~DeepRegistrationLib.learning.networks.UNetFieldPredictor`).
        cfg_shape: Synthetic image shape ``(Z, Y, X)`` in voxels (the card's training recipe).
        spacing: Voxel size of the synthetic images in mm (isotropic).
        pairs: Number of pairs, seeds ``seed … seed + pairs - 1``.
        max_displacement_mm: Largest synthetic displacement, mm.

    Returns:
        :func:`~DeepRegistrationLib.learning.training.validate`'s dict plus ``seconds_per_pair``.
    """
    from ..learning.training import TrainConfig, synth_pairs, validate

    cfg = TrainConfig(shape=tuple(cfg_shape), spacing=spacing, same_contrast=same_contrast,
                      max_displacement_mm=max_displacement_mm)
    batches = [synth_pairs(cfg, seed + i).sample(1) for i in range(pairs)]
    t = time.perf_counter()
    out = validate(model, batches)
    out["seconds_per_pair"] = (time.perf_counter() - t) / max(pairs, 1)
    return out


def evaluate_pair(model, fixed_path, moving_path, flab_path, mlab_path, spacing: float,
                  threads: int = 2, similarity: str = "lncc") -> dict:
    """Dice / folding / seconds on one labelled pair for: none, affine only, IO, model alone, model + IO
    (the affine stage and IO with ``similarity``).

    Args:
        model: A :class:`~DeepRegistrationLib.registration.pipeline.FieldPredictor` (``LoadedModel.predictor()``).
        fixed_path / moving_path / flab_path / mlab_path: The images and their label maps (any format
            :func:`~DeepRegistrationLib.io.images.read_image` reads).
        spacing: Working spacing of the registrations, mm.

    Returns:
        ``{"no_registration": {"dice"}, "affine_only" | "instance_optimization" | "model_alone" |
        "model_plus_io": {"dice", "folding_percent", "seconds"}}``: mean Dice over the fixed labels, folding in %
        of the working grid, wall seconds of the registration.
    """
    from ..io.images import read_image, read_label_image
    from ..registration.pipeline import register

    fixed, moving = read_image(fixed_path, "fixed image"), read_image(moving_path, "moving image")
    flab = read_label_image(flab_path, "fixed labels", fixed.grid)
    mlab = read_label_image(mlab_path, "moving labels", moving.grid)
    cfg = RegistrationConfig(spacing=spacing, threads=threads, similarity=similarity)
    zero = _ZeroPredictor()
    runs = {"affine_only": dict(predictor=zero, predictor_mode="replace"), "instance_optimization": {},
            "model_alone": dict(predictor=model, predictor_mode="replace"),
            "model_plus_io": dict(predictor=model, predictor_mode="init")}
    out = {"no_registration": {"dice": _dice(flab, mlab, SpatialTransform.identity())}}
    for name, kw in runs.items():
        t = time.perf_counter()
        res = register(fixed, moving, cfg, **kw)
        seconds = time.perf_counter() - t
        out[name] = {"dice": _dice(flab, mlab, res.transform), "folding_percent": res.folding_percent,
                     "seconds": round(seconds, 2)}
    return out


def _dice(flab: Image, mlab: Image, transform: SpatialTransform) -> float:
    """Mean Dice of the fixed labels and the moving labels warped by ``transform`` (nearest neighbour)."""
    warped = warp_image(mlab, flab.grid, transform, "nearest")
    return label_scores(flab.array, warped.array, None)["dice_mean"]


class _ZeroPredictor:
    """A predictor of the zero field: ``predictor_mode="replace"`` with it gives the affine stage alone."""

    def predict(self, fixed, moving, grid):
        return torch.zeros(1, 3, *fixed.shape[2:], dtype=fixed.dtype, device=fixed.device)
