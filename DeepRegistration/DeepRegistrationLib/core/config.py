"""Registration settings (one dataclass, validated, JSON-friendly) and device selection."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import InputError

MODES = ("rigid", "affine", "deformable")
SIMILARITIES = ("lncc", "mi", "mse")
REGULARIZERS = ("diffusion", "bending")
DEVICES = ("auto", "cpu", "cuda")
INITIALIZATIONS = ("search", "moments", "geometry", "none")
#: Default weight of the guide-landmark term per mm² of mean squared point distance. The LNCC loss spans
#: about 1 (from -1, a perfect match, to 0); at 0.01/mm² a 10 mm mean point distance costs as much as that
#: whole range and a 1 mm one 0.01, so the points pull hard while far off and the images decide below a
#: voxel or two (where hand-placed points are no more accurate than the images).
DEFAULT_GUIDE_WEIGHT = 0.01
#: Default working voxel size (mm).
DEFAULT_SPACING = 2.0
#: Default ``large_grid_voxels`` (millions of working voxels at :data:`DEFAULT_SPACING` or coarser): brains at 2 mm
#: (0.7–1.1 M) and the 3 mm trunk CTs of the robustness benchmark (1.4 M) are below it and run as planned;
#: measured on a 2 mm trunk CT (4.6 M voxels) in docs/ENGINE.md (*Work on large grids*).
DEFAULT_LARGE_GRID_VOXELS = 1.5
#: A fixed grid of more than this many voxels is *large* (a 0.75 mm CT of the trunk: 60-90 M; the 1 mm brain, 7 M,
#: and a 2 mm trunk CT, 4.6 M, are not): ``jacobian.nii.gz`` is written on the working grid instead of the fixed
#: grid, ``report.png`` is drawn on the working grid, ``warped.nii.gz`` is not written by default
#: (:data:`WARPED_CHOICES`), and the background writes are joined before the full-resolution label warps (their
#: memory is not added to a pending write's). Used by :mod:`DeepRegistrationLib.registration.run`.
FULL_GRID_MAX_VOXELS = 16_000_000
#: ``warped=`` of ``run_registration`` (``register --warped``): ``"full"`` writes ``warped.nii.gz`` on the full
#: fixed grid, ``"none"`` does not write it, ``"auto"`` (the default) writes it unless the fixed grid is large
#: (:data:`FULL_GRID_MAX_VOXELS`). At 0.75 mm (86.5 M voxels) the full-resolution warp and its gzip cost more
#: than the whole registration, for an image that ``deepregistration apply`` writes on demand from
#: ``transform.h5`` (the same bits) and that Slicer shows through the transform without it.
WARPED_CHOICES = ("auto", "full", "none")


def check_warped(choice: str) -> str:
    """``choice`` if it is one of :data:`WARPED_CHOICES`, else InputError naming them."""
    if choice not in WARPED_CHOICES:
        raise InputError(f"warped must be one of {', '.join(WARPED_CHOICES)} (got '{choice}').")
    return choice


@dataclass
class RegistrationConfig:
    """What to register and how.

    Attributes:
        mode: ``"rigid"`` (6 dof), ``"affine"`` (12 dof) or ``"deformable"`` (affine, then a dense field).
        similarity: ``"lncc"`` (same modality, default), ``"mi"`` (different modalities) or ``"mse"``.
        regularization: ``"diffusion"`` (first derivatives, default) or ``"bending"`` (second derivatives).
        reg_weight: Smoothness weight of the deformable stage; larger = smoother, less local detail.
        spacing: Working voxel size in mm (isotropic); never finer than the finest input voxel.
            2 mm registers brains well; coarser is faster.
        iterations: Iterations of the deformable stage at the finest level (coarser levels get more);
            the affine stage uses ``affine_iterations``. On a working grid above ``large_grid_voxels`` the
            finest levels run fewer.
        affine_iterations: Iterations of the linear stage at its finest level (coarser levels get 2×); on a
            working grid above ``large_grid_voxels`` the finest levels run fewer.
        large_grid_voxels: Working-grid size (millions of voxels) above which the work stops growing: on a
            larger grid each stage (linear, deformable) does at most the voxel-iterations its plan would cost on
            a grid of this size, the coarse levels first, so the finest levels run fewer iterations or none (the
            coarser field, upsampled); grids up to this size run the planned iterations exactly
            (default :data:`DEFAULT_LARGE_GRID_VOXELS`; 0 = no limit). With a ``spacing`` finer than
            :data:`DEFAULT_SPACING` the size grows by ``(DEFAULT_SPACING / spacing)³`` (the same field of view:
            the finer detail asked for keeps its iterations), see :meth:`large_grid_cap`.
            ``RegistrationResult.plan`` reports what ran.
        levels: Number of resolution levels (each halves the resolution of the next finer one).
        diffeomorphic: Parameterize the field as a stationary velocity field integrated by scaling
            and squaring (invertible by construction; slower).
        jacobian_weight: Weight of a penalty on Jacobian determinants below 0.05 (0 = off).
        lncc_radius: Half-width in voxels of the LNCC window.
        smoothing_passes: Box-filter passes (3³) applied to the field parameters each iteration.
        initialization: ``"search"`` (default: the best of many rigid starts, see
            :mod:`~DeepRegistrationLib.registration.initialization`), ``"moments"`` (align centres of mass),
            ``"geometry"`` (align field-of-view centres) or ``"none"``.
        init_max_rotation: Largest rotation (degrees, 0–180) the ``"search"`` initialization tries.
        intensity_percentiles: Percentiles mapped to 0 and 1 by the intensity normalization.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        seed: Random seed (torch), for reproducible runs.
        threads: CPU threads for torch (0 = torch's default).
        guide_weight: Weight per mm² of the guide-landmark term (``weight · mean |T(f_i) - m_i|²``) in the
            linear and deformable objectives, when guide landmarks are given (default
            :data:`DEFAULT_GUIDE_WEIGHT`; 0 = the points only start the registration).
        symmetric: Inverse-consistent deformable stage (deformable mode only): a stationary velocity field
            with both images deformed half way towards each other (SyN-style midpoint), so registering B to
            A gives (nearly) the inverse of A to B; implies the velocity parameterization of
            ``diffeomorphic``, about twice its time per iteration.
    """

    mode: str = "deformable"
    similarity: str = "lncc"
    regularization: str = "diffusion"
    reg_weight: float = 3.0
    spacing: float = DEFAULT_SPACING
    iterations: int = 10
    affine_iterations: int = 30
    large_grid_voxels: float = DEFAULT_LARGE_GRID_VOXELS
    levels: int = 3
    diffeomorphic: bool = False
    jacobian_weight: float = 0.0
    lncc_radius: int = 4
    smoothing_passes: int = 2
    initialization: str = "search"
    init_max_rotation: float = 180.0
    intensity_percentiles: tuple = field(default=(0.5, 99.5))
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    guide_weight: float = DEFAULT_GUIDE_WEIGHT
    symmetric: bool = False

    def validate(self) -> "RegistrationConfig":
        """Checks every value; raises InputError naming the bad option and its allowed values."""
        def choice(name, value, allowed):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

        choice("mode", self.mode, MODES)
        choice("similarity", self.similarity, SIMILARITIES)
        choice("regularization", self.regularization, REGULARIZERS)
        choice("device", self.device, DEVICES)
        choice("initialization", self.initialization, INITIALIZATIONS)
        v = self.init_max_rotation
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 180):
            raise InputError(f"init_max_rotation must be between 0 and 180 degrees, got {v!r}")
        for name, lo in (("reg_weight", 0.0), ("jacobian_weight", 0.0), ("guide_weight", 0.0),
                         ("large_grid_voxels", 0.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= lo):
                raise InputError(f"{name} must be a finite number >= {lo}, got {v!r}")
        if not (isinstance(self.spacing, (int, float)) and math.isfinite(self.spacing) and 0.2 <= self.spacing <= 20):
            raise InputError(f"spacing must be between 0.2 and 20 mm, got {self.spacing!r}")
        for name, lo, hi in (("iterations", 0, 100000), ("affine_iterations", 0, 100000), ("levels", 1, 6),
                             ("lncc_radius", 1, 10), ("smoothing_passes", 0, 10), ("threads", 0, 1024)):
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise InputError(f"{name} must be an integer between {lo} and {hi}, got {v!r}")
        if self.symmetric and self.mode != "deformable":
            raise InputError(f"symmetric registration deforms both images half way and needs mode 'deformable', "
                             f"not {self.mode!r}: use --mode deformable or leave out --symmetric")
        lo, hi = self.intensity_percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {self.intensity_percentiles}")
        return self

    def large_grid_cap(self) -> float:
        """Working voxels above which the stages' work stops growing (``inf`` without a limit): ``large_grid_voxels``
        millions, times ``(DEFAULT_SPACING / spacing)³`` for a spacing finer than :data:`DEFAULT_SPACING`."""
        if self.large_grid_voxels <= 0:
            return math.inf
        return self.large_grid_voxels * 1e6 * max(1.0, DEFAULT_SPACING / self.spacing) ** 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["intensity_percentiles"] = list(self.intensity_percentiles)
        return d


def select_device(name: str):
    """The torch device for ``"auto"``/``"cpu"``/``"cuda"``; InputError when CUDA is asked but absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available to PyTorch; use "
                         "--device cpu (or auto).")
    return torch.device(name)
