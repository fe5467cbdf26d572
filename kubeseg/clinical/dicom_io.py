"""DICOM series → the model's input array, judged from headers before any pixel is decoded.

A folder (an unpacked upload, or what WADO-RS returned) may hold several series: each is mapped
to one of the model's channels (``dataset.json`` ``channel_names``) by an explicit mapping, by
its SeriesDescription, or by its Modality (:func:`map_series_to_channels`). Classic single-frame
series (one file per slice) and enhanced multi-frame images (one file, per-frame functional
groups) are both read; either way the slices are ordered along the plane normal, and the
geometry is the one SimpleITK would give (origin = first slice's ImagePositionPatient,
direction columns = row cosine, column cosine, normal).

Header-first (DESIGN.md, Hostility): every file is parsed with ``stop_before_pixels``; rows,
columns, frames, samples per pixel, bits allocated and the transfer syntax are checked, and the
voxel count of each series is compared with the limit, before any pixel data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from kubeseg.errors import KubesegError
from kubeseg.imageio import Geometry

# Uncompressed syntaxes and RLE (pydicom decodes it without extra libraries). Deflate is refused
# (a whole-dataset zip bomb); JPEG family syntaxes need decoders this image does not ship.
SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
SUPPORTED_BITS = (8, 16, 32)
MAX_DIMENSION = 4096  # rows or columns of one frame
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_POSITION_TOLERANCE = 0.01  # mm: slices closer than this are duplicates; spacing may vary by this fraction


class DicomInputError(KubesegError):
    """A DICOM upload kubeseg refuses. ``kind``: invalid | unsupported | too_large | unprocessable."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DicomLimits:
    max_voxels: int = 512 * 512 * 1024
    min_size: int = 1
    max_dimension: int = MAX_DIMENSION


@dataclass
class Series:
    """One series, headers only: its files (or one multi-frame file), sorted later by position."""

    uid: str
    headers: list[Dataset]
    files: list[Path]

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def description(self) -> str:
        return str(getattr(self.first, "SeriesDescription", "") or "")

    @property
    def modality(self) -> str:
        return str(getattr(self.first, "Modality", "") or "")

    @property
    def multiframe(self) -> bool:
        return "PerFrameFunctionalGroupsSequence" in self.first

    @property
    def num_frames(self) -> int:
        return sum(int(getattr(h, "NumberOfFrames", 1) or 1) for h in self.headers)

    def label(self) -> str:
        return f"series {self.uid} ({self.modality or '?'} '{self.description}', {self.num_frames} frame(s))"


@dataclass
class DicomVolume:
    """One series as a volume: ``array`` (z, y, x) float32 in the kubeseg geometry, and its sources.

    ``source_datasets`` are the full datasets (pixels included) in the order highdicom expects:
    for single-frame series one per slice in ``array`` order; for a multi-frame image one dataset,
    with ``frame_order[k]`` the (0-based) frame shown at array slice ``k``.
    """

    series: Series
    array: np.ndarray
    geometry: Geometry
    source_datasets: list[Dataset]
    frame_order: Optional[list[int]] = None


@dataclass
class DicomStudyInput:
    """The model's input read from DICOM: ``data`` (C, z, y, x) and one :class:`DicomVolume` per channel."""

    data: np.ndarray
    geometry: Geometry
    volumes: list[DicomVolume]
    ignored: list[str] = field(default_factory=list)

    @property
    def reference(self) -> DicomVolume:
        """The series the segmentation refers to (channel 0's)."""
        return self.volumes[0]


def read_headers(folder: Path, limits: DicomLimits = DicomLimits()) -> tuple[list[Series], list[str]]:
    """Every image series under ``folder``, from headers only; files that are not DICOM images are listed."""
    by_uid: dict[str, Series] = {}
    ignored: list[str] = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
            ignored.append(f"{name}: not a readable DICOM file ({type(e).__name__})")
            continue
        if getattr(ds, "SOPClassUID", None) == SEG_SOP_CLASS or "Rows" not in ds:
            ignored.append(f"{name}: {getattr(ds, 'Modality', 'no')} object without an image to segment")
            continue
        check_header(ds, name, limits)
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            raise DicomInputError("invalid", f"{name}: no SeriesInstanceUID")
        by_uid.setdefault(uid, Series(uid, [], [])).headers.append(ds)
        by_uid[uid].files.append(path)
    series = list(by_uid.values())
    for s in series:
        _check_series_header(s, limits)
    return series, ignored


def check_header(ds: Dataset, name: str, limits: DicomLimits) -> None:
    """One file's image header: size per frame, frames, samples, bits and transfer syntax."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomInputError("unsupported", f"{name}: transfer syntax {syntax} is not supported; send "
                                             f"{', '.join(SUPPORTED_TRANSFER_SYNTAXES.values())}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DicomInputError("invalid", f"{name}: the header gives {rows} rows, {cols} columns, {frames} frame(s)")
    if rows > limits.max_dimension or cols > limits.max_dimension:
        raise DicomInputError("too_large", f"{name}: {rows}x{cols} pixels per frame exceed "
                                           f"{limits.max_dimension} per side")
    if rows * cols * frames > limits.max_voxels:
        raise DicomInputError("too_large", f"{name}: {rows}x{cols}x{frames} voxels exceed the limit of {limits.max_voxels}")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DicomInputError("unprocessable", f"{name}: {samples} samples per pixel (colour); send grayscale images")
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in SUPPORTED_BITS:
        raise DicomInputError("unsupported", f"{name}: {bits} bits allocated; supported are {SUPPORTED_BITS}")


def _check_series_header(s: Series, limits: DicomLimits) -> None:
    shapes = {(int(h.Rows), int(h.Columns)) for h in s.headers}
    if len(shapes) > 1:
        raise DicomInputError("unprocessable", f"{s.label()}: slices of different sizes {sorted(shapes)}")
    if s.multiframe and len(s.headers) > 1:
        raise DicomInputError("unprocessable", f"{s.label()}: {len(s.headers)} multi-frame files in one series; "
                                               "send one enhanced image per series")
    rows, cols = shapes.pop()
    voxels = rows * cols * s.num_frames
    if voxels > limits.max_voxels:
        raise DicomInputError("too_large", f"{s.label()}: {cols}x{rows}x{s.num_frames} = {voxels} voxels exceed "
                                           f"the limit of {limits.max_voxels}")
    if min(rows, cols, s.num_frames) < limits.min_size:
        raise DicomInputError("unprocessable", f"{s.label()}: size {cols}x{rows}x{s.num_frames} is below the "
                                               f"minimum of {limits.min_size} voxels per axis (a 3D volume is needed)")


def _normalise(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def map_series_to_channels(series: Sequence[Series], channel_names: Mapping[int, str],
                           mapping: Optional[Mapping[str, str]] = None) -> list[Series]:
    """One series per channel, in channel order.

    ``mapping``: channel (index as text, or its name) → SeriesInstanceUID, SeriesDescription or
    Modality. Without it: one series for a one-channel model; else each channel name is matched
    against the series' descriptions (the whole description, then a whole word of it;
    case-insensitive), then their modalities.
    """
    channels = [channel_names[c] for c in sorted(channel_names)]
    if not series:
        raise DicomInputError("unprocessable", "no DICOM series (no DICOM image) in the upload")
    chosen: list[Series] = []
    for index, name in enumerate(channels):
        want = None
        if mapping:
            want = mapping.get(str(index), mapping.get(name))
            if want is None:
                raise DicomInputError("unprocessable", f"the channel mapping names no series for channel {index} "
                                                       f"({name}); it has keys {sorted(mapping)}")
            hits = [s for s in series if want in (s.uid, s.description, s.modality)]
            if not hits:
                hits = [s for s in series if _normalise(want) and _normalise(want) == _normalise(s.description)]
        elif len(series) == 1 and len(channels) == 1:
            hits = list(series)
        else:
            key = _normalise(name)
            hits = [s for s in series if key and key == _normalise(s.description)]
            hits = hits or [s for s in series
                            if key and key in {_normalise(w) for w in s.description.replace("_", " ").split()}]
            hits = hits or [s for s in series if key and key == _normalise(s.modality)]
        if len(hits) != 1:
            found = "; ".join(s.label() for s in series)
            how = f"the mapping's {want!r}" if want is not None else f"channel name {name!r}"
            raise DicomInputError("unprocessable",
                                  f"{'no' if not hits else len(hits)} DICOM series match {how} for channel {index}; the "
                                  f"upload holds: {found}. Name the series per channel (option 'series')")
        if hits[0] in chosen:
            raise DicomInputError("unprocessable", f"{hits[0].label()} matches two channels")
        chosen.append(hits[0])
    return chosen


def _float_list(value, n: int, what: str, where: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != n or not np.all(np.isfinite(out)):
        raise DicomInputError("invalid", f"{where}: {what} is missing or malformed ({value!r})")
    return out


def _frame_attr(ds: Dataset, k: int, seq: str, attr: str):
    """A functional-group attribute of frame ``k``: per-frame first, then shared."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(group)
        if not groups:
            continue
        item = groups[k] if group.startswith("Per") else groups[0]
        inner = item.get(seq)
        if inner and attr in inner[0]:
            return inner[0][attr].value
    return None


@dataclass
class _Plane:
    position: list[float]
    orientation: list[float]
    pixel_spacing: list[float]
    slope: float
    intercept: float


def _planes(s: Series) -> list[_Plane]:
    out = []
    if s.multiframe:
        ds = s.first
        for k in range(int(ds.NumberOfFrames)):
            where = f"{s.label()} frame {k + 1}"
            pos = _float_list(_frame_attr(ds, k, "PlanePositionSequence", "ImagePositionPatient"), 3,
                              "ImagePositionPatient", where)
            ori = _float_list(_frame_attr(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"), 6,
                              "ImageOrientationPatient", where)
            sp = _float_list(_frame_attr(ds, k, "PixelMeasuresSequence", "PixelSpacing"), 2, "PixelSpacing", where)
            slope = _frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = _frame_attr(ds, k, "PixelValueTransformationSequence", "RescaleIntercept")
            out.append(_Plane(pos, ori, sp, float(slope if slope is not None else 1), float(icpt or 0)))
        return out
    for h, f in zip(s.headers, s.files):
        where = f"{s.label()} file {f.name}"
        out.append(_Plane(_float_list(h.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
                          _float_list(h.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
                          _float_list(h.get("PixelSpacing"), 2, "PixelSpacing", where),
                          float(h.get("RescaleSlope", 1) or 1), float(h.get("RescaleIntercept", 0) or 0)))
    return out


def series_geometry(s: Series) -> tuple[Geometry, list[int], list[_Plane]]:
    """The volume geometry and the slice order (indices into headers, or frames) along the normal."""
    planes = _planes(s)
    ori = np.array(planes[0].orientation)
    for p in planes[1:]:
        if not np.allclose(p.orientation, ori, atol=1e-4):
            raise DicomInputError("unprocessable", f"{s.label()}: slices have different orientations (a localizer "
                                                   "or a reformatted stack mixed in)")
        if not np.allclose(p.pixel_spacing, planes[0].pixel_spacing, rtol=1e-4):
            raise DicomInputError("unprocessable", f"{s.label()}: slices have different pixel spacings")
    row, col = ori[:3], ori[3:]
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomInputError("invalid", f"{s.label()}: ImageOrientationPatient is not two orthonormal directions")
    dist = np.array([float(np.dot(p.position, normal)) for p in planes])
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    d = dist[order]
    if len(d) > 1:
        steps = np.diff(d)
        if np.any(steps < _POSITION_TOLERANCE):
            raise DicomInputError("unprocessable", f"{s.label()}: two slices at the same position (duplicates, or "
                                                   "several stacks in one series)")
        if np.max(steps) - np.min(steps) > max(_POSITION_TOLERANCE, 0.01 * np.median(steps)):
            raise DicomInputError("unprocessable", f"{s.label()}: slice spacing varies from {np.min(steps):.3f} "
                                                   f"to {np.max(steps):.3f} mm (missing slices?)")
        z = float(np.mean(steps))
    else:
        z = float(s.first.get("SpacingBetweenSlices", s.first.get("SliceThickness", 1.0)) or 1.0)
    row_spacing, col_spacing = planes[0].pixel_spacing
    direction = np.stack([row, col, normal], axis=1)  # columns: index axes x, y, z
    geometry = Geometry(spacing=(z, float(row_spacing), float(col_spacing)),
                        origin=tuple(float(v) for v in planes[order[0]].position),
                        direction=tuple(float(v) for v in direction.ravel()))
    return geometry, order, planes


def read_volume(s: Series) -> DicomVolume:
    """Decode one series' pixels (after its headers passed) into a (z, y, x) float32 volume."""
    geometry, order, planes = series_geometry(s)
    try:
        if s.multiframe:
            ds = pydicom.dcmread(s.files[0])
            frames = ds.pixel_array
            frames = frames[None] if frames.ndim == 2 else frames
            array = np.stack([frames[k].astype(np.float32) * planes[k].slope + planes[k].intercept for k in order])
            return DicomVolume(s, array, geometry, [ds], order)
        datasets = [pydicom.dcmread(s.files[i]) for i in order]
        array = np.stack([ds.pixel_array.astype(np.float32) * planes[i].slope + planes[i].intercept
                          for ds, i in zip(datasets, order)])
    except DicomInputError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken pixel data
        raise DicomInputError("invalid", f"{s.label()}: the pixel data cannot be decoded ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not np.all(np.isfinite(array)):
        raise DicomInputError("invalid", f"{s.label()}: pixel values are not finite")
    return DicomVolume(s, array, geometry, datasets, None)


def read_dicom_input(folder: Path, channel_names: Mapping[int, str], limits: DicomLimits = DicomLimits(),
                     mapping: Optional[Mapping[str, str]] = None) -> DicomStudyInput:
    """The model's input from the DICOM files under ``folder``: headers, mapping, then pixels."""
    series, ignored = read_headers(folder, limits)
    chosen = map_series_to_channels(series, channel_names, mapping)
    total = sum(int(s.first.Rows) * int(s.first.Columns) * s.num_frames for s in chosen)
    if total > limits.max_voxels * len(chosen):
        raise DicomInputError("too_large", f"the chosen series hold {total} voxels, over the limit")
    volumes = [read_volume(s) for s in chosen]
    ref = volumes[0]
    for c, v in enumerate(volumes[1:], start=1):
        if v.array.shape != ref.array.shape or not np.allclose(v.geometry.origin, ref.geometry.origin, atol=1e-3) \
                or not np.allclose(v.geometry.spacing, ref.geometry.spacing, rtol=1e-4) \
                or not np.allclose(v.geometry.direction, ref.geometry.direction, atol=1e-4):
            raise DicomInputError("unprocessable", f"channel {c} ({v.series.label()}) does not share the grid of "
                                                   f"channel 0 ({ref.series.label()}): shape {v.array.shape} vs "
                                                   f"{ref.array.shape}; register the series first")
    data = np.stack([v.array for v in volumes]).astype(np.float32, copy=False)
    return DicomStudyInput(data, ref.geometry, volumes, ignored)


def patient_and_study(ds: Dataset) -> dict:
    """The identifiers a report carries, from a source header."""
    return {
        "patient_id": str(ds.get("PatientID", "") or ""),
        "patient_name": str(ds.get("PatientName", "") or ""),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "accession_number": str(ds.get("AccessionNumber", "") or ""),
        "study_date": str(ds.get("StudyDate", "") or ""),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
    }
