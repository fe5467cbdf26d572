"""Uploaded files → the model's input, or a :class:`BadInput` that says what is wrong.

Accepted: NIfTI (``.nii``, ``.nii.gz``), NRRD, MHA, one file per channel in the order of the
model's ``dataset.json`` ``channel_names`` (a zip may instead hold ``<case>_0000.nii.gz`` … files);
or DICOM: a zip of one or more series, or the DICOM files themselves, one series per channel
(mapped by :mod:`kubeseg.clinical.dicom_io`). The format is recognised from the bytes, not the name.

Everything that can be known before reading voxels is checked from the header first (dimension,
size, voxel count, the grid each of the model's configurations would resample it to), so an
absurdly large image is refused without allocating it. Headers that point at other files
(MetaImage ``ElementDataFile``, detached NRRD, .hdr/.img pairs) are refused before ITK opens
them (:mod:`kubeseg.image_guard`); a ``.nii.gz`` may not inflate beyond what its header declares,
and a zip may not expand beyond :attr:`Limits.max_expanded_bytes` (README, "Bounded work per request"). Reading then
goes through :func:`kubeseg.dataset_check.load_case`, the engine's one door for images: the
same checks (truncated or corrupt files, NaN/inf, channel geometry) as for training data.
"""

from __future__ import annotations

import gzip
import stat
import zipfile
import zlib
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from kubeseg.clinical.dicom_io import DicomInputError, DicomLimits, DicomStudyInput, read_dicom_input
from kubeseg.dataset import DatasetSpec, RawCase
from kubeseg.dataset_check import load_case
from kubeseg.errors import DatasetError
from kubeseg.image_guard import UnsafeImageError, check_gzip_nifti_expansion, check_image_file, looks_like_metaimage
from kubeseg.imageio import Geometry, itk_error_reason
from kubeseg.input_budget import DEFAULT_MAX_RESAMPLED_VOXELS, GridStage, InputRefused, check_resampled_grid

MAX_ZIP_ENTRIES = 4096
ZIP_EXPANSION_LIMIT = 4  # default expansion budget: this many times the request size limit
MAX_ZIP_RATIO = 200  # per entry: uncompressed / compressed (DICOM and CT NIfTI compress 2-20x; bombs ~1000x)


class BadInput(Exception):
    """A request the service refuses: an HTTP 4xx status and a message naming the problem."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class DecodedImage:
    """The model's input: ``data`` (C, z, y, x) float32, its geometry, and how to answer (format)."""

    data: np.ndarray
    geometry: Geometry
    ending: str  # file ending of the answer: the input's format (.nii.gz for DICOM input)
    source: str  # a short description for logs: file names and format
    dicom: Optional[DicomStudyInput] = None  # DICOM input: the source series (for DICOM-SEG and reports)


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for: input voxels, edge size, upload bytes, resampled voxels
    (any configuration), and bytes a zip may expand to (None: ``ZIP_EXPANSION_LIMIT`` x ``max_bytes``)."""

    max_voxels: int
    min_size: int
    max_bytes: int
    max_resampled_voxels: int = DEFAULT_MAX_RESAMPLED_VOXELS
    max_expanded_bytes: int | None = None

    @property
    def expansion_budget(self) -> int:
        return self.max_expanded_bytes if self.max_expanded_bytes is not None else self.max_bytes * ZIP_EXPANSION_LIMIT

    @classmethod
    def of(cls, settings) -> "Limits":
        """From :class:`services.settings.ServiceSettings`."""
        return cls(settings.max_voxels, settings.min_size, settings.max_request_bytes, settings.max_resampled_voxels,
                   settings.max_expanded_bytes)


def sniff(path: Path) -> str:
    """The format of a file from its first bytes: nifti, nifti_gz, nrrd, mha, zip, dicom, or unknown."""
    with open(path, "rb") as f:
        head = f.read(4096)  # a MetaImage header names its ElementDataFile within the first lines
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(348)
        except (OSError, EOFError, zlib.error):
            return "gzip_corrupt"
        return "nifti_gz" if _is_nifti(inner) else "gzip_other"
    if _is_nifti(head):
        return "nifti"
    if head.startswith(b"NRRD000"):
        return "nrrd"
    text = head.lstrip()
    if text.startswith((b"ObjectType", b"NDims")) and b"ElementDataFile" in head:
        return "mha"
    if looks_like_metaimage(text):
        return "mha"  # an unusual MetaImage header: the guard below judges it
    return "unknown"


def _is_nifti(header: bytes) -> bool:
    if len(header) < 348:
        return False
    size_le = int.from_bytes(header[:4], "little")
    size_be = int.from_bytes(header[:4], "big")
    return (size_le == 348 or size_be == 348) and header[344:347] in (b"n+1", b"ni1")  # ni1: refused by the guard


_ENDING = {"nifti": ".nii", "nifti_gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
_NAMES = {"nifti": "NIfTI", "nifti_gz": "NIfTI", "nrrd": "NRRD", "mha": "MetaImage (MHA)", "zip": "zip"}


def _unsupported(name: str, kind: str) -> BadInput:
    if kind == "gzip_corrupt":
        return BadInput(HTTPStatus.BAD_REQUEST, f"{name}: the gzip stream is corrupt or truncated")
    what = "a gzip file that holds no NIfTI image" if kind == "gzip_other" else "not an image file kubeseg reads"
    return BadInput(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"{name}: {what}; send NIfTI (.nii/.nii.gz), NRRD, MHA, or a zip of one DICOM series")


def _guard(path: Path, name: str) -> None:
    """Refuse headers that reference other files (before ITK opens them), and gzip bombs."""
    try:
        kind = check_image_file(path, name)
        if kind == "nifti_gz":
            check_gzip_nifti_expansion(path, name)
    except UnsafeImageError as e:
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if "inflates" in e.problem else HTTPStatus.UNPROCESSABLE_ENTITY
        raise BadInput(status, str(e)) from None


def check_grid(name: str, size_xyz, spacing_xyz, stages: Sequence[GridStage], limits: Limits) -> None:
    """The resampled-grid bound (:func:`kubeseg.input_budget.check_resampled_grid`) for a header's
    size and spacing in ITK order (x, y, z), as a :class:`BadInput` (413 over the limit, 422 for an
    unusable spacing). Every input format goes through it; DICOM readers call it from the first
    file's header."""
    try:
        check_resampled_grid(name, tuple(size_xyz)[::-1], tuple(spacing_xyz)[::-1], stages,
                             limits.max_resampled_voxels)
    except InputRefused as e:
        raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if e.too_large else HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"{e} (KUBESEG_MAX_RESAMPLED_VOXELS)" if e.too_large else str(e)) from None


def _check_header(path: Path, name: str, limits: Limits, stages: Sequence[GridStage] = ()) -> None:
    """Dimension, size, voxel count and the resampled grid from the header alone."""
    if path.name.endswith((".nii", ".nii.gz")):  # ITK only says "not recognized" for a zero dimension
        try:
            shape = nib.load(path).header.get_data_shape()
        except Exception:  # noqa: BLE001 - ITK's reader below reports what is wrong
            shape = None
        if shape is not None and any(int(s) == 0 for s in shape):
            raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: the image has zero size {tuple(int(s) for s in shape)}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise BadInput(HTTPStatus.BAD_REQUEST,
                       f"{name}: the header cannot be read ({itk_error_reason(e) or 'corrupt file'})") from None
    size = reader.GetSize()
    _check_size(size, reader.GetDimension(), name, limits)
    if reader.GetNumberOfComponents() != 1:
        raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"{name}: {reader.GetNumberOfComponents()} components per voxel (a vector or RGB image); "
                       "send one scalar image per channel")
    check_grid(name, size, reader.GetSpacing(), stages, limits)


def _check_size(size, dimension: int, name: str, limits: Limits) -> None:
    if dimension != 3:
        raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"{name}: a {dimension}D image (size {tuple(size)}); the model segments 3D volumes")
    if any(s == 0 for s in size):
        raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: the image has zero size {tuple(size)}")
    if any(s < limits.min_size for s in size):
        raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"{name}: size {tuple(size)} is below the minimum of {limits.min_size} voxels per axis")
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > limits.max_voxels:
        raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       f"{name}: {voxels} voxels (size {tuple(size)}) exceed the limit of {limits.max_voxels}")


def _safe_extract(zip_path: Path, name: str, dest: Path, limits: Limits) -> None:
    """Extract a zip within the expansion budget: no path traversal, links, encrypted entries or
    nested archives; at most ``MAX_ZIP_ENTRIES`` entries, ``MAX_ZIP_RATIO`` per entry, and
    ``limits.expansion_budget`` bytes in all, counted while writing (the sizes a zip declares may lie)."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: not a readable zip archive (corrupt or truncated)") from None
    budget = limits.expansion_budget
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{name}: {len(infos)} entries (limit {MAX_ZIP_ENTRIES})")
        total = 0
        for info in infos:
            p = PurePosixPath(info.filename.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]) or "\0" in info.filename:
                raise BadInput(HTTPStatus.BAD_REQUEST,
                               f"{name}: entry {info.filename!r} points outside the archive (path traversal)")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: entry {info.filename!r} is a symbolic link")
            if info.flag_bits & 0x1:
                raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: entry {info.filename!r} is encrypted")
            if info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1) and info.file_size > 1 << 20:
                raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{name}: entry {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}"
                               f"x (limit {MAX_ZIP_RATIO}x per entry; a zip bomb?)")
            total += info.file_size
        if total > budget:
            raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{name}: expands to {total} bytes, over the budget of {budget} (KUBESEG_MAX_EXPANDED_BYTES)")
        written = 0
        for info in infos:
            if info.is_dir():
                continue
            target = dest / PurePosixPath(info.filename.replace("\\", "/"))
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    entry = 0
                    while chunk := src.read(1 << 20):
                        entry += len(chunk)
                        written += len(chunk)
                        if entry > info.file_size or written > budget:
                            raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                           f"{name}: entry {info.filename!r} expands beyond the size the zip declares "
                                           f"or beyond the budget of {budget} bytes (KUBESEG_MAX_EXPANDED_BYTES)")
                        out.write(chunk)
            except BadInput:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
                    zlib.error) as e:
                raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: entry {info.filename!r} cannot be extracted ({e})") from None
            if sniff(target) in ("zip", "gzip_other"):
                raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY,
                               f"{name}: entry {info.filename!r} is itself an archive; nested archives are not opened")


_DICOM_STATUS = {"invalid": HTTPStatus.BAD_REQUEST, "unsupported": HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                 "too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "unprocessable": HTTPStatus.UNPROCESSABLE_ENTITY}


def _decode_dicom(folder: Path, name: str, spec: DatasetSpec, limits: Limits,
                  series_mapping: Optional[Mapping[str, str]], stages: Sequence[GridStage] = ()) -> DecodedImage:
    """DICOM series (one per channel) through :mod:`kubeseg.clinical.dicom_io`: headers first (size,
    frames, transfer syntax: the voxel count is bounded before pixels are decoded), then pixels;
    then the resampled-grid bound on the series' geometry, before any preprocessing."""
    try:
        study = read_dicom_input(folder, spec.channel_names, DicomLimits(limits.max_voxels, limits.min_size),
                                 series_mapping)
    except DicomInputError as e:
        raise BadInput(_DICOM_STATUS.get(e.kind, HTTPStatus.UNPROCESSABLE_ENTITY), f"{name}: {e.message}") from None
    check_grid(f"{name} (DICOM)", tuple(study.data.shape[-3:])[::-1], tuple(study.geometry.spacing)[::-1],
               stages, limits)
    source = ", ".join(f"{name} (DICOM series {v.series.uid})" for v in study.volumes)
    return DecodedImage(study.data, study.geometry, ".nii.gz", source, dicom=study)


def decode(uploads: Sequence[tuple[str, Path]], spec: DatasetSpec, limits: Limits, work_dir: Path,
           stages: Sequence[GridStage] = (), series_mapping: Optional[Mapping[str, str]] = None) -> DecodedImage:
    """Read uploaded ``(file name, path)`` pairs as one case for the model described by ``spec``;
    ``stages`` (:func:`kubeseg.input_budget.stages_of` the model's predictors) bound the resampled grid.

    ``series_mapping`` (DICOM only): channel → series UID, description or modality
    (:func:`kubeseg.clinical.dicom_io.map_series_to_channels`)."""
    if not uploads:
        raise BadInput(HTTPStatus.BAD_REQUEST, "no image file in the request (send the image as form field 'images')")
    channel_files: list[Path] = []
    names: list[str] = []
    ending = None
    for i, (name, path) in enumerate(uploads):
        name = name or f"file {i}"
        size = path.stat().st_size
        if size == 0:
            raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: the file is empty")
        if size > limits.max_bytes:
            raise BadInput(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{name}: {size} bytes exceed the limit of {limits.max_bytes}")
        kind = sniff(path)
        if kind != "zip":
            _guard(path, name)
        if kind == "zip":
            if len(uploads) > 1:
                raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: send a zip alone, not beside other files")
            extracted = work_dir / f"zip{i}"
            extracted.mkdir(parents=True)
            _safe_extract(path, name, extracted, limits)
            # image files zipped together, in channel order by name (_0000, _0001 ...); else DICOM
            for m in sorted(p for p in extracted.rglob("*") if p.is_file()):
                _guard(m, f"{name}:{m.relative_to(extracted)}")
            members = sorted(p for p in extracted.rglob("*") if p.is_file() and sniff(p) in _ENDING)
            if members:
                for m in members:
                    channel_files.append(_placed(m, sniff(m), work_dir, len(channel_files)))
                    names.append(f"{name}:{m.relative_to(extracted)}")
                ending = ending or _ENDING[sniff(members[0])]
                continue
            return _decode_dicom(extracted, name, spec, limits, series_mapping, stages)
        if kind == "dicom":  # loose DICOM files: all uploads together are the study
            if any(sniff(p) != "dicom" for _, p in uploads):
                raise BadInput(HTTPStatus.BAD_REQUEST, f"{name}: send DICOM files alone, not beside other formats")
            folder = work_dir / "dicom"
            folder.mkdir(parents=True, exist_ok=True)
            for j, (_, p) in enumerate(uploads):
                (folder / f"{j:05d}.dcm").symlink_to(p.resolve())
            return _decode_dicom(folder, f"{len(uploads)} DICOM file(s)", spec, limits, series_mapping, stages)
        if kind not in _ENDING:
            raise _unsupported(name, kind)
        channel_files.append(_placed(path, kind, work_dir, len(channel_files)))
        names.append(name)
        ending = ending or _ENDING[kind]
    if len(channel_files) != spec.num_channels:
        wanted = ", ".join(spec.channel_names[c] for c in sorted(spec.channel_names))
        raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY,
                       f"the model needs {spec.num_channels} channel(s) ({wanted}), one file each in this order; "
                       f"got {len(channel_files)}")
    for f, n in zip(channel_files, names):
        _check_header(f, n, limits, stages)
    try:
        loaded = load_case(RawCase("input", tuple(channel_files), None), spec, with_label=False)
    except DatasetError as e:
        by_file = {str(f): n for f, n in zip(channel_files, names)}
        lines = []
        for p in e.problems:
            msg = p.message
            for c, n in enumerate(names):
                msg = msg.replace(f"channel {c} image", f"channel {c} ({n})")
            lines.append(f"{by_file.get(p.file or '', 'input')}: {msg}")
        raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY, "; ".join(lines)) from None
    return DecodedImage(loaded.data, loaded.geometry, ending or ".nii.gz", ", ".join(names))


def _placed(path: Path, kind: str, work_dir: Path, index: int) -> Path:
    """The file under a name whose ending tells ITK its format (uploads arrive with any name)."""
    target = work_dir / f"channel_{index:04d}{_ENDING[kind]}"
    if path != target:
        target.symlink_to(path.resolve())
    return target
