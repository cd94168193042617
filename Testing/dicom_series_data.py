"""DICOM test series made from the bundled sample images (synthetic, non-identifying patient data).

``make_series`` writes an image as single-frame MR slices with pydicom (through the package's own series
writer), optionally resampled onto an oblique grid first, so tests can register real DICOM series.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "DeepRegistration" / "Resources" / "SampleData"
MR = "1.2.840.10008.5.1.4.1.1.4"


def rotation(axis, degrees: float) -> np.ndarray:
    """3×3 rotation matrix about ``axis`` by ``degrees`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def oblique(image: sitk.Image, rot: np.ndarray, spacing: float | None = None) -> sitk.Image:
    """``image`` resampled (linear) onto a grid with direction ``rot @ direction`` about its centre."""
    size = np.array(image.GetSize())
    sp = np.array(image.GetSpacing()) if spacing is None else np.full(3, spacing)
    size = np.maximum(2, np.round(size * np.array(image.GetSpacing()) / sp)).astype(int)
    d = rot @ np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    origin = centre - d @ (sp * (size - 1) / 2)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(sp.tolist())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(d.ravel().tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def make_series(image: sitk.Image | str, folder: Path, *, patient_name: str, patient_id: str, study_uid: str,
                frame_uid: str | None = None, description: str = "T1 test", series_number: int = 1,
                scale: float = 100.0, study_date: str = "20240101") -> list[Path]:
    """Writes ``image`` (or a sample image name) as an MR series in ``folder``; returns the files.

    Intensities are multiplied by ``scale`` and stored as int16.
    """
    import pydicom

    from DeepRegistrationLib.dicom.series import image_datasets, new_uid, write_datasets
    from DeepRegistrationLib.io.images import sitk_to_image

    if isinstance(image, str):
        image = sitk.ReadImage(str(SAMPLE / f"{image}.nii.gz"))
    img = sitk_to_image(image)
    img = type(img)(img.array * scale, img.grid, img.name)
    patient = pydicom.Dataset()
    patient.PatientName, patient.PatientID = patient_name, patient_id
    patient.PatientBirthDate, patient.PatientSex = "19700101", "O"
    study = pydicom.Dataset()
    study.StudyInstanceUID, study.StudyDate, study.StudyTime = study_uid, study_date, "120000"
    study.StudyID, study.AccessionNumber, study.ReferringPhysicianName = "1", "", ""
    study.BodyPartExamined, study.PatientPosition = "HEAD", "HFS"

    def extra(ds, k):
        ds.StudyDescription = "MR Brain"

    datasets = image_datasets(img, sop_class_uid=MR, patient_source=patient, study_source=study,
                              frame_of_reference_uid=frame_uid or new_uid(), series_description=description,
                              series_number=series_number, extra=extra)
    return write_datasets(datasets, folder)
