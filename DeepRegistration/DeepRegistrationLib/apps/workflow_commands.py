"""The ``register-batch``, ``register-sequence`` and ``template`` subcommands (argparse only at import).

    deepregistration register-batch PAIRS.csv -o OUT [registration options]
    deepregistration register-sequence SEQUENCE -o OUT [--reference N|mean] [--chain] [registration options]
    deepregistration template IMAGE... -o OUT [--iterations K] [--labels LABEL...] [registration options]

Each takes the ``register`` command's registration and learned-model options (same names and defaults).
Under ``torchrun --nnodes N --nproc-per-node G -m DeepRegistrationLib.apps.cli register-batch ...`` the work is
split over the ranks (see :mod:`DeepRegistrationLib.workflows.batch`).
Exit status: 0 success; 2 bad input; 3 (register-batch) some pairs failed, listed in the summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.config import WARPED_CHOICES
from .options import copy_registration_options
from .register_command import config_from_args

COMMANDS = ("register-batch", "register-sequence", "template")

BATCH_EPILOG = """\
PAIRS.csv: a header line, then one line per pair; relative paths start from the CSV's folder:
  fixed,moving,fixed_labels,moving_labels,name
  sub01_t0.nii.gz,sub01_t1.nii.gz,,,sub01
outputs: OUT/<name>/ (the files of a 'register' OUTDIR), OUT/summary.json, OUT/summary.csv, OUT/batch.json.
Rerun the same command to resume: complete pairs are skipped, failed ones retried.
multi-node: run on every node (OUT on a shared file system; one rank per GPU, or CPU processes):
  torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m DeepRegistrationLib.apps.cli register-batch pairs.csv -o /shared/out
"""


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--no-png", action="store_true", help="skip the report PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def add_subparsers(sub) -> None:
    """Adds the three subcommands (after ``register``, whose options they share)."""
    register_parser = sub.choices.get("register")
    b = sub.add_parser("register-batch", help="register every pair of a CSV in one process (resumable; torchrun)",
                       description="Register many pairs in one process: per-pair outputs like 'register', a "
                                   "summary, failing pairs reported, resume on rerun, rows split over torchrun "
                                   "ranks.", epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("pairs", metavar="PAIRS.csv", help="CSV with columns fixed,moving[,fixed_labels,moving_labels,"
                   "fixed_landmarks,moving_landmarks,name]")
    _output_options(b)
    b.add_argument("--warped", choices=WARPED_CHOICES, default="auto",
                   help="each pair's warped.nii.gz, as 'register --warped' (default: auto)")
    copy_registration_options(b, register_parser)

    s = sub.add_parser("register-sequence", help="motion-correct a 4D sequence (every frame onto a reference)",
                       description="Register every frame of a 4D image (or a folder of 3D volumes, sorted "
                                   "naturally) onto a reference frame; each frame's field starts from its "
                                   "neighbour's (warm start).")
    s.add_argument("sequence", metavar="SEQUENCE", help="4D NIfTI/NRRD file, or a folder of 3D volumes")
    s.add_argument("--reference", default="0", metavar="N|mean",
                   help="reference frame index (0-based) or 'mean' (the mean frame) (default: 0)")
    s.add_argument("--chain", action="store_true", help="register each frame to its neighbour and compose "
                   "(for large motion), then refine against the reference")
    _output_options(s)
    copy_registration_options(s, register_parser)

    t = sub.add_parser("template", help="build an unbiased template from several images",
                       description="Unbiased iterative template building: affine average, then deformable "
                                   "passes (register all to the template, average, apply the inverse of the "
                                   "mean deformation).")
    t.add_argument("images", nargs="+", metavar="IMAGE", help="subject images (at least 2)")
    t.add_argument("--iterations", dest="template_iterations", type=int, default=3, metavar="K",
                   help="deformable template passes (default: %(default)s)")
    t.add_argument("--labels", nargs="+", metavar="LABEL", help="one label map per image: majority-vote fusion "
                   "in template space (labels.nii.gz)")
    _output_options(t)
    copy_registration_options(t, register_parser, skip=("iterations",))  # --iterations: template iterations
    t.set_defaults(iterations=None)


class _Lines:
    """Progress as one line per new message on stderr (readable in logs of many processes)."""

    def __init__(self, enabled: bool, prefix: str = ""):
        self.enabled, self.prefix, self.last = enabled, prefix, None

    def __call__(self, fraction: float, message: str) -> bool:
        head = message.split(":")[0]
        if self.enabled and head != self.last:
            self.last = head
            sys.stderr.write(f"{self.prefix}[{100 * fraction:5.1f}%] {message}\n")
        return True


def run(args: argparse.Namespace) -> int:
    """Runs one of the three subcommands; returns the exit status (errors are raised)."""
    import os

    cfg, predictor = config_from_args(args)
    rank = int(os.environ.get("RANK", "0"))
    lines = _Lines(not args.quiet, f"rank {rank} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
    mode = getattr(args, "model_mode", "init")
    if args.command == "register-batch":
        from ..workflows.batch import read_pairs, run_batch

        pairs = read_pairs(args.pairs)
        summary = run_batch(pairs, args.output, cfg, write_png=not args.no_png, progress=lines,
                            predictor=predictor, predictor_mode=mode, warped=args.warped)
        if rank == 0:
            ok = len(summary.rows) - len(summary.failed)
            print(f"outputs: {summary.out_dir} ({ok}/{len(summary.rows)} pairs ok)")
            print(_quality_line(summary.out_dir / "summary.json", ("quality",)))
            for r in summary.failed:
                print(f"  {r['name']}: {r['status']}: {r.get('error')}")
        return 3 if summary.failed else 0
    if args.command == "register-sequence":
        from ..workflows.sequence import register_sequence

        result = register_sequence(args.sequence, args.output, cfg, reference=args.reference, chain=args.chain,
                                   write_png=not args.no_png, progress=lines, predictor=predictor,
                                   predictor_mode=mode)
        if rank == 0:
            print(f"outputs: {result.out_dir} ({len(result.frames)} frames)")
            print(_quality_line(Path(result.out_dir) / "sequence.json", ("quality",)))
        return 0
    from ..workflows.template import build_template

    result = build_template(args.images, args.output, cfg, iterations=args.template_iterations,
                            labels=args.labels, write_png=not args.no_png, progress=lines)
    if rank == 0:
        print(f"outputs: {result.out_dir} (mean deformation {result.iterations[-1]['mean_displacement_mm']:.3f} mm)")
        print(_quality_line(Path(result.out_dir) / "report.json", ("quality", "counts")))
    return 0


def _quality_line(summary_json: Path, keys: tuple) -> str:
    """``quality: 3 ok, 1 suspect, 0 failed`` from the verdict counts a workflow wrote into its summary JSON."""
    import json

    counts = json.loads(Path(summary_json).read_text())
    for k in keys:
        counts = counts.get(k) or {}
    return "quality: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
