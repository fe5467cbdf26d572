"""Requests the service must refuse, each with the HTTP status and a piece of the message.

Made from a good single-channel case of the test dataset; the limits they rely on are
:data:`LIMITS` (the service under test is started with the same values).
"""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 2_000_000
MAX_REQUEST_BYTES = 3_000_000
LIMITS = {"KUBESEG_MAX_VOXELS": str(MAX_VOXELS), "KUBESEG_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}


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
        BadRequest("unknown fold", [("ok.nii.gz", good)], 400, "not in model", {"folds": "7"}),
    ]
