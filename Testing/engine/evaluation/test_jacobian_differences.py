"""The Jacobian's index derivatives: np.gradient's central differences, bit for bit, and the same determinant
whatever the slab size (each slab's in-plane derivatives on its own slices, the through-plane ones with one
neighbouring slice on each side)."""
from __future__ import annotations

import numpy as np

from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.evaluation import metrics


def test_index_derivatives_are_numpys_gradient_bit_for_bit():
    rng = np.random.default_rng(3)
    for shape in ((3, 7, 5, 6), (3, 2, 3, 9), (3, 3, 2, 2)):
        u = rng.normal(scale=3.0, size=shape)
        for axis in (1, 2, 3):
            want = np.gradient(u, axis=axis, edge_order=1)
            assert metrics._index_derivatives(u, axis).tobytes() == want.tobytes()
    flat = rng.normal(size=(3, 1, 4, 5))
    assert not metrics._index_derivatives(flat, 1).any()


def test_jacobian_determinant_does_not_depend_on_the_slab_size():
    rng = np.random.default_rng(4)
    c, s = np.cos(0.4), np.sin(0.4)
    grid = Grid((11, 9, 10), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0), (c, -s, 0, s, c, 0, 0, 0, 1))
    u = rng.normal(scale=0.4, size=(3, *grid.shape)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] += rng.normal(scale=0.05, size=(3, 3))
    whole = metrics.jacobian_determinant(u, grid, affine, slab=64)
    for slab in (1, 2, 4):
        assert metrics.jacobian_determinant(u, grid, affine, slab=slab).tobytes() == whole.tobytes()
    # a linear field: det(A) det(I + G) exactly (to rounding) everywhere, borders included
    g = rng.normal(scale=0.05, size=(3, 3))
    ijk = np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij")  # (i, j, k) arrays of shape (X, Y, Z)
    pts = (grid.index_to_world @ np.stack([*ijk, np.ones(grid.size)]).reshape(4, -1))[:3]
    lin = (g @ pts).reshape(3, *grid.size).transpose(0, 3, 2, 1)
    want = np.linalg.det(affine[:3, :3]) * np.linalg.det(np.eye(3) + g)
    np.testing.assert_allclose(metrics.jacobian_determinant(lin, grid, affine, slab=3), want, rtol=1e-10)


def test_index_derivatives_of_float32_rows_are_those_of_the_float64_field():
    rng = np.random.default_rng(6)
    u = rng.normal(scale=3.0, size=(3, 7, 5, 6)).astype(np.float32)
    for axis in (1, 2, 3):
        want = np.gradient(u.astype(np.float64), axis=axis, edge_order=1)
        assert metrics._index_derivatives(u, axis).tobytes() == want.tobytes()
        n = u.shape[axis]
        for rows in ((0, 1), (0, 2), (1, n - 1), (n - 2, n), (n - 1, n), (0, n)):
            part = np.take(want, np.arange(*rows), axis=axis)
            assert metrics._index_derivatives(u, axis, rows).tobytes() == part.tobytes()


def test_jacobian_of_a_float32_field_is_that_of_its_float64_copy():
    rng = np.random.default_rng(7)
    grid = Grid((9, 1, 8), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0), (0, 1, 0, -1, 0, 0, 0, 0, 1))  # a 1-voxel axis
    u = rng.normal(scale=0.4, size=(3, *grid.shape)).astype(np.float32)
    affine = np.diag([1.1, 0.9, 1.0, 1.0])
    want = metrics.jacobian_determinant(u.astype(np.float64), grid, affine, slab=64)
    for slab in (None, 1, 2, 5):
        assert metrics.jacobian_determinant(u, grid, affine, slab=slab).tobytes() == want.tobytes()
