"""Conversions between MRML nodes and the engine's types (LPS mm, arrays ``(Z, Y, X)``).

Slicer's world is RAS, the engine's LPS: points and vectors convert with ``C = diag(-1, -1, 1)``; a volume's
``IJKToRAS`` matrix ``M`` becomes the engine grid's index-to-LPS matrix ``C4 @ M`` (``C4 = diag(-1, -1, 1, 1)``).
Both matrices and the point conversion are the engine's one implementation, :mod:`DeepRegistrationLib.core.frames`
(``C3``/``C4`` here are its ``RAS_TO_LPS``/``RAS_TO_LPS_4``); index order and voxel ↔ mm go through
:class:`~DeepRegistrationLib.core.grid.Grid`.
Engine transforms map fixed → moving (the resampling direction), which is a transform node's *FromParent*:
``FromParent_ras(p) = C · T(C · p)``. See docs/CONVENTIONS.md §2.

Coordinate frames used by the module (:func:`movingFrame` chooses): fixed-side nodes (fixed volume, fixed
mask/segmentation/landmarks) are read in **world** coordinates (a linear parent transform is applied). Moving-side
nodes are read

- in **world** coordinates when the moving volume is under linear transforms (its current alignment, e.g. made in
  the Transforms module) and no initial transform is given: registration starts from where the volume is shown,
  the output transform maps fixed world → that pre-aligned world and goes *on top of* the moving volume's
  transforms (:func:`placeOnTop`), so the volume ends under ``result ∘ parent`` and its own transforms are kept;
- else in their **local** coordinates moved by ``E``: the initial transform's matrix, or the current alignment
  when it cannot stay (the output transform is already one of the moving volume's transforms, or they are shared
  with the fixed volume). The output transform then maps fixed world → moving local points (``E`` included) and
  the moving volume placed directly under it is aligned.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from DeepRegistrationLib.core import frames
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.grid import Grid
from DeepRegistrationLib.core.image import Image

C3 = frames.RAS_TO_LPS  # 3×3, points and vectors (its own inverse)
C4 = frames.RAS_TO_LPS_4  # 4×4, homogeneous matrices

JACOBIAN_COLOR_NAME = "DeepRegistration Jacobian"


# ---------------------------------------------------------------------------------------------------- matrices
def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4×4 numpy array (float64) of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """vtkMatrix4x4 of a 4×4 (or 3×3, padded) numpy array."""
    a = np.eye(4)
    arr = np.asarray(array, dtype=float)
    a[:arr.shape[0], :arr.shape[1]] = arr
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def rasToLps(points: np.ndarray) -> np.ndarray:
    """Points or vectors ``(..., 3)`` RAS → LPS (its own inverse): :func:`DeepRegistrationLib.core.frames.ras_to_lps`."""
    return frames.ras_to_lps(points)


lpsToRas = rasToLps


def parentToWorldMatrix(node) -> np.ndarray:
    """4×4 RAS matrix of the node's parent transforms (identity without one); InputError if non-linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}'. Harden the "
                         "transform on it (Data module, right-click > Harden transform) or remove it, then run again.")
    return _matrixToWorld(parent)


def transformNodeToWorldMatrix(transformNode) -> np.ndarray:
    """ToParent-to-world 4×4 RAS matrix of a (linear) transform node, e.g. an initial transform."""
    if not transformNode.IsTransformToWorldLinear():
        raise InputError(f"the initial transform '{transformNode.GetName()}' is not linear. Use a linear (rigid or "
                         "affine) initial transform, or harden it on the moving volume first.")
    return _matrixToWorld(transformNode)


def transformChain(node) -> list:
    """The transform nodes ``node`` is under, nearest first (empty without a parent)."""
    chain = []
    parent = node.GetParentTransformNode() if node is not None else None
    while parent is not None and parent not in chain:
        chain.append(parent)
        parent = parent.GetParentTransformNode()
    return chain


def movingFrame(movingVolume, fixedVolume=None, outputTransform=None, initialTransform=None,
                useParentTransform: bool = True) -> tuple[str, np.ndarray | None]:
    """How moving-side nodes are read (see the module docstring): ``("world", None)`` or ``("local", E)``, ``E``
    the 4×4 RAS matrix that moves them (None = identity)."""
    if initialTransform is not None:
        return "local", transformNodeToWorldMatrix(initialTransform)
    chain = transformChain(movingVolume)
    if not chain or not useParentTransform:
        return "local", None
    if not chain[0].IsTransformToWorldLinear():  # a non-linear alignment cannot start an affine search
        return "local", None
    if (outputTransform is not None and outputTransform in chain) or chain[-1] in transformChain(fixedVolume):
        return "local", _matrixToWorld(chain[0])  # start from the current alignment; the result replaces it
    return "world", None


def placeOnTop(node, transformNode) -> bool:
    """Puts ``transformNode`` above all the transforms ``node`` is under (directly above ``node`` when it has
    none), so ``node`` is shown through ``transformNode ∘ its own transforms``; False if it already was."""
    chain = transformChain(node)
    if transformNode in chain:
        return False
    top = chain[-1] if chain else node
    if top is transformNode or top in transformChain(transformNode):
        raise InputError(f"'{transformNode.GetName()}' cannot be placed above '{node.GetName()}' (a loop).")
    top.SetAndObserveTransformNodeID(transformNode.GetID())
    return True


def _matrixToWorld(transformNode) -> np.ndarray:
    """4×4 RAS matrix of a transform node that is linear to world."""
    m = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(m)
    return arrayFromVtkMatrix(m)


# ---------------------------------------------------------------------------------------------------- volumes
def volumeIJKToRAS(volumeNode) -> np.ndarray:
    """The volume's own 4×4 IJKToRAS matrix (no parent transform)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return arrayFromVtkMatrix(m)


def volumeToImage(volumeNode, name: str = "image", world: bool = True, extraMatrix: np.ndarray | None = None,
                  dtype=np.float32) -> Image:
    """Engine :class:`Image` of a scalar volume node.

    Args:
        volumeNode: vtkMRMLScalarVolumeNode (or labelmap) with image data.
        name: What it is, for error messages.
        world: Include the node's (linear) parent transforms; False = the node's local coordinates.
        extraMatrix: Optional 4×4 RAS matrix applied last (e.g. an initial transform's ToParent).
        dtype: Array type (float32 for intensities).

    Returns:
        Image with array ``(K, J, I)`` = ``(Z, Y, X)`` (a copy) and its LPS grid (oblique directions kept).
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise InputError(f"{name}: the volume node is empty (no image data). Load or select a volume.")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"{name}: '{volumeNode.GetName()}' has several components per voxel (a vector or color "
                         "volume). Select a scalar volume, or extract one component first.")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), dtype=dtype, copy=True)
    matrix = volumeIJKToRAS(volumeNode)
    if world:
        matrix = parentToWorldMatrix(volumeNode) @ matrix
    if extraMatrix is not None:
        matrix = np.asarray(extraMatrix, dtype=float) @ matrix
    return Image(array, Grid.from_index_to_world(array.shape, C4 @ matrix), name)


def imageToVolume(image: Image, volumeNode=None, name: str | None = None, scene=None):
    """Fills (or creates) a scalar volume node from an engine :class:`Image` (exact geometry, LPS → RAS)."""
    scene = scene or slicer.mrmlScene
    if volumeNode is None:
        volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or image.name)
    array = np.ascontiguousarray(image.array.astype(np.uint8) if image.array.dtype == bool else image.array)
    slicer.util.updateVolumeFromArray(volumeNode, array)
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(C4 @ image.grid.index_to_world))
    if volumeNode.GetScene() is not None and volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


# ---------------------------------------------------------------------------------------------------- labels
def segmentNames(segmentationNode) -> list[str]:
    seg = segmentationNode.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def matchSegments(fixedNode, movingNode) -> tuple[list[str], list[str]]:
    """Segment IDs of two segmentations paired by segment name (fixed order), else by order when counts match."""
    fs, ms = fixedNode.GetSegmentation(), movingNode.GetSegmentation()
    fixedIds = [fs.GetNthSegmentID(i) for i in range(fs.GetNumberOfSegments())]
    movingIds = [ms.GetNthSegmentID(i) for i in range(ms.GetNumberOfSegments())]
    movingByName = {ms.GetSegment(i).GetName(): i for i in movingIds}
    common = [i for i in fixedIds if fs.GetSegment(i).GetName() in movingByName]
    if common:
        return common, [movingByName[fs.GetSegment(i).GetName()] for i in common]
    if len(fixedIds) == len(movingIds) and fixedIds:
        return fixedIds, movingIds
    raise InputError(f"the segmentations '{fixedNode.GetName()}' and '{movingNode.GetName()}' share no segment "
                     "name and have different numbers of segments, so Dice cannot pair them. Give corresponding "
                     "segments the same names.")


def labelArrayOnVolume(labelNode, referenceVolume, segmentIds: list[str] | None = None, what: str = "labels",
                       scene=None) -> np.ndarray:
    """Label array ``(K, J, I)`` int32 of a segmentation or labelmap node on ``referenceVolume``'s voxel grid.

    Segmentations: segment ``segmentIds[n]`` (default: all segments) gets label ``n + 1``.
    Labelmap volumes: values are kept; resampled (nearest neighbour) when on another grid.
    """
    scene = scene or referenceVolume.GetScene() or slicer.mrmlScene
    shape = tuple(reversed(referenceVolume.GetImageData().GetDimensions()))
    if labelNode.IsA("vtkMRMLSegmentationNode"):
        seg = labelNode.GetSegmentation()
        ids = list(segmentIds) if segmentIds is not None else \
            [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        if not ids:
            raise InputError(f"{what}: the segmentation '{labelNode.GetName()}' has no segment.")
        idArray = vtk.vtkStringArray()
        for i in ids:
            idArray.InsertNextValue(i)
        existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DeepRegistrationTemporaryLabels")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                labelNode, idArray, labelmap, referenceVolume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
            if not ok:
                raise InputError(f"{what}: the segmentation '{labelNode.GetName()}' could not be converted to a "
                                 "label map on the volume's grid.")
            array = np.array(slicer.util.arrayFromVolume(labelmap), dtype=np.int32)
            if array.shape != shape or not np.allclose(volumeIJKToRAS(labelmap), volumeIJKToRAS(referenceVolume),
                                                       atol=1e-6):
                raise InputError(f"{what}: exporting '{labelNode.GetName()}' did not give the volume's grid.")
        finally:  # the export adds a labelmap, its display node and a color table: remove them all
            removeNodeAndDependents(labelmap)
            for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
                if node is not None and node.GetID() not in existing:
                    scene.RemoveNode(node)
        return array
    if labelNode.IsA("vtkMRMLScalarVolumeNode"):
        array = np.array(slicer.util.arrayFromVolume(labelNode))
        if not np.all(np.isfinite(array)) or not np.allclose(array, np.round(array)):
            raise InputError(f"{what}: '{labelNode.GetName()}' holds non-integer values; select a label map or "
                             "a segmentation.")
        array = np.round(array).astype(np.int32)
        src = parentToWorldMatrix(labelNode) @ volumeIJKToRAS(labelNode)
        dst = parentToWorldMatrix(referenceVolume) @ volumeIJKToRAS(referenceVolume)
        if array.shape == shape and np.allclose(src, dst, atol=1e-4):
            return array
        return resampleNearest(array, src, shape, dst)
    raise InputError(f"{what}: '{labelNode.GetName()}' is neither a segmentation nor a label map volume.")


def resampleNearest(array: np.ndarray, srcIJKToRAS: np.ndarray, shape: tuple, dstIJKToRAS: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of an array ``(K, J, I)`` between two voxel grids (outside = 0)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    src = np.rint((np.linalg.inv(srcIJKToRAS) @ dstIJKToRAS @ ijk)[:3]).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.array(array.shape[::-1])[:, None]), axis=0)
    out = np.zeros(i.size, dtype=array.dtype)
    out[inside] = array[src[2, inside], src[1, inside], src[0, inside]]
    return out.reshape(shape)


def removeNodeAndDependents(node) -> None:
    """Removes a node with its display and storage nodes."""
    scene = node.GetScene()
    if scene is None:
        return
    for getter in ("GetNumberOfDisplayNodes", "GetNumberOfStorageNodes"):
        count = getattr(node, getter)() if hasattr(node, getter) else 0
        nth = node.GetNthDisplayNode if "Display" in getter else node.GetNthStorageNode
        for dependent in [nth(n) for n in range(count)]:
            if dependent is not None:
                scene.RemoveNode(dependent)
    scene.RemoveNode(node)


def writeLabelImage(array: np.ndarray, grid: Grid, path: str) -> None:
    """Writes a label/mask array on an engine grid (uint16 NIfTI/NRRD) for the worker."""
    from DeepRegistrationLib.io.images import write_image

    if array.max() > 65535:
        raise InputError("label values above 65535 are not supported.")
    write_image(Image(array.astype(np.uint16), grid, "labels"), path)


# ---------------------------------------------------------------------------------------------------- markups
def markupsToLpsPoints(markupsNode, world: bool = True, extraMatrix: np.ndarray | None = None
                       ) -> tuple[np.ndarray, list[str]]:
    """Control points ``(N, 3)`` in LPS mm and their labels (world or local coordinates, see module doc)."""
    n = markupsNode.GetNumberOfControlPoints()
    if n == 0:
        raise InputError(f"the landmark list '{markupsNode.GetName()}' has no point.")
    local = np.array([markupsNode.GetNthControlPointPosition(i) for i in range(n)], dtype=float)
    matrix = parentToWorldMatrix(markupsNode) if world else np.eye(4)
    if extraMatrix is not None:
        matrix = np.asarray(extraMatrix, dtype=float) @ matrix
    ras = local @ matrix[:3, :3].T + matrix[:3, 3]
    return rasToLps(ras), [markupsNode.GetNthControlPointLabel(i) for i in range(n)]


def lpsPointsToMarkups(points: np.ndarray, labels: list[str] | None = None, markupsNode=None, name: str = "F",
                       scene=None):
    """Fills (or creates) a fiducial markups node with LPS points (stored as RAS control points)."""
    scene = scene or slicer.mrmlScene
    if markupsNode is None:
        markupsNode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    markupsNode.RemoveAllControlPoints()
    for n, p in enumerate(lpsToRas(np.asarray(points, dtype=float).reshape(-1, 3))):
        index = markupsNode.AddControlPoint(vtk.vtkVector3d(*p))
        if labels is not None:
            markupsNode.SetNthControlPointLabel(index, str(labels[n]))
    return markupsNode


def writeLandmarksCsv(points: np.ndarray, labels: list[str], path: str) -> None:
    """CSV ``label,x,y,z`` in LPS mm, as the engine's landmark reader expects."""
    with open(path, "w", newline="") as f:
        f.write("# coordinateSystem = LPS\n")
        writer = csv.writer(f)
        writer.writerow(["label", "x", "y", "z"])
        for label, p in zip(labels, points):
            writer.writerow([label] + [repr(float(v)) for v in p])


# ---------------------------------------------------------------------------------------------------- transforms
def gridTransformFromField(field: np.ndarray, grid: Grid):
    """``vtkOrientedGridTransform`` of a displacement field ``(3, Z, Y, X)`` (LPS mm, components x, y, z).

    The grid is converted to RAS (origin and direction ``C ·``), the vectors to RAS mm, the direction is set
    with ``SetGridDirectionMatrix`` and the interpolation is linear (ITK's), docs/CONVENTIONS.md §2.
    """
    field = np.asarray(field, dtype=np.float64)
    if field.shape != (3, *grid.shape):
        raise ValueError(f"field shape {field.shape} does not match grid {grid.shape}")
    vectors = np.ascontiguousarray(frames.lps_to_ras(field.reshape(3, -1).T))  # (Z*Y*X, 3) RAS, x fastest
    image = vtk.vtkImageData()
    image.SetDimensions(*grid.size)
    image.SetSpacing(*grid.spacing)
    image.SetOrigin(*frames.lps_to_ras(grid.origin))
    data = numpy_support.numpy_to_vtk(vectors, deep=True, array_type=vtk.VTK_DOUBLE)
    data.SetName("DisplacementField")
    image.GetPointData().SetScalars(data)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(vtkMatrixFromArray(C3 @ grid.direction_matrix))
    transform.SetInterpolationModeToLinear()
    return transform


def setLinearGridInterpolation(transform) -> None:
    """Linear interpolation on every grid inside ``transform`` (Slicer reads grids as cubic, ITK is linear)."""
    if transform is None:
        return
    if transform.IsA("vtkGeneralTransform"):
        for i in range(transform.GetNumberOfConcatenatedTransforms()):
            setLinearGridInterpolation(transform.GetConcatenatedTransform(i))
    elif hasattr(transform, "SetInterpolationModeToLinear"):
        transform.SetInterpolationModeToLinear()
    transform.Modified()


RESULT_ATTRIBUTE = "DeepRegistration.preset"
"""Attribute marking transform nodes made by the module (kept in saved scenes)."""

FRAME_ATTRIBUTE = "DeepRegistration.movingFrame"
"""Attribute of a result transform: ``"world"`` (maps fixed world → the moving volume's world, placed on top of its
transforms) or ``"local"`` (→ moving local coordinates, the moving volume directly under it); see movingFrame."""

OUTPUT_ATTRIBUTE = "DeepRegistration.output"
"""Attribute of the volumes the module makes ("warped", "jacobian"): never offered as default inputs."""


def restoreLinearInterpolation(scene=None) -> int:
    """Switches the grids of the module's transform nodes back to linear interpolation after a scene load.

    Slicer reads grid transforms from files with cubic interpolation; the engine (like ITK) is linear, and the
    saved result differs by ~0.1 mm until this is called (the module calls it on every scene import).
    Returns the number of transform nodes updated.
    """
    scene = scene or slicer.mrmlScene
    count = 0
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")):
        node = scene.GetNthNodeByClass(n, "vtkMRMLTransformNode")
        if node.GetAttribute(RESULT_ATTRIBUTE) is not None and not node.IsLinear():
            setLinearGridInterpolation(node.GetTransformFromParent())
            node.Modified()
            count += 1
    return count


def setTransformNodeFromEngine(transformNode, affineLps: np.ndarray, field: np.ndarray | None = None,
                               fieldGrid: Grid | None = None, movingMatrix: np.ndarray | None = None) -> None:
    """Stores the engine map ``T(x) = A (x + u(x))`` (fixed → moving, LPS) as the node's FromParent.

    FromParent_ras(p) = E⁻¹ · A_ras (p + u_ras(p)) with ``A_ras = C4 A C4``, ``u_ras = C u(C p)`` and ``E`` the
    optional RAS matrix that moved the moving-side inputs (initial transform). Linear results become a matrix;
    deformable ones a ``vtkGeneralTransform`` [linear, grid] (the grid is applied first), which Slicer writes as an
    ITK composite transform [AffineTransform, DisplacementFieldTransform], the engine's own layout.
    """
    affineRas = C4 @ np.asarray(affineLps, dtype=float) @ C4
    if movingMatrix is not None:
        affineRas = np.linalg.inv(np.asarray(movingMatrix, dtype=float)) @ affineRas
    if field is None:
        transformNode.SetMatrixTransformFromParent(vtkMatrixFromArray(affineRas))
        return
    if transformNode.IsA("vtkMRMLLinearTransformNode"):
        raise InputError(f"the output transform '{transformNode.GetName()}' is a linear transform node and cannot "
                         "hold a deformable result. Select a (general) transform node or create a new one.")
    linear = vtk.vtkTransform()
    linear.SetMatrix(vtkMatrixFromArray(affineRas))
    general = vtk.vtkGeneralTransform()
    general.PreMultiply()
    general.Concatenate(linear)
    general.Concatenate(gridTransformFromField(field, fieldGrid))
    transformNode.SetAndObserveTransformFromParent(general)


def setInverseTransformNodeFromEngine(transformNode, affineInverseLps: np.ndarray, field: np.ndarray | None = None,
                                      fieldGrid: Grid | None = None, movingMatrix: np.ndarray | None = None) -> None:
    """Stores the engine's inverse ``T⁻¹(y) = z + w(z)``, ``z = A⁻¹ y`` (moving → fixed, LPS) as the node's FromParent.

    FromParent_ras(q) = z + w_ras(z) with ``z = A⁻¹_ras E q`` (``E`` as in :func:`setTransformNodeFromEngine`):
    a fixed-space node (volume, segmentation, markups) placed under this node is resampled onto the moving image.
    Deformable inverses become a ``vtkGeneralTransform`` [grid, linear] (the linear part is applied first), which
    Slicer writes as an ITK composite [DisplacementFieldTransform, AffineTransform], the engine's ``inverse.h5``.
    """
    linearRas = C4 @ np.asarray(affineInverseLps, dtype=float) @ C4
    if movingMatrix is not None:
        linearRas = linearRas @ np.asarray(movingMatrix, dtype=float)
    if field is None:
        transformNode.SetMatrixTransformFromParent(vtkMatrixFromArray(linearRas))
        return
    linear = vtk.vtkTransform()
    linear.SetMatrix(vtkMatrixFromArray(linearRas))
    general = vtk.vtkGeneralTransform()
    general.PreMultiply()
    general.Concatenate(gridTransformFromField(field, fieldGrid))
    general.Concatenate(linear)
    transformNode.SetAndObserveTransformFromParent(general)


def readItkInverseTransform(path: str) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """Reads the engine's ``inverse.h5`` (ITK composite [displacement, affine], LPS; the affine applied first).

    Returns:
        ``(A⁻¹ (4, 4), w (3, Z, Y, X) or None, grid of w or None)``, LPS mm.
    """
    import SimpleITK as sitk

    from DeepRegistrationLib.io.itk_transform import from_itk_inverse, itk_parts

    try:
        tx = sitk.ReadTransform(str(path))
        parts = itk_parts(tx)
        linear = parts[1:] if parts and parts[0].GetName() == "DisplacementFieldTransform" else parts
        if len(linear) != 1:  # exactly one linear part, as the engine writes it
            raise ValueError(f"found {[p.GetName() for p in linear]}")
        return from_itk_inverse(tx)  # ValueError for a second field or a non-linear part
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"'{path}' is not a [displacement, affine] inverse transform ({exc}).") from None


def readItkTransform(path: str) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """Reads the engine's ``transform.h5`` (ITK composite [affine, displacement], LPS) without torch.

    Returns:
        ``(affine (4, 4), field (3, Z, Y, X) or None, field grid or None)``, LPS mm.
    """
    import SimpleITK as sitk

    from DeepRegistrationLib.io.itk_transform import from_itk

    try:
        return from_itk(sitk.ReadTransform(str(path)))
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"'{path}' is not an [affine, displacement] transform ({exc}).") from None


def setRegistrationReferences(transformNode, fixedVolume, movingVolume) -> None:
    """Node references Slicer's registration modules set on their output transform."""
    transformNode.SetNodeReferenceID("spatialRegistrationFixed", fixedVolume.GetID() if fixedVolume else None)
    transformNode.SetNodeReferenceID("spatialRegistrationMoving", movingVolume.GetID() if movingVolume else None)


def mapPointsRas(transformNode, pointsRas: np.ndarray) -> np.ndarray:
    """Applies a transform node's FromParent (resampling direction) to RAS points ``(N, 3)``."""
    fromParent = transformNode.GetTransformFromParent()
    pts = vtk.vtkPoints()
    for p in np.asarray(pointsRas, dtype=float):
        pts.InsertNextPoint(*p)
    out = vtk.vtkPoints()
    fromParent.TransformPoints(pts, out)
    return numpy_support.vtk_to_numpy(out.GetData()).astype(float).copy()


# ---------------------------------------------------------------------------------------------------- display
def jacobianColorNode(scene=None):
    """A diverging color map for Jacobian determinants: red ≤ 0 (folding), white = 1, blue = 2 (expansion)."""
    scene = scene or slicer.mrmlScene
    node = scene.GetFirstNodeByName(JACOBIAN_COLOR_NAME)
    if node is not None and node.IsA("vtkMRMLProceduralColorNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", JACOBIAN_COLOR_NAME)
    node.SetAttribute("Category", "DeepRegistration")
    ctf = vtk.vtkColorTransferFunction()
    ctf.AddRGBPoint(0.0, 0.7, 0.0, 0.0)   # det J <= 0: folding
    ctf.AddRGBPoint(0.5, 1.0, 0.55, 0.3)  # compression
    ctf.AddRGBPoint(1.0, 1.0, 1.0, 1.0)   # volume preserved
    ctf.AddRGBPoint(1.5, 0.4, 0.6, 1.0)
    ctf.AddRGBPoint(2.0, 0.0, 0.1, 0.7)   # expansion
    node.SetAndObserveColorTransferFunction(ctf)
    return node


def showAsJacobian(volumeNode) -> None:
    """Display settings of a Jacobian-determinant volume: diverging colors, window 0..2."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(jacobianColorNode(volumeNode.GetScene()).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 2.0)


# ---------------------------------------------------------------------------------------------------- explanation maps
MAP_NAMES = ("residual", "local_similarity", "displacement", "uncertainty")
"""The engine's optional maps on the fixed grid: ``OUTDIR/explain/<name>.nii.gz`` and ``OUTDIR/uncertainty.nii.gz``."""

MAP_TITLES = {"residual": "residual", "local_similarity": "local similarity", "local_mi": "local MI (nats)",
              "displacement": "displacement (mm)", "uncertainty": "uncertainty (mm)"}
"""Node-name suffixes; ``local_mi`` is how ``local_similarity`` is shown after an MI registration (the engine
then writes the local mutual information in nats there, instead of LNCC cc² in [0, 1])."""

_MAP_COLORS = {
    # name: (colour node name, [(fraction of the window, r, g, b)], fixed window or None = 0..99th percentile)
    "residual": ("DeepRegistration residual", [(0.0, 0.0, 0.0, 0.02), (0.25, 0.34, 0.06, 0.43),
                                               (0.5, 0.73, 0.21, 0.33), (0.75, 0.98, 0.55, 0.04),
                                               (1.0, 0.99, 1.0, 0.64)], None),  # inferno-like: dark = agree
    "local_similarity": ("DeepRegistration local similarity", [(0.0, 0.70, 0.09, 0.17), (0.5, 0.97, 0.97, 0.97),
                                                               (1.0, 0.13, 0.40, 0.67)], (0.0, 1.0)),
    # diverging: red = dissimilar (cc² 0), white = 0.5, blue = locally identical (cc² 1)
    "heat": ("DeepRegistration heat (mm)", [(0.0, 0.0, 0.0, 0.0), (0.35, 0.75, 0.0, 0.0), (0.7, 1.0, 0.75, 0.0),
                                            (1.0, 1.0, 1.0, 1.0)], None),  # black-red-yellow-white
}


MAP_TRANSPARENT_BELOW = 1e-6
"""Map values below this are not drawn (threshold), so the fixed volume shows through where a map is 0."""


def mapColorNode(name: str, scene=None):
    """The colour table of an explanation map (``MAP_NAMES`` or ``local_mi``): residual inferno-like (black →
    yellow), local similarity diverging (red low → white middle → blue high; local MI the same, centred on 0),
    displacement and uncertainty a heat map (black → red → yellow → white). 256-entry tables, stretched over
    the volume's window like Slicer's own continuous tables."""
    scene = scene or slicer.mrmlScene
    key = "local_similarity" if name == "local_mi" else name
    title, anchors, _window = _MAP_COLORS[key if key in ("residual", "local_similarity") else "heat"]
    node = scene.GetFirstNodeByName(title)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", title)
    node.SetTypeToUser()
    node.SetAttribute("Category", "DeepRegistration")
    node.SetNumberOfColors(256)
    at = np.array([a[0] for a in anchors])
    rgb = np.array([a[1:] for a in anchors])
    for i in range(256):
        c = [float(np.interp(i / 255.0, at, rgb[:, k])) for k in range(3)]
        node.SetColor(i, f"{i}", c[0], c[1], c[2], 1.0)
    return node


def mapWindow(name: str, array: np.ndarray) -> tuple[float, float]:
    """Display range of a map: 0..1 for the local similarity (cc²), ±(99th percentile of |value|) for the local
    MI (0 in the middle), else 0 .. the 99th percentile of its non-zero voxels (at least a tiny positive width)."""
    fixed = _MAP_COLORS.get(name, (None, None, None))[2]
    if fixed is not None:
        return fixed
    a = np.asarray(array, dtype=float)
    if name == "local_mi":
        a = np.abs(a[np.isfinite(a) & (a != 0)])
        high = max(float(np.percentile(a, 99)) if a.size else 1.0, 1e-6)
        return -high, high
    a = a[np.isfinite(a) & (a > 0)]
    high = float(np.percentile(a, 99)) if a.size else 1.0
    return 0.0, max(high, 1e-6)


def showAsMap(volumeNode, name: str, array: np.ndarray | None = None) -> None:
    """Display settings of an explanation map volume: its colour table (:func:`mapColorNode`), window
    (:func:`mapWindow`) and a threshold that leaves zeros transparent (:data:`MAP_TRANSPARENT_BELOW`); the map's
    name is kept in the ``DeepRegistration.output`` attribute."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(mapColorNode(name, volumeNode.GetScene()).GetID())
    display.AutoWindowLevelOff()
    array = slicer.util.arrayFromVolume(volumeNode) if array is None else array
    low, high = mapWindow(name, array)
    display.SetWindowLevelMinMax(low, high)
    # zeros (outside the overlap, flat background: no information) are transparent over the fixed volume; the
    # local MI has negative values to show, so it is not thresholded (its 0 is the diverging table's white)
    display.AutoThresholdOff()
    if name == "local_mi":
        display.ApplyThresholdOff()
    else:
        top = float(np.nanmax(array)) if np.size(array) else 1.0
        display.SetThreshold(MAP_TRANSPARENT_BELOW, max(top, high) + 1.0)
        display.ApplyThresholdOn()
    volumeNode.SetAttribute(OUTPUT_ATTRIBUTE, name)


# ---------------------------------------------------------------------------------------------------- quality
VERDICT_COLORS = {"ok": "#2e7d32", "suspect": "#e65100", "failed": "#c62828"}
"""Background colour of the verdict label: ok green, suspect orange, failed red."""


def qualityOf(report: dict | None) -> dict | None:
    """``{"verdict": "ok" | "suspect" | "failed", "reasons": [str, ...]}`` of an engine report (its
    ``quality`` entry), or None when the report has none (an older engine)."""
    q = (report or {}).get("quality")
    if not isinstance(q, dict) or q.get("verdict") not in VERDICT_COLORS:
        return None
    return {"verdict": str(q["verdict"]), "reasons": [str(r) for r in q.get("reasons") or []]}


def verdictStyleSheet(verdict: str | None) -> str:
    """Qt style sheet of the verdict label: white bold text on the verdict's colour ("" for none)."""
    if verdict not in VERDICT_COLORS:
        return ""
    return (f"QLabel {{ color: white; background-color: {VERDICT_COLORS[verdict]}; font-weight: bold; "
            "border-radius: 3px; padding: 2px 8px; }")


# ---------------------------------------------------------------------------------------------------- metrics
METRIC_ROWS = (
    # (label, key in the flat metrics dict without _before/_after, unit)
    ("Similarity loss", "similarity", ""),
    ("NCC", "ncc", ""),
    ("Folding (det J <= 0)", "folding_percent", "%"),
    ("SDlogJ", "sdlogj", ""),
    ("Dice (mean)", "dice", ""),
    ("HD95 (mean)", "hd95", "mm"),
    ("TRE (mean)", "tre", "mm"),
)


def flatMetrics(report: dict) -> dict:
    """Summary numbers of an engine report: ``{name_before, name_after, ...}`` (absent metrics left out)."""
    s, d, ev = report.get("similarity", {}), report.get("deformation", {}), report.get("metrics", {})
    out = {"similarity_before": s.get("loss_before"), "similarity_after": s.get("loss_after"),
           "ncc_before": s.get("ncc_before"), "ncc_after": s.get("ncc_after"),
           "folding_percent_after": d.get("folding_percent")}
    sdlogj = next((d[k] for k in ("sdlogj", "sdlogj_l2r", "sdlogj_positive") if k in d), None)
    if sdlogj is not None:
        out["sdlogj_after"] = sdlogj
    if "labels" in ev:
        for tag in ("before", "after"):
            out[f"dice_{tag}"] = ev["labels"][tag]["dice_mean"]
            out[f"hd95_{tag}"] = ev["labels"][tag]["hd95_mean_mm"]
    if "landmarks" in ev:
        for tag in ("before", "after"):
            out[f"tre_{tag}"] = ev["landmarks"][tag]["mean"]
    return {k: (None if v is None else float(v)) for k, v in out.items() if v is not None}


def updateMetricsTable(tableNode, metrics: dict, quality: dict | None = None) -> None:
    """Fills a table node with columns Metric, Before, After, Unit, Note (NaN where not applicable).

    With ``quality`` (:func:`qualityOf`) the first row is ``Quality verdict`` (Note: ok, suspect or failed)
    followed by one ``Quality reason`` row per reason (Note: the reason)."""
    table = vtk.vtkTable()
    names, before, after, units, notes = (vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(),
                                          vtk.vtkStringArray(), vtk.vtkStringArray())
    for array, title in ((names, "Metric"), (before, "Before"), (after, "After"), (units, "Unit"), (notes, "Note")):
        array.SetName(title)

    def row(label, b, a, unit, note=""):
        names.InsertNextValue(label)
        before.InsertNextValue(np.nan if b is None else b)
        after.InsertNextValue(np.nan if a is None else a)
        units.InsertNextValue(unit)
        notes.InsertNextValue(note)

    if quality is not None:
        row("Quality verdict", None, None, "", quality["verdict"])
        for reason in quality["reasons"]:
            row("Quality reason", None, None, "", reason)
    for label, key, unit in METRIC_ROWS:
        b, a = metrics.get(f"{key}_before"), metrics.get(f"{key}_after")
        if a is None and b is None:
            continue
        row(label, b, a, unit)
    for array in (names, before, after, units, notes):
        table.AddColumn(array)
    tableNode.SetAndObserveTable(table)
    tableNode.Modified()


def fileUri(path: str) -> str:
    """``file://`` URI of a local path (for SampleData sources)."""
    from pathlib import Path

    return Path(os.path.abspath(path)).as_uri()


def makeScene():
    """An empty MRML scene with the module logics the glue and the DatasetBuilder need (docs/CONVENTIONS.md §3:
    Colors, Markups, Segmentations, Transforms, Volumes, SubjectHierarchy); also sets ``slicer.mrmlScene``.
    Inside Slicer use the application's scene instead; this is for PyPI slicer-core (tests, command line)."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    app.SetModuleLogic("Colors", colors)
    logics = [colors]
    for name, cls in (("Markups", slicer.vtkSlicerMarkupsLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Transforms", slicer.vtkSlicerTransformLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics.append(logic)
    slicer.mrmlScene = scene
    scene._keep = (app, logics)  # keep the logics alive as long as the scene
    return scene
