"""The moving image resampled onto the fixed grid, as a derived DICOM series in the fixed frame of reference.

The new series belongs to the **fixed** study and frame of reference (it lies on the fixed series' grid,
so a viewer overlays it on the fixed images without any registration), keeps the moving series' SOP class
and stored-value scale (Rescale Slope/Intercept for CT/PET), and says where it came from: Image Type
``DERIVED\\SECONDARY``, Derivation Description naming the method, Source Image Sequence = the moving
slices, and the Common Instance Reference Module (Referenced Series Sequence) = the moving series and,
when given, the registration object's series. New Study-level attributes are never invented: patient and
study attributes come from the fixed series (see :mod:`~DeepRegistrationLib.dicom.series`).
"""
from __future__ import annotations

import logging

from ..core.errors import InputError
from ..core.image import Image
from .series import IMAGE_SOP_CLASSES, Series, image_datasets, new_uid, pydicom

logger = logging.getLogger(__name__)

#: End of the Series Description of every derived series (how the PACS worker recognizes them in QIDO).
DERIVED_MARK = "[derived]"


def derived_series_datasets(warped: Image, fixed: Series, moving: Series, method: str, *,
                            series_number: int = 901, registration=None) -> list:
    """Datasets of the derived series.

    Args:
        warped: The moving image resampled onto the fixed series' grid (array ``(Z, Y, X)``, real values).
        fixed / moving: The series (headers).
        method: What produced it, for Derivation Description (e.g. "DeepRegistration 0.1.0 deformable, lncc").
        series_number: Series Number of the new series.
        registration: Optional registration object (pydicom Dataset) to reference as well.

    Raises:
        InputError: the warped image is not on the fixed grid, or the moving SOP class cannot be written.
    """
    dcm = pydicom()
    if not warped.grid.same_as(fixed.grid, tol=1e-3):
        raise InputError(f"the resampled image is not on the fixed series' grid ({warped.grid} vs {fixed.grid}).")
    sop = str(moving.first.SOPClassUID)
    if sop not in IMAGE_SOP_CLASSES:
        raise InputError(f"the moving series has SOP class {sop}; derived series are written for CT, MR and PET "
                         "images only. Leave out the derived series.")
    slope = float(moving.first.get("RescaleSlope", 1) or 1)
    intercept = float(moving.first.get("RescaleIntercept", 0) or 0)
    description = (f"Registered to series {fixed.first.get('SeriesNumber', '')} "
                   f"({str(fixed.first.get('SeriesDescription', ''))[:24]})").strip()
    derivation = (f"{moving.first.get('SeriesDescription', 'moving series')} resampled into the frame of "
                  f"reference of the fixed series by {method}")[:1024]
    source_refs = []
    for cls, uid in moving.instances():
        ref = dcm.Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = cls, uid
        source_refs.append(ref)
    refs = _references(fixed, moving, registration)

    def extra(ds, k):
        ds.DerivationDescription = derivation
        ds.SourceImageSequence = source_refs
        for kw, value in refs.items():
            setattr(ds, kw, value)
        for kw in ("ScanningSequence", "SequenceVariant", "MRAcquisitionType", "PatientPosition"):
            if kw in ds and moving.first.get(kw):
                setattr(ds, kw, moving.first.get(kw))

    return image_datasets(warped, sop_class_uid=sop, patient_source=fixed.first, study_source=fixed.first,
                          frame_of_reference_uid=fixed.frame_of_reference_uid,
                          series_description=f"{description[:53]} {DERIVED_MARK}", series_number=series_number,
                          series_uid=new_uid(), image_type=("DERIVED", "SECONDARY", "OTHER"), slope=slope,
                          intercept=intercept, extra=extra)


def _references(fixed: Series, moving: Series, registration) -> dict:
    """Common Instance Reference Module attributes for the moving series (and the registration object)."""
    dcm = pydicom()

    def series_item(series_uid, instances):
        item = dcm.Dataset()
        item.SeriesInstanceUID = series_uid
        seq = []
        for cls, uid in instances:
            ref = dcm.Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = cls, uid
            seq.append(ref)
        item.ReferencedInstanceSequence = seq
        return item

    same_study, other_study = [], []
    (same_study if moving.study_uid == fixed.study_uid else other_study).append(
        series_item(moving.series_uid, moving.instances()))
    if registration is not None:  # stored in the fixed study
        same_study.append(series_item(str(registration.SeriesInstanceUID),
                                      [(str(registration.SOPClassUID), str(registration.SOPInstanceUID))]))
    out = {}
    if same_study:
        out["ReferencedSeriesSequence"] = same_study
    if other_study:
        study = dcm.Dataset()
        study.StudyInstanceUID = moving.study_uid
        study.ReferencedSeriesSequence = other_study
        out["StudiesContainingOtherReferencedInstancesSequence"] = [study]
    return out
