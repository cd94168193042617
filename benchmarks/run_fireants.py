#!/usr/bin/env python3
"""FireANTs (PyPI ``fireants``) as a benchmark peer: one registration per process.

    python run_fireants.py register FIXED MOVING OUTDIR [--threads N]

Settings: FireANTs' own brain-registration recipe: moments (second order; ``--moments 1``: centre of mass only)
initialization, affine at scales
4, 2, 1 (200, 100, 50 iterations), then greedy deformable at scales 4, 2, 1 with 200, 100, 50 iterations
(local CC, kernel 7, compositive warp, grad/warp smoothing 2/0.5, Adam lr 0.5: the LPBA40 pairwise script),
on the CPU (``loss_type="cc"``; ``fusedcc`` needs CUDA). Writes ``warp.nii.gz``: the full fixed → moving map
as an ITK/ANTs displacement field on the fixed grid (LPS mm), FireANTs' ``save_as_ants_transforms``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(fixed_path: str, moving_path: str, out: Path, threads: int | None, moments_order: int = 2) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from fireants.io.image import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration

    fixed = BatchedImages([Image.load_file(fixed_path, device="cpu")])
    moving = BatchedImages([Image.load_file(moving_path, device="cpu")])
    moments = MomentsRegistration(1, fixed, moving, moments=moments_order, loss_type="cc")
    moments.optimize()
    affine = AffineRegistration([4, 2, 1], [200, 100, 50], fixed, moving, loss_type="cc", optimizer="Adam",
                                init_rigid=moments.get_affine_init())
    affine.optimize()
    greedy = GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], fixed_images=fixed,
                                moving_images=moving, loss_type="cc", cc_kernel_size=7,
                                deformation_type="compositive", smooth_grad_sigma=2, smooth_warp_sigma=0.5,
                                optimizer="adam", optimizer_lr=0.5, init_affine=affine.get_affine_matrix().detach())
    greedy.optimize()
    out.mkdir(parents=True, exist_ok=True)
    greedy.save_as_ants_transforms(str(out / "warp.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("fixed")
    r.add_argument("moving")
    r.add_argument("out", type=Path)
    r.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    r.add_argument("--moments", type=int, choices=(1, 2), default=2,
                   help="order of the moments start: 2 (principal axes, the recipe's) or 1 (centre of mass only)")
    args = p.parse_args(argv)
    register(args.fixed, args.moving, args.out, args.threads, args.moments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
