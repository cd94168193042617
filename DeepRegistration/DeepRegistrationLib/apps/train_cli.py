"""Command-line front end of the learned engine: ``train``, ``models list`` and ``evaluate``.

:func:`add_subparsers` adds the three commands to ``deepregistration``'s sub-parsers; :func:`run` executes
a parsed command and returns the exit status (errors of the engine are left to the caller, which prints
them). Results go to stdout as text or JSON; progress goes through :mod:`logging`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

COMMANDS = ("train", "models", "evaluate")


def add_subparsers(subparsers) -> None:
    """Adds ``train``, ``models`` and ``evaluate`` to an ``argparse`` sub-parsers object."""
    from ..learning.networks import INPUT_FEATURES
    from ..learning.training import TRAINING_MODES, TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train a field predictor (synthetic SynthMorph-style pairs or a "
                                            "Learn2Reg-layout dataset)",
                              description="Train a registration network; checkpoints let a run resume, and the "
                                          "final model is written as NAME.json + NAME.safetensors.")
    p.add_argument("--name", default=d.model_name, help="model name (default: %(default)s)")
    p.add_argument("-o", "--output-dir", metavar="DIR",
                   help="run folder for checkpoints and models (default: <user models folder>/runs/NAME)")
    p.add_argument("--install", action="store_true",
                   help="also copy the final model into the user models folder (it then appears in 'models list')")
    p.add_argument("--mode", choices=TRAINING_MODES, default=d.mode, help="loss (default: %(default)s)")
    p.add_argument("--similarity", choices=("lncc", "mi", "mse"), default=d.similarity)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--shape", type=int, nargs=3, default=list(d.shape), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, default=d.spacing, help="working spacing in mm (default: %(default)s)")
    p.add_argument("--channels", type=int, nargs="+", help="features per level (default: from --shape)")
    p.add_argument("--block", choices=("conv", "separable"), default=d.block)
    p.add_argument("--output", choices=("displacement", "svf"), default=d.output)
    p.add_argument("--reg-weight", type=float, default=d.reg_weight)
    p.add_argument("--dice-weight", type=float, default=d.dice_weight)
    p.add_argument("--supervised-weight", type=float, default=d.supervised_weight)
    p.add_argument("--seg-weight", type=float, default=d.seg_weight,
                   help="weight of the segmentation head's loss (mode multi-task; classes = --num-labels)")
    p.add_argument("--max-displacement", type=float, default=d.max_displacement_mm, metavar="MM")
    p.add_argument("--num-labels", type=int, default=d.num_labels)
    p.add_argument("--same-contrast", action="store_true", help="mono-modal synthetic pairs")
    p.add_argument("--dataset", metavar="DIR",
                   help="train on a Learn2Reg-layout dataset (e.g. DatasetBuilder output) instead of synthetic pairs")
    p.add_argument("--dataset-pairs", default="training_paired_images",
                   choices=("training_paired_images", "registration_val", "registration_test"),
                   help="pair list of --dataset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--val-pairs", type=int, default=d.val_pairs)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--input-features", choices=INPUT_FEATURES, default=d.input_features,
                   help="what the network sees: the intensities, or their local contrast (the same for a T1 and a "
                        "T2-like image of one anatomy; default: %(default)s)")
    p.add_argument("--init-model", metavar="NAME|PATH", help="fine-tune from this model")
    p.add_argument("--pseudo-labels-after", type=int, default=0, metavar="STEP",
                   help="multi-task: after STEP steps, images without labels take the segmentation head's labels "
                        "(self-training on unlabeled cases; default 0 = off)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the run folder")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--machine-progress", action="store_true",
                   help="JSON progress/message/result/error lines on stdout for a parent process (see "
                        "DeepRegistrationLib.core.jobs) instead of a progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard logs to the run folder's tensorboard/ (needs the tensorboard package)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")

    m = subparsers.add_parser("models", help="list the shipped and user models")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="list models (name, source, path, status)")
    ml.add_argument("--json", action="store_true", help="machine-readable output")
    for parser in (m, ml):
        parser.add_argument("-v", "--verbose", action="store_true", help="log details")

    e = subparsers.add_parser("evaluate", help="score a model / the engine on a Learn2Reg dataset, a pair or "
                                               "synthetic pairs",
                              description="A Learn2Reg-layout dataset (--dataset): Dice, HD95, TRE, folding, SDlogJ "
                                          "and time per pair of no registration, instance optimization (IO) alone, "
                                          "model alone and model + IO, with summaries (30th-percentile Dice), "
                                          "written as evaluation.json/.md/.png. Synthetic pairs: Dice and folding "
                                          "of the model alone vs no registration. A labelled pair: Dice, folding "
                                          "and time of affine only, IO alone, model alone and model + IO.")
    e.add_argument("--model", metavar="NAME|PATH", help="model to score (needed except for --dataset)")
    e.add_argument("--dataset", metavar="DIR", help="Learn2Reg-layout dataset folder (e.g. DatasetBuilder output)")
    e.add_argument("--pairs", default="registration_val",
                   choices=("registration_val", "registration_test", "training_paired_images"),
                   help="pair list of --dataset (default: %(default)s)")
    e.add_argument("--methods", nargs="+", choices=("none", "io", "model", "model+io"),
                   help="methods for --dataset (default: none io, plus model model+io with --model)")
    e.add_argument("--max-pairs", type=int, metavar="N", help="only the first N pairs of --dataset")
    e.add_argument("--iterations", type=int, help="IO iterations per level (default: the engine's)")
    e.add_argument("--similarity", choices=("lncc", "mi", "mse"), default="lncc",
                   help="IO similarity for --dataset: lncc (same contrast, default) or mi (e.g. CT/MR pairs)")
    e.add_argument("-o", "--out", metavar="DIR", help="where --dataset writes evaluation.json/.md/.png")
    e.add_argument("--overwrite", action="store_true", help="replace an existing evaluation in --out")
    e.add_argument("--synthetic", type=int, default=0, metavar="N", help="evaluate on N synthetic pairs")
    e.add_argument("--pair", nargs=4, metavar=("FIXED", "MOVING", "FIXED_LABELS", "MOVING_LABELS"))
    e.add_argument("--spacing", type=float, help="working spacing in mm (default: the model card's)")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.add_argument("-v", "--verbose", action="store_true", help="log details")


def run(args: argparse.Namespace) -> int:
    """Runs ``train``, ``models`` or ``evaluate``; returns the exit status (0 = success)."""
    if args.command == "train":
        return _train(args)
    if args.command == "models":
        return _models(args)
    if args.command == "evaluate":
        return _evaluate(args)
    raise ValueError(f"not a learned-engine command: {args.command!r}")


def _train(args: argparse.Namespace) -> int:
    from ..learning.model_files import load_model, save_model
    from ..learning.registry import user_models_dir
    from ..learning.training import TrainConfig, train

    out = Path(args.output_dir) if args.output_dir else user_models_dir() / "runs" / args.name
    cfg = TrainConfig(mode=args.mode, similarity=args.similarity, reg_weight=args.reg_weight,
                      dice_weight=args.dice_weight, supervised_weight=args.supervised_weight,
                      seg_weight=args.seg_weight, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, shape=tuple(args.shape), spacing=args.spacing,
                      channels=tuple(args.channels) if args.channels else None, block=args.block, output=args.output,
                      max_displacement_mm=args.max_displacement, num_labels=args.num_labels,
                      same_contrast=args.same_contrast, input_features=args.input_features, seed=args.seed,
                      val_every=args.val_every, val_pairs=args.val_pairs, checkpoint_every=args.checkpoint_every,
                      output_dir=str(out),
                      model_name=args.name, init_model=args.init_model, amp=not args.no_amp, device=args.device,
                      dataset=args.dataset, dataset_pairs=args.dataset_pairs, tensorboard=args.tensorboard,
                      pseudo_labels_after=args.pseudo_labels_after)
    machine = getattr(args, "machine_progress", False)
    from ..core import jobs
    from ..core.errors import Cancelled, DeepRegistrationError

    emitter = jobs.Emitter(sys.stdout, min_step=0.005) if machine else None
    jobs.watch_stdin(grace=2.0)  # started by a Job: a Cancel (closed stdin) stops it, keeping the checkpoint
    bar = None
    if not machine:
        try:
            from tqdm import tqdm
        except ImportError:  # optional (3D Slicer bundles no tqdm): plain log lines instead of a bar
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=cfg.steps, unit="step", desc=f"train {args.name}", file=sys.stderr)
    last = [-1.0, -1.0]  # fraction of the last PROGRESS line, of the last plain log line

    def progress(fraction: float, message: str) -> bool | None:
        if emitter is not None and emitter(fraction, message) is False:
            return False  # the parent cancelled: train() writes a checkpoint and raises Cancelled
        if bar is not None:
            step = int(round(fraction * cfg.steps))
            if step > bar.n:
                bar.update(step - bar.n)
                bar.set_postfix_str(message.split(", ")[-1])
        elif not machine and (fraction - last[1] >= 0.05 or fraction >= 1.0):
            last[1] = fraction
            logger.info("train %s: %3.0f%% %s", args.name, 100 * fraction, message)
        logger.debug("%3.0f%% %s", 100 * fraction, message)

    try:
        result = train(cfg, progress=progress, resume=not args.no_resume)
    except DeepRegistrationError as exc:
        if emitter is not None:
            emitter.error(str(exc), "cancelled" if isinstance(exc, Cancelled) else "input")
        raise
    finally:
        if bar is not None:
            bar.close()
    if result.model_path is None:  # a non-zero rank of a distributed run
        return 0
    best = result.best_model_path or result.model_path
    identity = result.validation[-1].get("dice_identity") if result.validation else None
    if identity is not None and not result.best_metric > identity + 0.001:
        warning = (f"the model has not learned to register yet: its best validation Dice "
                   f"({result.best_metric:.4f}) is not above no registration's ({identity:.4f}). Train longer "
                   "(--steps, or rerun to resume), or check the mode and the data.")
        sys.stderr.write(f"warning: {warning}\n")
        if emitter is not None:
            emitter.message(warning, "warning")
    if args.install:
        try:
            with jobs.commit():  # a Cancel before this point installs nothing; once begun, the install completes
                loaded = load_model(best)
                card = dict(loaded.card, name=args.name)
                installed = save_model(loaded.model, user_models_dir() / args.name, card)
        except Cancelled as exc:
            if emitter is not None:
                emitter.error(str(exc), "cancelled")
            raise
        logger.info("installed %s as '%s' (%s)", best.name, args.name, installed)
    summary = {"model": str(result.model_path), "best_model": str(best), "steps": result.step,
               "final_loss": float(np.mean(result.losses[-10:])), "best_dice": result.best_metric,
               "dice_no_registration": identity, "seconds": round(result.seconds, 1)}
    if emitter is not None:
        emitter.result(summary)
    else:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..learning.registry import list_models

    if getattr(args, "models_command", None) != "list":
        sys.stderr.write("usage: deepregistration models list [--json]\n")
        return 2
    entries = [e.summary() for e in list_models()]
    if args.json:
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
    else:
        for e in entries:
            status = "ok" if e["ok"] else f"UNUSABLE: {e['error']}"
            sys.stdout.write(f"{e['name']:24s} {e['source']:8s} {status:10s} {e['path']}\n")
        if not entries:
            sys.stdout.write("no models installed\n")
    return 0


def _evaluate_dataset(args: argparse.Namespace) -> int:
    from ..core.config import RegistrationConfig
    from ..core.errors import InputError
    from ..evaluation.datasets import check_report_folder, evaluate_dataset, write_report
    from ..learning.model_files import working_spacing
    from ..learning.registry import load

    if not args.out:
        raise InputError("evaluate --dataset needs an output folder: -o DIR")
    out = Path(args.out)
    check_report_folder(out, args.overwrite)
    loaded = load(args.model) if args.model else None
    spacing = working_spacing(loaded, args.spacing)
    cfg = RegistrationConfig(spacing=spacing, similarity=args.similarity,
                             **({"iterations": args.iterations} if args.iterations else {}))
    if loaded is not None:
        from ..learning.registry import usage_warning

        warning = usage_warning(loaded.card, cfg.similarity)
        if warning:
            sys.stderr.write(f"warning: {warning}\n")

    def progress(fraction: float, message: str) -> None:
        logger.info("%3.0f%% %s", 100 * fraction, message)

    result = evaluate_dataset(args.dataset, args.pairs, loaded.predictor() if loaded else None, cfg,
                              tuple(args.methods) if args.methods else None, args.max_pairs, progress)
    result["model"] = str(loaded.card_path) if loaded else None
    paths = write_report(result, out, overwrite=args.overwrite)
    for m in result["methods"]:
        s = result["summary"][m]
        sys.stdout.write(f"{m:9s} Dice {s['dice']['mean']:.3f} (p30 {s['dice']['p30']:.3f})  "
                         f"TRE {s['tre']['mean']:.2f} mm  folding {s['folding_percent']['mean']:.4f} %  "
                         f"{s['seconds']['mean']:.2f} s/pair\n")
    sys.stdout.write(f"report: {paths[1]}\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.model_scores import evaluate_pair, evaluate_synthetic
    from ..learning.model_files import working_spacing
    from ..learning.registry import load

    if args.dataset:
        return _evaluate_dataset(args)
    if not args.model:
        sys.stderr.write("evaluate: give --model NAME|PATH (or --dataset DIR to score the engine alone)\n")
        return 2
    loaded = load(args.model)
    spacing = working_spacing(loaded, args.spacing)
    result: dict = {"model": str(loaded.card_path), "spacing_mm": spacing}
    if args.synthetic:
        recipe = loaded.card.get("training", {}).get("recipe", {})
        result["synthetic"] = evaluate_synthetic(loaded.model, recipe.get("shape", [32, 32, 32]), spacing,
                                                 args.synthetic, same_contrast=bool(recipe.get("same_contrast")),
                                                 max_displacement_mm=float(recipe.get("max_displacement_mm", 8.0)))
    if args.pair:
        result["pair"] = evaluate_pair(loaded.model, *args.pair, spacing=spacing)
    if not args.synthetic and not args.pair:
        sys.stderr.write("evaluate: give --synthetic N and/or --pair FIXED MOVING FIXED_LABELS MOVING_LABELS\n")
        return 2
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
