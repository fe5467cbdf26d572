"""Label map → DICOM Segmentation (highdicom), referencing the series it was computed from.

One segment per foreground label present in ``dataset.json`` (segment numbers 1..N in the order
of the label values; the segment label is the label's name, its coded concepts come from
:mod:`kubeseg.clinical.label_codes`). A region model (labels that are lists of values,
:mod:`kubeseg.labels`) gets one segment per foreground region instead, numbered in the order of
``dataset.json``: the region's mask is every voxel holding one of its values, so segments overlap
(a lesion is also part of the organ), as a BINARY SEG allows. The SEG shares the source's study, patient and frame of
reference; each frame references its source slice (or source frame of an enhanced image) and
carries its plane position, so a viewer overlays it and :func:`read_segmentation` maps it back
voxel for voxel onto the label map in the input's array order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from kubeseg.atomic import atomic_path
from kubeseg.clinical.dicom_io import DicomVolume
from kubeseg.clinical.label_codes import LabelCode, default_label_code
from kubeseg.labels import IGNORE_KEY

SOFTWARE = "kubeseg"


def _code(c):
    from highdicom.sr import CodedConcept

    return CodedConcept(c.value, c.scheme, c.meaning)


def segment_numbers(labels: Mapping[str, int]) -> dict[int, tuple[int, str]]:
    """label value → (segment number, label name), foreground only, numbered 1..N by value (plain labels)."""
    fg = sorted((int(v), n) for n, v in labels.items() if int(v) != 0)
    return {v: (i + 1, n) for i, (v, n) in enumerate(fg)}


def has_regions(labels: Mapping) -> bool:
    return any(isinstance(v, (list, tuple)) for n, v in labels.items() if n != IGNORE_KEY)


def region_segments(labels: Mapping) -> list[tuple[str, tuple[int, ...]]]:
    """(name, values) of each foreground region, in ``dataset.json`` order; segment numbers 1..N."""
    out = []
    for name, value in labels.items():
        values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if name != IGNORE_KEY and set(values) != {0}:
            out.append((name, values))
    return out


def build_segmentation(segmentation: np.ndarray, source: DicomVolume, labels: Mapping[str, int],
                       codes: Mapping[str, LabelCode], model_name: str = "kubeseg", model_version: str = "0",
                       series_number: int = 300):
    """A ``highdicom.seg.Segmentation`` of ``segmentation`` ((z, y, x) label values, the volume's array order)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dcm_codes

    if segmentation.shape != source.array.shape:
        raise ValueError(f"segmentation shape {segmentation.shape} differs from the source volume's {source.array.shape}")
    if has_regions(labels):  # one binary mask per region, overlapping: (frames, rows, columns, segments)
        regions = region_segments(labels)
        pixels = np.stack([np.isin(segmentation, values) for _, values in regions], axis=-1)
        segments = [(i + 1, name, "region " + ",".join(map(str, values))) for i, (name, values) in enumerate(regions)]
    else:
        numbering = segment_numbers(labels)
        relabel = np.zeros(int(max(max(numbering, default=0), int(segmentation.max()))) + 1, dtype=np.uint16)
        for value, (number, _) in numbering.items():
            relabel[value] = number
        pixels = relabel[segmentation.astype(np.int64)]
        pixels = pixels.astype(np.uint16 if len(numbering) > 255 else np.uint8)
        segments = [(number, name, f"label {value}")
                    for value, (number, name) in sorted(numbering.items(), key=lambda kv: kv[1][0])]
    if source.frame_order is not None:  # enhanced source: SEG frames follow the source's frame order
        unsorted = np.empty_like(pixels)
        unsorted[source.frame_order] = pixels
        pixels = unsorted
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name[:64], version=str(model_version)[:64],
                                                   family=dcm_codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, name, what in segments:
        code = codes.get(name) or default_label_code(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=_code(code.category), segmented_property_type=_code(code.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=hd.UID(), tracking_id=f"{model_name} {what} ({name})"[:64]))
    first = source.source_datasets[0]
    return hd.seg.Segmentation(
        source_images=source.source_datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=SOFTWARE, manufacturer_model_name=model_name[:64],
        software_versions=str(model_version)[:64], device_serial_number="0",
        series_description=f"{model_name} segmentation"[:64],
        content_label="KUBESEG", content_description=f"{model_name} version {model_version}"[:64],
        content_creator_name="kubeseg^automatic",
        omit_empty_frames=False,  # every source slice keeps a frame: empty slices are a finding too
        **({"transfer_syntax_uid": first.file_meta.TransferSyntaxUID}
           if str(first.file_meta.TransferSyntaxUID) in ("1.2.840.10008.1.2.1",) else {}),
    )


def write_segmentation(segmentation: np.ndarray, source: DicomVolume, labels: Mapping[str, int],
                       codes: Mapping[str, LabelCode], path: str | Path, **kw) -> Path:
    """Build and save the DICOM-SEG atomically; returns ``path``."""
    seg = build_segmentation(segmentation, source, labels, codes, **kw)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(path)


def read_segment_masks(path_or_dataset, source: DicomVolume) -> dict[str, np.ndarray]:
    """Each segment of a DICOM-SEG as a mask on ``source``'s grid (z, y, x), by segment label, placed by plane
    position (independent of how it was written)."""
    import pydicom

    ds = path_or_dataset if isinstance(path_or_dataset, pydicom.Dataset) else pydicom.dcmread(path_or_dataset)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    direction = np.asarray(source.geometry.direction).reshape(3, 3)
    normal = direction[:, 2]
    origin = np.asarray(source.geometry.origin)
    dz = source.geometry.spacing[0]
    masks = {name: np.zeros(source.array.shape, dtype=bool) for name in names.values()}
    frames = ds.pixel_array
    frames = frames[None] if frames.ndim == 2 else frames
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pos = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        z = float(np.dot(pos - origin, normal)) / dz
        zi = int(round(z))
        if abs(z - zi) > 1e-3 or not 0 <= zi < source.array.shape[0] or not np.allclose(
                pos - origin - zi * dz * normal, 0, atol=1e-3):
            raise ValueError(f"SEG frame {k + 1} at {pos.tolist()} is not on a source slice")
        masks[names[number]][zi] |= frames[k] > 0
    return masks


def read_segmentation(path_or_dataset, source: DicomVolume, labels: Mapping[str, int],
                      regions_class_order=None) -> np.ndarray:
    """A DICOM-SEG read back as label values on ``source``'s grid (z, y, x), by plane position.

    Plain labels: each segment's voxels get its label's value (by segment label, else by number).
    Regions: the region masks are painted in turn with ``regions_class_order``'s values, as a region
    model's outputs are (:mod:`kubeseg.labels`), which gives back the label map it was written from.
    """
    import pydicom

    ds = path_or_dataset if isinstance(path_or_dataset, pydicom.Dataset) else pydicom.dcmread(path_or_dataset)
    masks = read_segment_masks(ds, source)
    out = np.zeros(source.array.shape, dtype=np.int64)
    if has_regions(labels):
        if regions_class_order is None:
            raise ValueError("reading a region model's DICOM-SEG as a label map needs regions_class_order")
        for (name, _), value in zip(region_segments(labels), regions_class_order):
            if name in masks:
                out[masks[name]] = int(value)
        return out
    numbers = {number: value for value, (number, _) in segment_numbers(labels).items()}
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    for number, name in names.items():
        value = labels.get(name, numbers.get(number))
        if value is not None:
            out[masks[name]] = int(value)
    return out
