"""DICOM Spatial Registration (REG) and Deformable Spatial Registration objects ↔ the engine's transform.

The engine's transform maps **fixed** LPS points to **moving** LPS points, ``T(x) = A (x + u(x))``
(see :mod:`DeepRegistrationLib.spatial.transforms`; ``transform.h5``). DICOM's two registration objects point in
*opposite* directions (PS3.3 C.20.2.1.1 and C.20.3.1.1), and this module is the one place that knows it:

- **Spatial Registration** (SOP class 1.2.840.10008.5.1.4.1.1.66.1, rigid/affine): each item of the
  Registration Sequence holds a Frame of Reference and a matrix that maps points *of that frame* into the
  object's own Frame of Reference, the *Registered RCS*. We write the object in the fixed frame, with an
  identity item for the fixed series and one item for the moving series holding ``M = A⁻¹`` (moving →
  fixed points).
- **Deformable Spatial Registration** (1.2.840.10008.5.1.4.1.1.66.3): applied to a point *of the Registered
  RCS*: Pre Deformation Matrix, then the grid's vector at that point, then the Post Deformation Matrix; the
  result is the point in the *Source* Frame of Reference. With the registered RCS = fixed and the source =
  moving this is the engine's direction: we write ``Pre = I``, the grid = ``u`` (its geometry in the fixed
  frame, vectors in mm, LPS), ``Post = A``, so ``source = A (x + u(x))`` exactly.

Reading accepts what other software writes as long as it can be expressed exactly: any set of REG items
(fixed → moving = ``M_moving⁻¹ · M_fixed``, a frame without an item being the Registered RCS itself, with
identity), and deformable items whose registered RCS is the fixed frame (``A = Post · Pre``,
``u = Pre₃⁻¹ δ``). Torch-free (pydicom + numpy).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.grid import Grid
from .series import MANUFACTURER, Series, base_dataset, new_uid, pydicom

logger = logging.getLogger(__name__)

SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.1"
DEFORMABLE_SPATIAL_REGISTRATION = "1.2.840.10008.5.1.4.1.1.66.3"
#: CID 7100 "RCS Registration Method Type": registration driven by the image content.
METHOD_CODE = ("125024", "DCM", "Image Content-based Registration")


# ------------------------------------------------------------------------------------------- writing
def registration_dataset(affine: np.ndarray, fixed: Series, moving: Series, *, field: np.ndarray | None = None,
                         field_grid: Grid | None = None, description: str = "DeepRegistration",
                         series_uid: str | None = None, series_number: int = 900, software_version: str = ""):
    """The DICOM object of a registration of ``moving`` onto ``fixed``, stored in the fixed study and frame.

    Args:
        affine: 4×4 LPS matrix ``A`` of the engine's transform (fixed → moving points).
        fixed / moving: The two series (headers are enough); their Frame of Reference, study, series and
            instance UIDs are referenced, patient/study attributes copied from ``fixed``.
        field: Displacement ``u`` ``(3, Z, Y, X)`` in LPS mm on ``field_grid`` (fixed space), or None.
            With a field the object is a Deformable Spatial Registration, otherwise a Spatial Registration.
        field_grid: Grid of ``field``.
        description: Content Description and Series Description (names the method).
        series_uid / series_number: Of the new REG series (a new UID by default).
        software_version: Software Versions (0018,1020).

    Returns:
        A pydicom Dataset ready for ``save_as`` or STOW-RS.
    """
    dcm = pydicom()
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.allclose(a[3], [0, 0, 0, 1]) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValueError("affine must be an invertible 4x4 matrix with last row (0, 0, 0, 1)")
    deformable = field is not None
    sop_class = DEFORMABLE_SPATIAL_REGISTRATION if deformable else SPATIAL_REGISTRATION
    ds = base_dataset(sop_class, fixed.first, fixed.first, series_uid or new_uid(), "REG", series_number,
                      description, fixed.frame_of_reference_uid)
    ds.InstanceNumber = 1
    ds.ContentLabel = "DEEPREG"
    ds.ContentDescription = description[:64]
    ds.ContentCreatorName = ""
    ds.ManufacturerModelName = "deepregistration"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = software_version or "unknown"
    if deformable:
        ds.DeformableRegistrationSequence = [_deformable_item(a, field, field_grid, moving)]
    else:
        ds.RegistrationSequence = [_matrix_item(np.eye(4), fixed), _matrix_item(np.linalg.inv(a), moving)]
    _common_instance_reference(ds, fixed, moving)
    return ds


def _code_item():
    dcm = pydicom()
    code = dcm.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = METHOD_CODE
    return code


def _matrix_type(m: np.ndarray) -> str:
    """RIGID (orthonormal, det +1), RIGID_SCALE (orthogonal) or AFFINE (PS3.3 C.20.2.1.2)."""
    r = m[:3, :3]
    gram = r.T @ r
    if np.abs(gram - np.eye(3)).max() < 1e-6 and np.linalg.det(r) > 0:
        return "RIGID"
    if np.abs(gram - np.diag(np.diag(gram))).max() < 1e-6 * max(1.0, np.abs(gram).max()) and np.linalg.det(r) > 0:
        return "RIGID_SCALE"
    return "AFFINE"


def _matrix_dataset(m: np.ndarray):
    dcm = pydicom()
    from pydicom.valuerep import format_number_as_ds

    item = dcm.Dataset()
    item.FrameOfReferenceTransformationMatrixType = _matrix_type(m)
    item.FrameOfReferenceTransformationMatrix = [format_number_as_ds(float(v)) for v in np.asarray(m).ravel()]
    return item


def _image_refs(series: Series) -> list:
    dcm = pydicom()
    out = []
    for cls, uid in series.instances():
        ref = dcm.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = cls, uid
        out.append(ref)
    return out


def _matrix_item(m: np.ndarray, series: Series):
    """Registration Sequence item: ``series``' frame, its images, and ``m`` (its frame → Registered RCS)."""
    dcm = pydicom()
    item = dcm.Dataset()
    item.FrameOfReferenceUID = series.frame_of_reference_uid
    item.ReferencedImageSequence = _image_refs(series)
    reg = dcm.Dataset()
    reg.RegistrationTypeCodeSequence = [_code_item()]
    reg.MatrixSequence = [_matrix_dataset(m)]
    item.MatrixRegistrationSequence = [reg]
    return item


def _right_handed(field: np.ndarray, grid: Grid) -> tuple[np.ndarray, Grid]:
    """The same field on a grid whose k axis is row × column (k reversed when the grid is left-handed)."""
    d = grid.direction_matrix
    if np.linalg.det(d) > 0:
        return field, grid
    origin = grid.index_to_world @ np.array([0, 0, grid.shape[0] - 1, 1.0])
    d = d.copy()
    d[:, 2] *= -1
    return field[:, ::-1], Grid(grid.shape, grid.spacing, tuple(origin[:3]), tuple(d.ravel()))


def _deformable_item(a: np.ndarray, field: np.ndarray, grid: Grid, moving: Series):
    dcm = pydicom()
    from pydicom.valuerep import format_number_as_ds

    if grid is None:
        raise ValueError("a displacement field needs its grid")
    u = np.asarray(field, dtype=np.float64)
    if u.shape != (3,) + tuple(grid.shape):
        raise ValueError(f"field shape {u.shape} does not match its grid {(3,) + tuple(grid.shape)}")
    if not np.all(np.isfinite(u)):
        raise ValueError("the displacement field holds NaN or infinite vectors")
    u, grid = _right_handed(u, grid)
    item = dcm.Dataset()
    item.SourceFrameOfReferenceUID = moving.frame_of_reference_uid
    item.ReferencedImageSequence = _image_refs(moving)
    item.RegistrationTypeCodeSequence = [_code_item()]
    item.PreDeformationMatrixRegistrationSequence = [_matrix_dataset(np.eye(4))]
    item.PostDeformationMatrixRegistrationSequence = [_matrix_dataset(a)]
    g = dcm.Dataset()
    d = grid.direction_matrix
    g.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in np.concatenate([d[:, 0], d[:, 1]])]
    g.ImagePositionPatient = [format_number_as_ds(float(v)) for v in grid.origin]
    g.GridDimensions = [int(n) for n in grid.size]
    g.GridResolution = [float(s) for s in grid.spacing]
    # (3, Z, Y, X) -> (Z, Y, X, 3): x fastest (left to right), then rows, then planes; (dx, dy, dz) triples.
    g.VectorGridData = np.ascontiguousarray(np.moveaxis(u, 0, -1), dtype="<f4").tobytes()
    item.DeformableRegistrationGridSequence = [g]
    return item


def _series_ref(series: Series):
    dcm = pydicom()
    ref = dcm.Dataset()
    ref.SeriesInstanceUID = series.series_uid
    ref.ReferencedInstanceSequence = _image_refs(series)
    return ref


def _common_instance_reference(ds, fixed: Series, moving: Series) -> None:
    """Common Instance Reference Module: the fixed series (same study) and the moving one (its own study)."""
    dcm = pydicom()
    if moving.study_uid == fixed.study_uid:
        ds.ReferencedSeriesSequence = [_series_ref(fixed)] + (
            [_series_ref(moving)] if moving.series_uid != fixed.series_uid else [])
        return
    ds.ReferencedSeriesSequence = [_series_ref(fixed)]
    other = dcm.Dataset()
    other.StudyInstanceUID = moving.study_uid
    other.ReferencedSeriesSequence = [_series_ref(moving)]
    ds.StudiesContainingOtherReferencedInstancesSequence = [other]


def write_registration(path: str | os.PathLike, *args, **kwargs) -> Path:
    """:func:`registration_dataset` written to ``path`` (a DICOM Part 10 file); returns the path."""
    ds = registration_dataset(*args, **kwargs)
    p = Path(path)
    ds.save_as(p, enforce_file_format=True)
    return p


# ------------------------------------------------------------------------------------------- reading
@dataclass
class Registration:
    """A registration read from a DICOM object, in the engine's convention (fixed → moving points).

    Attributes:
        affine: 4×4 LPS matrix ``A``.
        field: Displacement ``u`` ``(3, Z, Y, X)`` LPS mm on ``field_grid`` (fixed space), or None.
        field_grid: Grid of ``field``.
        fixed_frame_uid / moving_frame_uid: The frames it links.
        sop_class_uid: Spatial or Deformable Spatial Registration.
        referenced: Frame of Reference UID → SOP Instance UIDs of the images referenced for that frame.
    """

    affine: np.ndarray
    field: np.ndarray | None
    field_grid: Grid | None
    fixed_frame_uid: str
    moving_frame_uid: str
    sop_class_uid: str
    referenced: dict = field(default_factory=dict)

    @property
    def deformable(self) -> bool:
        return self.field is not None

    def to_sitk(self):
        """The same mapping as an ITK composite transform (what ``transform.h5`` holds)."""
        from ..io.itk_transform import to_itk

        return to_itk(self.affine, self.field, self.field_grid)

    def check_frames(self, fixed_frame_uid: str, moving_frame_uid: str) -> None:
        """Raises InputError unless this registration links exactly these two frames of reference."""
        if (fixed_frame_uid, moving_frame_uid) == (self.fixed_frame_uid, self.moving_frame_uid):
            return
        raise InputError(
            f"the registration object links frame of reference {self.moving_frame_uid} (moving) to "
            f"{self.fixed_frame_uid} (fixed), but the series are in {moving_frame_uid} (moving) and "
            f"{fixed_frame_uid} (fixed). Use the registration object made for these series (or these series' "
            "frames of reference).")


def _matrix(seq, what: str) -> np.ndarray:
    """The one 4×4 matrix of a Matrix Sequence / Pre- or Post-Deformation Matrix Registration Sequence."""
    if len(seq) != 1:
        raise InputError(f"{what} holds {len(seq)} matrices; only single-matrix registrations can be read.")
    vals = [float(v) for v in seq[0].FrameOfReferenceTransformationMatrix]
    if len(vals) != 16:
        raise InputError(f"{what}: a Frame of Reference Transformation Matrix needs 16 values, got {len(vals)}.")
    m = np.array(vals).reshape(4, 4)
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-9) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError(f"{what}: the matrix is not an invertible homogeneous 4x4 matrix.")
    return m


def _referenced(item) -> list[str]:
    return [str(r.ReferencedSOPInstanceUID) for r in item.get("ReferencedImageSequence", [])]


def read_registration(source, fixed_frame_uid: str | None = None, moving_frame_uid: str | None = None,
                      what: str = "registration object") -> Registration:
    """Reads a Spatial Registration or Deformable Spatial Registration object.

    Args:
        source: A pydicom Dataset or a file path.
        fixed_frame_uid / moving_frame_uid: The frames to map between (fixed → moving points). By default the
            object's own Frame of Reference (the Registered RCS) is fixed and the one other frame is moving.
        what: Name used in error messages.

    Returns:
        :class:`Registration` in the engine's convention.

    Raises:
        InputError: not a registration object, frames not in it, several candidate moving frames, matrix
            sequences with several matrices, undefined (NaN) vectors, grids that do not fit their data.
    """
    dcm = pydicom()
    if isinstance(source, (str, os.PathLike)):
        try:
            ds = dcm.dcmread(source)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{what}: '{source}' is not a readable DICOM file ({exc}).") from None
    else:
        ds = source
    sop = str(ds.get("SOPClassUID", ""))
    registered = str(ds.get("FrameOfReferenceUID", ""))
    if sop == SPATIAL_REGISTRATION:
        return _read_rigid(ds, registered, fixed_frame_uid, moving_frame_uid, what)
    if sop == DEFORMABLE_SPATIAL_REGISTRATION:
        return _read_deformable(ds, registered, fixed_frame_uid, moving_frame_uid, what)
    raise InputError(f"{what}: SOP class {sop or '(none)'} is not a Spatial Registration ({SPATIAL_REGISTRATION}) "
                     f"or Deformable Spatial Registration ({DEFORMABLE_SPATIAL_REGISTRATION}).")


def _read_rigid(ds, registered, fixed_uid, moving_uid, what) -> Registration:
    to_registered = {registered: np.eye(4)}  # frame -> matrix mapping its points into the Registered RCS
    refs: dict = {}
    for i, item in enumerate(ds.get("RegistrationSequence", [])):
        uid = str(item.get("FrameOfReferenceUID", ""))
        if not uid:
            raise InputError(f"{what}: registration item {i + 1} names no Frame of Reference UID.")
        seq = item.MatrixRegistrationSequence[0].MatrixSequence if "MatrixRegistrationSequence" in item else []
        to_registered[uid] = _matrix(seq, f"{what}, registration item {i + 1}")
        refs[uid] = _referenced(item)
    fixed_uid = fixed_uid or registered
    if moving_uid is None:
        others = [u for u in to_registered if u != fixed_uid]
        if len(others) != 1:
            raise InputError(f"{what}: it links {len(to_registered)} frames of reference; say which is moving.")
        moving_uid = others[0]
    for role, uid in (("fixed", fixed_uid), ("moving", moving_uid)):
        if uid not in to_registered:
            raise InputError(f"{what}: the {role} frame of reference {uid} is not registered in this object "
                             f"(it has {', '.join(to_registered)}). Use the registration object made for "
                             "these series.")
    affine = np.linalg.inv(to_registered[moving_uid]) @ to_registered[fixed_uid]
    return Registration(affine, None, None, fixed_uid, moving_uid, SPATIAL_REGISTRATION, refs)


def _read_deformable(ds, registered, fixed_uid, moving_uid, what) -> Registration:
    fixed_uid = fixed_uid or registered
    if fixed_uid != registered:
        raise InputError(f"{what}: a deformable registration maps its registered frame ({registered}) to a source "
                         f"frame; the fixed frame {fixed_uid} is not its registered frame. Use the registration "
                         "object made for these series.")
    items = list(ds.get("DeformableRegistrationSequence", []))
    sources = [str(it.get("SourceFrameOfReferenceUID", "")) for it in items]
    if moving_uid is None:
        candidates = [i for i, s in enumerate(sources) if "DeformableRegistrationGridSequence" in items[i]]
        if len(candidates) != 1:
            raise InputError(f"{what}: {len(candidates)} items carry a deformation grid; say which frame is moving.")
        index = candidates[0]
    elif moving_uid in sources:
        index = sources.index(moving_uid)
    else:
        raise InputError(f"{what}: the moving frame of reference {moving_uid} is not a source frame of this "
                         f"object (it has {', '.join(sources) or 'none'}). Use the registration object made for "
                         "these series.")
    item = items[index]
    pre = (_matrix(item.PreDeformationMatrixRegistrationSequence, f"{what}, pre-deformation matrix")
           if "PreDeformationMatrixRegistrationSequence" in item else np.eye(4))
    post = (_matrix(item.PostDeformationMatrixRegistrationSequence, f"{what}, post-deformation matrix")
            if "PostDeformationMatrixRegistrationSequence" in item else np.eye(4))
    affine = post @ pre
    field_ = grid = None
    if "DeformableRegistrationGridSequence" in item and len(item.DeformableRegistrationGridSequence):
        g = item.DeformableRegistrationGridSequence[0]
        dims = [int(v) for v in g.GridDimensions]
        res = [float(v) for v in g.GridResolution]
        orient = np.array([float(v) for v in g.ImageOrientationPatient])
        row, col = orient[:3], orient[3:]
        direction = np.stack([row, col, np.cross(row, col)], axis=1)
        raw = g.VectorGridData
        data = np.frombuffer(raw if isinstance(raw, bytes) else bytes(raw), dtype="<f4")
        if len(dims) != 3 or data.size != 3 * int(np.prod(dims)):
            raise InputError(f"{what}: Vector Grid Data holds {data.size} values, Grid Dimensions {dims} need "
                             f"{3 * int(np.prod(dims))}.")
        if not np.all(np.isfinite(data)):
            raise InputError(f"{what}: the deformation grid has undefined (NaN) vectors; it cannot be applied "
                             "everywhere. Export it again without undefined regions.")
        delta = np.moveaxis(data.reshape(dims[2], dims[1], dims[0], 3).astype(np.float64), -1, 0)
        grid = Grid(shape=(dims[2], dims[1], dims[0]), spacing=res,
                    origin=[float(v) for v in g.ImagePositionPatient], direction=tuple(direction.ravel()))
        # source = Post (Pre x + delta(x)) = (Post Pre) (x + L^-1 delta(x)), L the linear part of Pre
        field_ = np.einsum("ij,j...->i...", np.linalg.inv(pre[:3, :3]), delta)
    refs = {sources[index]: _referenced(item)}
    return Registration(affine, field_, grid, fixed_uid, sources[index], DEFORMABLE_SPATIAL_REGISTRATION, refs)


def software_version() -> str:
    """This package's version, for Software Versions (0018,1020)."""
    from .. import __version__

    return f"{MANUFACTURER} {__version__}"


def import_registration(path: str | os.PathLike, output: str | os.PathLike, fixed: Series | None = None,
                        moving: Series | None = None, overwrite: bool = False) -> Registration:
    """Writes a DICOM registration object as ``transform.h5`` (ITK, fixed → moving, LPS), after checking that
    it links the frames of reference of the given series (when given).

    Raises:
        InputError: unreadable or mismatching object, or an existing output without ``overwrite``.
    """
    import SimpleITK as sitk

    out = Path(output)
    if out.exists() and not overwrite:
        raise InputError(f"'{out}' already exists. Choose another file, or pass --overwrite.")
    if not str(out).lower().endswith((".h5", ".hdf5", ".tfm", ".txt")):
        raise InputError(f"cannot write '{out}': use .h5 (or .tfm/.txt for a linear registration).")
    reg = read_registration(path, fixed.frame_of_reference_uid if fixed else None,
                            moving.frame_of_reference_uid if moving else None)
    if fixed is not None and moving is not None:
        reg.check_frames(fixed.frame_of_reference_uid, moving.frame_of_reference_uid)
    if reg.deformable and not str(out).lower().endswith((".h5", ".hdf5")):
        raise InputError(f"a deformable registration needs an .h5 file, not '{out.name}'.")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}{out.suffix}")
    try:
        sitk.WriteTransform(reg.to_sitk(), str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return reg
