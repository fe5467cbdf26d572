"""Write a volume as a DICOM series (classic CT slices or one enhanced multi-frame image).

For tests, worked examples and demos: hospitals send DICOM, synthetic data is NIfTI. The
geometry is kept exactly (ImagePositionPatient per slice from origin, direction and spacing),
so that reading the series back gives the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kubeseg.imageio import Geometry

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class SeriesInfo:
    """Patient, study and series identity of a written series (UIDs generated where not given)."""

    patient_id: str = "KS-0001"
    patient_name: str = "Synthetic^Patient"
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    description: str = "CT"
    modality: str = "CT"
    series_number: int = 1
    accession_number: str = "ACC0001"


def _base(info: SeriesInfo, sop_class: str, study_uid: str, series_uid: str, for_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = info.patient_id, info.patient_name
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
    ds.StudyID, ds.StudyDate, ds.StudyTime = "1", "20260101", "120000"
    ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = "20260101", "120000", "20260101", "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = info.accession_number, ""
    ds.Modality, ds.SeriesDescription, ds.SeriesNumber = info.modality, info.description, info.series_number
    ds.Manufacturer = "kubeseg synthetic"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_series(array: np.ndarray, geometry: Geometry, folder: str | Path, info: SeriesInfo = SeriesInfo(),
                 multiframe: bool = False) -> list[Path]:
    """Write ``array`` (z, y, x; values in HU-like units, stored as int16) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = info.study_uid or generate_uid()
    series_uid = info.series_uid or generate_uid()
    for_uid = info.frame_of_reference_uid or generate_uid()
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    z_sp, y_sp, x_sp = geometry.spacing
    origin = np.asarray(geometry.origin, dtype=float)
    orientation = [float(v) for v in (*row, *col)]
    positions = [[float(v) for v in origin + k * z_sp * normal] for k in range(array.shape[0])]
    pixels = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    written = []
    if not multiframe:
        for k in range(array.shape[0]):
            ds = _base(info, CT_IMAGE, study_uid, series_uid, for_uid)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient, ds.ImageOrientationPatient = positions[k], orientation
            ds.PixelSpacing, ds.SliceThickness = [float(y_sp), float(x_sp)], float(z_sp)
            ds.Rows, ds.Columns = array.shape[1], array.shape[2]
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.KVP = 120
            ds.PixelData = pixels[k].tobytes()
            path = folder / f"slice_{k:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
        return written
    ds = _base(info, ENHANCED_CT_IMAGE, study_uid, series_uid, for_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = array.shape[0]
    ds.Rows, ds.Columns = array.shape[1], array.shape[2]
    ds.ContentQualification, ds.BurnedInAnnotation = "PRODUCT", "NO"
    ds.PresentationLUTShape, ds.LossyImageCompression = "IDENTITY", "00"
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [float(y_sp), float(x_sp)], float(z_sp)
    measures.SpacingBetweenSlices = float(z_sp)
    plane_o = Dataset()
    plane_o.ImageOrientationPatient = orientation
    transform = Dataset()
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = 0, 1, "HU"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([plane_o])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in range(array.shape[0]):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = positions[k]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.StackID, content.InStackPositionNumber = "1", k + 1
        content.DimensionIndexValues = [1, k + 1]
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = pixels.tobytes()
    path = folder / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def ct_phantom(shape=(12, 32, 32), seed: Optional[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like body (soft tissue, a bright organ) and its label map (1 = organ)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [s / 2 for s in shape]
    body = ((y - c[1]) / (shape[1] * 0.45)) ** 2 + ((x - c[2]) / (shape[2] * 0.45)) ** 2 <= 1
    organ = ((z - c[0]) / (shape[0] * 0.3)) ** 2 + ((y - c[1]) / (shape[1] * 0.2)) ** 2 \
        + ((x - c[2] - 3) / (shape[2] * 0.2)) ** 2 <= 1
    image = np.full(shape, -1000.0) + body * 1040 + organ * 80 + rng.normal(0, 10, shape)
    return image.astype(np.float32), organ.astype(np.uint8)
