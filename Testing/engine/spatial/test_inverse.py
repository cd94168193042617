"""The inverse transform (moving → fixed): an analytic affine + smooth field, oblique grids, the
negated-velocity inverse, and the ITK form composed with the forward transform in SimpleITK."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import random_smooth_field
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.spatial.inverse import consistency_error, foreground_points, invert, invert_field
from DeepRegistrationLib.spatial.transforms import SpatialTransform, scaling_and_squaring


def _oblique_grid(shape=(20, 24, 22), spacing=(2.0, 2.5, 3.0)) -> Grid:
    angle = np.deg2rad(25.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return Grid(shape, spacing, (-20.0, 10.0, -30.0), tuple(direction.ravel()))


def _affine(rng) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.eye(3) + rng.normal(scale=0.05, size=(3, 3))
    a[:3, 3] = rng.normal(scale=5.0, size=3)
    return a


def _inner_points(grid: Grid, rng, n=500, margin=3) -> np.ndarray:
    ijk = np.stack([rng.uniform(margin, s - 1 - margin, n) for s in grid.size], axis=-1)
    m = grid.index_to_world
    return ijk @ m[:3, :3].T + m[:3, 3]


@pytest.mark.parametrize("oblique", [False, True])
def test_fixed_point_inverse_of_affine_and_smooth_field(oblique):
    rng = np.random.default_rng(1)
    grid = _oblique_grid() if oblique else Grid((20, 24, 22), (2.0, 2.5, 3.0), (-20.0, 10.0, -30.0))
    u = random_smooth_field(grid.shape, rng, max_mm=4.0)
    forward = SpatialTransform(_affine(rng), u, grid)
    inv = invert(forward)
    assert inv.method == "fixed-point" and inv.residual_max_mm < 1e-3 and inv.iterations > 1
    # y = T(x) for x well inside the field grid: T⁻¹(y) must give x back
    x = _inner_points(grid, rng)
    np.testing.assert_allclose(inv.map_points(forward.map_points(x)), x, atol=0.05)  # interpolation of w
    err = consistency_error(forward, inv, forward.map_points(x))
    assert err["p95_mm"] < 0.02 and err["n"] == len(x)
    # a wrong inverse (the field not inverted) is measured as wrong
    wrong = invert(SpatialTransform(forward.affine, -u, grid))
    assert consistency_error(forward, wrong, forward.map_points(x))["mean_mm"] > 0.1


def test_linear_inverse_is_the_matrix_inverse():
    forward = SpatialTransform(_affine(np.random.default_rng(2)))
    inv = invert(forward)
    assert inv.method == "linear" and inv.field is None
    np.testing.assert_allclose(inv.affine_inverse @ forward.affine, np.eye(4), atol=1e-12)


def test_velocity_inverse_is_the_negated_velocity():
    rng = np.random.default_rng(3)
    grid = _oblique_grid()
    v = random_smooth_field(grid.shape, rng, max_mm=5.0)
    u = scaling_and_squaring(torch.as_tensor(v, dtype=torch.float64)[None], grid)[0].numpy()
    forward = SpatialTransform(_affine(rng), u, grid)
    inv = invert(forward, velocity=v)
    assert inv.method == "velocity" and inv.iterations == 0
    x = _inner_points(grid, rng)
    err = consistency_error(forward, inv, forward.map_points(x))
    assert err["p95_mm"] < 0.05, err
    # and it agrees with the numerical inverse of the integrated field
    w, _, _ = invert_field(u, grid)
    assert np.abs(inv.field - w)[:, 3:-3, 3:-3, 3:-3].max() < 0.1


def test_itk_inverse_composed_with_forward_is_identity_in_simpleitk(tmp_path):
    rng = np.random.default_rng(4)
    grid = _oblique_grid()
    forward = SpatialTransform(_affine(rng), random_smooth_field(grid.shape, rng, max_mm=3.0), grid)
    inv = invert(forward)
    sitk.WriteTransform(forward.to_sitk(), str(tmp_path / "transform.h5"))
    sitk.WriteTransform(inv.to_sitk(), str(tmp_path / "inverse.h5"))
    fwd_tx = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    inv_tx = sitk.ReadTransform(str(tmp_path / "inverse.h5"))
    y = forward.map_points(_inner_points(grid, rng, n=200))
    back = np.array([fwd_tx.TransformPoint(inv_tx.TransformPoint(tuple(p))) for p in y])
    dist = np.linalg.norm(back - y, axis=1)
    assert np.percentile(dist, 95) < 0.02, np.percentile(dist, 95)
    # SimpleITK's inverse mapping equals ours
    ours = inv.map_points(y)
    theirs = np.array([inv_tx.TransformPoint(tuple(p)) for p in y])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_foreground_points_use_the_mask_or_bright_voxels():
    grid = Grid((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    a = np.zeros(grid.shape)
    a[2:5, 2:5, 2:5] = 1.0
    assert len(foreground_points(a, grid)) == 27
    mask = np.zeros(grid.shape, dtype=bool)
    mask[0, 0, :] = True
    pts = foreground_points(a, grid, mask)
    np.testing.assert_allclose(pts[:, 1:], 0.0)
    assert len(foreground_points(a, grid, max_points=10)) <= 10


def test_fixed_point_stops_once_settled_where_a_steep_spot_converges_slowly():
    """A field with one steep spot (|du/dx| up to ~0.9): the largest residual falls slowly there, so the
    iteration stops once all but a few points have settled (spatial/inverse.py SETTLED_*), well before the
    iteration limit, and the inverse is still exact almost everywhere."""
    from DeepRegistrationLib.spatial import inverse as I

    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    k, j, i = np.meshgrid(*(np.arange(40.0),) * 3, indexing="ij")
    r2 = (i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2
    sigma = 3.0
    # u_x = a·exp(-r²/2σ²): its largest x-derivative is a·e^(-1/2)/σ, here 0.9
    a = 0.9 * sigma / np.exp(-0.5)
    field = np.zeros((3, 40, 40, 40))
    field[0] = a * np.exp(-r2 / (2 * sigma ** 2))
    w, iterations, residual = invert_field(field, grid)
    assert I.SETTLED_AFTER <= iterations < I.MAX_ITERATIONS
    # the residual of every grid point, recomputed here: w(z) + u(z + w(z)) along x (u has an x part only)
    from scipy.ndimage import map_coordinates

    moved = np.stack([k, j, i + w[0]])  # array index order (z, y, x); u_x depends on all three
    u_at = map_coordinates(field[0], moved, order=1, mode="nearest")
    res = np.abs(w[0] + u_at)
    assert (res > I.SETTLED_MM).mean() <= 10 * I.SETTLED_FRACTION
    assert np.percentile(res, 99) < 1e-3


def test_points_that_converged_leave_the_iteration_without_changing_the_inverse():
    """Converged points stop iterating (spatial/inverse.py FROZEN_MM): the written inverse's rule gives the field
    of iterating every point to 0.00002 mm within about its freezing step, at every grid point."""
    from DeepRegistrationLib.spatial import inverse as I

    rng = np.random.default_rng(6)
    grid = _oblique_grid((24, 26, 28))
    u = random_smooth_field(grid.shape, rng, max_mm=3.0)
    exact, n_exact, res_exact = invert_field(u, grid, tol_mm=2e-5, max_iterations=80, settled_after=80)
    w, n, residual = invert_field(u, grid, tol_mm=I.WRITE_TOL_MM, settled_after=I.WRITE_SETTLED_AFTER,
                                  settled_fraction=I.WRITE_SETTLED_FRACTION)
    assert res_exact < 2e-5 and residual < I.WRITE_TOL_MM and 2 < n < n_exact
    assert w.shape == exact.shape == u.shape
    assert np.abs(w - exact).max() < 5 * I.WRITE_TOL_MM
    # most points froze at a step below a tenth of the tolerance: they are that close
    assert np.percentile(np.linalg.norm(w - exact, axis=0), 90) < I.WRITE_TOL_MM / 5


def _normalized(field: np.ndarray, grid: Grid):
    """The field in grid_sample's normalized units ``un = A u`` (1, 3, Z, Y, X), the grid points' normalized
    coordinates ``b`` (3, N) and ``A`` (float64), as the plain formulas give them."""
    from DeepRegistrationLib.spatial import warp as W

    size = np.asarray(grid.size, dtype=np.float64)
    a = (2.0 / np.maximum(size - 1, 1))[:, None] * grid.world_to_index[:3, :3]
    un = torch.mm(torch.as_tensor(a, dtype=torch.float32),
                  torch.as_tensor(field, dtype=torch.float32).reshape(3, -1)).view(1, 3, *grid.shape)
    k, j, i = torch.meshgrid(*[torch.linspace(-1.0, 1.0, n, dtype=torch.float64) for n in grid.shape], indexing="ij")
    base = torch.stack([i, j, k]).reshape(3, -1).float()
    # b is world_to_normalized of the grid points
    points = W.world_to_normalized(W.grid_points(grid), grid).reshape(-1, 3)
    np.testing.assert_allclose(base.t().numpy(), points.numpy(), atol=2e-6)
    return un, base, a


def test_fixed_point_iteration_is_the_plain_iteration_with_each_point_frozen_at_its_small_step(monkeypatch):
    """invert_field (blocks of points, converged points leaving the iteration, normalized coordinates) gives the
    plain iteration ``s ← un(b - s)`` over every grid point, from the linearized start, in which a point keeps its
    value from the iteration where its step |A⁻¹ Δs| fell below the frozen threshold; ``w = -A⁻¹ s``; the same
    iteration count."""
    from DeepRegistrationLib.spatial import inverse as I
    from DeepRegistrationLib.spatial import warp as W

    monkeypatch.setattr(I, "BLOCK_POINTS", 997)  # several blocks, the last one short
    rng = np.random.default_rng(4)
    grid = _oblique_grid((18, 20, 19))
    field = random_smooth_field(grid.shape, rng, max_mm=5.0)
    tol = 1e-3
    w, n, residual = invert_field(field, grid, tol_mm=tol, settled_after=8, settled_fraction=1e-3)
    un, base, a = _normalized(field, grid)
    a_inv = np.linalg.inv(a)
    gram = a_inv.T @ a_inv
    terms = [(i, i, gram[i, i]) for i in range(3)] + [(i, j, 2 * gram[i, j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    cur = I._linearized_start(un[0], np.asarray(grid.size, dtype=np.float64), I.START_PASSES).reshape(3, -1)
    frozen = torch.zeros(cur.shape[1], dtype=torch.bool)
    frozen_sq = min(I.FROZEN_MM, tol / 10.0) ** 2
    for k in range(1, n + 1):
        new = W.sample_normalized(un, grid, (base - cur).t().reshape(1, -1, 1, 1, 3), padding_mode="border").view(3, -1)
        step_sq = I._quadratic_form(new - cur, terms)
        cur = torch.where(frozen, cur, new)
        moving = ~frozen & (step_sq > frozen_sq)
        if k < n and 5 * int(moving.sum()) <= 4 * int((~frozen).sum()):
            frozen |= ~moving
    assert n > 2 and frozen.any()
    expected = cur.t().double().numpy() @ (-a_inv.T)
    np.testing.assert_allclose(np.moveaxis(w, 0, -1).reshape(-1, 3), expected, rtol=0, atol=1e-9)
    # the quadratic form is the squared length in mm of the step
    d = torch.randn(3, 50)
    np.testing.assert_allclose(I._quadratic_form(d, terms).numpy(),
                               np.square(a_inv @ d.double().numpy()).sum(axis=0), rtol=1e-5)


def test_linearized_start_is_the_field_minus_its_one_sided_jacobian_times_itself():
    """The first guess ``s = un - J un`` (and that step again, ``un - J s``), ``J`` by one-sided differences towards
    ``-s`` (each axis; the outer grid points take the difference they have), in slabs (slab borders inside the grid)
    as over the whole grid."""
    from DeepRegistrationLib.spatial import inverse as I

    rng = np.random.default_rng(8)
    grid = _oblique_grid((11, 9, 13))
    un, _, _ = _normalized(random_smooth_field(grid.shape, rng, max_mm=4.0), grid)
    v = un[0].double().numpy()

    def linear_step(guess):  # un - J guess, J one-sided towards -guess
        out = v.copy()
        for c, axis in ((0, 3), (1, 2), (2, 1)):
            n = v.shape[axis]
            diff = np.diff(v, axis=axis)
            ahead = np.concatenate([diff, np.take(diff, [n - 2], axis=axis)], axis=axis)  # v[i+1] - v[i]
            back = np.concatenate([np.take(diff, [0], axis=axis), diff], axis=axis)  # v[i] - v[i-1]
            comp = guess[c:c + 1]
            out -= np.where(comp > 0, back, ahead) * (n - 1) / 2.0 * comp
        return out

    once = linear_step(v)
    twice = linear_step(once)
    size = np.asarray(grid.size, dtype=np.float64)
    for slab in (1, 4, 100):
        np.testing.assert_allclose(I._linearized_start(un[0], size, 1, slab=slab).numpy(), once, atol=1e-7)
        np.testing.assert_allclose(I._linearized_start(un[0], size, 2, slab=slab).numpy(), twice, atol=1e-7)
    np.testing.assert_array_equal(I._linearized_start(un[0], size, 0).numpy(), un[0].numpy())
    assert np.abs(once - v).max() > 1e-3 and np.abs(twice - once).max() > 1e-4  # real corrections


def _plain_start_inverse(field: np.ndarray, grid: Grid, tol: float, settled_after: int, settled_fraction: float):
    """The inversion as it was before the linearized start: ``w ← -u(z + w)`` in LPS mm from ``w = -u(z)``, float32,
    a point frozen once its step fell below the frozen threshold (once that spares a fifth), the same stopping
    rules. Returns ``(w (3, Z, Y, X), iterations)``."""
    from DeepRegistrationLib.spatial import inverse as I
    from DeepRegistrationLib.spatial import warp as W

    u = torch.as_tensor(field, dtype=torch.float32)[None]
    z = W.grid_points(grid).reshape(-1, 3)
    cur = -torch.movedim(u[0], 0, -1).reshape(-1, 3)
    frozen = torch.zeros(z.shape[0], dtype=torch.bool)
    frozen_sq = min(I.FROZEN_MM, tol / 10.0) ** 2
    for k in range(1, I.MAX_ITERATIONS + 1):
        norm = W.world_to_normalized(z + cur, grid)
        new = -W.sample_normalized(u, grid, norm.view(1, -1, 1, 1, 3), padding_mode="border").view(3, -1).t()
        step_sq = (new - cur).square().sum(dim=-1)
        inside = norm.abs().amax(dim=-1) <= 1.0
        squared = torch.where(inside & ~frozen, step_sq, 0.0)
        cur = torch.where(frozen[:, None], cur, new)
        if float(squared.max().sqrt()) < tol:
            break
        if k >= settled_after and int((squared > I.SETTLED_MM ** 2).sum()) <= settled_fraction * int(inside.sum()):
            break
        moving = ~frozen & (step_sq > frozen_sq)
        if 5 * int(moving.sum()) <= 4 * int((~frozen).sum()):
            frozen |= ~moving
    return np.moveaxis(cur.double().numpy().reshape(*grid.shape, 3), -1, 0), k


def _grid_residual(field: np.ndarray, grid: Grid, w: np.ndarray) -> np.ndarray:
    """``|w(z) + u(z + w(z))|`` (mm, float64, ITK's field rule) at the grid points whose ``z + w`` is in the grid."""
    from DeepRegistrationLib.spatial import warp as W

    z = W.grid_points(grid, dtype=torch.float64).reshape(-1, 3)
    wt = torch.as_tensor(np.moveaxis(w, 0, -1).reshape(-1, 3))
    target = z + wt
    inside = W.world_to_normalized(target, grid).abs().amax(dim=-1) <= 1.0
    u_at = W.sample_field(torch.as_tensor(field, dtype=torch.float64)[None], grid, target.view(1, -1, 1, 1, 3))
    return (wt + u_at.view(3, -1).t()).norm(dim=1)[inside].numpy()


@pytest.mark.parametrize("oblique", [False, True])
def test_inverse_of_a_strong_field_is_as_exact_as_with_the_plain_start(oblique):
    """A strong random smooth field (6 mm, σ = 3 voxels: steep spots where the written inverse's settled rule
    stops): with the written inverse's rule the new inversion needs no more iterations than the plain-start
    iteration, and its inverse's largest and mean residual (recomputed in float64) are no larger."""
    from DeepRegistrationLib.spatial import inverse as I

    grid = (_oblique_grid((30, 32, 28)) if oblique else
            Grid((30, 32, 28), (2.0, 2.5, 3.0), (-20.0, 10.0, -30.0)))
    field = random_smooth_field(grid.shape, np.random.default_rng(7), max_mm=6.0)
    rule = dict(settled_after=I.WRITE_SETTLED_AFTER, settled_fraction=I.WRITE_SETTLED_FRACTION)
    w, n, _ = invert_field(field, grid, tol_mm=I.WRITE_TOL_MM, **rule)
    w_old, n_old = _plain_start_inverse(field, grid, I.WRITE_TOL_MM, **rule)
    new, old = _grid_residual(field, grid, w), _grid_residual(field, grid, w_old)
    print(f"iterations {n} / {n_old}, residual max {new.max():.5f} / {old.max():.5f} mm, "
          f"mean {new.mean():.7f} / {old.mean():.7f} mm")
    assert n <= n_old
    assert new.max() <= old.max() and new.mean() <= old.mean()


def test_a_folding_field_is_reported_not_hidden(caplog):
    """A field that folds (|du/dx| up to 2) cannot be inverted: the iteration runs to its limit, returns a largest
    residual above the tolerance and logs a warning."""
    grid = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    k, j, i = np.meshgrid(*(np.arange(40.0),) * 3, indexing="ij")
    sigma = 3.0
    field = np.zeros((3, 40, 40, 40))
    field[0] = 2.0 * sigma / np.exp(-0.5) * np.exp(-((i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2) / (2 * sigma ** 2))
    with caplog.at_level("WARNING", logger="DeepRegistrationLib.spatial.inverse"):
        w, n, residual = invert_field(field, grid, max_iterations=30, settled_after=30)
    assert n == 30 and residual > 0.1 and np.isfinite(w).all()
    assert any("field inversion stopped" in r.getMessage() for r in caplog.records)
