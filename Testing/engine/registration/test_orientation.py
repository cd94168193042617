"""The same physical pair stored with different voxel layouts gives the same physical result.

Variants of both images: as stored (LPS-like), flipped to RAS index order, axes permuted, and an
oblique header (both images rotated together by R; the result must then be R T R⁻¹).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import brain_mask
from DeepRegistrationLib.core.config import RegistrationConfig
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.io.images import read_image
from DeepRegistrationLib.registration.pipeline import register


def flip_axes(image: Image, axes_ijk: tuple[int, ...]) -> Image:
    """Same physical image with the given index axes reversed (header adjusted)."""
    arr = image.array
    m = image.grid.index_to_world.copy()
    for a in axes_ijk:
        arr = np.flip(arr, 2 - a)
        n = image.grid.size[a]
        m[:3, 3] = m[:3, 3] + m[:3, a] * (n - 1)
        m[:3, a] = -m[:3, a]
    return Image(np.ascontiguousarray(arr), Grid.from_index_to_world(arr.shape, m), image.name)


def permute_axes(image: Image, order_ijk: tuple[int, int, int]) -> Image:
    """Same physical image with index axes permuted: new axis c is old axis ``order_ijk[c]``."""
    arr = np.transpose(image.array, [2 - o for o in reversed(order_ijk)])
    m = image.grid.index_to_world.copy()
    m2 = m.copy()
    for c, o in enumerate(order_ijk):
        m2[:3, c] = m[:3, o]
    return Image(np.ascontiguousarray(arr), Grid.from_index_to_world(arr.shape, m2), image.name)


def rotate_header(image: Image, r: np.ndarray) -> Image:
    m = image.grid.index_to_world.copy()
    m[:3] = r @ m[:3]
    return Image(image.array, Grid.from_index_to_world(image.array.shape, m), image.name)


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


CFG = RegistrationConfig(mode="deformable", spacing=4.0, iterations=20, affine_iterations=40, levels=2, threads=2)


@pytest.fixture(scope="module")
def pair(sample_dir):
    return (read_image(sample_dir / "fixed.nii.gz", "fixed image"),
            read_image(sample_dir / "moving.nii.gz", "moving image"))


@pytest.fixture(scope="module")
def reference(pair):
    fixed, moving = pair
    res = register(fixed, moving, CFG)
    pts = fixed.grid.world_points()[brain_mask(fixed)][::7]
    return pts, res.transform.map_points(pts)


@pytest.mark.parametrize("variant", ["ras", "permuted", "oblique"])
def test_same_physical_result(pair, reference, variant):
    fixed, moving = pair
    pts, expected = reference
    r = np.eye(3)
    if variant == "ras":
        f2, m2 = flip_axes(fixed, (0, 1)), flip_axes(moving, (0, 1))
    elif variant == "permuted":
        f2, m2 = permute_axes(fixed, (2, 0, 1)), permute_axes(moving, (1, 2, 0))
    else:
        r = rotation(0.35, -0.2, 0.5)
        f2, m2 = rotate_header(fixed, r), rotate_header(moving, r)
    res = register(f2, m2, CFG)
    got = res.transform.map_points(pts @ r.T) @ r  # R^-1 T'(R x)
    err = np.linalg.norm(got - expected, axis=1)
    assert np.median(err) < 0.1 and np.percentile(err, 95) < 0.25, (np.median(err), np.percentile(err, 95), err.max())
