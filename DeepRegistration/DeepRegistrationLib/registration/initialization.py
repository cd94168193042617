"""The initial alignment: a search over many rigid starts at a coarse resolution, the best one wins.

Centre-of-mass alignment alone fails when the moving image is rotated by more than the linear stage's
capture range (~20°) or sees only part of the fixed image (a slab, a cropped scan: the centres of mass
then differ by the missing part). :func:`search` therefore scores, in one tensor batch each, on a
*search level* (the images average-pooled to voxels of 16 mm or more):

1. **rotations** about the fixed centre of mass, the moving centre of mass mapped onto it: the identity,
   the 4 principal-axes alignments (eigenvectors of the intensity-weighted second moments, one for each
   proper sign choice: the sign ambiguity is resolved by the similarity), and a lattice of rotation
   vectors (step :data:`ROTATION_STEP_DEG`, all rotations up to 180° about any axis);
2. **translations**: for the best :data:`TOP_ROTATIONS` rotations, a 5×5×5 grid of offsets along the
   fixed image's axes (steps of 1/8 of the larger field-of-view extent);
   steps 1 and 2 are pre-screened on the search level pooled once more: only the best
   :data:`PRESCREEN_KEEP` of each (and the centre-of-mass and principal-axes starts) are scored on the search level;
3. **refinement**: the best :data:`TOP_STARTS` starts, the plain centre-of-mass start and the
   field-of-view-centre start run a short rigid optimization together (one batch), and the lowest loss at
   the coarsest registration level wins.

Scores are the registration's own similarity (LNCC with a smaller window at the search level), computed
on the overlap of the two images only (:mod:`~DeepRegistrationLib.registration.similarity`); a start whose overlap
with the fixed image's foreground is below :data:`MIN_OVERLAP` of the best start's is discarded, so a
start that keeps only a small well-matching corner cannot win.

All matrices are 4×4 LPS fixed → moving, ``y = A x`` (mm), as everywhere in the engine.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .optim import CosineAdam
from .similarity import Similarity

logger = logging.getLogger(__name__)

#: Spacing of the rotation-vector lattice (degrees): covers every rotation within ~31° (36·√3/2).
ROTATION_STEP_DEG = 36.0
#: Rotations kept for the translation search.
TOP_ROTATIONS = 4
#: Starts (after the translation search) that are refined, besides the centre-of-mass and field-of-view starts.
TOP_STARTS = 3
#: Rigid refinement of the kept starts: iterations and Adam step (parameter units: 0.1 rad, 10 mm).
REFINE_ITERATIONS = 30
REFINE_STEP = 0.3
#: A start must overlap the fixed foreground by at least this fraction of the best start's overlap.
MIN_OVERLAP = 0.5
#: The search level's voxel size is at least this many mm (the working grid pooled by a power of 2).
SEARCH_SPACING_MM = 16.0
#: Pre-screen: the rotations and the shifts are first scored on the search level pooled once more (2×
#: coarser, 8× fewer voxels); only this many of each step's best (plus the centre-of-mass and principal-axes
#: starts) are scored on the search level. None scores every start there.
PRESCREEN_KEEP: int | None = 64
#: The pre-screen runs only when the coarser level has at least this many voxels along every axis.
PRESCREEN_MIN_SIZE = 4


@dataclass
class InitResult:
    """What :func:`search` found.

    Attributes:
        matrix: 4×4 LPS fixed → moving start of the linear stage.
        start: Which start won (``"moments"``, ``"geometry"``, ``"principal axes ..."``, ``"rotation ..."``,
            with ``"+ shift ..."`` when the translation search moved it).
        score: The winner's similarity loss at the coarsest registration level (lower is better).
        moments_score: The same loss for the refined centre-of-mass start (for comparison).
        candidates: Number of starts scored.
        seconds: Time of the search.
    """

    matrix: np.ndarray
    start: str
    score: float
    moments_score: float
    candidates: int
    seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mode": "search", "start": self.start, "score": round(self.score, 6),
                "moments_score": round(self.moments_score, 6), "candidates": self.candidates,
                "seconds": round(self.seconds, 3), "matrix_lps": np.round(self.matrix, 6).tolist()}


def search_factor(spacing: float, coarsest_factor: int) -> int:
    """Pooling factor (a power of 2, at least ``coarsest_factor``) of the search level for a working spacing."""
    f = max(1, coarsest_factor)
    while spacing * f < SEARCH_SPACING_MM:
        f *= 2
    return f


def rotation_lattice(step_deg: float = ROTATION_STEP_DEG) -> np.ndarray:
    """Rotation vectors ``(N, 3)`` (radians) on a cubic lattice of spacing ``step_deg`` within the ball of
    radius π (every rotation), the zero vector first."""
    h = math.radians(step_deg)
    n = int(math.floor(math.pi / h))
    pts = [np.array(p, float) * h for p in itertools.product(range(-n, n + 1), repeat=3)]
    pts = [p for p in pts if np.linalg.norm(p) <= math.pi + 1e-9]
    pts.sort(key=np.linalg.norm)
    return np.array(pts)


def _rotvec_matrix(r: np.ndarray) -> np.ndarray:
    theta = float(np.linalg.norm(r))
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * kx @ kx


def second_moments(array: np.ndarray, grid, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intensity-weighted centre of mass ``(3,)`` and covariance ``(3, 3)`` (LPS mm, mm²) of a ``(Z, Y, X)`` array."""
    w = array.astype(np.float64) if mask is None else array * mask
    total = float(w.sum())
    if total <= 0:
        return grid.center(), np.eye(3)
    pts = grid.world_points().reshape(-1, 3)
    wf = w.reshape(-1) / total
    c = wf @ pts
    d = pts - c
    cov = (d * wf[:, None]).T @ d
    return c, cov


def principal_rotations(cov_fixed: np.ndarray, cov_moving: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The 4 proper rotations ``R`` (3×3) taking the fixed principal axes onto the moving ones
    (``R e_f = ±e_m`` per axis, det R = +1), named by their signs."""
    _, ef = np.linalg.eigh(cov_fixed)
    _, em = np.linalg.eigh(cov_moving)
    out = []
    for signs in itertools.product((1.0, -1.0), repeat=3):
        r = em @ np.diag(signs) @ ef.T
        if np.linalg.det(r) > 0:
            out.append(("principal axes (" + ",".join("+" if s > 0 else "-" for s in signs) + ")", r))
    return out


def _about(rot: np.ndarray, c_fixed: np.ndarray, c_moving: np.ndarray) -> np.ndarray:
    """4×4 ``x -> R (x - c_fixed) + c_moving``."""
    a = np.eye(4)
    a[:3, :3] = rot
    a[:3, 3] = c_moving - rot @ c_fixed
    return a


def _apply(pts: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Points ``(1, Z, Y, X, 3)`` mapped by each of ``(B, 4, 4)`` matrices: ``(B, Z, Y, X, 3)``."""
    return torch.einsum("bij,zyxj->bzyxi", mats[:, :3, :3], pts[0]) + mats[:, None, None, None, :3, 3]


class _Scorer:
    """Scores batches of 4×4 matrices on one level: loss ``(B,)`` and foreground overlap ``(B,)``."""

    def __init__(self, level, sim: Similarity, batch: int = 128):
        self.lv = level
        self.sim = sim
        self.batch = batch
        fg = level.fixed > 0.05
        self.fg = fg if level.fmask is None else fg & level.fmask

    def __call__(self, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, overlaps = [], []
        with torch.no_grad():
            for s in range(0, mats.shape[0], self.batch):
                m = mats[s:s + self.batch]
                warped, valid, view = self.lv.warp(_apply(self.lv.pts, m))
                losses.append(self.sim.per_sample(self.lv.fixed, warped, valid, self.lv.fmask, view))
                overlaps.append((valid & self.fg).sum((1, 2, 3, 4)).to(torch.float32))
        return torch.cat(losses), torch.cat(overlaps)


def _coarser(level):
    """The search level average-pooled once more (a level of the same class: same warp, same masks)."""
    fmask = None if level.fmask is None else level.fmask.to(level.fixed.dtype)
    mmask = level.moving[:, 1:] if level.moving.shape[1] > 1 else None
    return type(level)(level.fixed, level.fgrid, level.moving[:, :1], level.mgrid, 2, fmask, mmask)


class _Screened:
    """Scores starts on the search level after a pre-screen on a coarser level: every start is scored coarsely,
    the best ``keep`` (and the ``always`` indices) are scored on the search level; the others get an infinite
    loss and no overlap, so they rank last."""

    def __init__(self, fine: _Scorer, coarse: _Scorer | None, keep: int | None):
        self.fine, self.coarse, self.keep = fine, coarse, keep

    def __call__(self, mats: torch.Tensor, always: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        if self.coarse is None or self.keep is None or mats.shape[0] <= self.keep + len(always):
            return self.fine(mats)
        order = _rank(*self.coarse(mats))
        chosen = torch.zeros(mats.shape[0], dtype=torch.bool, device=mats.device)
        chosen[order[:self.keep]] = True
        chosen[list(always)] = True
        idx = torch.nonzero(chosen)[:, 0]
        loss = torch.full((mats.shape[0],), float("inf"), device=mats.device)
        overlap = torch.zeros(mats.shape[0], device=mats.device)
        loss[idx], overlap[idx] = self.fine(mats[idx])
        return loss, overlap


def _rank(loss: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Indices by increasing loss, starts overlapping less than MIN_OVERLAP of the best overlap last."""
    ok = overlap >= MIN_OVERLAP * overlap.max().clamp_min(1.0)
    key = torch.where(ok, loss, loss + 1e6)
    return torch.argsort(key)


def _rigid_batch(params: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Batched :func:`~DeepRegistrationLib.spatial.transforms.params_to_matrix` (kind ``"rigid"``): ``(B, 6)`` rotation
    vectors (rad) + translations (mm) → ``(B, 4, 4)`` matrices ``y = R (x - c) + c + t``."""
    rv, t = params[:, :3], params[:, 3:]
    theta = torch.sqrt((rv * rv).sum(1, keepdim=True) + 1e-24)
    k = rv / theta
    zero = torch.zeros_like(k[:, 0])
    kx = torch.stack([zero, -k[:, 2], k[:, 1], k[:, 2], zero, -k[:, 0], -k[:, 1], k[:, 0], zero], 1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=params.dtype, device=params.device)
    r = eye + torch.sin(theta)[:, :, None] * kx + (1 - torch.cos(theta))[:, :, None] * (kx @ kx)
    top = torch.cat([r, (center + t - r @ center)[:, :, None]], 2)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=params.dtype, device=params.device).expand(r.shape[0], 1, 4)
    return torch.cat([top, bottom], 1)


def _refine(level, sim: Similarity, starts: torch.Tensor, center: torch.Tensor, frame: torch.Tensor,
            iters: int) -> torch.Tensor:
    """A short rigid optimization of every start at once (batch): ``(B, 4, 4)`` refined matrices."""
    b = starts.shape[0]
    local_center = frame[:3, :3].T @ center
    scale = torch.tensor([0.1] * 3 + [10.0] * 3, device=starts.device)
    raw = torch.zeros((b, 6), device=starts.device, requires_grad=True)
    opt = CosineAdam(raw, REFINE_STEP, iters, lr_end=0.01)

    def matrices(p: torch.Tensor) -> torch.Tensor:
        return starts @ frame @ _rigid_batch(p * scale, local_center) @ frame.T

    best_loss = torch.full((b,), float("inf"), device=starts.device)
    best = starts.clone()
    steps = max(iters, 0)
    for it in range(steps + 1):  # the last evaluation scores the last step's parameters: no gradient after it
        opt.zero_grad()
        last = it == steps
        with torch.set_grad_enabled(not last):
            m = matrices(raw)
            warped, valid, view = level.warp(_apply(level.pts, m))
            loss = sim.per_sample(level.fixed, warped, valid, level.fmask, view)
        with torch.no_grad():
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best[better] = m[better].detach()
        if not last:
            loss.sum().backward()
            opt.step()
    return best


def search(search_level, coarse_level, sim: Similarity, fixed_moments: tuple[np.ndarray, np.ndarray],
           moving_moments: tuple[np.ndarray, np.ndarray], geometry_start: np.ndarray, frame: torch.Tensor,
           max_rotation_deg: float = 180.0, progress=None) -> InitResult:
    """Finds the rigid start of the linear stage (see the module docstring).

    Args:
        search_level / coarse_level: Pipeline levels (pooled fixed and moving images with ``warp``, ``pts``,
            ``fixed``, ``fmask``); the search level is the coarser one.
        sim: The registration's similarity (its name and LNCC radius are used).
        fixed_moments / moving_moments: ``(centre (3,), covariance (3, 3))`` in LPS mm of each image.
        geometry_start: 4×4 matrix aligning the field-of-view centres.
        frame: 4×4 tensor whose rotation block is the fixed grid's direction (the axes of the search).
        max_rotation_deg: Only rotations up to this angle are tried (principal axes included).
        progress: Optional :class:`~DeepRegistrationLib.core.progress.Progress`.

    Returns:
        :class:`InitResult`.
    """
    t0 = time.perf_counter()
    dev = search_level.fixed.device
    to_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)
    cf, cov_f = fixed_moments
    cm, cov_m = moving_moments
    coarse_sim = Similarity(sim.name, min(sim.radius, 2))

    bound = math.radians(max_rotation_deg) + 1e-6
    angle = lambda r: math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))
    names, rots = ["moments"], [np.eye(3)]
    for n, r in principal_rotations(cov_f, cov_m):
        if angle(r) <= bound:
            names.append(n)
            rots.append(r)
    n_principal = len(names)  # the centre-of-mass and principal-axes starts are always scored in full
    for rv in rotation_lattice():
        norm = np.linalg.norm(rv)
        if not 0 < norm <= bound:
            continue
        names.append("rotation %.0f° about (%s)" % (math.degrees(norm), ",".join("%.2f" % v for v in rv / norm)))
        rots.append(_rotvec_matrix(rv))
    mats = to_t(np.stack([_about(r, cf, cm) for r in rots]))
    pre = _coarser(search_level) if PRESCREEN_KEEP else None
    if pre is not None and min(pre.fgrid.shape) < PRESCREEN_MIN_SIZE:
        pre = None
    scorer = _Screened(_Scorer(search_level, coarse_sim), None if pre is None else _Scorer(pre, coarse_sim),
                       PRESCREEN_KEEP)
    loss, overlap = scorer(mats, tuple(range(n_principal)))
    n_scored = mats.shape[0]
    if progress is not None:
        progress(0.4, "initialization: rotations")

    # translation search for the best rotations, along the fixed grid's axes
    top = _rank(loss, overlap)[:TOP_ROTATIONS].tolist()
    step = float(max(search_level.fgrid.extent_mm())) / 8.0
    axes = frame[:3, :3]
    offsets = to_t(list(itertools.product((-2, -1, 0, 1, 2), repeat=3))) * step  # (125, 3) in fixed axes
    shifted, shifted_names = [], []
    for i in top:
        for o in offsets:
            if not bool(o.any()):
                continue
            m = mats[i].clone()
            # x -> A (x - d): the fixed anatomy at x + d is looked up where A maps it
            d = axes @ o
            m[:3, 3] = m[:3, 3] - m[:3, :3] @ d
            shifted.append(m)
            shifted_names.append(f"{names[i]} + shift ({', '.join('%.0f' % v for v in d.tolist())}) mm")
    if shifted:
        smats = torch.stack(shifted)
        sl, so = scorer(smats)
        mats = torch.cat([mats, smats])
        loss, overlap = torch.cat([loss, sl]), torch.cat([overlap, so])
        names += shifted_names
        n_scored += smats.shape[0]
    if progress is not None:
        progress(0.7, "initialization: translations")

    # refine the best starts with the moments and geometry starts, pick by the coarse level's loss
    order = _rank(loss, overlap).tolist()
    keep = [0]
    for i in order:
        if len(keep) >= TOP_STARTS + 1:
            break
        if i not in keep:
            keep.append(i)
    starts = torch.cat([mats[keep], to_t(geometry_start)[None]])
    start_names = [names[i] for i in keep] + ["geometry"]
    center = to_t(cf)
    refined = _refine(search_level, coarse_sim, starts, center, frame, REFINE_ITERATIONS)
    final_loss, final_overlap = _Scorer(coarse_level, sim)(refined)
    winner = int(_rank(final_loss, final_overlap)[0])
    result = InitResult(matrix=refined[winner].double().cpu().numpy(), start=start_names[winner],
                        score=float(final_loss[winner]), moments_score=float(final_loss[0]),
                        candidates=n_scored, seconds=time.perf_counter() - t0,
                        details={"refined": {n: round(float(v), 5) for n, v in zip(start_names, final_loss)}})
    logger.info("initialization: %s wins (loss %.4f; moments %.4f) of %d starts in %.2f s", result.start,
                result.score, result.moments_score, n_scored, result.seconds)
    return result
