"""Conversion between the engine's transform parts and ITK transforms (SimpleITK), without torch.

The engine's full transform is ``T(x) = A (x + u(x))`` (fixed → moving LPS points, see
:mod:`DeepRegistrationLib.spatial.transforms`); in ITK it is the ``CompositeTransform`` ``[A, u]`` (the last added
transform is applied first). This module is torch-free so that the Slicer glue can read results in
Slicer's main process, where only the background worker imports torch.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..core.grid import Grid


def to_itk(affine: np.ndarray, field: np.ndarray | None = None, grid: Grid | None = None) -> sitk.Transform:
    """ITK ``CompositeTransform([AffineTransform, DisplacementFieldTransform])`` with the same point mapping.

    Args:
        affine: 4×4 LPS matrix ``A``.
        field: Displacement ``u`` ``(3, Z, Y, X)``, LPS mm, components (x, y, z); None for linear only.
        grid: Grid of ``field`` (fixed space).

    The field is stored as float64 vectors on ``grid`` (ITK: linear interpolation, zero displacement
    beyond half a voxel outside the grid).
    """
    aff = sitk.AffineTransform(3)
    aff.SetMatrix(tuple(float(v) for v in np.asarray(affine)[:3, :3].ravel()))
    aff.SetTranslation(tuple(float(v) for v in np.asarray(affine)[:3, 3]))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(aff)
    if field is not None:
        vec = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(np.asarray(field), 0, -1), dtype=np.float64),
                                     isVector=True)  # no copy for a channels-last float64 field
        grid.apply_to_sitk(vec)
        composite.AddTransform(sitk.DisplacementFieldTransform(vec))
    return composite


def _linear_part_matrix(part: sitk.Transform) -> np.ndarray:
    """4×4 matrix of a linear ITK transform, probed at the origin and the unit points."""
    probe = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    mapped = np.array([part.TransformPoint(tuple(p)) for p in probe])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    return m


def itk_parts(transform: sitk.Transform) -> list:
    """The transforms of an ITK ``CompositeTransform`` in its order (the last one is applied first), or
    ``[transform]`` for any other transform."""
    if transform.GetName() != "CompositeTransform":
        return [transform]
    comp = sitk.CompositeTransform(transform)
    return [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]


def _field_part(part: sitk.Transform) -> tuple[np.ndarray, Grid]:
    """The displacement ``(3, Z, Y, X)`` float64 (LPS mm) of a ``DisplacementFieldTransform`` and its grid."""
    img = sitk.DisplacementFieldTransform(part).GetDisplacementField()
    return np.moveaxis(sitk.GetArrayFromImage(img), -1, 0).astype(np.float64), Grid.from_sitk(img)


def from_itk_parts(parts: list) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """:func:`from_itk` on the parts of a composite (:func:`itk_parts`)."""
    affine = np.eye(4)
    field = grid = None
    for part in parts:
        name = part.GetName()
        if name == "DisplacementFieldTransform":
            if field is not None:
                raise ValueError("only one displacement field is supported in a composite")
            field, grid = _field_part(part)
            continue
        if field is not None:
            raise ValueError("only [affine..., displacement] composites are supported")
        if not part.IsLinear():
            raise ValueError(f"cannot convert the non-linear ITK transform {name}")
        affine = affine @ _linear_part_matrix(part)
    return affine, field, grid


def from_itk(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """Splits what :func:`to_itk` wrote (or ANTs' ``[affine, warp]`` read as one composite) into parts.

    Returns:
        ``(affine (4, 4), field (3, Z, Y, X) or None, field grid or None)``, LPS mm.

    Raises:
        ValueError: anything but linear transforms followed by at most one displacement field.
    """
    return from_itk_parts(itk_parts(transform))


def from_itk_inverse(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """Splits an inverse as the engine writes it (``inverse.h5``: ITK ``[displacement, affine]``, the affine applied
    first; ``y -> z + w(z)``, ``z = A⁻¹ y``, moving → fixed LPS points), or linear transforms alone.

    Returns:
        ``(A⁻¹ (4, 4): the product of the linear parts, w (3, Z, Y, X) or None, grid of w or None)``, LPS mm.

    Raises:
        ValueError: anything but at most one displacement field followed by one or more linear transforms.
    """
    parts = itk_parts(transform)
    field = grid = None
    if parts and parts[0].GetName() == "DisplacementFieldTransform":
        field, grid = _field_part(parts[0])
        parts = parts[1:]
    names = [part.GetName() for part in parts]
    if not parts or "DisplacementFieldTransform" in names:
        raise ValueError(f"found {names}")
    return from_itk_parts(parts)[0], field, grid
