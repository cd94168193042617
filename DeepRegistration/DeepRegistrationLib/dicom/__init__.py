"""DICOM in and out of the engine: Spatial Registration / Deformable Spatial Registration objects
(:mod:`~DeepRegistrationLib.dicom.registration_objects`), the resampled moving image as a derived series (:mod:`~DeepRegistrationLib.dicom.derived_series`),
and a DICOMweb PACS worker (:mod:`~DeepRegistrationLib.dicom.dicomweb`, :mod:`~DeepRegistrationLib.dicom.pacs`, command ``deepregistration pacs``).

Needs pydicom (and dicomweb-client for the PACS worker): ``pip install 'deepregistration[pacs]'``.
Nothing here imports torch except the registration step of :mod:`~DeepRegistrationLib.dicom.pacs`.
"""
