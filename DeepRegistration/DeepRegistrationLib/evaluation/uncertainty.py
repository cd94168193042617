"""A cheap per-voxel uncertainty of a registration: the spread of a few perturbed restarts.

What it is
----------
Starting from the registration's result ``T(x) = A (x + u(x))``, ``K`` copies of the displacement are
perturbed by independent random smooth fields (largest component ``perturbation_mm``, by default one
and a half working voxels) and optimized again for a few gradient-descent steps with the registration's
own similarity and regularization, all ``K`` in one batched tensor (one pass costs about as much as ``K``
images of the working grid). The map is the per-voxel spread of the ``K`` results,
``sqrt(Σ_c var_k u_k,c(x))`` in mm, on the fixed working grid.

Where the images pin the correspondence down (edges, texture), every restart is pulled back to the same
optimum and the spread shrinks towards 0; where they carry no information (flat background, a blank
region, outside the overlap) only the smoothness term acts and the perturbation largely survives, so
the spread stays near the perturbation's size. A restart that escapes to another optimum shows up as
a large spread inside the anatomy.

What it is not
--------------
Not a calibrated posterior or an error bound: it scales with ``perturbation_mm`` and the number of
iterations, it only probes displacements of that size (a gross misregistration that every restart
shares, e.g. a wrong initial rotation, can have a small spread), and for rigid/affine results it measures
how well a deformable refinement would be determined, not the linear parameters' spread.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..spatial import warp as W
from ..core.config import RegistrationConfig
from ..core.grid import Grid
from ..core.image import Image
from ..core.progress import Progress, ProgressCallback
from ..registration.preprocess import prepare_pair
from ..registration.regularizers import Regularizer
from ..registration.similarity import Similarity
from ..spatial.filters import box_filter
from ..learning.synth import smooth_noise
from ..spatial.transforms import SpatialTransform

logger = logging.getLogger(__name__)

#: Number of perturbed restarts (batched); 4 gave a stable median spread (±10 %) on the bundled pair.
RESTARTS = 4
#: Optimizer steps per restart (at the registration's finest deformable step size).
ITERATIONS = 20
#: Perturbation size in working voxels (largest displacement component of the random field).
PERTURBATION_VOXELS = 1.5
#: Spatial scale of the random perturbation, in working voxels (one random value per this many voxels).
PERTURBATION_SCALE = 6.0
#: Largest step per iteration as a fraction of the working voxel size (the deformable stage's ``FIELD_STEP``).
STEP = 0.15
#: Voxels whose gradient norm reaches this quantile of the restart's gradient norms take the full step;
#: the others move in proportion to their gradient.
GRADIENT_QUANTILE = 0.99
#: Whether the restarts include the smoothness term (see the module docstring).
REGULARIZED = True


@dataclass
class Uncertainty:
    """Result of :func:`restart_spread`.

    Attributes:
        spread: ``(Z, Y, X)`` float32, mm, on ``grid`` (the fixed working grid).
        grid: The fixed working grid.
        anatomy: ``(Z, Y, X)`` bool: voxels whose fixed-image window has structure (where the summary is taken).
        perturbation_mm: Size of the perturbation used.
    """

    spread: np.ndarray
    grid: Grid
    anatomy: np.ndarray
    perturbation_mm: float

    def summary(self) -> dict:
        """``{"median_mm", "p95_mm"}`` over the anatomy, ``"background_median_mm"`` elsewhere, and the settings."""
        inside = self.spread[self.anatomy]
        outside = self.spread[~self.anatomy]
        med = lambda a: float(np.median(a)) if a.size else float("nan")
        return {"median_mm": med(inside), "p95_mm": float(np.percentile(inside, 95)) if inside.size else float("nan"),
                "background_median_mm": med(outside), "perturbation_mm": self.perturbation_mm}

    def on_grid(self, grid: Grid) -> Image:
        """The spread resampled (linearly) onto ``grid`` (e.g. the fixed image's), as an Image in mm."""
        from ..spatial.resampling import sample_on_grid

        return Image(sample_on_grid(self.spread, self.grid, grid), grid, "uncertainty")


def restart_spread(fixed: Image, moving: Image, transform: SpatialTransform, config: RegistrationConfig, *,
                   fixed_mask: Image | None = None, moving_mask: Image | None = None, restarts: int = RESTARTS,
                   iterations: int = ITERATIONS, perturbation_mm: float | None = None, seed: int = 0,
                   device=None, progress: ProgressCallback | None = None,
                   prepared: tuple | None = None) -> Uncertainty:
    """Spread (mm) of ``restarts`` perturbed, batched re-optimizations of ``transform``'s displacement.

    Args:
        fixed / moving: The images as registered (any grids); masks as in the registration.
        transform: The registration result (fixed → moving, LPS mm).
        config: The registration's settings (spacing, similarity, regularization and its weight).
        restarts: Number of restarts ``K`` (≥ 2), optimized together in one ``(K, 3, Z, Y, X)`` tensor.
        iterations: Optimizer steps.
        perturbation_mm: Largest component of each random perturbation; default
            :data:`PERTURBATION_VOXELS` working voxels.
        seed: Seed of the perturbations (reproducible maps).
        device: Torch device of the batched optimization (None = CPU).
        progress: ``callback(fraction, message)`` once per step; returning False cancels (raises Cancelled).
        prepared: The registration's own working images ``(fixed, moving)``
            (``RegistrationResult.working_images``), as ``prepare`` made them from these images and masks; None:
            prepared here.

    Returns:
        :class:`Uncertainty` on the fixed working grid.
    """
    if restarts < 2:
        raise ValueError(f"restarts must be at least 2, got {restarts}")
    if prepared is not None:
        fw, mw = prepared
    else:
        fw, mw = prepare_pair(fixed, moving, config.spacing, fixed_mask, moving_mask, config.intensity_percentiles,
                              concurrent=config.threads != 1)
    to_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)[None, None]
    f_t = to_t(fw.array)
    chans = [to_t(mw.array)] + ([to_t(mw.mask)] if mw.mask is not None else [])
    m_t = torch.cat(chans, 1)
    fmask = None if fw.mask is None else to_t(fw.mask) > 0.5
    grid = fw.grid
    h = min(grid.spacing)
    amp = PERTURBATION_VOXELS * h if perturbation_mm is None else float(perturbation_mm)
    sim = Similarity(config.similarity, config.lncc_radius)
    reg = Regularizer(config.regularization)
    affine = torch.as_tensor(transform.affine, dtype=torch.float32, device=device)
    pts = W.grid_points(grid, device)
    with torch.no_grad():
        if transform.field is None:
            u0 = torch.zeros((1, 3, *grid.shape), device=device)
        else:
            field = torch.as_tensor(transform.field, dtype=torch.float32, device=device)[None]
            u0 = W.sample_field(field, transform.field_grid, pts)
    gen = torch.Generator().manual_seed(int(seed))
    noise = smooth_noise(restarts, 3, grid.shape, PERTURBATION_SCALE, gen).to(device)
    noise = noise / noise.abs().amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6) * amp
    param = noise.clone().requires_grad_(True)
    lr = STEP * h
    prog = Progress(progress)
    for it in range(iterations):
        prog(it / iterations, f"uncertainty: {restarts} restarts, step {it + 1}/{iterations}")
        u = u0 + box_filter(param, 1)
        mapped = W.apply_affine(pts + torch.movedim(u, 1, -1), affine)
        out, view = W.sample_in_view(m_t, mw.grid, mapped)
        valid = view if out.shape[1] == 1 else view & (out[:, 1:2].detach() > 0.5)
        loss = sim.per_sample(f_t, out[:, :1], valid, fmask, view).sum()
        if REGULARIZED:
            loss = loss + config.reg_weight * restarts * reg(u, grid)
        (grad,) = torch.autograd.grad(loss, param)
        with torch.no_grad():
            # gradient descent with one step scale per restart (not Adam's per-voxel normalization, which
            # would move voxels with a vanishing gradient as fast as the others and erase the very contrast
            # between informative and blank regions this map shows): GRADIENT_QUANTILE of the voxels'
            # gradient norms step by lr, larger ones are clipped to lr
            norm = grad.norm(dim=1, keepdim=True)
            ref = torch.quantile(norm.flatten(1)[:, ::max(1, norm[0].numel() // 100_000)], GRADIENT_QUANTILE,
                                 dim=1).view(-1, 1, 1, 1, 1).clamp_min(1e-12)
            lr_t = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(1, iterations))))
            param -= lr_t * grad / torch.maximum(norm, ref)
    with torch.no_grad():
        u = u0 + box_filter(param, 1)
        spread = u.var(dim=0, unbiased=False).sum(0).sqrt()
        fixed_var = box_filter(torch.cat([f_t, f_t * f_t], 1), config.lncc_radius)
        anatomy = (fixed_var[:, 1:2] - fixed_var[:, :1] ** 2) > 1e-4
        if fmask is not None:
            anatomy = anatomy & fmask
    result = Uncertainty(spread.cpu().numpy().astype(np.float32), grid, anatomy[0, 0].cpu().numpy(), amp)
    logger.info("uncertainty: median %.2f mm in the anatomy (perturbation %.1f mm, %d restarts)",
                result.summary()["median_mm"], amp, restarts)
    return result
