"""Requests the service must refuse, each with the HTTP status and a piece of the message.

Made from a good single-channel case of the test dataset; the limits they rely on are
:data:`LIMITS` (the service under test is started with the same values).
"""

from __future__ import annotations

import gzip
import io
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 2_000_000
MAX_REQUEST_BYTES = 3_000_000
LIMITS = {"KUBESEG_MAX_VOXELS": str(MAX_VOXELS), "KUBESEG_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}


def grid_stages():
    """A model's configurations for decode() without a model: the test bundles' 1 mm-ish 3d_fullres
    and a coarser cascade first stage (the service under test uses its own model's plans)."""
    from kubeseg.input_budget import GridStage

    return [GridStage("3d_fullres", (0, 1, 2), (1.0, 1.0, 1.0), 1, 4),
            GridStage("3d_lowres", (0, 1, 2), (2.0, 2.0, 2.0), 1, 4)]


@dataclass
class BadRequest:
    kind: str
    files: list[tuple[str, bytes]]
    status: int
    message: str  # a piece of the error message (case-insensitive)
    fields: dict = field(default_factory=dict)


def _nifti_bytes(array: np.ndarray, spacing=(1.0, 1.0, 1.0), gz: bool = True) -> bytes:
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def _sitk_bytes(image: sitk.Image, suffix: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"x{suffix}"
        sitk.WriteImage(image, str(p))
        return p.read_bytes()


def dicom_zip(image: sitk.Image, series: int = 1) -> bytes:
    """A zip of DICOM slices; ``series`` > 1 writes the volume again under new series UIDs."""
    import tempfile

    buf = io.BytesIO()
    img = sitk.Cast(sitk.RescaleIntensity(image, -1000, 1000), sitk.sitkInt16)
    with tempfile.TemporaryDirectory() as d, zipfile.ZipFile(buf, "w") as zf:
        for s in range(series):
            uid = f"1.2.826.0.1.3680043.2.1125.{7 + s}"
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            for z in range(img.GetDepth()):
                sl = img[:, :, z]
                sl.SetMetaData("0020|000e", uid)  # series instance UID
                sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")  # study
                sl.SetMetaData("0008|0018", f"{uid}.{z + 1}")  # SOP instance UID
                sl.SetMetaData("0020|0013", str(z + 1))
                sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
                sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
                sl.SetMetaData("0018|0050", str(img.GetSpacing()[2]))
                sl.SetMetaData("0008|0060", "CT")
                p = Path(d) / f"s{s}_{z:03d}.dcm"
                writer.SetFileName(str(p))
                writer.Execute(sl)
                zf.write(p, f"series{s}/slice{z:03d}.dcm")
    return buf.getvalue()


def raw_nifti(shape=(16, 16, 16), pixdim=(1.0, 1.0, 1.0), units: str | None = None, magic: bytes = b"n+1",
              payload: bytes | None = None, gz: bool = True) -> bytes:
    """A NIfTI-1 file written byte by byte: the header says what the test wants, whatever the data."""
    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(np.int16)
    h["magic"], h["vox_offset"] = magic, 352
    h["pixdim"][1:4] = pixdim
    h["qform_code"], h["sform_code"] = 1, 1
    h["srow_x"], h["srow_y"], h["srow_z"] = [pixdim[0], 0, 0, 0], [0, pixdim[1], 0, 0], [0, 0, pixdim[2], 0]
    if units:
        h.set_xyzt_units(units, "sec")
    rng = np.random.default_rng(0)
    data = payload if payload is not None else rng.integers(0, 500, int(np.prod(shape)), dtype=np.int16).tobytes()
    raw = h.binaryblock + b"\0" * 4 + data
    return gzip.compress(raw, 1) if gz else raw


def _meta(data_file: str, extra: str = "", key: str = "ElementDataFile") -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = 24 24 12\nElementType = MET_SHORT\n"
            f"ElementSpacing = 1 1 1\n{extra}{key} = {data_file}\n").encode()


def _nrrd(field: str, sizes: str = "24 24 12", data: bytes = b"") -> bytes:
    return (f"NRRD0004\ntype: short\ndimension: 3\nsizes: {sizes}\nencoding: raw\nendian: little\n"
            f"{field}\n").encode() + data


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def hostile_requests(good: bytes) -> list[BadRequest]:
    """Headers that point at other files, lying sizes, bombs, absurd geometry (issue 12).

    ``good`` is a good single-channel .nii.gz. Every one must be refused before its voxels (or
    a file it points to) are read, with a status and the file's name.
    """
    link = zipfile.ZipInfo("scan.nii.gz")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    inner_zip = _zip([("case_0000.nii.gz", good)])
    mhd = _meta("LOCAL").replace(b"ElementDataFile = LOCAL\n", b"ElementDataFile = scan.raw\n")
    z, y, x = 12, 24, 24
    return [
        BadRequest("400 mm spacing (resampled grid of 10^11 voxels)",
                   [("giant.nii.gz", raw_nifti(pixdim=(400.0, 400.0, 400.0)))], 413, "resamples to"),
        BadRequest("spacing in metres", [("metres.nii.gz", raw_nifti(pixdim=(1.0, 1.0, 1.0), units="meter"))], 413,
                   "resamples to"),
        BadRequest("spacing in micrometres (1 um per voxel: no voxels left after resampling)",
                   [("microns.nii.gz", raw_nifti(pixdim=(1.0, 1.0, 1.0), units="micron"))], 422,
                   "no voxels along an axis"),
        BadRequest("spacing 1e30 mm", [("overflow.nii.gz", raw_nifti(pixdim=(1e30, 1.0, 1.0)))], 413, "resamples to"),
        BadRequest("micrometre spacing (no voxels after resampling)",
                   [("tiny.nii.gz", raw_nifti(pixdim=(1e-6, 1e-6, 1e-6)))], 422, "no voxels along an axis"),
        BadRequest("negative spacing", [("negative.nii.gz", raw_nifti(pixdim=(-2.0, 1.0, 1.0)))], 422,
                   "not positive"),
        BadRequest("MetaImage ElementDataFile = /etc/passwd", [("scan.mhd", _meta("/etc/passwd"))], 422,
                   "ElementDataFile"),
        BadRequest("MetaImage ElementDataFile=../x.raw", [("scan.mha", _meta("../x.raw").replace(b" = ../", b"=../"))],
                   422, "ElementDataFile"),
        BadRequest("MetaImage ElementDataFile = LIST", [("list.mhd", _meta("LIST") + b"/etc/passwd\n/etc/hosts\n")],
                   422, "ElementDataFile"),
        BadRequest("MetaImage file pattern", [("pattern.mhd", _meta("/proc/self/fd/%d 0 9 1"))], 422,
                   "ElementDataFile"),
        BadRequest("MetaImage 'element data file' spelling",
                   [("spaced.mha", _meta("/etc/passwd", key="Element Data File"))], 422, "ElementDataFile"),
        BadRequest("MetaImage lying CompressedDataSize",
                   [("lying.mha", _meta("LOCAL", "CompressedData = True\nCompressedDataSize = 999999999999\n")
                     + b"x\x9c" + b"\0" * 64)], 422, "CompressedDataSize"),
        BadRequest("detached NRRD (data file: /proc/self/environ)",
                   [("detached.nrrd", _nrrd("data file: /proc/self/environ") + b"\n")], 422, "detached NRRD"),
        BadRequest("detached NRRD (datafile: LIST)",
                   [("list.nhdr", _nrrd("DataFile: LIST") + b"\n/etc/passwd\n")], 422, "detached NRRD"),
        BadRequest("NRRD with huge sizes and tiny data",
                   [("huge.nrrd", _nrrd("", sizes="100000 100000 100000", data=b"\0" * 64))], 413, "exceed the limit"),
        BadRequest("NIfTI header-only file (ni1, data in a .img)", [("pair.nii", raw_nifti(magic=b"ni1", payload=b"",
                                                                                       gz=False))], 422, "header-only"),
        BadRequest("a .hdr upload", [("scan.hdr", raw_nifti(gz=False))], 422, "header-only"),
        BadRequest("gzip'd NIfTI pair header", [("pair.nii.gz", raw_nifti(magic=b"ni1", payload=b""))], 422,
                   "header-only"),
        BadRequest("Analyze 7.5 header", [("analyze.nii", raw_nifti(magic=b"\0\0\0", payload=b"", gz=False))], 422,
                   "Analyze"),
        BadRequest("HDF5 file", [("scan.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 2000)], 422, "HDF5"),
        BadRequest("gzip bomb (.nii.gz inflating far past its header)",
                   [("bomb.nii.gz", raw_nifti(payload=b"\0" * (16 ** 3 * 2) + b"\0" * (48 << 20)))], 413, "inflates"),
        BadRequest("zip bomb (one entry, 1000x)", [("bomb.zip", _zip([("case_0000.nii", b"\0" * (40 << 20))],
                                                                     zipfile.ZIP_DEFLATED))], 413, "zip bomb"),
        BadRequest("zip with too many entries", [("many.zip", _zip([(f"f{i}.dcm", b"") for i in range(4100)]))], 413,
                   "entries"),
        BadRequest("nested zip", [("nested.zip", _zip([("inner.zip", inner_zip)]))], 422, "nested"),
        BadRequest("symlink in zip", [("link.zip", _zip([(link, b"/etc/passwd")]))], 400, "symbolic link"),
        BadRequest("MetaImage .mhd/.raw pair in a zip", [("pair.zip", _zip([("scan.mhd", mhd),
                                                                            ("scan.raw", b"\0" * (z * y * x * 2))]))],
                   422, "ElementDataFile"),
    ]


def bad_requests(good_case: Path) -> list[BadRequest]:
    """At least twelve kinds of bad request, each from the good case ``good_case`` (.nii.gz)."""
    good = good_case.read_bytes()
    image = sitk.ReadImage(str(good_case))
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # z, y, x
    xyz = np.ascontiguousarray(array.transpose(2, 1, 0))
    nan = xyz.copy()
    nan[1, 1, 1] = np.nan
    inf = xyz.copy()
    inf[2, 2, 2] = np.inf
    raw = gzip.decompress(good)
    big = nib.Nifti1Header()  # the header claims 10^9 voxels; a few bytes of data follow
    big.set_data_shape((1000, 1000, 1000))
    big.set_data_dtype(np.int16)
    big["magic"], big["vox_offset"] = b"n+1", 352
    zero = nib.Nifti1Header()
    zero.set_data_shape((0, 24, 24))
    zero.set_data_dtype(np.int16)
    zero["magic"], zero["vox_offset"] = b"n+1", 352
    zero_sized = zero.binaryblock + b"\0" * 4
    huge = big.binaryblock + b"\0" * 4 + b"\0" * 4096
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as zf:
        zf.writestr("../../etc/evil.nii.gz", good)
    empty_zip = io.BytesIO()
    with zipfile.ZipFile(empty_zip, "w") as zf:
        zf.writestr("readme.txt", "no images here")
    rgb = sitk.Compose([image, image, image])
    return [
        BadRequest("not an image", [("notes.txt", b"patient notes, not an image\n" * 20)], 415, "not an image file"),
        BadRequest("empty file", [("empty.nii.gz", b"")], 400, "empty"),
        BadRequest("corrupt gzip", [("broken.nii.gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)], 400, "corrupt"),
        BadRequest("truncated NIfTI (gz)", [("cut.nii.gz", good[: len(good) // 2])], 422, "truncated"),
        BadRequest("truncated NIfTI", [("cut.nii", raw[: len(raw) - 4000])], 422, "truncated"),
        BadRequest("2D image", [("slice.nii.gz", _nifti_bytes(xyz[:, :, 5]))], 422, "2D image"),
        BadRequest("4D image", [("series.nii.gz", _nifti_bytes(np.stack([xyz, xyz], -1)))], 422, "4D image"),
        BadRequest("RGB image", [("rgb.mha", _sitk_bytes(rgb, ".mha"))], 422, "components per voxel"),
        BadRequest("wrong channel count", [("a.nii.gz", good), ("b.nii.gz", good)], 422, "needs 1 channel"),
        BadRequest("NaN voxels", [("nan.nii.gz", _nifti_bytes(nan))], 422, "NaN"),
        BadRequest("infinite voxels", [("inf.nii.gz", _nifti_bytes(inf))], 422, "infinite"),
        BadRequest("one-voxel-thin image", [("thin.nii.gz", _nifti_bytes(xyz[:, :, :1]))], 422, "below the minimum"),
        BadRequest("zero-sized image", [("zero.nii", zero_sized)], 400, "zero size"),
        BadRequest("absurdly large image", [("huge.nii", huge)], 413, "exceed the limit"),
        BadRequest("request body too large", [("big.nii.gz", b"\x1f\x8b" + b"0" * (MAX_REQUEST_BYTES + 10))], 413,
                   "exceed"),
        BadRequest("DICOM zip with two series", [("study.zip", dicom_zip(image, series=2))], 422, "2 DICOM series"),
        BadRequest("zip with path traversal", [("evil.zip", traversal.getvalue())], 400, "path traversal"),
        BadRequest("zip without images", [("nothing.zip", empty_zip.getvalue())], 422, "no DICOM series"),
        *hostile_requests(good),
        BadRequest("unknown fold", [("ok.nii.gz", good)], 400, "not in model", {"folds": "7"}),
    ]
