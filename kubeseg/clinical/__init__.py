"""Clinical I/O: DICOM in (:mod:`.dicom_io`), DICOM-SEG (:mod:`.dicom_seg`) and FHIR (:mod:`.fhir_report`)
out, DICOMweb (:mod:`.dicomweb`, :mod:`.pacs`), QA flags (:mod:`.qa`), saliency (:mod:`.saliency`).

The engine layer: pydicom, highdicom, fhir.resources and requests, no web framework.
"""
