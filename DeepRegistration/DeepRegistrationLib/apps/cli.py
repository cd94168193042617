"""The ``deepregistration`` command.

    deepregistration register FIXED MOVING -o OUTDIR [options]

Exit status: 0 success (whatever the quality verdict, unless --fail-on); 2 bad input or options (one message
on stderr, nothing written); 3 the quality verdict reached --fail-on (outputs written); 130 interrupted (nothing
written); 1 unexpected internal error.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..core.errors import Cancelled, DeepRegistrationError
from .register_command import register_command

EPILOG = """\
outputs (in OUTDIR, written to a temporary folder first and moved into place when complete):
  transform.h5      ITK composite transform (affine + displacement field), fixed -> moving, LPS;
                    apply it with SimpleITK/ANTs/Slicer to map the moving image onto the fixed one
  warped.nii.gz     moving image resampled onto the fixed image's grid (see --warped: by default
                    not written for a fixed image of more than 16 M voxels)
  inverse.h5        (deformable mode) the inverse, moving -> fixed, LPS; report.json gives its
                    inverse-consistency error |T(T^-1(y)) - y| in mm
  jacobian.nii.gz   Jacobian determinant of the transform (<1 shrink, >1 expand, <=0 folding)
  report.json       similarity before/after, folding %, Dice/HD95/TRE if labels/landmarks given,
                    timings, parameters, versions, device
  report.png        fixed / moving before / after / checkerboards / Jacobian, three planes
                    (with --explain: three more rows with the maps below)
  explain/          (--explain) residual.nii.gz |fixed - warped| after intensity normalization,
                    local_similarity.nii.gz (LNCC cc2, or local MI with --similarity mi: what
                    the optimizer saw), displacement.nii.gz (mm),
                    all on the fixed image's grid
  uncertainty.nii.gz (--uncertainty) per-voxel spread (mm) of a few perturbed restarts, on the fixed
                    grid: large where the images do not determine the deformation; not an error bound

examples:
  deepregistration register fixed.nii.gz moving.nii.gz -o out
  deepregistration register t1.nii.gz t2.nii.gz -o out --similarity mi --mode affine
  deepregistration register f.nii.gz m.nii.gz -o out --fixed-labels f_seg.nii.gz --moving-labels m_seg.nii.gz
"""


def _extra_command_modules() -> dict:
    """Commands that live in other modules: ``train``/``models``/``evaluate`` (the learned engine) and
    ``dataset`` (the DatasetBuilder, when its package is installed). Importing them loads only argparse."""
    out = {}
    from . import train_cli

    for name in ("train", "models", "evaluate"):
        out[name] = train_cli
    try:
        from DatasetBuilderLib import cli as dataset_cli
    except ImportError:  # the engine installed without the DatasetBuilder
        dataset_cli = None
    if dataset_cli is not None:
        out["dataset"] = dataset_cli
    from . import pacs_cli  # argparse only; pydicom/dicomweb-client are imported when it runs

    out["pacs"] = pacs_cli
    from . import workflow_commands as workflow_commands  # argparse only

    for name in workflow_commands.COMMANDS:
        out[name] = workflow_commands
    from . import feedback_cli  # argparse only

    out["feedback"] = feedback_cli
    from . import apply_cli  # argparse only

    out["apply"] = apply_cli
    return out


def _add_extra_commands(sub, command: str | None = None) -> None:
    """Adds the other modules' commands; for a known ``command``, only those of its module (building ``train``'s
    parsers imports torch for their defaults, which ``feedback`` or ``dataset`` do not need)."""
    modules = _extra_command_modules()
    if command in modules:  # only the commands of that command's module
        modules = {key: m for key, m in modules.items() if m is modules[command]}
    if "train" in modules:
        modules["train"].add_subparsers(sub)
    if "dataset" in modules:
        modules["dataset"].add_subparser(sub)
    if "pacs" in modules:
        modules["pacs"].add_subparser(sub)  # after "register": it shares its registration options
    if "register-batch" in modules:
        modules["register-batch"].add_subparsers(sub)  # register-batch, register-sequence, template
    if "feedback" in modules:
        modules["feedback"].add_subparser(sub)
    if "apply" in modules:
        modules["apply"].add_subparser(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with a ``command`` named, only ``register``'s and that command's module's (the
    same options, help and errors for that command): ``register`` imports no other command's module, and only the
    ``train``/``models``/``evaluate`` parsers import torch and the training code (for their defaults)."""
    from ..core.config import FULL_GRID_MAX_VOXELS, WARPED_CHOICES, RegistrationConfig

    d = RegistrationConfig()
    parser = argparse.ArgumentParser(
        prog="deepregistration",
        description="Register 3D medical images (NIfTI, NRRD, MHA, DICOM folders) in physical space.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "register", help="register MOVING onto FIXED and write transform, warped image and report",
        description="Align MOVING to FIXED: an initialization search, then rigid/affine, then (mode deformable) "
                    "a smooth dense deformation, each at several resolutions.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixed", metavar="FIXED", help="fixed (reference) image file or DICOM series folder")
    p.add_argument("moving", metavar="MOVING", help="moving image, to be aligned to FIXED")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists (after success only)")
    g = p.add_argument_group("registration")
    g.add_argument("--mode", choices=("rigid", "affine", "deformable"), default=d.mode,
                   help="transform model (default: %(default)s)")
    g.add_argument("--similarity", choices=("lncc", "mi", "mse"), default=d.similarity,
                   help="lncc: same modality; mi: different modalities (e.g. T1 vs T2, CT vs MR); mse: same "
                        "intensities (default: %(default)s)")
    g.add_argument("--regularization", choices=("diffusion", "bending"), default=d.regularization,
                   help="smoothness penalty of the deformation (default: %(default)s)")
    g.add_argument("--reg-weight", type=float, default=d.reg_weight, metavar="W",
                   help="smoothness weight; larger = smoother deformation (default: %(default)s)")
    g.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help=f"working voxel size in mm; smaller = more detail, slower (default: {d.spacing}, or the "
                        "--model's own working spacing; the model itself always runs at its own spacing)")
    g.add_argument("--iterations", type=int, default=d.iterations, metavar="N",
                   help="deformable iterations at the finest level, coarser levels run 2N (default: %(default)s)")
    g.add_argument("--affine-iterations", type=int, default=d.affine_iterations, metavar="N",
                   help="rigid/affine iterations at the finest linear level (default: %(default)s)")
    g.add_argument("--large-grid-voxels", type=float, default=d.large_grid_voxels, metavar="M",
                   help="working-grid size in millions of voxels above which the work stops growing: larger grids "
                        "run fewer iterations at their finest levels (0 = no limit; default: %(default)s)")
    g.add_argument("--levels", type=int, default=d.levels, metavar="N",
                   help="resolution levels (default: %(default)s)")
    g.add_argument("--diffeomorphic", action="store_true",
                   help="stationary velocity field + scaling and squaring (invertible; slower)")
    g.add_argument("--symmetric", action="store_true",
                   help="inverse-consistent: both images deformed half way (velocity field, midpoint "
                   "similarity, symmetric affine), so B to A gives nearly the inverse of A to B; deformable "
                   "mode only; about twice the time of --diffeomorphic")
    g.add_argument("--jacobian-weight", type=float, default=d.jacobian_weight, metavar="W",
                   help="penalty on near-folding (det J < 0.05); 0 = off (default: %(default)s)")
    g.add_argument("--init", dest="initialization", choices=("search", "moments", "geometry", "none"),
                   default=d.initialization, help="initial alignment: search (the best of many rigid starts: "
                   "principal axes, rotations up to --init-max-rotation, shifts; for large rotations or partial "
                   "fields of view), centres of mass, centres of the fields of view, or none (default: "
                   "%(default)s)")
    g.add_argument("--init-max-rotation", type=float, default=d.init_max_rotation, metavar="DEG",
                   help="largest rotation the search initialization tries, 0-180 degrees (default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto uses a CUDA GPU when PyTorch sees one (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    g.add_argument("--threads", type=int, default=d.threads, metavar="N",
                   help="CPU threads for PyTorch; 0 = all cores (default)")
    e = p.add_argument_group("optional inputs")
    e.add_argument("--fixed-mask", metavar="FILE", help="only voxels inside count (non-zero = inside)")
    e.add_argument("--moving-mask", metavar="FILE", help="mask of the moving image")
    e.add_argument("--fixed-labels", metavar="FILE", help="label map on the fixed grid: adds Dice/HD95")
    e.add_argument("--moving-labels", metavar="FILE", help="label map on the moving grid")
    e.add_argument("--fixed-landmarks", metavar="FILE", help="landmarks (CSV label,x,y,z in LPS mm; Slicer "
                   ".mrk.json or .fcsv): adds TRE")
    e.add_argument("--moving-landmarks", metavar="FILE", help="corresponding moving landmarks")
    e.add_argument("--guide-landmarks", nargs=2, metavar=("FIXED", "MOVING"),
                   help="corresponding landmarks that guide the registration (same formats, paired by label; "
                   "at least 3, 4-8 well spread work best): their rigid least-squares fit starts the "
                   "registration; kept separate from the evaluation landmarks")
    e.add_argument("--guide-weight", type=float, default=d.guide_weight, metavar="W",
                   help="weight per mm² of the guide landmarks' term in the objectives; 0 = they only start "
                   "the registration (default: %(default)s)")
    m = p.add_argument_group("learned model")
    m.add_argument("--model", metavar="NAME|PATH", help="a trained field predictor (see 'deepregistration models "
                   "list') whose prediction starts the deformable optimization")
    m.add_argument("--model-mode", choices=("init", "replace"), default="init",
                   help="init: refine the prediction at the finest level; replace: use it as is (default: init)")
    o = p.add_argument_group("output")
    o.add_argument("--no-png", action="store_true", help="skip report.png")
    o.add_argument("--warped", choices=WARPED_CHOICES, default="auto",
                   help="warped.nii.gz: full = on the fixed image's full grid; none = not written; auto = full "
                        f"unless the fixed image has more than {FULL_GRID_MAX_VOXELS / 1e6:g} M voxels (a 0.75 mm "
                        "trunk CT: the warp and its gzip would cost more than the registration; 'deepregistration "
                        "apply' writes the same image later from transform.h5) (default: auto)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    o.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    o.add_argument("--explain", action="store_true",
                   help="also write explainability maps into OUTDIR/explain/ (residual, local similarity, "
                        "displacement magnitude) and draw them in report.png")
    o.add_argument("--uncertainty", action="store_true",
                   help="also estimate the per-voxel uncertainty (spread of a few perturbed restarts optimized in one "
                        "batch; on a CPU about as long again as the registration) into OUTDIR/uncertainty.nii.gz; "
                        "it feeds the quality verdict")
    o.add_argument("--fail-on", choices=("suspect", "failed"),
                   help="exit with status 3 when the quality verdict in report.json is this or worse "
                        "(for pipelines; the outputs are written either way)")
    if command != "register":
        _add_extra_commands(sub, command)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on a command line (the top level has no option taking a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Runs one ``deepregistration`` command line (``argv``, default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"deepregistration {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    extra = {} if args.command == "register" else _extra_command_modules()
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in extra:
            return extra[args.command].run(args)
        return register_command(args)
    except DeepRegistrationError as exc:
        if isinstance(exc, Cancelled):
            print(f"deepregistration: {exc}", file=sys.stderr)
            return 130
        print(f"deepregistration: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepregistration: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = {"slicer": "dataset", "vtk": "dataset", "pydicom": "dataset"}.get((exc.name or "").split(".")[0])
        hint = f"pip install 'deepregistration[{extra}]'" if extra else f"pip install {exc.name}"
        print(f"deepregistration: error: this command needs the Python package '{exc.name}', which is not "
              f"installed. Install it ({hint}) and run again.", file=sys.stderr)
        return 2
    except MemoryError:
        print("deepregistration: error: out of memory; use a coarser --spacing (e.g. 3) or --device cuda.",
              file=sys.stderr)
        return 2


def console_main() -> None:
    """The ``deepregistration`` console script: :func:`main` on ``sys.argv``, then the process exits.

    After a ``register`` or ``apply`` command, whose outputs are all written and closed by then, the process ends
    without Python's teardown of its modules: with torch loaded that teardown costs about 0.5 s of CPU and up to a
    second of wall time at every exit (measured: ``python -c "import torch"`` 2.16 s CPU median, 1.61 s when ending with
    ``os._exit``). Logging is shut down (flushed) and stdout/stderr are flushed first; other commands, which may
    leave background work to Python's exit (workers, ``torchrun`` ranks), exit the ordinary way.
    """
    rc = main()
    if _command(sys.argv[1:]) in ("register", "apply"):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    console_main()
