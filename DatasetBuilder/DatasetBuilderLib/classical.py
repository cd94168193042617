"""Algorithmic ground truth: a pair's transform from classical registration (the engine's optimization or ANTs).

Flagged ``"kind": "algorithmic"`` in the pair's gold standard, never mistaken for expert or synthetic truth,
with the method, its settings and quality scores computed the same way for every method from the stored
transform (SimpleITK): global NCC of the fixed image with the moving image before/after, % folding
(Jacobian determinant ≤ 0 of the whole fixed → moving mapping on the fixed grid) and mean Dice of the pair's
labels through the transform when both cases have label maps. Stored as ITK ``.h5`` (fixed → moving, LPS)
next to the pair.

Methods: ``engine`` (DeepRegistration's instance optimization, always available) and ``ants`` (ANTs SyN
through ``antspyx`` with its defaults, when installed; its ``fwdtransforms`` ``[warp, affine]`` are stored
as one SimpleITK CompositeTransform ``[affine, warp]``, i.e. ``T(x) = A(x + u(x))``, docs/CONVENTIONS.md §2).
elastix is not offered (its transforms need transformix to become one ITK transform).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

METHODS = ("engine", "ants")


@dataclass
class ClassicalOptions:
    """Settings of the algorithmic ground truth (kept small: it runs once per pair).

    Attributes:
        method: ``engine`` or ``ants`` (antspyx must be installed).
        spacing: Engine working voxel size, mm. iterations / affine_iterations: engine optimizer iterations.
        ants_transform: antspyx ``type_of_transform`` (``SyN`` default; ``SyNRA``, ``ElasticSyN``, ...).
        threads: CPU threads (1 keeps runs reproducible and the machine usable).
        seed: Random seed (engine and ANTs).
    """

    method: str = "engine"
    spacing: float = 4.0
    iterations: int = 20
    affine_iterations: int = 30
    ants_transform: str = "SyN"
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"classical method must be one of {', '.join(METHODS)}, not {self.method!r}")

    def settings(self) -> dict:
        """The settings that matter for the chosen method (recorded in the gold-standard entry)."""
        if self.method == "ants":
            return {"type_of_transform": self.ants_transform, "threads": self.threads, "seed": self.seed}
        return {"spacing_mm": self.spacing, "iterations": self.iterations,
                "affine_iterations": self.affine_iterations, "threads": self.threads, "seed": self.seed}


def check_available(opts: ClassicalOptions) -> None:
    """Raises ValueError naming the fix when the chosen method's package is missing (before any work)."""
    if opts.method == "ants":
        try:
            import ants  # noqa: F401
        except ImportError as exc:
            raise ValueError("classical ground truth with ANTs needs antspyx: pip install antspyx "
                             "(or use the engine method)") from exc


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels present in ``a`` (0 = background)."""
    scores = []
    for label in np.unique(a[a > 0]):
        x, y = a == label, b == label
        scores.append(2.0 * np.logical_and(x, y).sum() / max(x.sum() + y.sum(), 1))
    return float(np.mean(scores)) if scores else float("nan")


def _ncc(a: sitk.Image, b: sitk.Image) -> float:
    x = sitk.GetArrayViewFromImage(a).astype(np.float64).ravel()
    y = sitk.GetArrayViewFromImage(b).astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-12))


def _engine(fixed_path: Path, moving_path: Path, opts: ClassicalOptions) -> sitk.Transform:
    from DeepRegistrationLib.core.config import RegistrationConfig
    from DeepRegistrationLib.io.images import read_image
    from DeepRegistrationLib.registration.pipeline import register

    config = RegistrationConfig(spacing=opts.spacing, iterations=opts.iterations,
                                affine_iterations=opts.affine_iterations, threads=opts.threads, device="cpu",
                                seed=opts.seed)
    result = register(read_image(fixed_path, "fixed image"), read_image(moving_path, "moving image"), config)
    return result.transform.to_sitk()


def _ants(fixed_path: Path, moving_path: Path, opts: ClassicalOptions) -> sitk.Transform:
    import ants

    previous = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"), getattr(ants.config, "_random_seed", None)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(opts.threads)
    ants.config._random_seed = opts.seed  # antspyx passes it as --random-seed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reg = ants.registration(ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)),
                                    type_of_transform=opts.ants_transform, outprefix=os.path.join(tmp, "x"))
            fwd = list(reg["fwdtransforms"])
            affines = [sitk.ReadTransform(p) for p in fwd if p.endswith(".mat")]
            warps = [sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(p), sitk.sitkVectorFloat64))
                     for p in fwd if p.endswith((".nii.gz", ".nii"))]
    finally:
        ants.config._random_seed = previous[1]
        if previous[0] is None:
            os.environ.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
        else:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = previous[0]
    # SimpleITK applies a composite's transforms from the last to the first: T(x) = A(x + u(x))
    return sitk.CompositeTransform(affines + warps)


def quality(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
            fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None) -> dict:
    """Method-independent scores of a fixed → moving transform (see module doc), rounded to 6 digits."""
    identity = sitk.Transform(3, sitk.sitkIdentity)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    q = {"ncc_before": _ncc(fixed, sitk.Resample(moving, fixed, identity, sitk.sitkLinear, 0.0)),
         "ncc_after": _ncc(fixed, sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))}
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    det = sitk.GetArrayViewFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    q["folding_percent"] = 100.0 * float((det <= 0).mean())
    if fixed_labels is not None and moving_labels is not None:
        fa = sitk.GetArrayFromImage(fixed_labels)
        for name, t in (("dice_before", identity), ("dice_after", transform)):
            warped = sitk.Resample(moving_labels, fixed_labels, t, sitk.sitkNearestNeighbor, 0)
            q[name] = _dice(fa, sitk.GetArrayFromImage(warped))
    return {k: round(v, 6) for k, v in q.items()}


def register_pair(out: Path, fixed: dict, moving: dict, transform_rel: str, opts: ClassicalOptions) -> dict:
    """Registers a pair of written cases, stores the transform and returns its gold-standard entry.

    Args:
        out: Dataset folder.
        fixed, moving: Dataset entries (``image``, optional ``label`` paths relative to ``out``).
        transform_rel: Where to store the ``.h5`` (relative to ``out``).
        opts: Method and settings.
    """
    from .writer import write_transform

    fixed_path, moving_path = out / fixed["image"], out / moving["image"]
    transform = (_ants if opts.method == "ants" else _engine)(fixed_path, moving_path, opts)
    write_transform(out / transform_rel, transform)
    stored = sitk.ReadTransform(str(out / transform_rel))  # score what was written, not what was meant
    labels = [sitk.ReadImage(str(out / e["label"])) for e in (fixed, moving)] \
        if "label" in fixed and "label" in moving else [None, None]
    q = quality(sitk.ReadImage(str(fixed_path), sitk.sitkFloat32), sitk.ReadImage(str(moving_path)), stored, *labels)
    logger.info("classical ground truth (%s): NCC %.3f -> %.3f", opts.method, q["ncc_before"], q["ncc_after"])
    method = "ANTs SyN (antspyx)" if opts.method == "ants" else "DeepRegistration instance optimization"
    return {"kind": "algorithmic", "method": method, "transform": transform_rel, "direction": "fixed->moving",
            "frame": "LPS", "quality": q, "settings": opts.settings()}
