"""Applying a registration result to other data: images, label maps and points (``deepregistration apply``).

``apply_transform(INPUT, RESULT, OUTPUT)`` resamples an image or a label map onto a reference grid through a
result's transform, or maps a points file, and writes OUTPUT atomically: what ``antsApplyTransforms`` and
``antsApplyTransformsToPoints`` do with ANTs' outputs.

Directions (LPS mm everywhere; ``T`` is ``transform.h5``, fixed → moving points, the resampling direction):

- **images and label maps** are resampled: ``output(x) = input(T(x))`` at every voxel centre ``x`` of the
  reference grid. Forward (the default) brings moving-space data onto the fixed grid (the reference defaults to
  ``report.json``'s ``inputs.fixed``); ``inverse=True`` uses ``T⁻¹`` (``inverse.h5``, moving → fixed) and brings
  fixed-space data (a segmentation of the fixed image) onto the moving grid (default reference
  ``inputs.moving``).
- **points** are mapped the *other* way, as ``antsApplyTransformsToPoints``: forward maps fixed-space points to
  moving space (``T(p)``), ``inverse=True`` maps moving-space points to fixed space (``T⁻¹(p)``). No reference.

The forward resampling of an intensity image is ``register``'s own ``warped.nii.gz``
(:func:`~DeepRegistrationLib.registration.run.warped_image`'s call of
:func:`~DeepRegistrationLib.spatial.resampling.warp_image`: linear interpolation; a stored integer type of 16 bits
or more, a CT's int16, is kept, rounded; anything else becomes float32) written by the same writer
(:func:`~DeepRegistrationLib.io.images.write_image`): the same bits for the same pair. Label maps (an integer
image that looks like one, see :func:`looks_like_labels`, or ``interpolation="nearest"``) are resampled by nearest
neighbour and keep their stored type. Outside the input's field of view the value is 0 (ITK's rule: border values
up to half a voxel beyond the outer voxel centres).

``T⁻¹`` of a deformable result is ``z + w(z)``, ``z = A⁻¹ y`` (:class:`~DeepRegistrationLib.spatial.inverse.InverseTransform`,
ITK composite ``[displacement, affine]``); its images are resampled here, slab by slab, through the same sampler
(:mod:`~DeepRegistrationLib.spatial.warp`, ITK's border rules). A linear result is inverted exactly (its matrix).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from ..core.progress import Progress, ProgressCallback
from ..io.images import (WRITABLE_SUFFIXES, read_image, read_label_image, stored_type, write_image,
                         written_integer_type)
from ..io.itk_transform import from_itk_inverse, from_itk_parts, itk_parts
from ..io.landmarks import Landmarks, read_landmarks, write_landmarks_csv, write_markups_json

logger = logging.getLogger(__name__)

#: Input files read as points (:func:`~DeepRegistrationLib.io.landmarks.read_landmarks`); anything else is an image.
POINT_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".fcsv")
#: Point outputs that can be written: ``label,x,y,z`` CSV (LPS) or Slicer markups JSON (LPS).
POINT_OUTPUT_SUFFIXES = (".csv", ".json")
#: :func:`looks_like_labels`: a label map has at least this fraction of its foreground neighbour pairs (along x)
#: equal, and fewer than :data:`LABEL_SMALL_STEP_FRACTION` of its unequal ones differ by 1 or 2. Measured (64
#: slices): 13 label maps and a mask (the bundled AAL pair at 3 mm, the trunk CT's TotalSegmentator labels and
#: overlap mask at 2 mm, the atlases of Debian's mricron-data: AAL, Brodmann, JHU at 1 and 2 mm, JHU189,
#: NatBrainLab, AICHA, Harvard-Oxford, INIA19 int16) equal 0.82-0.999, small steps 0.09-0.42; uint8 T1 MR (ch2, ch2bet, ch2better) equal 0.09-0.24; the 2 mm CT quantized
#: to 255 / 63 / 15 levels equal 0.45 / 0.77 / 0.88 with small steps 0.75 / 0.88 / 0.996.
LABEL_EQUAL_FRACTION = 0.6
LABEL_SMALL_STEP_FRACTION = 0.5


# ---------------------------------------------------------------------------------------------- transforms
@dataclass
class LoadedTransform:
    """The map an application resamples through: ``transform`` (a
    :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform`, ``A (x + u(x))``, or an
    :class:`~DeepRegistrationLib.spatial.inverse.InverseTransform`, ``z + w(z)`` with ``z = A⁻¹ y``), with where it
    came from (``source``: the file, or ``"<file> (matrix inverted)"``) and which way it maps (``direction``:
    ``"fixed -> moving"`` or ``"moving -> fixed"``)."""

    transform: object
    source: str
    direction: str

    @property
    def is_inverse_form(self) -> bool:
        """True for ``z + w(z)``, ``z = A⁻¹ y`` (resampled by :func:`_warp_inverse_form`)."""
        return hasattr(self.transform, "affine_inverse")


def read_transform_file(path: str | os.PathLike):
    """Reads an ITK transform file (``.h5``, ``.tfm``, ``.txt``, ``.mat``) as the engine's transform.

    Accepted: linear transforms followed by at most one displacement field (``transform.h5``'s ``[affine,
    displacement]``: a :class:`~DeepRegistrationLib.spatial.transforms.SpatialTransform`), or a displacement field
    followed by linear transforms (``inverse.h5``'s ``[displacement, affine]``: an
    :class:`~DeepRegistrationLib.spatial.inverse.InverseTransform`). Split by
    :func:`~DeepRegistrationLib.io.itk_transform.from_itk_parts` and
    :func:`~DeepRegistrationLib.io.itk_transform.from_itk_inverse`.

    Raises:
        InputError: a missing, unreadable or unsupported transform (B-spline, several fields, ...).
    """
    from ..spatial.inverse import InverseTransform
    from ..spatial.transforms import SpatialTransform

    p = Path(path)
    if not p.is_file():
        raise InputError(f"transform: '{p}' does not exist. Give a 'register' output folder or its transform.h5.")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "sitk::ERROR" not in ln), "")
        raise InputError(f"transform: '{p}' is not a readable ITK transform file ({line[:160]}). Give a "
                         "'register' output folder, its transform.h5 or inverse.h5, or an ITK .h5/.tfm/.txt/.mat "
                         "transform.") from None
    parts = itk_parts(tx)
    names = [part.GetName() for part in parts]
    if len(parts) >= 2 and names[0] == "DisplacementFieldTransform" and "DisplacementFieldTransform" not in names[1:]:
        # inverse.h5's [displacement, affine]
        try:
            linear, field, grid = from_itk_inverse(tx)  # ValueError for a non-linear part
        except ValueError as exc:
            raise InputError(f"transform: '{p}' holds {names}, which cannot be applied ({exc}).") from None
        return InverseTransform(linear, field, grid, "file")
    try:
        return SpatialTransform(*from_itk_parts(parts))
    except ValueError as exc:
        raise InputError(f"transform: '{p}' holds {names}, which cannot be applied ({exc}). Supported: linear "
                         "transforms and one displacement field, as 'register' writes them.") from None


def load_transform(result: str | os.PathLike, inverse: bool = False) -> tuple[LoadedTransform, Path | None]:
    """The transform of ``result`` (a ``register`` output folder or a transform file), inverted with ``inverse``,
    and where the result's ``report.json`` would be (the folder's, or that of the folder holding a
    ``transform.h5`` / ``inverse.h5`` given as a file; not read here), else None.

    A folder gives ``transform.h5``, or ``inverse.h5`` with ``inverse``; a linear result without ``inverse.h5`` is
    inverted exactly (its 4×4 matrix). Raises :class:`InputError` for a deformable transform asked to invert
    without its inverse file, and for a missing or unusable transform.
    """
    from ..spatial.inverse import InverseTransform
    from ..spatial.transforms import SpatialTransform

    p = Path(result)
    if not p.exists():
        raise InputError(f"transform: '{p}' does not exist. Give a 'register' output folder (holding "
                         "transform.h5) or a transform file.")
    if inverse and p.is_file() and p.name == "transform.h5" and (p.parent / "report.json").is_file():
        p = p.parent  # a result folder's transform.h5: its inverse is the folder's inverse.h5
    folder = p if p.is_dir() else p.parent
    report_file = folder / "report.json" if p.is_dir() or p.name in ("transform.h5", "inverse.h5") else None
    if p.is_dir():
        forward_file = p / "transform.h5"
        if not forward_file.is_file():
            raise InputError(f"transform: folder '{p}' holds no transform.h5; give a 'register' output folder "
                             "or a transform file.")
        if inverse and (p / "inverse.h5").is_file():
            tx = read_transform_file(p / "inverse.h5")
            if not isinstance(tx, InverseTransform) and tx.field is not None:
                raise InputError(f"transform: '{p / 'inverse.h5'}' is not an inverse as 'register' writes it "
                                 "([displacement, affine]).")
            return LoadedTransform(tx, str(p / "inverse.h5"), "moving -> fixed"), report_file
        tx, source = read_transform_file(forward_file), str(forward_file)
    else:
        tx, source = read_transform_file(p), str(p)
    direction = "moving -> fixed" if isinstance(tx, InverseTransform) else "fixed -> moving"
    if p.is_file() and p.name == "inverse.h5" and not isinstance(tx, InverseTransform):
        direction = "moving -> fixed"  # a linear inverse.h5 reads as a plain matrix
    if not inverse:
        return LoadedTransform(tx, source, direction), report_file
    other = "fixed -> moving" if direction == "moving -> fixed" else "moving -> fixed"
    if tx.field is None:  # linear: the exact inverse of its matrix
        matrix = tx.affine_inverse if isinstance(tx, InverseTransform) else tx.affine
        try:
            inv = np.linalg.inv(matrix)
        except np.linalg.LinAlgError:
            raise InputError(f"transform: the matrix of '{source}' is singular and cannot be inverted.") from None
        return LoadedTransform(SpatialTransform(inv), f"{source} (matrix inverted)", other), report_file
    if p.is_dir():
        raise InputError(f"--inverse: the result folder '{p}' holds a deformable transform but no inverse.h5. "
                         "Run 'deepregistration register' again (it writes inverse.h5 in deformable mode), or "
                         "give an inverse transform file with -t and no --inverse.")
    raise InputError(f"--inverse: '{source}' is a deformable transform, which is not inverted here. Give its "
                     "inverse file instead (a 'register' output folder's inverse.h5) with -t and no --inverse.")


def _read_report(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # needed only for the default reference, which then says so
        logger.warning("%s cannot be read as JSON (%s); it is not used", path, exc)
        return None
    return report if isinstance(report, dict) else None


# ---------------------------------------------------------------------------------------------- grids and inputs
def read_reference_grid(path: str | os.PathLike) -> Grid:
    """The grid of the image file or DICOM folder ``path`` (a file's header only, when SimpleITK can read it alone).

    Raises:
        InputError: missing or unreadable, or not a 3D image.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"reference: '{p}' does not exist. Give the image whose grid the output should have "
                         "(-r REFERENCE).")
    if p.is_dir():
        return read_image(p, "reference image").grid
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"reference: '{p}' is not a readable image. Use NIfTI, NRRD, MetaImage or a DICOM "
                         "series folder.") from None
    if reader.GetDimension() != 3:
        raise InputError(f"reference: '{p}' is a {reader.GetDimension()}D image of size {reader.GetSize()}; the "
                         "reference must be a 3D image.")
    return Grid.from_sitk(reader)


def looks_like_labels(array: np.ndarray) -> bool:
    """Whether integer-valued voxels ``(Z, Y, X)`` look like a label map (piecewise constant, arbitrary steps) rather
    than a quantized intensity image; judged on about 64 slices.

    Among neighbour pairs along x whose two voxels are both > 0: at least :data:`LABEL_EQUAL_FRACTION` equal, and of
    the unequal ones fewer than :data:`LABEL_SMALL_STEP_FRACTION` differ by 1 or 2. Negative values: not labels."""
    a = array[::max(1, array.shape[0] // 64)]
    if a.size == 0 or a.min() < 0:
        return False
    left, right = a[:, :, 1:], a[:, :, :-1]
    both = (left > 0) & (right > 0)
    n = int(np.count_nonzero(both))
    if n == 0:
        return bool((a > 0).any())  # isolated voxels only: points or thin structures
    diff = np.abs(np.subtract(left[both], right[both], dtype=np.float32))  # exact below 2^24
    equal = int(np.count_nonzero(diff == 0))
    differ = n - equal
    small = int(np.count_nonzero((diff <= 2) & (diff > 0)))
    return equal / n >= LABEL_EQUAL_FRACTION and (differ == 0 or small / differ < LABEL_SMALL_STEP_FRACTION)


def _is_points(path: Path) -> bool:
    return path.suffix.lower() in POINT_SUFFIXES and not path.is_dir()


# ---------------------------------------------------------------------------------------------- resampling
def _warp_inverse_form(image: Image, target: Grid, inverse, interpolation: str, dtype, prog: Progress) -> Image:
    """``image`` on ``target`` through ``z + w(z)``, ``z = A⁻¹ y`` (an :class:`InverseTransform`), slab by slab, with
    ITK's border rules (the field: border values up to half a voxel beyond its grid, 0 further, as
    :func:`~DeepRegistrationLib.spatial.warp.sample_field`; the image: ``padding_mode="itk"``); an integer ``dtype``
    rounded half to even and clipped into its range.

    ``z`` is an affine map of the target's voxel index, and so are its ``grid_sample`` coordinates in the field's
    grid and in the image's (:func:`~DeepRegistrationLib.spatial.warp.normalized_affine`): they are computed as sums
    of per-axis terms (:func:`_index_affine_points`), and ``w`` enters the image's coordinates through the linear part of
    its normalization; no world points are formed. Measured on the 0.75 mm trunk CT (its fixed labels onto the
    moving grid, 67.5 M voxels, nearest; 1 thread, CPU s, loaded machine, ABAB) against world points mapped by
    ``apply_affine`` + ``map_points`` and sampled by ``sample``: 14.8 / 14.9 vs 19.3 / 19.7 CPU s (the whole
    ``apply``); 5 voxels of 67.5 M differ (a tie at float32 rounding); the fixed CT itself (linear, int16):
    20.1 vs 24.4 CPU s, 0.04 % of the voxels 1 HU apart (rounding), one more at the field of view's edge. With the
    fast axis added in float32 (:func:`_index_affine_points`): 11.6 / 14.5 / 14.0 CPU s (against 17.3 / 14.9 / 17.3,
    alternating), 1 voxel of 67.5 M differs."""
    import torch

    from ..spatial import warp as W
    from ..spatial.resampling import SLAB_VOXELS, slab_writer

    mode = {"linear": "bilinear", "nearest": "nearest"}[interpolation]
    vol = torch.as_tensor(np.ascontiguousarray(image.array))
    # float32 values (read_image's) are picked as they are by nearest; only int32 labels beyond 2^24 need float64
    vol = vol.to(torch.float64 if interpolation == "nearest" and vol.dtype != torch.float32 else torch.float32)
    vol = vol[None, None]
    index_to_z = torch.as_tensor(np.asarray(inverse.affine_inverse, dtype=np.float64) @ target.index_to_world)
    to_image = W.normalized_affine(index_to_z, image.grid)  # target index -> the image's grid_sample coordinates
    field = to_field = w_to_image = None
    if inverse.field is not None:
        field = torch.as_tensor(inverse.field, dtype=torch.float32)[None]
        to_field = W.normalized_affine(index_to_z, inverse.field_grid)
        w_to_image = W.normalized_affine(torch.eye(4, dtype=torch.float64), image.grid)[:3, :3].to(torch.float32)
    out = np.empty(target.shape, dtype=dtype)
    write = slab_writer(out, np.iinfo(out.dtype) if np.issubdtype(out.dtype, np.integer) else None)
    step = max(1, SLAB_VOXELS // max(1, target.shape[1] * target.shape[2]))  # slabs as warp_image's
    with torch.no_grad():
        for k0 in range(0, target.shape[0], step):
            k1 = min(target.shape[0], k0 + step)
            prog(k0 / target.shape[0], "resampling")
            norm = _index_affine_points(to_image, target.shape, k0, k1)
            if field is not None:
                w = W.sample_normalized(field, inverse.field_grid, _index_affine_points(to_field, target.shape, k0, k1),
                                        "bilinear", "itk")  # (1, 3, k, Y, X) mm
                norm += torch.movedim(w, 1, -1) @ w_to_image.T
            write(k0, k1, W.sample_normalized(vol, image.grid, norm, mode=mode, padding_mode="itk")[0, 0])
    return Image(out, target, image.name)


def _index_affine_points(matrix, shape, k0: int, k1: int):
    """``matrix`` (4×4, float64) applied to the voxel indices ``(i, j, k, 1)`` of slices ``k0 <= k < k1`` of a grid of
    ``shape`` ``(Z, Y, X)``: ``(1, k1 - k0, Y, X, 3)`` float32, the sum of three per-axis terms."""
    import torch

    ar = lambda a, b: torch.arange(a, b, dtype=torch.float64)
    _, ny, nx = shape
    m = matrix.to(torch.float64)
    kz = (ar(k0, k1)[:, None] * m[:3, 2] + m[:3, 3])[:, None, None, :]
    jy = (ar(0, ny)[:, None] * m[:3, 1])[None, :, None, :]
    ix = (ar(0, nx)[:, None] * m[:3, 0]).to(torch.float32)[None, None, :, :]
    # the two slow axes summed in float64 (a small (k, Y, 1, 3) array), the fast one added in float32: one full-size
    # float32 array, no full-size float64 one
    return ((kz + jy).to(torch.float32) + ix)[None]


# ---------------------------------------------------------------------------------------------- output
def _check_output(output: str | os.PathLike, overwrite: bool, points: bool) -> Path:
    out = Path(output).absolute()
    name = out.name.lower()
    if points and not name.endswith(POINT_OUTPUT_SUFFIXES):
        raise InputError(f"output '{out}': points are written as .csv (label,x,y,z in LPS mm) or Slicer "
                         ".mrk.json; choose one of those suffixes.")
    if not points and not name.endswith(WRITABLE_SUFFIXES):
        raise InputError(f"output '{out}': an image is written as {', '.join(WRITABLE_SUFFIXES)}; choose one of "
                         "those suffixes.")
    if out.is_dir():
        raise InputError(f"output '{out}' is a folder; give a file name.")
    if out.exists() and not overwrite:
        raise InputError(f"output '{out}' already exists. Choose another name, or pass --overwrite to replace it "
                         "(it is replaced only once the new file is complete).")
    if not out.parent.is_dir():
        raise InputError(f"the folder of the output, '{out.parent}', does not exist. Create it first.")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"cannot write in '{out.parent}' (permission denied). Choose a writable folder.")
    return out


def _write_atomically(out: Path, write) -> None:
    """``write(path)`` into a temporary folder next to ``out``, then every file it made renamed into place (a
    header/data pair such as ``.nhdr`` + ``.raw`` too); nothing is left under ``out`` on error."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp / out.name)
        made = sorted(tmp.iterdir(), key=lambda f: f.name == out.name)  # the named file last
        for f in made:
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the workflow
def apply_transform(input_path: str | os.PathLike, result: str | os.PathLike, output: str | os.PathLike,
                    reference: str | os.PathLike | None = None, interpolation: str = "auto", inverse: bool = False,
                    overwrite: bool = False, progress: ProgressCallback | None = None) -> dict:
    """Resamples an image or label map through a registration result (or maps a points file) into ``output``.

    Args:
        input_path: Image file or DICOM folder (NIfTI, NRRD, MetaImage, ...), or a points file (``.csv``,
            ``.mrk.json``, ``.fcsv``; see :func:`~DeepRegistrationLib.io.landmarks.read_landmarks`).
        result: A ``register`` output folder, or a transform file (``.h5``/``.tfm``/``.txt``/``.mat``: ITK
            ``[affine, displacement]`` as ``transform.h5``, or ``[displacement, affine]`` as ``inverse.h5``).
        output: Output file: an image suffix for images (:data:`~DeepRegistrationLib.io.images.WRITABLE_SUFFIXES`),
            ``.csv`` or ``.mrk.json`` for points. Refused when it exists, unless ``overwrite``.
        reference: Image file or DICOM folder whose grid (shape, spacing, origin, direction) the output gets; only
            its header is read where SimpleITK can. Default: ``report.json``'s ``inputs.fixed`` (forward) or
            ``inputs.moving`` (``inverse``). Not used for points.
        interpolation: ``"linear"``, ``"nearest"`` or ``"auto"`` (nearest for an integer image that
            :func:`looks_like_labels`, else linear).
        inverse: Apply the inverse (``inverse.h5``; a linear result's matrix inverted).
        overwrite: Replace an existing ``output`` (once the new file is complete).
        progress: ``callback(fraction, message)``; returning False cancels (``Cancelled``), nothing written.

    Returns:
        What was done: ``{"output", "kind" ("image" | "labels" | "points"), "interpolation", "dtype",
        "transform", "direction", "reference", "grid", "seconds"}`` (``points`` for points instead of the grid).

    Raises:
        InputError: a missing or bad input, transform or reference, an existing ``output``, a deformable result to
            invert without its ``inverse.h5``; nothing is written.
    """
    t0 = time.perf_counter()
    if interpolation not in ("linear", "nearest", "auto"):
        raise InputError(f"interpolation must be linear, nearest or auto, not {interpolation!r}.")
    prog = Progress(progress)
    src = Path(input_path)
    if not src.exists():
        raise InputError(f"input: '{src}' does not exist. Check the path (relative paths start from "
                         f"'{Path.cwd()}').")
    points = _is_points(src)
    out = _check_output(output, overwrite, points)
    loaded, report_file = load_transform(result, inverse)
    prog(0.02, "reading")
    if points:
        return _apply_points(src, loaded, out, prog, t0)
    ref = _reference_path(reference, loaded, report_file, result)
    target = read_reference_grid(ref)
    stored = stored_type(src)  # the header's voxel type (None for a DICOM folder)
    # float32 (not read_image's keep_integer): warp_image samples a float32 volume, so a kept int16 array would be
    # converted there, a float32 copy on top of the int16 one (measured at 0.75 mm, 1 thread: 12.1-13.0 vs 11.3-12.1
    # CPU s, peak 1080 vs 954 MB)
    image = read_image(src, "input image")
    integer_stored = stored is not None and np.issubdtype(stored, np.integer)
    if interpolation == "auto":
        labels = integer_stored and looks_like_labels(image.array)
        interpolation = "nearest" if labels else "linear"
    kind = "labels" if interpolation == "nearest" else "image"
    if interpolation == "nearest":
        dtype = stored if integer_stored else np.dtype(np.float32)  # a label map keeps its type
        if integer_stored and stored.itemsize >= 4 and float(np.abs(image.array).max()) >= 2 ** 24:
            # labels beyond float32's exact integers: read again as int32 (nearest samples in float64)
            image = read_label_image(src, "input labels")
    else:  # register's rule: 16-bit and wider integers kept (rounded), anything else float32
        dtype = np.dtype(written_integer_type(stored) or np.float32)
    prog(0.3, "resampling")
    if loaded.is_inverse_form:
        warped = _warp_inverse_form(image, target, loaded.transform, interpolation, dtype, prog.sub(0.3, 0.8))
    elif interpolation == "linear":  # register's own warped.nii.gz call
        from ..registration.run import warped_image

        warped = warped_image(image, target, loaded.transform, written_integer_type(stored))
    else:
        from ..spatial.resampling import warp_image

        warped = warp_image(image, target, loaded.transform, interpolation, dtype=dtype)
    del image
    prog(0.8, "writing")
    _write_atomically(out, lambda path: write_image(warped, path))
    prog(1.0, "done")
    logger.info("wrote %s (%s, %s interpolation) on the grid of %s", out, kind, interpolation, ref)
    return {"output": str(out), "kind": kind, "interpolation": interpolation, "dtype": str(warped.array.dtype),
            "transform": loaded.source, "direction": loaded.direction, "reference": str(ref),
            "grid": target.to_dict(), "seconds": round(time.perf_counter() - t0, 3)}


def _reference_path(reference, loaded: LoadedTransform, report_file: Path | None, result) -> Path:
    """``reference``, or the result's input on the side the output lies on (the fixed image for a fixed → moving
    transform, the moving image for moving → fixed), as the result's ``report.json`` (read only then) records it."""
    if reference is not None:
        return Path(reference)
    key = "fixed" if loaded.direction == "fixed -> moving" else "moving"
    path = ((_read_report(report_file) or {}).get("inputs") or {}).get(key)
    if not path:
        raise InputError(f"no reference grid: '{result}' has no (readable) report.json naming the {key} image. Give "
                         "the image whose grid the output should have with -r REFERENCE.")
    if not Path(path).exists():
        raise InputError(f"reference: the {key} image recorded in the result's report.json, '{path}', no longer "
                         "exists. Give the image whose grid the output should have with -r REFERENCE.")
    return Path(path)


def _apply_points(src: Path, loaded: LoadedTransform, out: Path, prog: Progress, t0: float) -> dict:
    """Maps the points of ``src`` through ``loaded`` (the transform's own direction) into ``out``."""
    lms = read_landmarks(src)
    mapped = Landmarks(lms.labels, loaded.transform.map_points(lms.points))
    if not np.all(np.isfinite(mapped.points)):
        raise InputError(f"input: mapping the points of '{src}' gave non-finite positions; check the transform.")
    writer = write_markups_json if out.name.lower().endswith(".json") else write_landmarks_csv
    prog(0.8, "writing")
    _write_atomically(out, lambda path: writer(mapped, path))
    prog(1.0, "done")
    frm, to = loaded.direction.split(" -> ")
    return {"output": str(out), "kind": "points", "interpolation": None, "dtype": None,
            "transform": loaded.source, "direction": loaded.direction, "reference": None,
            "points": len(mapped), "meaning": f"{frm}-space points mapped to {to} space",
            "seconds": round(time.perf_counter() - t0, 3)}
