"""Trains the small default model, reproducibly from a seed, and ships it only if it helps.

Recipe: a depthwise-separable SVF U-Net trained on SynthMorph-style synthetic pairs (random label maps,
a random contrast per pair, bias, noise, random diffeomorphic deformations) with the ``semi-supervised``
loss (LNCC + soft Dice of the warped labels + diffusion); no real image is seen. Each pair shares one
random contrast (``same_contrast``), and the network sees each image's local contrast
(``--input-features local-contrast``, the default: ``|I - local mean| / local std``), which any local linear
intensity map leaves unchanged — so a T1 and a T2-like (inverted) image of one anatomy give it the same
inputs, without multimodal training. What did not learn on the CPU budget (2 cores, 400-1200 steps, validation
Dice stayed at the identity's): the ``supervised`` loss (squared error to the known field), the Dice-only
``synthetic`` loss and MI + Dice with independent contrasts per image, LNCC of a shared-contrast rendering
while the network sees independent contrasts, and edge-map inputs trained that way; the LNCC loss on
same-contrast pairs moved off the identity within 200 steps (intensity inputs) or 800 (local contrast).
Uses CUDA when available, else the CPU (the card records which, the steps and the seconds).

After training (or with ``--from-run``, for the best model of an earlier run) the model is evaluated at its
working spacing on synthetic test pairs and on the bundled sample pair (``DeepRegistration/Resources/
SampleData``), as it is (LNCC) and with its moving image in a T2-like contrast (MI): no registration, affine
only, instance optimization (IO) alone, model alone (after the affine stage) and model + IO. It is written to
``DeepRegistration/Resources/Models/NAME.{json,safetensors}`` only when, on the bundled pair (and for a
local-contrast model also on its T2-like version), the model alone beats the affine stage alone by
``--min-gain`` Dice (the "model alone" run includes the affine stage, so beating no registration proves
nothing) and model + IO is not worse than IO alone by more than ``--tolerance``; otherwise nothing is shipped
and the numbers are printed.

Usage (from the repository root)::

    python scripts/train_default_model.py --steps 8000 --seed 0           # the shipped model (CPU: 30 min)
    python scripts/train_default_model.py --steps 300 --run-dir /tmp/run   # CPU smoke run
    python scripts/train_default_model.py --steps 8000 --from-run          # re-evaluate / ship an earlier run
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DeepRegistration"))

from DeepRegistrationLib.learning.model_files import load_model, save_model  # noqa: E402
from DeepRegistrationLib.learning.networks import INPUT_FEATURES  # noqa: E402
from DeepRegistrationLib.evaluation.model_scores import evaluate_pair, evaluate_synthetic  # noqa: E402
from DeepRegistrationLib.learning.training import TrainConfig, train  # noqa: E402

logger = logging.getLogger("train_default_model")
SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"
MODELS = ROOT / "DeepRegistration" / "Resources" / "Models"


def recipe(args: argparse.Namespace) -> TrainConfig:
    """The default model's recipe (everything else is TrainConfig's defaults)."""
    return TrainConfig(mode="semi-supervised", similarity="lncc", same_contrast=True, steps=args.steps,
                       batch_size=1, lr=args.lr, shape=(32, 32, 32), spacing=args.spacing, channels=(8, 16, 16, 16),
                       block="separable", output="svf", reg_weight=0.3, dice_weight=1.0, max_displacement_mm=20.0,
                       num_labels=16, label_scale=6.0, field_scale=8.0,
                       input_features=args.input_features,
                       seed=args.seed, val_every=max(args.steps // 10, 1), val_pairs=8,
                       checkpoint_every=max(args.steps // 10, 1), output_dir=str(args.run_dir),
                       model_name=args.name)


def inverted_moving(path: Path, out: Path) -> Path:
    """A T2-like version of the bundled moving image (intensities reversed inside the head, background dark),
    written to ``out``: the multimodal check of the shipping gate."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(image)
    inverted = sitk.GetImageFromArray(np.where(a > 0.1 * np.percentile(a, 99), a.max() - a, 0).astype(np.float32))
    inverted.CopyInformation(image)
    sitk.WriteImage(inverted, str(out))
    return out


def evaluate(loaded, cfg: TrainConfig, run_dir: Path) -> dict:
    """Synthetic test pairs (one contrast per pair / one per image) and the bundled pair, as is (LNCC) and with
    a T2-like moving image (MI), each at the model's spacing: none, affine only, IO, model alone, model + IO."""
    synthetic = {kind: evaluate_synthetic(loaded.model, cfg.shape, cfg.spacing, 8, seed=777, same_contrast=same,
                                          max_displacement_mm=cfg.max_displacement_mm)
                 for kind, same in (("same_contrast", True), ("multimodal", False))}
    labels = (SAMPLE / "fixed_labels.nii.gz", SAMPLE / "moving_labels.nii.gz")
    predictor = loaded.predictor()
    pair = evaluate_pair(predictor, SAMPLE / "fixed.nii.gz", SAMPLE / "moving.nii.gz", *labels, spacing=cfg.spacing)
    moving_t2 = inverted_moving(SAMPLE / "moving.nii.gz", run_dir / "moving_inverted.nii.gz")
    pair_t2 = evaluate_pair(predictor, SAMPLE / "fixed.nii.gz", moving_t2, *labels, spacing=cfg.spacing,
                            similarity="mi")
    return {"synthetic_test": synthetic, "bundled_pair": pair, "bundled_pair_inverted_mi": pair_t2}


def passes(pair: dict, min_gain: float, tolerance: float) -> bool:
    """The gate on one pair's results: the model alone beats the affine stage by ``min_gain``, and model + IO
    is not worse than IO alone by more than ``tolerance``."""
    return (pair["model_alone"]["dice"] >= pair["affine_only"]["dice"] + min_gain
            and pair["model_plus_io"]["dice"] >= pair["instance_optimization"]["dice"] - tolerance)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=3.0, help="working spacing of the model in mm")
    p.add_argument("--name", default="default")
    p.add_argument("--input-features", default="local-contrast", choices=INPUT_FEATURES,
                   help="what the network sees: the intensities, or their local contrast (networks.local_contrast: "
                        "unchanged by local linear intensity maps, an inverted contrast included; default)")
    p.add_argument("--run-dir", type=Path, default=ROOT / "build" / "default_model_run")
    p.add_argument("--from-run", action="store_true",
                   help="do not train: evaluate (and ship) the best model of an earlier run in --run-dir")
    p.add_argument("--tolerance", type=float, default=0.005, help="allowed Dice loss of model + IO vs IO alone")
    p.add_argument("--min-gain", type=float, default=0.01,
                   help="Dice the model alone must add to the affine stage alone (a near-zero field must not pass)")
    p.add_argument("--no-ship", action="store_true", help="evaluate only; never write Resources/Models")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = recipe(args)
    if args.from_run:
        chosen = next((c for c in (args.run_dir / f"{args.name}-best.json", args.run_dir / f"{args.name}.json")
                       if c.is_file()), None)
        if chosen is None:
            p.error(f"--from-run: no model '{args.name}' in {args.run_dir}")
    else:
        start = time.perf_counter()
        result = train(cfg, progress=lambda f, m: logger.info("%3.0f%% %s", 100 * f, m)
                       if round(f * cfg.steps) % 50 == 0 else None)
        logger.info("trained %d steps in %.0f s", result.step, time.perf_counter() - start)
        chosen = result.best_model_path or result.model_path
    loaded = load_model(chosen)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(loaded, cfg, args.run_dir)
    sys.stdout.write(json.dumps(dict(model=str(chosen), **metrics), indent=2) + "\n")

    gates = {"bundled_pair": metrics["bundled_pair"]}
    if loaded.model.input_features == "local-contrast":  # claimed to work across contrasts: checked there too
        gates["bundled_pair_inverted_mi"] = metrics["bundled_pair_inverted_mi"]
    failed = [name for name, pair in gates.items() if not passes(pair, args.min_gain, args.tolerance)]
    if failed:
        for name in failed:
            pair = gates[name]
            logger.warning("not shipping (%s): model alone %.4f vs affine only %.4f; model + IO %.4f vs IO %.4f", name,
                           pair["model_alone"]["dice"], pair["affine_only"]["dice"], pair["model_plus_io"]["dice"],
                           pair["instance_optimization"]["dice"])
        return 1
    if args.no_ship:
        return 0
    card = dict(loaded.card)
    card["training"] = dict(card["training"], recipe=dict(card["training"]["recipe"], output_dir=None))  # no local path
    card["metrics"] = dict(bundled_pair_spacing_mm=cfg.spacing, **metrics)
    if args.input_features == "local-contrast":
        card["description"] = ("SVF U-Net (depthwise-separable) trained only on synthetic SynthMorph-style pairs; it "
                               "sees each image's local contrast (unchanged by local linear intensity maps, an "
                               "inverted contrast included), so a T1 and a T2-like image look alike to it; meant as "
                               "the initialization of a short instance optimization.")
    else:
        card["description"] = ("SVF U-Net (depthwise-separable) trained only on synthetic SynthMorph-style pairs, "
                               "one random contrast per pair (any single contrast; not trained for multimodal "
                               "pairs); meant as the initialization of a short instance optimization.")
    MODELS.mkdir(parents=True, exist_ok=True)
    out = save_model(loaded.model, MODELS / args.name, card)
    logger.info("shipped %s (%d bytes of weights)", out, out.with_suffix(".safetensors").stat().st_size)
    shutil.copy2(out, args.run_dir / f"{args.name}-shipped.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
