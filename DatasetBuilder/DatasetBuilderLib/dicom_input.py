"""DICOM series folders as input: read into a scene (volume + subject hierarchy), harvest identifying text.

Each series (SimpleITK/GDCM series IDs) of a folder becomes a scalar volume node under subject-hierarchy
patient and study items carrying the DICOM attributes the builder uses (``DICOM.PatientID``, name, birth
date, study date and UID, modality), so :func:`DatasetBuilderLib.scenes.collect_cases` treats it like a
scene loaded by Slicer's DICOM module.

Identifying text: the outputs are NIfTI images with cleared headers, never DICOM, so no header is carried
over; instead every text value of every file of the series (pydicom ``iterall``: nested sequences and private
tags included) that can identify — person names, dates, date-times, UIDs, and LO/SH/LT/ST/UT/AE values of
patient, study, institution, physician, operator, device and comment attributes and of all private tags —
is collected for the PHI scan (a broader net than the PS3.15 Annex E basic profile's text attributes).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .deid import PhiStrings

logger = logging.getLogger(__name__)

ALWAYS_VRS = {"PN", "DA", "DT", "UI"}
TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "AE", "UC"}
IDENTIFYING_WORDS = ("Patient", "Study", "Institution", "Physician", "Operator", "Accession", "Station",
                     "Device", "Comment", "Address", "Name", "Requesting", "Performed", "Scheduled", "Admission",
                     "Ethnic", "Occupation", "Military", "Region", "Country", "Telephone", "Insurance", "Issuer",
                     "Identifier", "Description", "Protocol", "Series")


def dicom_series_folders(root: str | os.PathLike) -> list[Path]:
    """Folders under ``root`` (itself included) that hold at least one DICOM series."""
    out = []
    for folder, _, files in os.walk(root):
        if files and sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
            out.append(Path(folder).resolve())
    return sorted(out)


def harvest_phi(dataset, phi: PhiStrings) -> None:
    """Adds the identifying text values of a pydicom dataset (see module doc) to ``phi``."""
    for element in dataset.iterall():
        if element.VR not in ALWAYS_VRS | TEXT_VRS or element.value in (None, ""):
            continue
        keyword = element.keyword or ""
        if element.VR in TEXT_VRS and not element.tag.is_private and \
                not any(word in keyword for word in IDENTIFYING_WORDS):
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            phi.add(str(value), f"DICOM {keyword or element.tag}")


def load_dicom_folder(folder: str | os.PathLike):
    """A scene holding every series of ``folder``, and the identifying strings of all their files."""
    import pydicom

    from DeepRegistrationLib.image import Image
    from DeepRegistrationLib.io import sitk_to_image
    from DeepRegistrationSlicerLib import nodes as N

    from .scenes import make_scene

    scene = make_scene()
    sh = scene.GetSubjectHierarchyNode()
    phi = PhiStrings()
    patients: dict[str, int] = {}
    for series in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        for ds in headers:
            harvest_phi(ds, phi)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = sitk_to_image(reader.Execute(), "DICOM series")
        first = headers[0]
        pid = str(first.get("PatientID", "") or "")
        volume = N.imageToVolume(Image(image.array.astype(np.float32), image.grid), name=str(first.get(
            "SeriesDescription", "") or "series"), scene=scene)
        volume.SetAttribute("DICOM.instanceUIDs", " ".join(str(ds.SOPInstanceUID) for ds in headers))
        if pid not in patients:
            patients[pid] = sh.CreateSubjectItem(sh.GetSceneItemID(), str(first.get("PatientName", "") or pid))
            for key in ("PatientID", "PatientName", "PatientBirthDate"):
                sh.SetItemAttribute(patients[pid], f"DICOM.{key}", str(first.get(key, "") or ""))
        study = sh.CreateStudyItem(patients[pid], str(first.get("StudyDescription", "") or "study"))
        for key in ("StudyDate", "StudyInstanceUID", "Modality", "AccessionNumber", "InstitutionName"):
            sh.SetItemAttribute(study, f"DICOM.{key}", str(first.get(key, "") or ""))
        sh.CreateItem(study, volume)
        if not pid:
            sh.RemoveItemAttribute(patients[pid], "DICOM.PatientID")
    logger.info("read %d DICOM series from a folder", len(patients))
    return scene, phi
