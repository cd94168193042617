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


def from_itk(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """Splits what :func:`to_itk` wrote (or ANTs' ``[affine, warp]`` read as one composite) into parts.

    Returns:
        ``(affine (4, 4), field (3, Z, Y, X) or None, field grid or None)``, LPS mm.

    Raises:
        ValueError: anything but linear transforms followed by at most one displacement field.
    """
    comp = sitk.CompositeTransform(transform) if transform.GetName() == "CompositeTransform" else None
    parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())] if comp else [transform]
    affine = np.eye(4)
    field = grid = None
    for part in parts:
        name = part.GetName()
        if name == "DisplacementFieldTransform":
            if field is not None:
                raise ValueError("only one displacement field is supported in a composite")
            img = sitk.DisplacementFieldTransform(part).GetDisplacementField()
            field = np.moveaxis(sitk.GetArrayFromImage(img), -1, 0).astype(np.float64)
            grid = Grid.from_sitk(img)
            continue
        if field is not None:
            raise ValueError("only [affine..., displacement] composites are supported")
        if not part.IsLinear():
            raise ValueError(f"cannot convert the non-linear ITK transform {name}")
        affine = affine @ _linear_part_matrix(part)
    return affine, field, grid
