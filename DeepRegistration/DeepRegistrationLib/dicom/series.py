"""DICOM image series as the engine sees them: headers, geometry, and writing an image as a series.

Geometry is LPS mm, the patient coordinate system of DICOM and the engine's world frame (see
:mod:`DeepRegistrationLib.core.grid`): a slice's Image Position (Patient) is the centre of its first voxel,
Image Orientation (Patient) holds the row (i) and column (j) direction cosines, and the slices are ordered
along their common normal. Torch-free: pydicom, numpy and SimpleITK only.

Identifying attributes: an object written here carries only the patient and study attributes listed in
:data:`PATIENT_KEYWORDS` / :data:`STUDY_KEYWORDS`, copied from the source series (never invented, never
taken from anywhere else), so it holds no identifying value that its sources did not already hold.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image

logger = logging.getLogger(__name__)

#: Patient attributes copied from a source series into every object we write (Patient Module, type 2).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
#: Study attributes copied from the study an object is stored in (General Study Module).
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                  "AccessionNumber")
#: Image storage SOP classes whose series can be registered (CT, MR and their enhanced forms are not
#: multi-frame-aware here: classic single-frame slices only).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
}
MANUFACTURER = "DeepRegistration"


def pydicom():
    """The pydicom module, or an InputError naming the extra to install."""
    try:
        import pydicom as module
    except ModuleNotFoundError:
        raise InputError("DICOM objects need the Python package 'pydicom': pip install "
                         "'deepregistration[pacs]'") from None
    return module


def new_uid() -> str:
    """A new UID (pydicom's prefix, random suffix)."""
    return pydicom().uid.generate_uid()


def now() -> tuple[str, str]:
    """(DA, TM) strings of the current local date and time."""
    t = datetime.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S")


@dataclass
class Series:
    """One image series: its slices' headers sorted along the slice normal, and their grid.

    Attributes:
        datasets: pydicom datasets (headers; pixel data when read with pixels), sorted by position.
        grid: The series' voxel grid (LPS mm), ``shape (Z, Y, X)`` with Z = number of slices.
        paths: The files, in the same order (empty for series built in memory).
    """

    datasets: list
    grid: Grid
    paths: list = field(default_factory=list)

    @property
    def first(self):
        return self.datasets[0]

    @property
    def study_uid(self) -> str:
        return str(self.first.StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.first.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.FrameOfReferenceUID)

    @property
    def patient_id(self) -> str:
        return str(self.first.get("PatientID", ""))

    def instances(self) -> list[tuple[str, str]]:
        """``(SOP Class UID, SOP Instance UID)`` of every slice."""
        return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in self.datasets]


def series_from_datasets(datasets: Sequence, what: str = "series", paths: Sequence = ()) -> Series:
    """Sorts single-frame image slices of one series along their normal and derives the grid.

    Raises:
        InputError: no slices, several series, multi-frame objects, missing geometry, slices that do not
            share one orientation, fewer than 2 slices, uneven slice spacing (> 1 % or 0.01 mm).
    """
    if not datasets:
        raise InputError(f"{what}: no DICOM image slices.")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) != 1:
        raise InputError(f"{what}: the slices belong to {len(uids)} series; give one series.")
    for ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"{what}: multi-frame (enhanced) images are not supported; export the series as "
                             "single-frame slices.")
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
            if kw not in ds:
                raise InputError(f"{what}: slice {ds.get('SOPInstanceUID', '?')} has no {kw}; only images placed "
                                 "in the patient coordinate system can be registered.")
    orient = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    for ds in datasets:
        if np.abs(np.array([float(v) for v in ds.ImageOrientationPatient]) - orient).max() > 1e-4:
            raise InputError(f"{what}: the slices have different orientations (a localizer or a mixed series); "
                             "give a series of parallel slices.")
    row, col = orient[:3], orient[3:]
    normal = np.cross(row, col)
    pos = [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in datasets]
    order = np.argsort([p @ normal for p in pos], kind="stable")
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order] if paths else []
    pos = [pos[i] for i in order]
    if len(datasets) < 2:
        raise InputError(f"{what}: a single slice; a 3D series needs at least 2 slices.")
    steps = np.array([pos[i + 1] - pos[i] for i in range(len(pos) - 1)])
    step = steps.mean(axis=0)
    dz = float(np.linalg.norm(step))
    if dz <= 1e-6 or np.abs(np.linalg.norm(steps - step, axis=1)).max() > max(0.01, 0.01 * dz):
        raise InputError(f"{what}: the slices are not evenly spaced (or two share a position); give a regular "
                         "3D series.")
    ds0 = datasets[0]
    spacing_rc = [float(v) for v in ds0.PixelSpacing]  # (row spacing = along columns, column spacing)
    direction = np.stack([row, col, step / dz], axis=1)
    grid = Grid(shape=(len(datasets), int(ds0.Rows), int(ds0.Columns)),
                spacing=(spacing_rc[1], spacing_rc[0], dz), origin=tuple(pos[0]), direction=tuple(direction.ravel()))
    return Series(list(datasets), grid, [Path(p) for p in paths])


def read_series(folder: str | os.PathLike, what: str = "series", pixels: bool = False) -> Series:
    """Reads the image slices of the one series in ``folder`` (files of other SOP classes are skipped).

    Raises:
        InputError: no DICOM image in the folder, or more than one series (see :func:`series_from_datasets`).
    """
    dcm = pydicom()
    folder = Path(folder)
    datasets, paths = [], []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        try:
            ds = dcm.dcmread(p, stop_before_pixels=not pixels)
        except Exception:  # noqa: BLE001 - not a DICOM file: skipped
            continue
        if "ImagePositionPatient" in ds and "SOPClassUID" in ds:
            datasets.append(ds)
            paths.append(p)
    if not datasets:
        raise InputError(f"{what}: folder '{folder}' holds no DICOM image slices.")
    return series_from_datasets(datasets, what, paths)


def copy_keywords(target, source, keywords: Sequence[str]) -> None:
    """Copies the listed attributes from ``source`` (empty values for type-2 attributes it lacks)."""
    for kw in keywords:
        setattr(target, kw, source.get(kw, "") if kw in source else "")


def base_dataset(sop_class_uid: str, patient_source, study_source, series_uid: str, modality: str,
                 series_number: int, series_description: str, frame_of_reference_uid: str):
    """A dataset with file meta, SOP Common, Patient, General Study, General Series, Frame of Reference and
    General Equipment attributes; patient and study values copied from the given source datasets."""
    dcm = pydicom()
    from pydicom.dataset import FileMetaDataset

    ds = dcm.Dataset()
    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = dcm.uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = dcm.uid.PYDICOM_IMPLEMENTATION_UID
    meta.FileMetaInformationVersion = b"\x00\x01"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128  # a Part 10 file even where a writer keeps the dataset "as is" (STOW-RS)
    ds.SpecificCharacterSet = patient_source.get("SpecificCharacterSet", "ISO_IR 100") or "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    date, time = now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    copy_keywords(ds, patient_source, PATIENT_KEYWORDS)
    copy_keywords(ds, study_source, STUDY_KEYWORDS)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    # Laterality (2C): the source's value; absent when the body part is known (and unpaired); empty = unknown
    if study_source.get("BodyPartExamined"):
        ds.BodyPartExamined = study_source.BodyPartExamined
    if study_source.get("Laterality") or not study_source.get("BodyPartExamined"):
        ds.Laterality = study_source.get("Laterality", "") or ""
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ContentDate, ds.ContentTime = date, time
    return ds


def write_datasets(datasets: Sequence, folder: str | os.PathLike) -> list[Path]:
    """Writes datasets as ``<SOPInstanceUID>.dcm`` into ``folder`` (created), returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def stored_values(array: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                  signed: bool = True) -> np.ndarray:
    """Stored pixel values (int16 or uint16) of real values: ``round((value - intercept) / slope)``, clipped."""
    info = np.iinfo(np.int16 if signed else np.uint16)
    raw = np.round((np.asarray(array, dtype=np.float64) - intercept) / slope)
    return np.clip(raw, info.min, info.max).astype(np.int16 if signed else np.uint16)


def image_datasets(image: Image, *, sop_class_uid: str, patient_source, study_source, frame_of_reference_uid: str,
                   series_description: str, series_number: int = 1, series_uid: str | None = None,
                   image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "OTHER"), slope: float = 1.0,
                   intercept: float = 0.0, extra=None) -> list:
    """One single-frame slice per ``k`` of an image (array ``(Z, Y, X)``, LPS grid), as pydicom datasets.

    The grid must be right-handed in DICOM's sense (slice normal = row × column); a left-handed grid is
    written with its k axis reversed (same voxels in space). Pixel values are stored as int16
    ``round((value - intercept) / slope)``; CT and PET get Rescale Slope/Intercept, MR stores the values as
    they are (slope 1, intercept 0 required).

    Args:
        image: What to write.
        sop_class_uid: CT, MR or PET Image Storage (see :data:`IMAGE_SOP_CLASSES`).
        patient_source / study_source: Datasets whose patient / study attributes are copied.
        frame_of_reference_uid: The frame the grid's coordinates are in.
        series_description: Series Description (0008,103E).
        series_number / series_uid: Series Number and UID (a new UID by default).
        image_type: Image Type (0008,0008) values.
        slope / intercept: Rescale of stored values (CT/PT only).
        extra: Optional ``callback(dataset, k)`` adding attributes to each slice.
    """
    modality = IMAGE_SOP_CLASSES.get(sop_class_uid)
    if modality is None:
        raise InputError(f"cannot write images of SOP class {sop_class_uid}; supported: CT, MR, PET Image Storage")
    if modality == "MR" and (slope != 1.0 or intercept != 0.0):
        raise ValueError("MR Image Storage has no rescale: use slope 1 and intercept 0")
    grid, arr = image.grid, np.asarray(image.array)
    d = grid.direction_matrix
    if np.linalg.det(d) < 0:  # left-handed: reverse k so that the slice normal is row x column
        origin = grid.index_to_world @ np.array([0, 0, grid.shape[0] - 1, 1.0])
        d = d.copy()
        d[:, 2] *= -1
        grid = Grid(grid.shape, grid.spacing, tuple(origin[:3]), tuple(d.ravel()))
        arr = arr[::-1]
    series_uid = series_uid or new_uid()
    stored = stored_values(arr, slope, intercept)
    out = []
    m = grid.index_to_world
    for k in range(grid.shape[0]):
        ds = base_dataset(sop_class_uid, patient_source, study_source, series_uid, modality, series_number,
                          series_description, frame_of_reference_uid)
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.PatientOrientation = ""
        ds.PatientPosition = study_source.get("PatientPosition", "") or ""
        ds.AcquisitionNumber = ""
        ds.ImagePositionPatient = [_ds_str(v) for v in (m @ np.array([0, 0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [_ds_str(v, 8) for v in np.concatenate([d[:, 0], d[:, 1]])]
        ds.PixelSpacing = [_ds_str(grid.spacing[1]), _ds_str(grid.spacing[0])]
        ds.SliceThickness = _ds_str(grid.spacing[2])
        ds.SpacingBetweenSlices = _ds_str(grid.spacing[2])
        ds.SliceLocation = _ds_str(float(d[:, 2] @ (m @ np.array([0, 0, k, 1.0]))[:3]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(grid.shape[1]), int(grid.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        plane = np.ascontiguousarray(stored[k])
        ds.SmallestImagePixelValue = int(plane.min())
        ds.LargestImagePixelValue = int(plane.max())
        ds["SmallestImagePixelValue"].VR = ds["LargestImagePixelValue"].VR = "SS"
        ds.PixelData = plane.tobytes()
        _modality_attributes(ds, modality, slope, intercept)
        if extra is not None:
            extra(ds, k)
        out.append(ds)
    return out


def _modality_attributes(ds, modality: str, slope: float, intercept: float) -> None:
    """Type 1/2 attributes of the CT / MR / PET image modules that we cannot know: empty or generic."""
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = _ds_str(intercept), _ds_str(slope)
        ds.RescaleType = "HU"
        ds.KVP = ""
    elif modality == "MR":
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = ""
        ds.MagneticFieldStrength = ""
    else:
        ds.RescaleIntercept, ds.RescaleSlope = _ds_str(intercept), _ds_str(slope)


def _ds_str(value: float, digits: int = 6) -> str:
    """A DS value (at most 16 characters) of a float."""
    for d in range(digits, -1, -1):
        s = f"{float(value):.{d}f}".rstrip("0").rstrip(".") if d else f"{float(value):.0f}"
        if s in ("-0", ""):
            s = "0"
        if len(s) <= 16:
            return s
    return f"{float(value):.6g}"
