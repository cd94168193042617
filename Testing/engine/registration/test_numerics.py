"""Unit tests for the engine's hand-written numerics, each against a direct or textbook computation.

- the custom ``torch.autograd.Function`` backward passes (``gradcheck`` in float64 on small inputs);
- ``box_filter`` against ``avg_pool3d(count_include_pad=False)`` and an explicit window loop;
- LNCC (registration and training) against per-voxel windows computed one by one;
- diffusion and bending energy of analytic fields in mm on an anisotropic grid;
- ``CosineAdam`` against the textbook Adam update (Kingma & Ba) and against ``torch.optim.Adam`` with
  ``CosineAnnealingLR``;
- the linear-time mutual information against a direct Parzen estimate (the same window evaluated voxel by voxel);
- the folding penalty, global NCC, masked MSE and the training soft Dice against direct formulas;
- LNCC's cache of the fixed statistics against a fresh computation (a new tensor at a reused address).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.evaluation.metrics import jacobian_determinant as jacobian_np
from DeepRegistrationLib.registration.optim import CosineAdam
from DeepRegistrationLib.registration.regularizers import (_Diffusion, bending_energy, diffusion, folding_penalty,
    jacobian_determinant)
from DeepRegistrationLib.registration.similarity import LNCC, MutualInformation, Similarity, global_ncc, joint_histogram
from DeepRegistrationLib.spatial.filters import _BoxMean, _box_count, box_filter


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- custom autograd
@pytest.mark.parametrize("radius", [1, 2])  # radius 1 takes the shifted-add branch, 2 the running sums
def test_box_mean_backward_passes_gradcheck(radius):
    x = torch.rand(1, 2, 5, 4, 6, dtype=torch.float64, generator=_gen(radius), requires_grad=True)
    count = _box_count(x.shape, radius, x.dtype, x.device)
    assert torch.autograd.gradcheck(lambda t: _BoxMean.apply(t, radius, count), (x,), eps=1e-6, atol=1e-8)


def test_diffusion_backward_passes_gradcheck():
    field = torch.rand(2, 3, 4, 5, 3, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    weights = (1 / 0.7 ** 2, 1 / 1.3 ** 2, 1 / 2.1 ** 2)
    assert torch.autograd.gradcheck(lambda u: _Diffusion.apply(u, weights), (field,), eps=1e-6, atol=1e-8)


def test_diffusion_forward_equals_plain_autograd_formula():
    field = torch.rand(1, 3, 6, 5, 4, dtype=torch.float64, generator=_gen(2))
    grid = Grid((6, 5, 4), (0.8, 1.5, 2.5), (0, 0, 0))
    hz, hy, hx = grid.spacing[2], grid.spacing[1], grid.spacing[0]
    direct = sum(((field.diff(dim=axis) / h) ** 2).mean() for axis, h in ((2, hz), (3, hy), (4, hx)))
    torch.testing.assert_close(diffusion(field, grid), direct, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------- box filter
def _box_direct(x: np.ndarray, r: int) -> np.ndarray:
    """Window mean with the window clipped at the grid's faces, one voxel at a time."""
    out = np.empty_like(x)
    _, _, nz, ny, nx = x.shape
    for z in range(nz):
        for y in range(ny):
            for xx in range(nx):
                win = x[:, :, max(z - r, 0):z + r + 1, max(y - r, 0):y + r + 1, max(xx - r, 0):xx + r + 1]
                out[:, :, z, y, xx] = win.mean(axis=(2, 3, 4))
    return out


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_box_filter_equals_avg_pool_and_direct_window_means(radius):
    x = torch.rand(2, 3, 7, 8, 9, dtype=torch.float64, generator=_gen(radius))
    got = box_filter(x, radius)
    pooled = F.avg_pool3d(x, 2 * radius + 1, 1, radius, count_include_pad=False)
    torch.testing.assert_close(got, pooled, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), _box_direct(x.numpy(), radius), rtol=1e-12, atol=1e-12)
    thin = x[:, :, :2]  # a window wider than the grid along z (avg_pool3d refuses that case)
    np.testing.assert_allclose(box_filter(thin, radius).numpy(), _box_direct(thin.numpy(), radius), rtol=1e-12,
                               atol=1e-12)


# ------------------------------------------------------------------------------------- LNCC
def _cc2_direct(f: np.ndarray, w: np.ndarray, r: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel ``cc²`` and fixed-window variance from explicit windows (population moments)."""
    nz, ny, nx = f.shape
    cc2, var_f = np.empty_like(f), np.empty_like(f)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                sl = (slice(max(z - r, 0), z + r + 1), slice(max(y - r, 0), y + r + 1), slice(max(x - r, 0), x + r + 1))
                a, b = f[sl].ravel(), w[sl].ravel()
                va, vb = a.var(), b.var()
                cov = ((a - a.mean()) * (b - b.mean())).mean()
                cc2[z, y, x] = cov * cov / (va * vb + eps)
                var_f[z, y, x] = va
    return cc2, var_f


def _test_images(shape=(6, 7, 5), seed=3):
    g = _gen(seed)
    fixed = torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)
    fixed[..., :2, :, :] = 0.25  # a flat slab: windows there have no structure
    warped = (0.6 * fixed + 0.4 * torch.rand(1, 1, *shape, dtype=torch.float64, generator=g)).requires_grad_()
    return fixed, warped


def test_lncc_equals_direct_window_computation_over_structured_fixed_voxels():
    fixed, warped = _test_images()
    region = torch.ones(fixed.shape, dtype=torch.bool)
    region[..., :, :, -1] = False
    cc2, var_f = _cc2_direct(fixed[0, 0].numpy(), warped[0, 0].detach().numpy(), 1, 1e-12)
    for mask in (None, region):
        lncc = LNCC(radius=1, eps=1e-12, flat=1e-4)
        got = float(lncc(fixed, warped, region=mask).detach())
        structure = (var_f > 1e-4) & (True if mask is None else mask[0, 0].numpy())
        assert 0 < structure.sum() < structure.size  # the flat slab is left out, the rest counts
        assert got == pytest.approx(1.0 - (cc2 * structure).sum() / structure.sum(), rel=1e-10, abs=1e-12)
        # the cached fixed statistics give the same value again
        assert float(lncc(fixed, warped, region=mask).detach()) == got
    # identical images: the minimum, 0, at the identity
    assert float(LNCC(radius=1)(fixed, fixed.clone())) == pytest.approx(0.0, abs=1e-9)


def test_lncc_cache_never_takes_a_new_tensor_at_a_reused_address_for_the_old_one():
    # two fixed images in turn in the same numpy buffer: each torch.from_numpy tensor has the same address and
    # in-place version 0, so a cache keyed on (data_ptr, _version) returned the first image's statistics
    first, warped = _test_images(seed=7)
    second, _ = _test_images(seed=8)
    buffer = first.numpy().copy()
    lncc = LNCC(radius=1)
    a = torch.from_numpy(buffer)
    assert float(lncc(a, warped).detach()) == pytest.approx(float(LNCC(radius=1)(first, warped).detach()))
    del a
    buffer[...] = second.numpy()
    b = torch.from_numpy(buffer)
    expected = float(LNCC(radius=1)(second, warped).detach())
    assert float(LNCC(radius=1)(first, warped).detach()) != pytest.approx(expected)  # the images do differ
    assert float(lncc(b, warped).detach()) == pytest.approx(expected, rel=1e-12)
    # an in-place change of the same tensor object is seen too (its version counter moves)
    b.mul_(0.5).add_(0.25)
    assert float(lncc(b, warped).detach()) == pytest.approx(float(LNCC(radius=1)(b.clone(), warped).detach()),
                                                            rel=1e-12)


def test_lncc_gradient_matches_finite_differences():
    fixed, warped = _test_images(shape=(4, 5, 4), seed=5)
    lncc = LNCC(radius=1)
    assert torch.autograd.gradcheck(lambda w: lncc(fixed, w), (warped,), eps=1e-6, atol=1e-7)


def test_training_lncc_equals_direct_mean_over_every_window():
    from DeepRegistrationLib.learning.training import lncc

    fixed, warped = _test_images(seed=6)
    got = lncc(fixed, warped, radius=2, eps=1e-5).detach()
    cc2, _ = _cc2_direct(fixed[0, 0].numpy(), warped[0, 0].detach().numpy(), 2, 1e-5)
    assert float(got) == pytest.approx(1.0 - cc2.mean(), rel=1e-10)


# ------------------------------------------------------------------------------------- regularizers
ANISO = Grid((9, 8, 10), (0.7, 1.3, 2.1), (3.0, -4.0, 5.0))  # spacing along (i, j, k) = (x, y, z)


def _mm_coords(grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index-axis positions in mm, each ``(Z, Y, X)`` (identity direction: z, y, x offsets from the origin)."""
    nz, ny, nx = grid.shape
    sx, sy, sz = grid.spacing
    k, j, i = torch.meshgrid(torch.arange(nz, dtype=torch.float64), torch.arange(ny, dtype=torch.float64),
                             torch.arange(nx, dtype=torch.float64), indexing="ij")
    return k * sz, j * sy, i * sx


def test_diffusion_of_a_linear_field_in_mm():
    z, y, x = _mm_coords(ANISO)
    field = torch.zeros(1, 3, *ANISO.shape, dtype=torch.float64)
    field[0, 0] = 0.3 * z  # du_x/dz = 0.3 and du_y/dx = -0.2 mm/mm, whatever the voxel size
    field[0, 1] = -0.2 * x
    # sum over axes of the mean over all 3 components: (0.3² + 0.2²) / 3
    assert float(diffusion(field, ANISO)) == pytest.approx((0.3 ** 2 + 0.2 ** 2) / 3, rel=1e-12)


def test_bending_energy_of_quadratic_fields_in_mm():
    z, y, x = _mm_coords(ANISO)
    field = torch.zeros(1, 3, *ANISO.shape, dtype=torch.float64)
    field[0, 2] = 0.05 * z * z  # d²u_z/dz² = 0.1 /mm
    assert float(bending_energy(field, ANISO)) == pytest.approx(0.1 ** 2 / 3, rel=1e-10)
    field[0, 2] = 0.05 * x * y  # a mixed term only, counted twice: 2 · 0.05²
    assert float(bending_energy(field, ANISO)) == pytest.approx(2 * 0.05 ** 2 / 3, rel=1e-10)


def test_jacobian_determinant_of_a_linear_map_on_an_oblique_grid_torch_and_numpy_agree():
    c, s = math.cos(0.4), math.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, -1.0]])  # rotated and flipped
    grid = Grid((6, 7, 8), (0.9, 1.4, 2.2), (10.0, -3.0, 2.0), tuple(direction.ravel()))
    m = np.array([[0.10, 0.05, -0.02], [0.00, -0.15, 0.04], [0.03, 0.02, 0.20]])  # u(x) = M x (LPS mm)
    pts = grid.world_points()  # (Z, Y, X, 3)
    u = np.moveaxis(pts @ m.T, -1, 0)  # (3, Z, Y, X)
    want = np.linalg.det(np.eye(3) + m)
    np.testing.assert_allclose(jacobian_np(u, grid), want, rtol=1e-10)
    det_t = jacobian_determinant(torch.from_numpy(u)[None], grid)
    assert det_t.shape == (1, 4, 5, 6)
    np.testing.assert_allclose(det_t.numpy(), want, rtol=1e-10)


def test_folding_penalty_of_linear_maps_is_the_hinge_of_their_determinant():
    grid = Grid((6, 6, 6), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0))
    pts = torch.from_numpy(grid.world_points())  # (Z, Y, X, 3)
    for m, det in ((np.diag([0.2, -0.1, 0.0]), 1.2 * 0.9), (np.diag([-1.5, 0.0, 0.0]), -0.5),
                   (np.diag([-0.97, 0.0, 0.0]), 0.03)):
        u = torch.movedim(pts @ torch.from_numpy(m).T, -1, 0)[None]  # u(x) = M x, det(I + M) = det
        want = max(0.0, 0.05 - det)
        assert float(folding_penalty(u, grid)) == pytest.approx(want, abs=1e-12)
        assert float(folding_penalty(u, grid, threshold=0.5)) == pytest.approx(max(0.0, 0.5 - det), abs=1e-12)


def test_global_ncc_is_the_pearson_correlation_over_the_mask():
    g = _gen(11)
    fixed = torch.rand(1, 1, 5, 6, 7, generator=g)
    warped = 0.7 * fixed + 0.3 * torch.rand(1, 1, 5, 6, 7, generator=g)
    mask = torch.rand(1, 1, 5, 6, 7, generator=g) > 0.4
    want = np.corrcoef(fixed.numpy().ravel(), warped.numpy().ravel())[0, 1]
    assert global_ncc(fixed, warped) == pytest.approx(want, rel=1e-6)
    sel = mask.numpy().ravel()
    want_masked = np.corrcoef(fixed.numpy().ravel()[sel], warped.numpy().ravel()[sel])[0, 1]
    assert global_ncc(fixed, warped, mask) == pytest.approx(want_masked, rel=1e-6)
    assert global_ncc(fixed, 3.0 * fixed + 1.0) == pytest.approx(1.0, abs=1e-6)  # affine intensity invariance


def test_masked_mse_per_sample_equals_a_direct_mean_over_the_overlap():
    g = _gen(12)
    fixed = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, generator=g)
    warped = torch.rand(2, 1, 4, 5, 6, dtype=torch.float64, generator=g)
    valid = torch.rand(2, 1, 4, 5, 6, generator=g) > 0.3
    region = torch.rand(1, 1, 4, 5, 6, generator=g) > 0.2
    got = Similarity("mse").per_sample(fixed, warped, valid, region)
    for b in range(2):
        keep = (valid[b, 0] & region[0, 0]).numpy()
        want = ((fixed[0, 0].numpy() - warped[b, 0].numpy())[keep] ** 2).mean()
        assert float(got[b]) == pytest.approx(want, rel=1e-12)


def test_training_soft_dice_equals_a_direct_sum_over_present_foreground_classes():
    from DeepRegistrationLib.learning.training import _soft_dice

    g = _gen(13)
    pred = torch.rand(2, 4, 3, 4, 5, dtype=torch.float64, generator=g).softmax(1)
    target_idx = torch.randint(0, 3, (2, 3, 4, 5), generator=g)  # class 3 never present
    target = F.one_hot(target_idx, 4).movedim(-1, 1).to(torch.float64)
    values = []
    for b in range(2):
        for c in range(1, 4):
            p, t = pred[b, c].numpy(), target[b, c].numpy()
            if t.sum() > 0:
                values.append((2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5))
    assert len(values) == 4  # classes 1, 2 in both samples; background and the absent class left out
    assert float(_soft_dice(pred, target)) == pytest.approx(np.mean(values), rel=1e-12)
    assert float(_soft_dice(target, target)) == pytest.approx(1.0, rel=1e-9)


# ------------------------------------------------------------------------------------- CosineAdam
def _textbook_adam(p0: np.ndarray, grads, lr, lr_end, steps, b1=0.9, b2=0.999, eps=1e-8, vector_dim=None):
    """Kingma & Ba's Algorithm 1 with bias correction; step size cosine-annealed from lr to lr_end."""
    p, m = p0.copy(), np.zeros_like(p0)
    v = np.zeros_like(p0) if vector_dim is None else np.zeros_like(p0.mean(vector_dim, keepdims=True))
    out = []
    for t, g in enumerate(grads, start=1):
        alpha = lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * min(t - 1, steps) / steps))
        m = b1 * m + (1 - b1) * g
        g2 = g * g if vector_dim is None else (g * g).mean(vector_dim, keepdims=True)
        v = b2 * v + (1 - b2) * g2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - alpha * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p.copy())
    return out


@pytest.mark.parametrize("vector_dim", [None, 1])
def test_cosine_adam_follows_the_textbook_update(vector_dim):
    rng = np.random.default_rng(7)
    p0 = rng.normal(size=(1, 3, 2, 3, 4))
    grads = [rng.normal(size=p0.shape) * (1 + t) for t in range(6)]
    param = torch.tensor(p0, requires_grad=True)
    opt = CosineAdam(param, lr=0.5, steps=5, lr_end=0.05, vector_dim=vector_dim)
    want = _textbook_adam(p0, grads, 0.5, 0.05, 5, vector_dim=vector_dim)
    for g, w in zip(grads, want):  # 6 steps: the last runs past the schedule's end at lr_end
        param.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(param.detach().numpy(), w, rtol=1e-12, atol=1e-14)
    assert opt.current_lr() == pytest.approx(0.05)


def test_cosine_adam_matches_torch_adam_with_cosine_annealing():
    rng = np.random.default_rng(8)
    p0 = rng.normal(size=(4, 5))
    target = rng.normal(size=(4, 5))
    a = torch.tensor(p0, requires_grad=True)
    b = torch.tensor(p0, requires_grad=True)
    ours = CosineAdam(a, lr=0.1, steps=20, lr_end=0.01)
    ref = torch.optim.Adam([b], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=20, eta_min=0.01)
    for _ in range(20):
        for p in (a, b):
            p.grad = None
            ((p - torch.tensor(target)) ** 4).sum().backward()
        ours.step()
        ref.step()
        sched.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------- mutual information
def _parzen_weights(c: torch.Tensor, bins: int, kernel: torch.Tensor) -> torch.Tensor:
    """``(N, bins)``: voxel n's weight in bin a = Σ_k g(a − k) · tri(k − c_n), evaluated directly for every voxel
    and bin (the window the linear-time estimate applies: a triangle one bin wide, then a sampled Gaussian)."""
    k = torch.arange(bins, dtype=c.dtype)
    tri = (1 - (k[None, :] - c[:, None]).abs()).clamp_min(0)  # (N, bins)
    r = (kernel.numel() - 1) // 2
    a = torch.arange(bins)
    offsets = a[:, None] - a[None, :]  # (a, k)
    g = torch.where(offsets.abs() <= r, kernel[(offsets + r).clamp(0, 2 * r)], torch.zeros((), dtype=c.dtype))
    return tri @ g.T.to(c.dtype)


def _mi_direct(fixed: torch.Tensor, warped: torch.Tensor, bins: int, sigma: float, mask=None) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    cf = fixed.reshape(-1).clamp(0, 1) * (bins - 1)
    cw = warped.reshape(-1).clamp(0, 1) * (bins - 1)
    wf, ww = _parzen_weights(cf, bins, kernel), _parzen_weights(cw, bins, kernel)
    if mask is not None:
        wf = wf * mask.reshape(-1, 1).to(wf.dtype)
    p = wf.T @ ww
    p = p / p.sum()
    pf, pw = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    return -(p * (torch.log(p + 1e-10) - torch.log(pf * pw + 1e-10))).sum()


def test_joint_histogram_bilinear_binning_equals_direct_triangle_window():
    g = _gen(9)
    f, w = torch.rand(300, dtype=torch.float64, generator=g), torch.rand(300, dtype=torch.float64, generator=g)
    f[:3] = torch.tensor([0.0, 1.0, 0.5])  # both ends and a bin centre
    hist = joint_histogram(f, w, 8)
    k = torch.arange(8, dtype=torch.float64)
    tf = (1 - (k[None] - 7 * f[:, None]).abs()).clamp_min(0)
    tw = (1 - (k[None] - 7 * w[:, None]).abs()).clamp_min(0)
    torch.testing.assert_close(hist, tf.T @ tw, rtol=1e-12, atol=1e-12)
    assert float(hist.sum()) == pytest.approx(300.0)


@pytest.mark.parametrize("masked", [False, True])
def test_linear_time_mi_equals_direct_parzen_estimate_value_and_gradient(masked):
    g = _gen(10)
    fixed = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64, generator=g)
    warped = (0.5 * (1 - fixed) + 0.5 * torch.rand(fixed.shape, dtype=torch.float64, generator=g)).requires_grad_()
    mask = (torch.rand(fixed.shape, generator=g) > 0.3) if masked else None
    mi = MutualInformation(num_bins=16, sigma=0.5)
    got = mi(fixed, warped, mask)
    (grad_got,) = torch.autograd.grad(got, warped)
    want = _mi_direct(fixed, warped, 16, 0.5, mask)
    (grad_want,) = torch.autograd.grad(want, warped)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(got.detach()) < 0  # dependent images: positive MI
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-9)
