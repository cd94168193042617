"""The ``register`` command (``deepregistration register FIXED MOVING -o OUTDIR``) run on parsed arguments: one
public function that the command line and ``pacs register`` call (argparse and the standard library only at
import; the engine is imported when the command runs).
"""
from __future__ import annotations

import argparse
import sys


class _Bar:
    """A text progress bar on stderr (tqdm) labelled ``desc``, left on screen when done with ``leave``; or nothing
    (``enabled`` False). Called as the engine's progress callback, ``bar(fraction, message)``."""

    def __init__(self, enabled: bool, desc: str = "registering", leave: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=100, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed} {postfix}",
                            desc=desc, leave=leave)

    def __call__(self, fraction: float, message: str) -> bool:
        if self.bar is not None:
            self.bar.n = round(100 * fraction, 1)
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.refresh()
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def register_command(args: argparse.Namespace) -> int:
    """Runs the ``register`` command on its parsed arguments (the namespace of
    :func:`~DeepRegistrationLib.apps.cli.build_parser`'s ``register``; ``pacs register`` fills one per pair).

    Prints the output folder and the report summary on stdout and a progress bar on stderr (unless ``quiet``).
    Returns the exit status: 0, or 3 when ``fail_on`` is set and the quality verdict is that or worse. Raises the
    engine's errors (:class:`~DeepRegistrationLib.core.errors.InputError`, ``Cancelled``…) for the caller to print.
    """
    from ..registration.run import check_output_dir, run_registration, summary_lines

    check_output_dir(args.output, args.overwrite)
    cfg, predictor = config_from_args(args)
    bar = _Bar(not args.quiet)
    try:
        summary = run_registration(
            args.fixed, args.moving, args.output, cfg, fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
            fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
            fixed_landmarks=args.fixed_landmarks, moving_landmarks=args.moving_landmarks,
            guide_fixed_landmarks=(args.guide_landmarks or (None, None))[0],
            guide_moving_landmarks=(args.guide_landmarks or (None, None))[1],
            overwrite=args.overwrite, write_png=not args.no_png, progress=bar, predictor=predictor,
            predictor_mode=args.model_mode, explain=args.explain,
            uncertainty=args.uncertainty, warped=getattr(args, "warped", "auto"))
    finally:
        bar.close()
    print(f"outputs: {summary.out_dir}")
    for line in summary_lines(summary.report):
        print("  " + line)
    warped = summary.report["outputs"]["warped"]
    if warped["file"] is None:
        print(f"  warped.nii.gz not written: {warped['why']}; to write it: {warped['how']} "
              "(or register with --warped full)")
    return verdict_status(summary.report, getattr(args, "fail_on", None))


def config_from_args(args: argparse.Namespace):
    """``(RegistrationConfig, predictor | None)`` from the registration and learned-model options that
    ``register`` and the commands built on it share (:func:`~DeepRegistrationLib.apps.options.copy_registration_options`);
    an option a command does not offer takes the engine default.

    A model is checked against the mode before it loads
    (:func:`~DeepRegistrationLib.registration.predictors.check_predictor_use`), and its card's working spacing
    applies unless ``--spacing`` is given (:func:`~DeepRegistrationLib.learning.model_files.working_spacing`);
    a warning about the model's use goes to stderr. Raises ``InputError`` for a bad combination or model.
    """
    from ..core.config import RegistrationConfig
    from ..learning.model_files import working_spacing

    d = RegistrationConfig()
    loaded = predictor = None
    if getattr(args, "model", None):
        from ..learning import registry
        from ..registration.predictors import check_predictor_use

        check_predictor_use(args.mode, getattr(args, "model_mode", "init"))  # before loading
        loaded = registry.load(args.model)  # InputError for unknown, corrupt or tampered models
        predictor = loaded.predictor()

    def option(name: str):
        value = getattr(args, name, None)
        return getattr(d, name) if value is None else value

    cfg = RegistrationConfig(
        mode=args.mode, similarity=option("similarity"), regularization=option("regularization"),
        reg_weight=option("reg_weight"), spacing=working_spacing(loaded, getattr(args, "spacing", None)),
        iterations=option("iterations"), affine_iterations=option("affine_iterations"), levels=option("levels"),
        large_grid_voxels=option("large_grid_voxels"),
        diffeomorphic=bool(getattr(args, "diffeomorphic", False)), jacobian_weight=option("jacobian_weight"),
        initialization=option("initialization"), init_max_rotation=option("init_max_rotation"),
        device=option("device"), seed=option("seed"), guide_weight=option("guide_weight"),
        symmetric=bool(getattr(args, "symmetric", False)), threads=option("threads")).validate()
    if loaded is not None:
        from ..learning import registry

        warning = registry.usage_warning(loaded.card, cfg.similarity)
        if warning:
            sys.stderr.write(f"warning: {warning}\n")
    return cfg, predictor


def verdict_status(report: dict, fail_on: str | None) -> int:
    """3 when the report's quality verdict is ``fail_on`` ('suspect' or 'failed') or worse, else 0."""
    from ..evaluation.quality import VERDICTS

    verdict = (report.get("quality") or {}).get("verdict")
    if fail_on and verdict in VERDICTS and VERDICTS.index(verdict) >= VERDICTS.index(fail_on):
        return 3
    return 0
