#!/usr/bin/env python3
"""ANTs SyN (antspyx defaults) as one benchmark process; run with a Python that has ``antspyx``.

Subcommands:

- ``register FIXED MOVING OUT``: ``ants.registration(fixed, moving, type_of_transform="SyN")`` with every
  other setting at its antspyx default; writes ``OUT/warped.nii.gz``, ``OUT/affine.mat`` (ITK affine),
  ``OUT/warp.nii.gz`` (displacement field on the fixed grid, LPS mm) and ``OUT/transforms.json``.
  This is the timed process (the parent measures it as a whole, imports included).
- ``warp-labels FIXED MOVING_LABELS OUT``: the moving labels through the same transforms with
  ``ants.apply_transforms`` (nearest neighbour) → ``OUT/warped_labels.nii.gz``; not timed, used by the
  parent as a cross-check of its own uniform evaluation.

Transform direction: fixed → moving (resampling). antspyx ``fwdtransforms`` = ``[warp, affine]``; the same
mapping as an ITK/SimpleITK CompositeTransform is ``[affine, warp]``, i.e. ``T(x) = A(x + u(x))``
(``transforms.json`` lists the files in that SimpleITK order).
Threads: ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (set ``--threads`` or the environment before the call).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def register(fixed_path: str, moving_path: str, out: Path, seed: int | None) -> None:
    """Runs SyN and writes warped image, transforms and a manifest into ``out``."""
    import ants

    if seed is not None and hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        # only the seed: ants.set_ants_deterministic() would also force one thread
        ants.config._random_seed = seed
    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    reg = ants.registration(fixed, moving, type_of_transform="SyN")
    out.mkdir(parents=True, exist_ok=True)
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    fwd = list(reg["fwdtransforms"])
    warp = next(p for p in fwd if p.endswith((".nii.gz", ".nii")))
    aff = next(p for p in fwd if p.endswith(".mat"))
    shutil.copy(aff, out / "affine.mat")
    shutil.copy(warp, out / "warp.nii.gz")
    (out / "transforms.json").write_text(json.dumps({
        "direction": "fixed -> moving (resampling), LPS",
        "antspyx_fwdtransforms_order": ["warp.nii.gz", "affine.mat"],
        "sitk_composite_order": ["affine.mat", "warp.nii.gz"],
        "ants_version": getattr(ants, "__version__", "unknown"),
        "threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
    }, indent=2))


def warp_labels(fixed_path: str, labels_path: str, out: Path) -> None:
    """Moving labels → fixed grid with antspyx's own transform application (nearest neighbour)."""
    import ants

    fixed = ants.image_read(fixed_path)
    labels = ants.image_read(labels_path)
    warped = ants.apply_transforms(fixed, labels, transformlist=[str(out / "warp.nii.gz"), str(out / "affine.mat")],
                                   interpolator="nearestNeighbor")
    ants.image_write(warped, str(out / "warped_labels.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("fixed")
    r.add_argument("moving")
    r.add_argument("out")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--threads", type=int, default=None)
    w = sub.add_parser("warp-labels")
    w.add_argument("fixed")
    w.add_argument("labels")
    w.add_argument("out")
    w.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    if args.cmd == "register":
        register(args.fixed, args.moving, Path(args.out), args.seed)
    else:
        warp_labels(args.fixed, args.labels, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
