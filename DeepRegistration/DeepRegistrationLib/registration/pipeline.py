"""The registration pipeline: initialization → rigid/affine → deformable, multi-resolution, by instance
optimization in PyTorch (CUDA when present, else CPU).

All optimization happens on the working grids (:mod:`~DeepRegistrationLib.registration.preprocess`) in LPS mm;
the result is a :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform` ``T(x) = A (x + u(x))``
mapping fixed points to moving points, valid at any resolution.

A learned network plugs in through :class:`FieldPredictor`: its predicted displacement either
initializes the finest level of the optimization (``predictor_mode="init"``) or replaces the
optimization (``"replace"``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import initialization as init_search
from ..evaluation import metrics
from ..spatial import warp as W
from ..core.config import RegistrationConfig, select_device
from ..core.grid import Grid
from .optim import CosineAdam
from .predictors import PREDICTOR_MODES, check_predictor_use
from ..core.image import Image
from .preprocess import WorkingImage, center_of_mass, check_overlap, prepare_pair
from ..core.progress import Progress, ProgressCallback
from .guidance import GuideLandmarks, LandmarkTerm
from . import symmetric
from .regularizers import Regularizer, folding_penalty
from .similarity import LocalCC2, Similarity, global_ncc
from ..spatial.filters import box_filter
from ..spatial.transforms import SpatialTransform, params_to_matrix, scaling_and_squaring

logger = logging.getLogger(__name__)

#: Adam step of the deformable stage, as a fraction of the level's voxel size (mm per step / mm).
#: Small steps plus the smoothness penalty converge to smoother, more accurate fields than large ones
#: (measured on Colin27 pairs: 0.15 beat 0.5 by ~0.01 Dice at 1 mm).
FIELD_STEP = 0.15
#: Coarser levels are cheap (8× fewer voxels per halving): they run this many times more iterations.
COARSE_ITERATION_FACTOR = 2
#: The deformable step decays (cosine) to this fraction of its initial value within each level.
FIELD_STEP_END = 0.05
#: On a grid above the cap (:func:`_stage_plan`), a level (other than the coarsest) left fewer than this share
#: of its planned iterations is not run: a few steps of a cosine schedule planned for many do not pay their
#: cost (measured on the 2 mm trunk CT, docs/ENGINE.md, *Work on large grids*).
MIN_LEVEL_SHARE = 0.25


class FieldPredictor(Protocol):
    """A learned model that predicts a displacement field (the slot for networks).

    ``predict(fixed, moving, grid)`` receives the fixed image and the affinely aligned moving image,
    both ``(1, 1, Z, Y, X)`` float32 in [0, 1] on ``grid`` (the fixed working grid), and returns the
    displacement ``(1, 3, Z, Y, X)`` in LPS mm on the same grid (``warped(x) = moving(x + u(x))``).
    """

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid) -> torch.Tensor: ...


@dataclass
class RegistrationResult:
    """What :func:`register` found.

    Attributes:
        transform: Fixed → moving map ``A (x + u(x))`` (LPS mm); ``u`` lives on ``working_grid``.
        working_grid: The fixed image's working grid.
        similarity_before / similarity_after: The configured similarity loss (lower is better) on the
            working grid, for the images as given (no transform) and after registration.
        ncc_before / ncc_after: Global Pearson correlation, same voxels (a comparable summary).
        velocity: With ``config.diffeomorphic`` or ``config.symmetric``: the stationary velocity field ``v`` ``(3, Z, Y, X)`` float64,
            LPS mm per unit time, components (x, y, z), on ``transform.field_grid`` (the working grid plus one
            voxel on every side), with ``u ≈ exp(v) - id`` (7 squarings); ``exp(-v)`` is the exact inverse's
            field (:func:`DeepRegistrationLib.spatial.inverse.invert`). None otherwise.
        jacobian: ``(Z, Y, X)`` det of the Jacobian of the full map on ``working_grid``.
        folding_percent: % of working-grid voxels with det J <= 0.
        sdlogj: Both SDlogJ variants (see :func:`DeepRegistrationLib.evaluation.metrics.sdlogj`).
        initialization: How the linear stage started (``mode``; for ``"search"`` also the winning
            ``start``, its ``score`` and the centre-of-mass start's ``moments_score``).
        plan: The iterations each level ran, in order: one dict per level with ``stage`` (``"linear"`` or
            ``"deformable"``), ``factor`` (pooling factor), ``voxels`` (the level's fixed-grid voxels; for
            ``symmetric`` the midpoint grid's), ``planned`` (from ``iterations``/``affine_iterations``) and
            ``iterations`` (after ``config.large_grid_voxels``).
        timings: Seconds per stage.
        device: Where it ran.
        config: The settings used.
        working_images: The registration's own :class:`WorkingImages`: the ``(fixed, moving)``
            :class:`~DeepRegistrationLib.registration.preprocess.WorkingImage` pair it prepared (working spacing,
            normalized intensities, masks; it unpacks as that pair) and the moving one warped by ``transform`` onto
            the working grid for the similarity after, so that the evaluation neither prepares nor warps them again.
    """

    transform: SpatialTransform
    working_grid: Grid
    similarity_before: float
    similarity_after: float
    ncc_before: float
    ncc_after: float
    jacobian: np.ndarray
    folding_percent: float
    sdlogj: dict
    initialization: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    device: str = "cpu"
    config: RegistrationConfig | None = None
    velocity: np.ndarray | None = None
    working_images: "WorkingImages | None" = field(default=None, repr=False)
    plan: list = field(default_factory=list)


@dataclass(eq=False)
class WorkingImages:
    """The working images of one registration (:attr:`RegistrationResult.working_images`).

    Unpacks as the ``(fixed, moving)`` :class:`~DeepRegistrationLib.registration.preprocess.WorkingImage` pair.
    ``fixed_tensor`` is the fixed working image ``(1, 1, Z, Y, X)`` float32 in [0, 1], ``fixed_mask`` its mask
    ``(1, 1, Z, Y, X)`` bool (None without one); ``warped`` ``(1, 1, Z, Y, X)`` float32 is the moving working image
    sampled (trilinear, 0 outside) at ``transform`` of the working grid's voxel centres and ``view`` ``(1, 1, Z, Y,
    X)`` bool where those points lie inside the moving field of view, as the similarity after saw them; all on
    ``device``; ``local``: for LNCC, the similarity after's per-voxel map
    (:class:`~DeepRegistrationLib.registration.similarity.LocalCC2`, None when its fixed statistics were cached
    ones of an earlier view). They hold for that very ``transform`` object only (:meth:`warped_for`). Pickled, it
    is the plain ``(fixed, moving)`` tuple (what earlier versions kept; the warped image is computed again where it
    is needed).
    """

    fixed: WorkingImage
    moving: WorkingImage
    fixed_tensor: torch.Tensor | None = None
    fixed_mask: torch.Tensor | None = None
    warped: torch.Tensor | None = None
    view: torch.Tensor | None = None
    transform: SpatialTransform | None = None
    local: LocalCC2 | None = None

    def __iter__(self):
        return iter((self.fixed, self.moving))

    def __len__(self) -> int:
        return 2

    def __reduce__(self):
        return tuple, ((self.fixed, self.moving),)

    def __getitem__(self, i):
        return (self.fixed, self.moving)[i]

    def warped_for(self, transform: SpatialTransform, device=None) -> tuple | None:
        """``(fixed_tensor, fixed_mask, warped, view)`` when they were computed for ``transform`` (the same object)
        on ``device`` (None: the CPU), else None."""
        if self.warped is None or transform is not self.transform:
            return None
        want = torch.empty(0, device="cpu" if device is None else device).device  # "cuda" is "cuda:0" here
        if self.warped.device != want:
            return None
        return self.fixed_tensor, self.fixed_mask, self.warped, self.view


def _pool(t: torch.Tensor, f: int) -> torch.Tensor:
    return t if f == 1 else F.avg_pool3d(t, f, stride=f, ceil_mode=True)


class _Level:
    """One resolution level: pooled images, masks and fixed-grid points."""

    def __init__(self, fixed: torch.Tensor, fgrid: Grid, moving: torch.Tensor, mgrid: Grid, factor: int,
                 fmask: torch.Tensor | None, mmask: torch.Tensor | None):
        self.factor = factor
        self.fgrid = fgrid.downsampled(factor)
        self.mgrid = mgrid.downsampled(factor)
        self.fixed = _pool(fixed, factor)
        chans = [moving] + ([mmask] if mmask is not None else [])
        self.moving = _pool(torch.cat(chans, 1), factor)
        self.fmask = None if fmask is None else (_pool(fmask, factor) > 0.5)
        self.pts = W.grid_points(self.fgrid, fixed.device)

    def warp_fixed(self, mapped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The fixed image at fixed-space points ``(B, Z, Y, X, 3)`` (the symmetric mode's half-way warp):
        ``(warped (B, 1, Z, Y, X), view, mask)``, ``view`` marking samples inside the fixed field of view and
        ``mask`` the warped fixed mask (bool; None without a mask)."""
        chans = self.fixed if self.fmask is None else torch.cat([self.fixed, self.fmask.to(self.fixed.dtype)], 1)
        out, view = W.sample_in_view(chans, self.fgrid, mapped)
        return out[:, :1], view, (None if self.fmask is None else out[:, 1:2].detach() > 0.5)

    def warp(self, mapped: torch.Tensor, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moving image at mapped points ``(B, Z, Y, X, 3)``: ``(warped, valid, view)``.

        ``mapped`` is in LPS mm, or with ``normalized`` already in ``grid_sample`` coordinates of ``mgrid``
        (points mapped by ``W.normalized_affine(A, self.mgrid)``: one point-wise product fewer per step).
        ``warped`` ``(B, 1, Z, Y, X)`` is 0 outside the moving image; ``view`` (bool, same shape) marks the
        samples inside the moving field of view and ``valid`` those also inside the moving mask: the
        similarity counts only the overlap (see :mod:`~DeepRegistrationLib.registration.similarity`).
        """
        if normalized:
            out, view = W.sample_normalized_in_view(self.moving, mapped)
        else:
            out, view = W.sample_in_view(self.moving, self.mgrid, mapped)
        valid = view
        if out.shape[1] > 1:
            valid = view & (out[:, 1:2].detach() > 0.5)
        return out[:, :1], valid, view

    def loss(self, sim: Similarity, mapped: torch.Tensor, normalized: bool = False) -> torch.Tensor:
        """``sim`` of the fixed image and the moving image at ``mapped`` (its overlap only; ``normalized`` as
        :meth:`warp`), a scalar."""
        warped, valid, view = self.warp(mapped, normalized)
        return sim(self.fixed, warped, valid, self.fmask, view)


class _Best:
    """Keeps the parameters with the lowest loss seen (Adam may end a level slightly past the optimum;
    for images that already match, the start is the optimum and is returned unchanged).

    An update must beat the best loss by ``tol`` (relative): near an optimum, float32 summation noise
    is larger than the true differences and would otherwise pick a random nearby point.
    """

    def __init__(self, params: torch.Tensor, tol: float = 1e-5):
        self.loss = float("inf")
        self.tol = tol
        self.params = params.detach().clone()

    def update(self, loss: torch.Tensor, params: torch.Tensor) -> None:
        value = float(loss.detach())
        if value < self.loss - self.tol * max(abs(self.loss), 1e-3) or self.loss == float("inf"):
            self.loss = value
            self.params.copy_(params.detach())


def _smooth(u: torch.Tensor, passes: int) -> torch.Tensor:
    for _ in range(passes):
        u = box_filter(u, 1)
    return u


def _factors(levels: int) -> list[int]:
    return [2 ** i for i in reversed(range(levels))]


def _optimize_linear(lv: _Level, a0: torch.Tensor, kind: str, center: torch.Tensor, iters: int, sim: Similarity,
                     progress: Progress, frame: torch.Tensor, term: LandmarkTerm | None = None,
                     reverse: _Level | None = None) -> torch.Tensor:
    """Rigid/affine fit at one level; the parameters live in ``frame`` (4×4: the fixed grid's axes), so
    the result does not depend on how the image axes are stored (LPS, RAS, permuted, oblique).
    ``term`` (guide landmarks, mm²) is added to the similarity. With ``reverse`` (the same level with the
    images' roles swapped: moving grid, fixed image sampled) the similarity is the mean of both directions,
    ``A`` on the fixed grid and ``A⁻¹`` on the moving grid, which is unchanged when the images are swapped
    (the symmetric mode)."""
    n = 6 if kind == "rigid" else 12
    local_center = frame[:3, :3].T @ center

    def matrix(params: torch.Tensor) -> torch.Tensor:
        return a0 @ frame @ params_to_matrix(params * scale, kind, local_center) @ frame.T

    # parameter scales: translation in units of 10 mm, rotation / matrix entries in units of 0.1
    scale = torch.tensor([0.1] * 3 + [10.0] * 3 if kind == "rigid" else [10.0] * 3 + [0.1] * 9,
                         device=a0.device)
    raw = torch.zeros(n, device=a0.device, requires_grad=True)
    opt = CosineAdam(raw, 0.05 if lv.factor > 1 else 0.02, iters, lr_end=0.0005)
    # a second similarity object: each caches the statistics of its own first image
    sim_reverse = None if reverse is None else Similarity(sim.name, sim.radius)

    def objective(params: torch.Tensor) -> torch.Tensor:
        m = matrix(params)
        loss = lv.loss(sim, W.apply_affine(lv.pts, W.normalized_affine(m, lv.mgrid)), normalized=True)
        if reverse is not None:
            loss = 0.5 * (loss + reverse.loss(sim_reverse, W.apply_affine(reverse.pts, torch.linalg.inv(m))))
        if term is None:
            return loss
        return loss + (term.linear(m) if reverse is None else term.linear_symmetric(m))

    best = _descend(raw, opt, objective, iters, progress, f"{kind} level 1/{lv.factor}")
    with torch.no_grad():
        return matrix(best)


def _descend(param: torch.Tensor, opt: CosineAdam, objective, iters: int, progress: Progress,
             label: str) -> torch.Tensor:
    """Runs ``iters`` optimizer steps on ``objective(param)``; returns the best parameters seen
    (including the final ones), detached."""
    best = _Best(param)
    for it in range(iters):
        opt.zero_grad()
        loss = objective(param)
        best.update(loss, param)
        loss.backward()
        opt.step()
        if it % 5 == 0:
            progress((it + 1) / iters, f"{label}: loss {loss.item():.4f}")
    with torch.no_grad():
        best.update(objective(param), param)
    return best.params


def _field_from_param(param: torch.Tensor, grid: Grid, cfg: RegistrationConfig) -> torch.Tensor:
    u = _smooth(param, cfg.smoothing_passes)
    return scaling_and_squaring(u, grid) if cfg.diffeomorphic else u


def _optimize_field(lv: _Level, affine: torch.Tensor, init: torch.Tensor, iters: int, sim: Similarity,
                    cfg: RegistrationConfig, progress: Progress,
                    term: LandmarkTerm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The deformable stage at one level, from the parameters ``init`` ``(1, 3, Z, Y, X)`` (mm, on ``lv.fgrid``):
    returns the displacement ``u`` and, for ``cfg.diffeomorphic``, its velocity ``v`` (``u = exp(v) - id``;
    else None), both ``(1, 3, Z, Y, X)`` mm on ``lv.fgrid``."""
    reg = Regularizer(cfg.regularization)
    param = init.detach().clone().requires_grad_(True)
    lr = FIELD_STEP * min(lv.fgrid.spacing)  # mm per step
    # decaying steps: Adam's normalized steps would otherwise keep the field jittering by ~lr around
    # the optimum (trilinear interpolation has kinks at voxel centres, so gradients never vanish)
    opt = CosineAdam(param, lr, iters, lr_end=FIELD_STEP_END * lr, vector_dim=1)
    to_moving = W.normalized_affine(affine, lv.mgrid)  # fixed LPS -> moving grid_sample coordinates

    def objective(p: torch.Tensor) -> torch.Tensor:
        u = _field_from_param(p, lv.fgrid, cfg)
        mapped = W.apply_affine(lv.pts + torch.movedim(u, 1, -1), to_moving)  # grid_sample coordinates
        loss = lv.loss(sim, mapped, normalized=True) + cfg.reg_weight * reg(u, lv.fgrid)
        if cfg.jacobian_weight > 0:
            loss = loss + cfg.jacobian_weight * folding_penalty(u, lv.fgrid)
        if term is not None:
            loss = loss + term.deformable(affine, u, lv.fgrid)
        return loss

    best = _descend(param, opt, objective, iters, progress, f"deformable level 1/{lv.factor}")
    with torch.no_grad():
        velocity = _smooth(best, cfg.smoothing_passes).detach() if cfg.diffeomorphic else None
        return _field_from_param(best, lv.fgrid, cfg).detach(), velocity


def _optimize_symmetric_field(lv: _Level, grid: Grid, h_fixed: torch.Tensor, h_moving: torch.Tensor,
                              init: torch.Tensor, iters: int, sim: Similarity, cfg: RegistrationConfig,
                              progress: Progress, term: LandmarkTerm | None = None) -> torch.Tensor:
    """The symmetric (midpoint, SyN-style) deformable stage at one level (:mod:`.symmetric`).

    The parameters are a stationary velocity ``v`` ``(1, 3, Z, Y, X)`` mm on ``grid`` (the midpoint grid at
    this level's factor). Both images move half way: the fixed image is sampled at ``H_f⁻¹ exp(-v/2)(z)``, the
    moving one at ``H_m exp(v/2)(z)`` (``h_fixed``/``h_moving`` 4×4, ``H_m H_f = A``), and the similarity (the
    sum of both argument orders) compares them on ``grid``; the smoothness penalty is on ``v`` (the same for
    ``v`` and ``-v``). Swapping the images swaps ``(H_f, H_m)`` for ``(H_m⁻¹, H_f⁻¹)`` and ``v`` for ``-v``: the
    registration of B to A is (up to the linear stage and the discretization) the inverse of A to B's.
    The full map is ``H_m exp(v) H_f``. Guide points meet half way: ``exp(v/2)(H_f f)`` against
    ``exp(-v/2)(H_m⁻¹ m)``.

    Returns:
        ``v`` ``(1, 3, Z, Y, X)`` mm on ``grid``.
    """
    reg = Regularizer(cfg.regularization)
    param = init.detach().clone().requires_grad_(True)
    lr = FIELD_STEP * min(grid.spacing)
    opt = CosineAdam(param, lr, iters, lr_end=FIELD_STEP_END * lr, vector_dim=1)
    pts = W.grid_points(grid, init.device)
    h_fixed_inv, h_moving_inv = torch.linalg.inv(h_fixed), torch.linalg.inv(h_moving)

    def half_way(points: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
        return points + torch.movedim(W.sample_field(disp, grid, points), 1, -1)

    def objective(p: torch.Tensor) -> torch.Tensor:
        v = _smooth(p, cfg.smoothing_passes)
        forward = scaling_and_squaring(0.5 * v, grid)
        backward = scaling_and_squaring(-0.5 * v, grid)
        fixed_half, fixed_view, fixed_mask = lv.warp_fixed(
            W.apply_affine(pts + torch.movedim(backward, 1, -1), h_fixed_inv))
        moving_half, valid, view = lv.warp(W.apply_affine(pts + torch.movedim(forward, 1, -1), h_moving))
        # the similarity treats its first image as constant (its local statistics are precomputed): both
        # orders, each with the other image held, give the gradient through both half-warps. Their sum, not
        # their mean: each order moves only its own image, half way, so each carries about half of the
        # similarity's gradient for the full map (with the mean the smoothness weight acted twice as strong:
        # Dice 0.838 against 0.841 for the default at 4 mm on the bundled pair)
        both, seen = valid & fixed_view, view & fixed_view
        loss = (sim(fixed_half.detach(), moving_half, both, fixed_mask, seen)
                + sim(moving_half.detach(), fixed_half, both, fixed_mask, seen))
        loss = loss + cfg.reg_weight * reg(v, grid)
        if cfg.jacobian_weight > 0:
            loss = loss + cfg.jacobian_weight * (folding_penalty(forward, grid) + folding_penalty(backward, grid))
        if term is not None:
            loss = loss + term.pairs(lambda f: half_way(W.apply_affine(f, h_fixed), forward),
                                     lambda m: half_way(W.apply_affine(m, h_moving_inv), backward))
        return loss

    best = _descend(param, opt, objective, iters, progress, f"symmetric deformable level 1/{lv.factor}")
    with torch.no_grad():
        return _smooth(best, cfg.smoothing_passes).detach()


def _predict(p: "_Prepared", affine: torch.Tensor, predictor: FieldPredictor, device) -> torch.Tensor:
    """The predictor's displacement ``(1, 3, Z, Y, X)`` mm on the finest fixed working grid, for the moving image
    after ``affine``."""
    finest = p.finest
    with torch.no_grad():
        moved = finest.warp(W.apply_affine(finest.pts, affine))[0]
        return predictor.predict(finest.fixed, moved, finest.fgrid).to(device=device, dtype=torch.float32)


def _stage_plan(stage: str, planned: dict, voxels: dict, finest_voxels: int, cfg: RegistrationConfig) -> dict:
    """The iterations each level of one stage runs: ``{factor: iterations}``, coarse to fine as ``planned``.

    ``planned`` maps each level's pooling factor to its iterations from ``cfg.iterations``/``cfg.affine_iterations``,
    ``voxels`` to the level's fixed-grid voxel count; ``finest_voxels`` is the working grid's. On a working grid
    larger than ``cap = cfg.large_grid_cap()`` (``large_grid_voxels`` millions, more for a spacing finer than the
    default; no limit for 0) the stage's work (voxel-iterations over its levels) is capped at what the same plan
    costs on a grid of ``cap`` voxels, ``Σ planned·voxels · cap / finest_voxels``; the levels take it coarse to
    fine, each ``min(planned, ⌊left / voxels⌋)`` (the coarsest at least one), so the finest levels give way
    first; a finer level left fewer than ``MIN_LEVEL_SHARE`` of its planned iterations gets 0. A level with 0 is
    not optimized (the coarser field or matrix carries over). Grids up to ``cap``
    run ``planned`` exactly. ``stage`` (``"linear"``/``"deformable"``) only names the stage in the log."""
    cap = cfg.large_grid_cap()
    if finest_voxels <= cap:
        return dict(planned)
    left = cap / finest_voxels * sum(planned[f] * voxels[f] for f in planned)
    out = {}
    for n, f in enumerate(planned):
        iters = min(planned[f], math.floor(left / voxels[f]))
        if n == 0:
            iters = max(iters, min(planned[f], 1))
        elif iters < MIN_LEVEL_SHARE * planned[f]:
            iters = 0
        out[f] = iters
        left -= iters * voxels[f]
    if out != planned:
        logger.info("%s stage on %.2f M working voxels (cap %.2f M, large_grid_voxels): iterations per level %s "
                    "instead of %s", stage, finest_voxels / 1e6, cap / 1e6, out, planned)
    return out


def _stage_levels(stage: str, planned: dict, grids: dict, finest: Grid, cfg: RegistrationConfig, span: tuple,
                  progress: ProgressCallback | None, record: list):
    """The levels one stage runs, coarse to fine as ``planned`` (pooling factor → iterations from
    ``cfg.iterations``/``cfg.affine_iterations``; ``grids`` maps the factor to the level's grid, ``finest`` is
    the stage's full-size grid): ``(n, factor, iterations, progress)`` per level, the iterations within
    ``cfg.large_grid_voxels`` (:func:`_stage_plan`), the levels sharing ``span`` of ``progress`` (``n`` counts
    every planned level). A level the plan leaves out (0 of a planned > 0) is not yielded: the coarser level's
    matrix or field carries over. Each level's entry goes to ``record`` (``RegistrationResult.plan``)."""
    voxels = {f: grids[f].num_voxels for f in planned}
    plan = _stage_plan(stage, planned, voxels, finest.num_voxels, cfg)
    record.extend({"stage": stage, "factor": int(f), "voxels": int(voxels[f]), "planned": int(planned[f]),
                   "iterations": int(plan[f])} for f in planned)
    k = len(planned)
    for n, f in enumerate(planned):
        if plan[f] == 0 < planned[f]:
            continue
        yield n, f, plan[f], Progress(progress, *np.interp([n / k, (n + 1) / k], [0, 1], span))


def _level_plan(run_factors: list[int], grids: dict, finest: Grid, cfg: RegistrationConfig,
                progress: ProgressCallback | None, record: list):
    """:func:`_stage_levels` of the deformable stage: the coarser levels with ``COARSE_ITERATION_FACTOR`` times
    ``cfg.iterations``, the levels sharing 0.3–0.95 of ``progress``."""
    planned = {f: cfg.iterations * (COARSE_ITERATION_FACTOR if f > 1 else 1) for f in run_factors}
    return _stage_levels("deformable", planned, grids, finest, cfg, (0.3, 0.95), progress, record)


def _symmetric_stage(p: "_Prepared", cfg: RegistrationConfig, affine: torch.Tensor, device,
                     predictor: FieldPredictor | None, predictor_mode: str,
                     progress: ProgressCallback | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The symmetric deformable stage over the levels in the midpoint frame (:mod:`.symmetric`): ``(u, v)`` on
    the finest fixed working grid, ``v`` the velocity pulled back into the fixed frame (``A exp(v)`` is the
    full map, ``u = exp(v) - id``), both ``(1, 3, Z, Y, X)`` mm (``v`` None for a replacing predictor)."""
    finest = p.finest
    a_np = affine.double().cpu().numpy()
    hf_np, hm_np = symmetric.half_affines(a_np)
    mid = symmetric.midpoint_grid(p.fw.grid, p.mw.grid, hf_np, hm_np)
    h_fixed, h_moving = (torch.as_tensor(h, dtype=torch.float32, device=device) for h in (hf_np, hm_np))
    logger.info("symmetric: midpoint grid %s", mid)
    run_factors = p.factors
    init = torch.zeros((1, 3, *mid.downsampled(run_factors[0]).shape), device=device)
    if predictor is not None:
        pred = _predict(p, affine, predictor, device)
        if predictor_mode == "replace":
            return pred, None
        init = symmetric.push_forward(pred, finest.fgrid, hf_np, mid)
        run_factors = [1]
    v, prev = init, None
    for _, f, iters, sub in _level_plan(run_factors, {f: mid.downsampled(f) for f in run_factors}, mid, cfg,
                                        progress, p.plan):
        grid = mid.downsampled(f)
        if prev is not None:
            v = W.resample_field(v, prev, grid)
        v = _optimize_symmetric_field(p.levels[f], grid, h_fixed, h_moving, v, iters, p.sim, cfg, sub, p.term)
        prev = grid
    with torch.no_grad():
        v_fixed = symmetric.pull_back(v, prev, hf_np, finest.fgrid)
        return scaling_and_squaring(v_fixed, finest.fgrid), v_fixed


def _evaluate(lv: _Level, affine: torch.Tensor | None, u: torch.Tensor | None, sim: Similarity, local: bool = False
              ) -> tuple[float, float, torch.Tensor, torch.Tensor, LocalCC2 | None]:
    """``sim`` and the global NCC of ``lv``'s images after ``affine`` (4×4; None: the identity) and ``u`` (None: no
    field), the warped
    moving image ``(1, 1, Z, Y, X)`` with its field of view (bool, same shape) they were computed on, and with
    ``local`` for LNCC its per-voxel map (:meth:`~DeepRegistrationLib.registration.similarity.Similarity.evaluate`;
    else None)."""
    with torch.no_grad():
        pts = lv.pts if u is None else lv.pts + torch.movedim(u, 1, -1)
        # the identity (None) maps the points to themselves: apply_affine would return the same numbers
        # (x·1 + y·0 + z·0 + 0 is exact; grid_points gives no -0.0 that it would turn into +0.0)
        mapped = pts if affine is None else W.apply_affine(pts, affine)
        warped, valid, view = lv.warp(mapped)
        if local:
            loss, local_map = sim.evaluate(lv.fixed, warped, valid, lv.fmask, view)
        else:
            loss, local_map = sim(lv.fixed, warped, valid, lv.fmask, view), None
        ncc = global_ncc(lv.fixed, warped, valid if lv.fmask is None else valid & lv.fmask)
        return float(loss), ncc, warped, view, local_map


def _level_moments(lv: _Level) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Second moments (centre, covariance; LPS mm) of a level's fixed and moving images, within their masks."""
    fixed = lv.fixed[0, 0].double().cpu().numpy()
    fmask = None if lv.fmask is None else lv.fmask[0, 0].cpu().numpy()
    moving = lv.moving[0, 0].double().cpu().numpy()
    mmask = None if lv.moving.shape[1] < 2 else lv.moving[0, 1].cpu().numpy() > 0.5
    return (init_search.second_moments(fixed, lv.fgrid, fmask),
            init_search.second_moments(moving, lv.mgrid, mmask))


def _initial_affine(cfg: RegistrationConfig, fw: WorkingImage, mw: WorkingImage) -> np.ndarray:
    a = np.eye(4)
    if cfg.initialization == "moments":
        a[:3, 3] = center_of_mass(mw.array, mw.grid, mw.mask) - center_of_mass(fw.array, fw.grid, fw.mask)
    elif cfg.initialization == "geometry":
        a[:3, 3] = mw.grid.center() - fw.grid.center()
    return a


def _padded_field(u: torch.Tensor | np.ndarray | None, grid: Grid) -> tuple[np.ndarray | None, Grid | None]:
    """The field ``(3, Z, Y, X)`` (any float type) extended by one voxel on every side (edge values repeated), as
    float64, on the matching grid.

    ITK (and our ``warp.sample_field``) give zero displacement beyond half a voxel outside a field's grid.
    The working grid's outermost voxel centres can lie inside the fixed image's outermost voxels, so
    without this margin the exported transform would jump from ``u`` to 0 in the fixed image's border
    layer (measured: 0.17 % "folded" border voxels on a 1 mm brain pair).

    ``np.pad(u.astype(np.float64), 1, mode="edge")`` over the three space axes, value for value (copies and the
    exact float32 → float64 conversion), written into its array directly: no float64 copy of ``u`` first.
    """
    if u is None:
        return None, None
    src = u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u)
    padded = np.empty((src.shape[0],) + tuple(n + 2 for n in src.shape[1:]), dtype=np.float64)
    padded[:, 1:-1, 1:-1, 1:-1] = src
    # each axis in turn over what is filled so far (the corners and edges come from the earlier axes' copies)
    padded[:, 0, 1:-1, 1:-1] = padded[:, 1, 1:-1, 1:-1]
    padded[:, -1, 1:-1, 1:-1] = padded[:, -2, 1:-1, 1:-1]
    padded[:, :, 0, 1:-1] = padded[:, :, 1, 1:-1]
    padded[:, :, -1, 1:-1] = padded[:, :, -2, 1:-1]
    padded[:, :, :, 0] = padded[:, :, :, 1]
    padded[:, :, :, -1] = padded[:, :, :, -2]
    origin = np.asarray(grid.origin) - grid.direction_matrix @ np.asarray(grid.spacing)
    return padded, Grid(tuple(n + 2 for n in grid.shape), grid.spacing, tuple(origin), grid.direction)


@dataclass
class _Prepared:
    """What every stage works on: the working images as tensors and their resolution levels.

    ``f_t``/``m_t`` are the fixed/moving working images ``(1, 1, Z, Y, X)`` float32 in [0, 1] on ``fw.grid``/
    ``mw.grid``; ``levels`` maps each pooling factor (``factors``, coarsest first) to its :class:`_Level`;
    ``frame`` is the 4×4 fixed-grid axes the linear parameters live in; ``term`` the guide-landmark term.
    """

    fw: WorkingImage
    mw: WorkingImage
    f_t: torch.Tensor
    m_t: torch.Tensor
    fmask: torch.Tensor | None
    mmask: torch.Tensor | None
    factors: list[int]
    levels: dict
    sim: Similarity
    frame: torch.Tensor
    term: LandmarkTerm | None
    sim_before: float
    ncc_before: float
    plan: list = field(default_factory=list)

    @property
    def finest(self) -> _Level:
        return self.levels[1]


def _prepare_levels(fixed: Image, moving: Image, cfg: RegistrationConfig, fixed_mask: Image | None,
                    moving_mask: Image | None, guide: GuideLandmarks | None, device) -> _Prepared:
    """Working images (resampled, normalized), their levels, the similarity and the guide term."""
    # the two images in two threads unless one thread was asked for (the same bits either way)
    fw, mw = prepare_pair(fixed, moving, cfg.spacing, fixed_mask, moving_mask, cfg.intensity_percentiles,
                          concurrent=cfg.threads != 1)
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)[None, None]
    f_t, m_t = to_t(fw.array), to_t(mw.array)
    fmask = None if fw.mask is None else to_t(fw.mask)
    mmask = None if mw.mask is None else to_t(mw.mask)
    factors = _factors(cfg.levels)
    levels = {f: _Level(f_t, fw.grid, m_t, mw.grid, f, fmask, mmask) for f in factors}
    sim = Similarity(cfg.similarity, cfg.lncc_radius)
    term = None if guide is None or cfg.guide_weight == 0 else LandmarkTerm(guide, cfg.guide_weight, device)
    sim_before, ncc_before, _, _, _ = _evaluate(levels[1], None, None, sim)
    frame = torch.eye(4, device=device)
    frame[:3, :3] = torch.as_tensor(fw.grid.direction_matrix, dtype=torch.float32, device=device)
    return _Prepared(fw, mw, f_t, m_t, fmask, mmask, factors, levels, sim, frame, term, sim_before, ncc_before)


def _initialize(p: _Prepared, cfg: RegistrationConfig, initial_affine: np.ndarray | None,
                progress: ProgressCallback | None, timings: dict) -> tuple[np.ndarray, dict]:
    """The linear stage's start (4×4 LPS fixed → moving) and how it was found (``RegistrationResult.initialization``)."""
    if initial_affine is not None:
        return np.asarray(initial_affine, dtype=float), {"mode": "given"}
    if cfg.initialization == "search":
        fw, mw = p.fw, p.mw
        sf = init_search.search_factor(min(fw.grid.spacing), p.factors[0])
        coarse = p.levels[p.factors[0]]
        search_lv = coarse if sf == p.factors[0] else _Level(p.f_t, fw.grid, p.m_t, mw.grid, sf, p.fmask, p.mmask)
        fixed_m, moving_m = _level_moments(coarse)
        found = init_search.search(search_lv, coarse, p.sim, fixed_m, moving_m, _initial_affine(
            RegistrationConfig(initialization="geometry"), fw, mw), p.frame, cfg.init_max_rotation,
            Progress(progress, 0.08, 0.12))
        timings["initialization"] = found.seconds
        return found.matrix, found.to_dict()
    return _initial_affine(cfg, p.fw, p.mw), {"mode": cfg.initialization}


def _linear_stage(p: _Prepared, cfg: RegistrationConfig, a0: np.ndarray, device,
                  progress: ProgressCallback | None) -> torch.Tensor:
    """Rigid/affine refinement from ``a0`` over the levels; the 4×4 LPS fixed → moving matrix (float32)."""
    affine = torch.as_tensor(a0, dtype=torch.float32, device=device)
    center = torch.as_tensor(center_of_mass(p.fw.array, p.fw.grid, p.fw.mask), dtype=torch.float32, device=device)
    kind = "rigid" if cfg.mode == "rigid" else "affine"
    factors = p.factors
    # deformable: the affine stage stops one level early (the field refines it); rigid/affine: all levels
    lin_factors = ([f for f in factors if f >= 2] or [1]) if cfg.mode == "deformable" else factors
    # 0.08-0.12 is the initialization search's share of the progress range
    lin_span = (0.12, 0.3 if cfg.mode == "deformable" else 0.95)
    planned = {f: cfg.affine_iterations * (2 if f > lin_factors[-1] else 1) for f in lin_factors}
    for _, f, iters, sub in _stage_levels("linear", planned, {f: p.levels[f].fgrid for f in lin_factors}, p.fw.grid,
                                          cfg, lin_span, progress, p.plan):
        lv = p.levels[f]
        f_t, m_t = p.f_t, p.m_t
        if f == 1:
            # At full resolution, linear interpolation of the moving image pulls a linear fit towards
            # voxel-aligned positions (~1/12 voxel); a 3³ box smoothing of both images removes most of it.
            f_t, m_t = box_filter(p.f_t, 1), box_filter(p.m_t, 1)
            lv = _Level(f_t, p.fw.grid, m_t, p.mw.grid, 1, p.fmask, p.mmask)
        reverse = _Level(m_t, p.mw.grid, f_t, p.fw.grid, f, p.mmask, p.fmask) if cfg.symmetric else None
        affine = _optimize_linear(lv, affine, kind, center, iters, p.sim, sub, p.frame, p.term, reverse)
    return affine


def _deformable_stage(p: _Prepared, cfg: RegistrationConfig, affine: torch.Tensor, device,
                      predictor: FieldPredictor | None, predictor_mode: str,
                      progress: ProgressCallback | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The dense field over the levels (coarse to fine), after ``affine``: ``(u, v)``, the displacement and
    (``cfg.diffeomorphic``/``cfg.symmetric``) its velocity, ``(1, 3, Z, Y, X)`` mm on the finest level's grid (``v`` None otherwise;
    ``u`` None only when no level ran)."""
    if cfg.symmetric:
        return _symmetric_stage(p, cfg, affine, device, predictor, predictor_mode, progress)
    factors, finest = p.factors, p.finest
    u = v = None
    run_factors = factors
    init = torch.zeros((1, 3, *p.levels[factors[0]].fgrid.shape), device=device)
    if predictor is not None:
        init = _predict(p, affine, predictor, device)
        run_factors = [] if predictor_mode == "replace" else [1]
        u = init
    prev_grid = p.levels[factors[0]].fgrid if predictor is None else finest.fgrid
    for n, f, iters, sub in _level_plan(run_factors, {f: p.levels[f].fgrid for f in run_factors}, finest.fgrid, cfg,
                                        progress, p.plan):
        lv = p.levels[f]
        if n > 0 or predictor is not None:
            # the diffeomorphic parameters are the velocity (the displacement only for a prediction)
            init = W.resample_field(u if v is None else v, prev_grid, lv.fgrid)
        if cfg.diffeomorphic and n == 0 and predictor is None:
            init = torch.zeros_like(init)
        u, v = _optimize_field(lv, affine, init, iters, p.sim, cfg, sub, p.term)
        prev_grid = lv.fgrid
    if u is not None and prev_grid != finest.fgrid:
        u = W.resample_field(u, prev_grid, finest.fgrid)
        v = None if v is None else W.resample_field(v, prev_grid, finest.fgrid)
    return u, v


def _finish(p: _Prepared, cfg: RegistrationConfig, affine: torch.Tensor, u: torch.Tensor | None,
            v: torch.Tensor | None, init_info: dict, timings: dict, device) -> RegistrationResult:
    """Similarity after, the Jacobian and its summaries, and the exported transform (field padded by a voxel)."""
    fw = p.fw
    sim_after, ncc_after, warped, view, local = _evaluate(p.finest, affine, u, p.sim, local=True)
    a_np = affine.double().cpu().numpy()
    # the float32 field as it is, copied off the device once (the Jacobian's differences are float64 either way)
    u_np = None if u is None else u[0].detach().cpu().numpy()
    if u_np is not None:
        detj = metrics.jacobian_determinant(u_np, fw.grid, affine=a_np)
    else:
        detj = np.full(fw.grid.shape, float(np.linalg.det(a_np[:3, :3])))
    transform = SpatialTransform(a_np, *_padded_field(u_np, fw.grid))
    # the warped image is a channel of the moving image and mask sampled together: its own copy
    images = WorkingImages(p.fw, p.mw, p.finest.fixed, p.finest.fmask, warped.contiguous(), view, transform, local)
    return RegistrationResult(
        transform=transform,
        working_grid=fw.grid, similarity_before=p.sim_before, similarity_after=sim_after,
        ncc_before=p.ncc_before, ncc_after=ncc_after, jacobian=detj.astype(np.float32),
        folding_percent=float(metrics.folding_percent(detj)), sdlogj=metrics.sdlogj(detj),
        initialization=init_info, timings=timings, device=str(device), config=cfg,
        velocity=None if v is None else _padded_field(v[0], fw.grid)[0],
        working_images=images, plan=list(p.plan))


def register(fixed: Image, moving: Image, config: RegistrationConfig | None = None, *,
             fixed_mask: Image | None = None, moving_mask: Image | None = None,
             initial_affine: np.ndarray | None = None, predictor: FieldPredictor | None = None,
             predictor_mode: str = "init", guide: GuideLandmarks | None = None,
             progress: ProgressCallback | None = None) -> RegistrationResult:
    """Registers ``moving`` to ``fixed``.

    Args:
        fixed: Fixed image (any orientation and voxel size; LPS grid): float32 intensities, or int16/uint16 as
            :func:`~DeepRegistrationLib.io.images.read_image` keeps them with ``keep_integer`` (exact in float32:
            the same result as from their float32 copy, which is never made).
        moving: Moving image (the same types).
        config: Settings; defaults to ``RegistrationConfig()`` (deformable, LNCC, 2 mm).
        fixed_mask / moving_mask: Optional masks (any grid overlapping their image); only voxels
            inside count in the similarity.
        initial_affine: Optional 4×4 LPS fixed → moving matrix replacing the initialization.
        predictor: Optional learned :class:`FieldPredictor` for the deformable stage.
        predictor_mode: ``"init"`` (prediction starts the finest-level optimization) or ``"replace"``.
        guide: Optional corresponding points (LPS mm, see :mod:`~DeepRegistrationLib.registration.guidance`):
            ``config.guide_weight · mean |T(f_i) - m_i|²`` (mm²) is added to the linear and deformable
            objectives. They do not choose the start here: pass their fit as ``initial_affine`` for that.
        progress: ``callback(fraction, message)``; returning False cancels (raises Cancelled).

    Returns:
        :class:`RegistrationResult`.

    Raises:
        InputError: bad settings, images that do not overlap, empty masks, CUDA asked but absent.
        Cancelled: the callback asked to stop.
    """
    cfg = (config or RegistrationConfig()).validate()
    if predictor_mode not in PREDICTOR_MODES:
        raise ValueError(f"predictor_mode must be one of {PREDICTOR_MODES}, not {predictor_mode!r}")
    if predictor is not None:
        check_predictor_use(cfg.mode, predictor_mode)  # a field predictor needs the deformable mode (InputError)
    device = select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prog = Progress(progress)
    timings: dict[str, float] = {}
    check_overlap(fixed.grid, moving.grid)

    t = time.perf_counter()
    prog(0.0, "preprocessing")
    prepared = _prepare_levels(fixed, moving, cfg, fixed_mask, moving_mask, guide, device)
    timings["preprocess"] = time.perf_counter() - t
    prog(0.08, "initializing")

    a0, init_info = _initialize(prepared, cfg, initial_affine, progress, timings)
    t = time.perf_counter()
    affine = _linear_stage(prepared, cfg, a0, device, progress)
    timings["linear"] = time.perf_counter() - t

    u = v = None
    if cfg.mode == "deformable":
        t = time.perf_counter()
        u, v = _deformable_stage(prepared, cfg, affine, device, predictor, predictor_mode, progress)
        timings["deformable"] = time.perf_counter() - t

    t = time.perf_counter()
    result = _finish(prepared, cfg, affine, u, v, init_info, timings, device)
    timings["evaluate"] = time.perf_counter() - t
    prog(1.0, "registered")
    logger.info("registered: %s %.4f -> %.4f, NCC %.3f -> %.3f, folding %.4f%%", cfg.similarity,
                result.similarity_before, result.similarity_after, result.ncc_before, result.ncc_after,
                result.folding_percent)
    return result
