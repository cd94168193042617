"""The fast paths of the similarity and the filters against the direct computations they replace.

- ``box_filter``'s running sums (written without padded copies) and shifted adds (3³ windows) against explicit
  window means, on lines longer and shorter than the window;
- the batched mutual information (one joint histogram per pair in one ``index_add``) against one pair at a time,
  values and gradients.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegistrationLib.registration.similarity import MutualInformation, Similarity
from DeepRegistrationLib.spatial.filters import box_filter
from test_numerics import _box_direct  # window means by explicit slices


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g




@pytest.mark.parametrize("radius", [0, 1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 3, 12, 11, 10), (1, 2, 1, 3, 9), (1, 1, 5, 10, 2)])
def test_box_filter_equals_direct_window_means(radius, shape):
    x = torch.rand(*shape, dtype=torch.float64, generator=_gen(radius + sum(shape)))
    np.testing.assert_allclose(box_filter(x, radius).numpy(), _box_direct(x.numpy(), radius), rtol=1e-12,
                               atol=1e-12)


def test_box_filter_backward_equals_the_adjoint_of_the_direct_means():
    x = torch.rand(1, 1, 9, 4, 5, dtype=torch.float64, generator=_gen(5), requires_grad=True)
    weights = torch.rand(x.shape, dtype=torch.float64, generator=_gen(6))
    (box_filter(x, 3) * weights).sum().backward()
    # <box(x), w> = <x, box^T(w)>: the gradient of each input voxel from the direct means, by linearity
    direct = np.zeros(x.shape)
    flat = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        flat[idx] = 1.0
        direct[idx] = float((_box_direct(flat, 3) * weights.numpy()).sum())
        flat[idx] = 0.0
    np.testing.assert_allclose(x.grad.numpy(), direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_batched_mutual_information_equals_one_pair_at_a_time(masked):
    g = _gen(7)
    fixed = torch.rand(1, 1, 9, 10, 8, generator=g)
    warped = (0.5 * (1 - fixed) + 0.5 * torch.rand(4, 1, 9, 10, 8, generator=g)).requires_grad_()
    mask = (torch.rand(4, 1, 9, 10, 8, generator=g) > 0.3) if masked else None
    mi = MutualInformation()
    batched = mi.per_sample(fixed, warped, mask)
    single = torch.stack([mi(fixed, warped[b:b + 1], None if mask is None else mask[b:b + 1]) for b in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=1e-7)
    g_batched, = torch.autograd.grad(batched.sum(), warped)
    g_single, = torch.autograd.grad(single.sum(), warped)
    torch.testing.assert_close(g_batched, g_single, rtol=1e-5, atol=1e-8)
    assert float(g_single.abs().sum()) > 0
    # the Similarity front end gives the same per-sample losses (valid & region as the mask)
    sim = Similarity("mi")
    torch.testing.assert_close(sim.per_sample(fixed, warped.detach(), mask), batched.detach())
