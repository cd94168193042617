"""The box sums of ``spatial.filters`` bit for bit against the zero-padded summation they stand for.

``_box_sum`` alternates two buffers between the axes (and never writes its input); these tests pin that it gives
exactly the bits of summing zero-padded lines in the documented order (shifted adds for 3³ windows, running-sum
differences for larger ones), for contiguous and channels-last inputs, lines longer and shorter than the window,
and single-voxel axes, and that :func:`box_filter`'s backward is the same window sum of ``grad / count``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from DeepRegistrationLib.spatial.filters import _box_count, _box_sum, box_filter


def _padded_reference(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Window sums by zero padding, axis by axis: ``(x[i] + x[i-1]) + x[i+1]`` for r = 1, else the difference of
    the running sums of the line padded with r + 1 zeros in front and r behind."""
    for d in (2, 3, 4):
        n = x.shape[d]
        pad = [0] * 6
        side = 2 * (4 - d)  # F.pad counts from the last axis
        if radius == 1:
            pad[side], pad[side + 1] = 1, 1
            p = F.pad(x, pad)
            x = (p.narrow(d, 1, n) + p.narrow(d, 0, n)) + p.narrow(d, 2, n)
        else:
            pad[side], pad[side + 1] = radius + 1, radius
            c = torch.cumsum(F.pad(x, pad), dim=d)
            x = c.narrow(d, 2 * radius + 1, n) - c.narrow(d, 0, n)
    return x


def _inputs(shape, seed):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed))
    channels_last = torch.movedim(torch.movedim(x, 1, -1).contiguous(), -1, 1)
    return [x, channels_last, x.double()]


@pytest.mark.parametrize("radius", [1, 2, 4])
@pytest.mark.parametrize("shape", [(1, 3, 12, 11, 10), (2, 1, 1, 3, 9), (1, 2, 5, 10, 2), (1, 1, 1, 1, 1),
                                   (1, 3, 20, 1, 14)])
def test_box_sum_has_the_bits_of_the_zero_padded_sum_and_leaves_its_input(radius, shape):
    for x in _inputs(shape, radius + sum(shape)):
        before = x.clone()
        got = _box_sum(x, radius)
        assert torch.equal(got, _padded_reference(x, radius))
        assert torch.equal(x, before)
        assert got.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("radius", [1, 3])
def test_box_filter_backward_is_the_window_sum_of_grad_over_count(radius):
    x = torch.rand(1, 3, 9, 7, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    count = _box_count(x.shape, radius, x.dtype, x.device)
    y = box_filter(x, radius)
    assert torch.equal(y, _padded_reference(x.detach(), radius) / count)
    (y * w).sum().backward()
    assert torch.equal(x.grad, _padded_reference(w / count, radius))


@pytest.mark.parametrize("radius", [1, 3])
def test_box_sum_consuming_its_input_gives_the_same_bits(radius):
    for x in _inputs((1, 3, 8, 1, 11), 9):
        want = _box_sum(x, radius)
        got = _box_sum(x.clone(), radius, consume=True)
        assert torch.equal(got, want)
