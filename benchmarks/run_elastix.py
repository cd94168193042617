#!/usr/bin/env python3
"""elastix (itk-elastix, default affine + B-spline parameter maps) as one benchmark process.

Run with a Python that has ``itk-elastix``. Subcommands:

- ``register FIXED MOVING OUT``: ``elastix_registration_method`` with
  ``GetDefaultParameterMap("affine")`` then ``GetDefaultParameterMap("bspline")`` with only its bending-energy
  penalty removed (affine + the default B-spline map segfaults in itk-elastix 0.25.4);
  writes ``OUT/warped.nii.gz`` and ``OUT/TransformParameters.{0,1}.txt``. This is the timed process.
- ``export FIXED MOVING MOVING_LABELS OUT``: not timed. transformix writes the dense displacement field of
  the full transform on the fixed grid, ``OUT/displacement.nii.gz`` (vectors LPS mm, fixed → moving:
  ``T(x) = x + u(x)``), and the moving labels through the transform with nearest neighbour
  (FinalBSplineInterpolationOrder 0), ``OUT/warped_labels.nii.gz`` (a cross-check for the parent).

Threads: ``--threads`` (elastix's NumberOfThreads) and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PARAM_FILES = ("TransformParameters.0.txt", "TransformParameters.1.txt")


def register(fixed_path: str, moving_path: str, out: Path, threads: int | None) -> None:
    """Default affine + B-spline elastix registration; writes the warped image and parameter files."""
    import itk

    fixed = itk.imread(fixed_path, itk.F)
    moving = itk.imread(moving_path, itk.F)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine"))
    bspline = po.GetDefaultParameterMap("bspline")
    # itk-elastix 0.25.4 segfaults (during ASGD gradient sampling) on affine + the default B-spline map,
    # whose Metric is [AdvancedMattesMutualInformation, TransformBendingEnergyPenalty]; without the
    # penalty it runs. Upstream considers dropping the penalty from the default (SuperElastix/elastix#1377).
    bspline["Metric"] = ["AdvancedMattesMutualInformation"]
    bspline["Registration"] = ["MultiResolutionRegistration"]
    po.AddParameterMap(bspline)
    kw = {"number_of_threads": threads} if threads else {}
    warped, result_po = itk.elastix_registration_method(fixed, moving, parameter_object=po,
                                                        log_to_console=False, **kw)
    out.mkdir(parents=True, exist_ok=True)
    itk.imwrite(warped, str(out / "warped.nii.gz"), compression=True)
    n = result_po.GetNumberOfParameterMaps()
    itk.ParameterObject.WriteParameterFiles(result_po, [str(out / f"TransformParameters.{i}.txt") for i in range(n)])


def _read_params(out: Path):
    import itk

    po = itk.ParameterObject.New()
    po.ReadParameterFiles([str(out / f) for f in PARAM_FILES if (out / f).exists()])
    # the written files chain through InitialTransformParameterFileName; as one object the maps are
    # already applied in sequence, so the chaining is removed to avoid applying the affine twice
    for i in range(po.GetNumberOfParameterMaps()):
        po.SetParameter(i, "InitialTransformParameterFileName", "NoInitialTransform")
    return po


def export(fixed_path: str, moving_path: str, labels_path: str, out: Path) -> None:
    """Dense displacement field (fixed grid) and nearest-neighbour warped labels through transformix."""
    import itk
    import numpy as np

    po = _read_params(out)
    moving = itk.imread(moving_path, itk.F)
    # transformix also writes deformationField.nii into output_directory (else into the working folder)
    field = itk.transformix_deformation_field(moving, po, output_directory=str(out))
    itk.imwrite(field, str(out / "displacement.nii.gz"), compression=True)
    for i in range(po.GetNumberOfParameterMaps()):
        po.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
    labels = itk.imread(labels_path, itk.F)
    warped = itk.transformix_filter(labels, transform_parameter_object=po, output_directory=str(out))
    arr = np.rint(itk.array_view_from_image(warped)).astype(np.uint8)
    img = itk.image_from_array(arr)
    img.CopyInformation(warped)
    itk.imwrite(img, str(out / "warped_labels.nii.gz"), compression=True)
    for leftover in ("deformationField.nii", "result.nii", "transformix.log"):
        (out / leftover).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("fixed")
    r.add_argument("moving")
    r.add_argument("out")
    r.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("export")
    e.add_argument("fixed")
    e.add_argument("moving")
    e.add_argument("labels")
    e.add_argument("out")
    e.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if args.cmd == "register":
        register(args.fixed, args.moving, Path(args.out), args.threads)
    else:
        export(args.fixed, args.moving, args.labels, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
