"""DICOM series folders as input: read into a scene (volume + subject hierarchy), harvest identifying text.

Each series (SimpleITK/GDCM series IDs) of a folder becomes a scalar volume node under subject-hierarchy
patient and study items carrying the DICOM attributes the builder uses (``DICOM.PatientID``, name, birth
date, study date and UID, modality), so :func:`DatasetBuilderLib.scenes.collect_cases` treats it like a
scene loaded by Slicer's DICOM module.

Headers: each file's header goes through the DICOM PS3.15 Annex E **Basic Application Level
Confidentiality Profile** as implemented by Kitware's ``dicom-anonymizer`` (private tags removed; the tables
of the DICOM 2026c standard with dicom-anonymizer 2.x, which needs Python >= 3.10; on Python 3.9, i.e.
3D Slicer 5.8, the last release for it, 1.0.13.post1, with the DICOM 2024b tables; both work with the
pydicom 2.4.4 that Slicer 5.8 and 5.10 bundle). What the profile keeps (acquisition parameters:
manufacturer, model, sequence, TR/TE, spacing, ...) of the series' first file is the case's de-identified header summary
(``headersTr/<case>.json``), minus UIDs (regenerated randomly by the profile: useless for NIfTI and not
reproducible), binary values, emptied values and the profile's placeholders — and minus any value that an
identifying string of the inputs occurs in (the builder filters against all of them).

Identifying text for the PHI scan, from every file of the series (pydicom ``iterall``: nested sequences
and private tags included): every text, name, date/time or UID value the profile removed or replaced
(numbers and code strings are not searched: "F" or "4000" would match everywhere), plus a broader net — person names,
dates, date-times, UIDs, and LO/SH/LT/ST/UT/AE values of patient, study, institution, physician, operator,
device and comment attributes and of all private tags.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys
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


# dicom-anonymizer's tables of PS3.15 Annex E, newest first (2.x has 2026c; 1.0.13.post1, the last release for
# Python 3.9, has 2024b)
ANNEX_E_TABLES = ("dicomfields_2026c", "dicomfields_2024b")
# What to install (also in the module's Resources/DatasetBuilder-requirements.txt): 2.x needs Python >= 3.10
DICOM_ANONYMIZER_SPEC = ("dicom-anonymizer>=2.1,<3" if sys.version_info >= (3, 10)
                         else "dicom-anonymizer==1.0.13.post1")
SUMMARY_SKIP_VRS = {"UI", "SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
PHI_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "AE", "UC", "DA", "DT", "TM", "UI"}
PLACEHOLDERS = {"", "ANONYMIZED", "00010101", "00010101010101.000000+0000", "000000.00"}


def dicom_support_problem() -> str | None:
    """Why DICOM series folders cannot be read in this Python (one sentence naming the fix), or None."""
    if importlib.util.find_spec("pydicom") is None:
        return "DICOM input needs the package pydicom (it comes with 3D Slicer): pip install pydicom"
    if importlib.util.find_spec("dicomanonymizer") is None:
        return ("DICOM input needs the package dicom-anonymizer (PS3.15 Annex E profile): "
                f"pip install '{DICOM_ANONYMIZER_SPEC}'")
    if annex_e_tables() is None:
        return ("the installed dicom-anonymizer has none of the PS3.15 Annex E tables this builder knows "
                f"({', '.join(ANNEX_E_TABLES)}): pip install '{DICOM_ANONYMIZER_SPEC}'")
    return None


def annex_e_tables() -> str | None:
    """The newest PS3.15 Annex E tables of the installed dicom-anonymizer (None when there is none we know)."""
    for name in ANNEX_E_TABLES:
        try:
            if importlib.util.find_spec(f"dicomanonymizer.dicom_anonymization_databases.{name}") is not None:
                return name
        except ImportError:  # dicom-anonymizer not installed
            return None
    return None


def deidentify(dataset):
    """A copy of a pydicom dataset after the PS3.15 Annex E Basic Profile (private tags removed).

    Raises:
        ImportError naming the package and the command that installs it when ``dicom-anonymizer`` is missing.
    """
    problem = dicom_support_problem()
    if problem:
        raise ImportError(problem)
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions

    tables = annex_e_tables()
    out = copy.deepcopy(dataset)
    anonymize_dataset(out, None, True, lambda: initialize_actions(tables))
    return out


def _text_values(dataset) -> set[str]:
    """Values of free-text, name, date/time and UID elements (codes and numbers are not searched: "F",
    "4000" and the like would match everywhere by chance)."""
    values = set()
    for element in dataset.iterall():
        if element.VR not in PHI_VRS or element.value in (None, ""):
            continue
        for value in (element.value if element.VM > 1 else [element.value]):
            values.add(str(value))
    return values


def header_summary(anonymized) -> dict[str, object]:
    """Top-level attributes the profile kept: ``{keyword: value or [values]}`` (see module doc)."""
    out: dict[str, object] = {}
    for element in anonymized:
        if element.VR in SUMMARY_SKIP_VRS or element.tag.is_private or not element.keyword:
            continue
        values = [str(v) for v in (element.value if element.VM > 1 else [element.value]) if v is not None]
        if not values or all(v.strip() in PLACEHOLDERS for v in values):
            continue
        out[element.keyword] = values if element.VM > 1 else values[0]
    return out


def harvest_phi(dataset, phi: PhiStrings, anonymized=None) -> None:
    """Adds the identifying text values of a pydicom dataset (see module doc) to ``phi``.

    ``anonymized``: the dataset after :func:`deidentify`; every value it no longer holds is identifying.
    """
    if anonymized is not None:
        kept = _text_values(anonymized)
        for value in _text_values(dataset) - kept:
            phi.add(value, "DICOM value removed by the PS3.15 basic profile")
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
    """A scene holding every series of ``folder``, the identifying strings of all their files, and the
    de-identified header summary of each series by volume node ID."""
    import pydicom

    from DeepRegistrationLib.core.image import Image
    from DeepRegistrationLib.io.images import sitk_to_image
    from DeepRegistrationSlicerLib import nodes as N

    scene = N.makeScene()
    sh = scene.GetSubjectHierarchyNode()
    phi = PhiStrings()
    summaries: dict[str, dict] = {}
    patients: dict[str, int] = {}
    for series in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series)
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        clean = [deidentify(ds) for ds in headers]
        for ds, anonymized in zip(headers, clean):
            harvest_phi(ds, phi, anonymized)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        image = sitk_to_image(reader.Execute(), "DICOM series")
        first = headers[0]
        pid = str(first.get("PatientID", "") or "")
        volume = N.imageToVolume(Image(image.array.astype(np.float32), image.grid), name=str(first.get(
            "SeriesDescription", "") or "series"), scene=scene)
        volume.SetAttribute("DICOM.instanceUIDs", " ".join(str(ds.SOPInstanceUID) for ds in headers))
        summaries[volume.GetID()] = header_summary(clean[0])
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
    logger.info("read %d DICOM series from a folder", len(summaries))
    return scene, phi, summaries
