"""``spatial.warp``'s point maps and field-of-view test against their plain formulas (bits and gradients)."""
from __future__ import annotations

import numpy as np
import torch

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.spatial import warp as W


def _points(seed=0, shape=(1, 6, 5, 7, 3)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 40.0


def test_world_to_normalized_and_apply_affine_have_the_bits_of_product_plus_offset():
    grid = Grid((7, 5, 6), (1.5, 2.0, 0.8), (-10.0, 4.0, 3.0), tuple(np.eye(3)[[1, 0, 2]].ravel()))
    pts = _points()
    w2i = grid.world_to_index
    size = np.asarray(grid.size, dtype=np.float64)
    a = torch.as_tensor((2.0 / (size - 1))[:, None] * w2i[:3, :3], dtype=torch.float32)
    b = torch.as_tensor(2.0 / (size - 1) * w2i[:3, 3] - 1.0, dtype=torch.float32)
    assert torch.equal(W.world_to_normalized(pts, grid), pts @ a.T + b)
    m = torch.eye(4)
    m[:3, :3] += 0.05 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    m[:3, 3] = torch.tensor([3.0, -2.0, 7.5])
    m1, m2 = m.clone().requires_grad_(), m.clone().requires_grad_()
    p1, p2 = pts.clone().requires_grad_(), pts.clone().requires_grad_()
    got, want = W.apply_affine(p1, m1), p2 @ m2[:3, :3].T + m2[:3, 3]
    assert torch.equal(got, want)
    weights = torch.rand(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.equal(m1.grad, m2.grad) and torch.equal(p1.grad, p2.grad)


def test_sample_in_view_marks_points_within_the_outer_voxel_centres():
    grid = Grid((5, 4, 3), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    vol = torch.rand(1, 1, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    pts = torch.stack(torch.meshgrid(torch.linspace(-1.5, 9.5, 12), torch.linspace(-1.0, 7.0, 9),
                                     torch.linspace(-0.5, 4.5, 6), indexing="ij"), -1)[None]  # (1, 12, 9, 6, 3)
    vals, inside = W.sample_in_view(vol, grid, pts)
    norm = W.world_to_normalized(pts, grid)
    assert torch.equal(inside, (norm.abs() <= 1.0 + 1e-6).all(dim=-1).unsqueeze(1))
    assert 0 < int(inside.sum()) < inside.numel()
    assert vals.shape == (1, 1, 12, 9, 6)


def test_inside_half_voxel_is_the_plain_all_axes_test_at_its_limits():
    for dtype in (torch.float32, torch.float64):
        for size in ((5, 7, 1), (40, 3, 2)):  # grid.size (x, y, z); a size-1 axis allows half a voxel each side
            grid = Grid(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
            n = torch.rand(2, 9, 8, 7, 3, generator=torch.Generator().manual_seed(4), dtype=dtype) * 2.6 - 1.3
            s = torch.as_tensor(grid.size, dtype=dtype)
            limit = 1 + torch.where(s > 1, 1.0 / torch.clamp(s - 1, min=1), torch.full_like(s, 0.5)) + 1e-6
            n[0, 0, 0, 0] = limit  # exactly at the limit on every axis: inside
            n[0, 0, 0, 1] = torch.nextafter(limit, torch.full_like(limit, 9.0))  # just beyond: outside
            n[0, 0, 0, 2] = -limit
            want = (n.abs() <= limit).all(dim=-1)
            got = W._inside_half_voxel(n, grid)
            assert torch.equal(got, want)
            assert bool(got[0, 0, 0, 0]) and not bool(got[0, 0, 0, 1]) and bool(got[0, 0, 0, 2])


def test_normalized_affine_maps_points_as_world_to_normalized_after_the_affine():
    grid = Grid((7, 5, 6), (1.5, 2.0, 0.8), (-10.0, 4.0, 3.0), tuple(np.eye(3)[[1, 0, 2]].ravel()))
    pts = _points(seed=5)
    m = torch.eye(4)
    m[:3, :3] += 0.1 * torch.randn(3, 3, generator=torch.Generator().manual_seed(6))
    m[:3, 3] = torch.tensor([-4.0, 2.5, 9.0])
    m.requires_grad_()
    folded = W.apply_affine(pts, W.normalized_affine(m, grid))
    plain = W.world_to_normalized(W.apply_affine(pts, m), grid)
    assert torch.allclose(folded, plain, rtol=1e-5, atol=1e-5)
    folded.sum().backward()  # differentiable in the matrix (the linear stage's parameters)
    assert m.grad is not None and torch.isfinite(m.grad).all() and m.grad.abs().sum() > 0
    vol = torch.rand(1, 1, 6, 5, 7, generator=torch.Generator().manual_seed(7))
    world = W.apply_affine(pts, m.detach()) * 0.05  # points spread over and beyond the small grid
    vals_a, inside_a = W.sample_in_view(vol, grid, world)
    vals_b, inside_b = W.sample_normalized_in_view(vol, W.world_to_normalized(world, grid))
    assert torch.equal(vals_a, vals_b) and torch.equal(inside_a, inside_b)


def test_grid_sample_split_over_threads_gives_the_bits_and_point_gradients_of_one_call():
    """On the CPU one batch entry is sampled as one part per thread (3D grid_sample runs only its batch in
    parallel): the same values and gradient with respect to the points as one plain call, for one and two
    channels, every padding and mode; a volume needing a gradient, or a point count the parts do not divide,
    is sampled at once."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    saved = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            for channels in (1, 2):
                vol = torch.rand((1, channels, 9, 11, 13), generator=gen)
                for shape in ((1, 6, 5, 7), (1, 5, 7, 1)):  # 210 points: 2 and 3 divide; 35: neither
                    norm0 = torch.rand((*shape, 3), generator=gen) * 2.4 - 1.2
                    for mode, padding in (("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")):
                        norm = norm0.clone().requires_grad_(True)
                        ref = norm0.clone().requires_grad_(True)
                        got = W.grid_sample(vol, norm, mode, padding)
                        want = F.grid_sample(vol, ref, mode=mode, padding_mode=padding, align_corners=True)
                        assert got.shape == want.shape == (1, channels, *shape[1:])
                        assert got.detach().numpy().tobytes() == want.detach().numpy().tobytes()
                        if mode == "bilinear":
                            (got * got).sum().backward()
                            (want * want).sum().backward()
                            assert norm.grad.numpy().tobytes() == ref.grad.numpy().tobytes()
            # a volume with a gradient: its gradient is the plain call's
            field = torch.rand((1, 3, 9, 11, 13), generator=gen).requires_grad_(True)
            plain = field.detach().clone().requires_grad_(True)
            norm = torch.rand((1, 6, 5, 7, 3), generator=gen) * 2 - 1
            W.grid_sample(field, norm, "bilinear", "border").square().sum().backward()
            F.grid_sample(plain, norm, mode="bilinear", padding_mode="border",
                          align_corners=True).square().sum().backward()
            assert field.grad.numpy().tobytes() == plain.grad.numpy().tobytes()
    finally:
        torch.set_num_threads(saved)
