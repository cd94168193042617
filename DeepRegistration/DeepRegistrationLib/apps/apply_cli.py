"""The ``deepregistration apply`` command (argparse only at import; the work is in
:mod:`~DeepRegistrationLib.workflows.apply`).

    deepregistration apply INPUT -t RESULT -o OUTPUT [-r REFERENCE] [--interpolation {linear,nearest,auto}]
                           [--inverse] [--overwrite] [--threads N] [-q]

Prints the output file and what was done (stdout); bad input exits 2 with one message, nothing written.
"""
from __future__ import annotations

import argparse

EPILOG = """\
directions (T = RESULT's transform.h5, fixed -> moving points, the resampling direction):
  images, label maps   resampled onto the REFERENCE grid: output(x) = INPUT(T(x)). Forward brings
                       moving-space images onto the fixed grid (REFERENCE defaults to the result's
                       fixed image); --inverse brings fixed-space images (e.g. a segmentation of the
                       fixed image) onto the moving grid with inverse.h5 (REFERENCE: the moving image)
  points               mapped the other way, as antsApplyTransformsToPoints: forward maps fixed-space
                       points to moving space, --inverse maps moving-space points to fixed space
output type follows the input: a label map (auto: an integer image that looks piecewise constant)
  is resampled nearest-neighbour and keeps its type; other images: integer types of 16 bits or more
  (a CT's int16) kept, rounded; 8-bit and float images become float32. The forward resampling of the
  registered moving image is register's own warped.nii.gz, bit for bit.
RESULT: a 'register' output folder, or a transform file (.h5/.tfm/.txt/.mat: ITK [affine, displacement]
  as transform.h5, or [displacement, affine] as inverse.h5). A linear result is inverted exactly.
OUTPUT is written to a temporary file next to it and renamed into place when complete.

examples:
  deepregistration apply moving_t2.nii.gz -t out -o t2_on_fixed.nii.gz
  deepregistration apply fixed_seg.nii.gz -t out --inverse -o seg_on_moving.nii.gz
  deepregistration apply followup.nii.gz -t out/transform.h5 -r fixed.nii.gz -o followup_on_fixed.nii.gz
  deepregistration apply fixed_points.mrk.json -t out -o points_in_moving.mrk.json
"""


def add_subparser(sub) -> None:
    """Adds ``apply`` to the ``deepregistration`` subcommands."""
    p = sub.add_parser("apply", help="resample an image, a label map or points through a registration result",
                       description="Apply a registration result (its transform.h5, or inverse.h5 with --inverse) "
                                   "to another image, a label map or a points file, as antsApplyTransforms.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", help="image file or DICOM folder, or points (.csv, .mrk.json, .fcsv)")
    p.add_argument("-t", "--transform", required=True, metavar="RESULT",
                   help="a 'register' output folder or a transform file")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="output file (.nii.gz, .nrrd, .mha, ... for images; .csv or .mrk.json for points)")
    p.add_argument("-r", "--reference", metavar="REFERENCE",
                   help="image (file or DICOM folder) whose grid the output gets: a file's header only (a DICOM "
                        "folder is read whole). Default: the result's fixed image, or its moving image with "
                        "--inverse")
    p.add_argument("--interpolation", "-n", choices=("linear", "nearest", "auto"), default="auto",
                   help="auto: nearest for a label map, linear otherwise (default: %(default)s)")
    p.add_argument("--inverse", action="store_true",
                   help="apply the inverse: inverse.h5 (moving -> fixed), or the inverted matrix of a linear result")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (after success only)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for PyTorch; 0 = all cores (default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def run(args: argparse.Namespace) -> int:
    """Runs ``apply``; InputError propagates to the main command (exit 2, one message)."""
    from ..core.errors import InputError

    if args.threads < 0:
        raise InputError(f"--threads must be 0 (all cores) or more, not {args.threads}.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from ..workflows.apply import apply_transform
    from .register_command import _Bar

    bar = _Bar(not args.quiet, desc="applying", leave=False)
    try:
        done = apply_transform(args.input, args.transform, args.output, reference=args.reference,
                               interpolation=args.interpolation, inverse=args.inverse, overwrite=args.overwrite,
                               progress=bar)
    finally:
        bar.close()
    print(f"output: {done['output']}")
    if done["kind"] == "points":
        print(f"  {done['points']} points: {done['meaning']} ({done['transform']})")
    else:
        shape = "x".join(str(n) for n in reversed(done["grid"]["shape_zyx"]))
        print(f"  {done['kind']}, {done['interpolation']} interpolation, {done['dtype']}, {shape} voxels on the grid "
              f"of {done['reference']}")
        print(f"  transform {done['transform']} ({done['direction']})")
    return 0
