"""Headers that point at other files are refused before ITK opens them (kubeseg.image_guard), in the
engine's one reader, so training data, ``kubeseg predict`` and the service all refuse them."""
from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.image_guard import (UnsafeImageError, bounded_gzip_size, check_gzip_nifti_expansion, check_image_file,
                                 nifti_declared_bytes)
from kubeseg.imageio import read_sitk
from kubeseg.nifti_integrity import check_nifti

from tests.services.bad_inputs import raw_nifti


@pytest.fixture
def image() -> sitk.Image:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.integers(0, 100, (6, 8, 10)).astype(np.int16))
    img.SetSpacing((0.8, 0.9, 2.5))
    return img


def _header(data_file: str, key: str = "ElementDataFile", extra: str = "") -> str:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = 10 8 6\nElementType = MET_SHORT\n"
            f"ElementSpacing = 0.8 0.9 2.5\n{extra}{key} = {data_file}\n")


@pytest.mark.parametrize("suffix, options", [(".nii", {}), (".nii.gz", {}), (".nrrd", {}), (".nrrd", {"gz": 1}),
                                             (".mha", {}), (".mha", {"gz": 1})])
def test_self_contained_files_pass_and_read(tmp_path, image, suffix, options):
    f = tmp_path / f"ok{suffix}"
    sitk.WriteImage(image, str(f), useCompression=bool(options))
    assert check_image_file(f) in ("nifti", "nifti_gz", "nrrd", "metaimage")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_sitk(f)), sitk.GetArrayFromImage(image))


def test_itk_would_follow_an_external_file_and_read_sitk_refuses(tmp_path, image):
    """The threat is real: ITK reads a file named by the header; kubeseg's reader refuses first."""
    secret = tmp_path / "elsewhere" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(sitk.GetArrayFromImage(image).tobytes())
    header = tmp_path / "upload" / "scan.mha"
    header.parent.mkdir()
    header.write_text(_header(str(secret)))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(header))).sum() == sitk.GetArrayFromImage(image).sum()
    with pytest.raises(UnsafeImageError, match=r"scan\.mha.*ElementDataFile"):
        read_sitk(header)


@pytest.mark.parametrize("text", [
    _header("/etc/passwd"),
    _header("../x.raw").replace(" = ../", "=../"),
    _header("x.raw"),
    _header("LIST") + "a.raw\nb.raw\n",
    _header("slice%03d.raw 1 10 1"),
    _header("/etc/passwd", key="Element Data File"),
    _header("/etc/passwd", key="elementdatafile"),
    _header("LOCAL", key="Element_Data_File") + "ElementDataFile = /etc/passwd\n",
    "\ufeff  " + _header("/etc/passwd").replace("\n", "\r\n").replace(" = ", "\t=\t"),
    _header("LOCAL", extra="HeaderSize = -1\n"),
    _header("LOCAL", extra="Comment = " + "x" * 70000 + "\n"),
])
def test_metaimage_headers_that_reference_other_files(tmp_path, text):
    f = tmp_path / "scan.mha"
    f.write_bytes(text.encode("utf-8"))
    with pytest.raises(UnsafeImageError) as e:
        check_image_file(f, "scan.mha")
    assert str(e.value).startswith("scan.mha: ")


def test_metaimage_lying_compressed_size(tmp_path, image):
    f = tmp_path / "ok.mha"
    sitk.WriteImage(image, str(f), useCompression=True)
    check_image_file(f)  # ITK's own compressed file: its CompressedDataSize is true
    text = f.read_bytes()
    head, _, data = text.partition(b"ElementDataFile = LOCAL\n")
    lying = tmp_path / "lying.mha"
    import re
    lying.write_bytes(re.sub(rb"CompressedDataSize = \d+", b"CompressedDataSize = 99999999999", head)
                      + b"ElementDataFile = LOCAL\n" + data)
    with pytest.raises(UnsafeImageError, match="CompressedDataSize"):
        read_sitk(lying)


@pytest.mark.parametrize("field", ["data file: /proc/self/environ", "datafile: ../x.raw", "Data File: LIST",
                                   "data file: slice%03d.raw 1 10 1 2", "  data  file :x.raw", "DATAFILE:x.raw"])
def test_detached_nrrd(tmp_path, field):
    f = tmp_path / "scan.nrrd"
    f.write_text(f"NRRD0005\ntype: short\ndimension: 3\nsizes: 10 8 6\nencoding: raw\n{field}\n\n")
    with pytest.raises(UnsafeImageError, match="detached NRRD"):
        read_sitk(f)


def test_pairs_and_formats_that_read_a_second_file(tmp_path):
    cases = {
        "pair.nii": raw_nifti(magic=b"ni1", payload=b"", gz=False),  # content decides, not the name
        "pair.nii.gz": raw_nifti(magic=b"ni1", payload=b""),
        "analyze.nii": raw_nifti(magic=b"\0\0\0", payload=b"", gz=False),
        "scan.hdr": raw_nifti(gz=False),
        "scan.img": b"\0" * 1000,
        "scan.spr": b"numDim: 3\ndim: 10 8 6\ndataType: WORD\n",
        "other.dat": b"numDim: 3\nfidName: /etc/passwd\n",
        "scan.h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 100,
        "userblock.bin": b"\0" * 512 + b"\x89HDF\r\n\x1a\n" + b"\0" * 100,
        "2dseq": b"\0" * 100,
    }
    for name, data in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(UnsafeImageError) as e:
            read_sitk(f)
        assert str(f) in str(e.value), name


def test_gzip_bomb_is_measured_with_a_cap(tmp_path):
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(raw_nifti(payload=b"\0" * (16 ** 3 * 2) + b"\0" * (200 << 20)))  # 200 MiB in ~200 KB
    assert bomb.stat().st_size < 1 << 20
    started = time.perf_counter()
    with pytest.raises(UnsafeImageError, match="inflates to more than the 8544 bytes"):
        check_gzip_nifti_expansion(bomb, "bomb.nii.gz")
    assert time.perf_counter() - started < 1.0
    assert bounded_gzip_size(bomb, 4096) == 4097
    ok = tmp_path / "ok.nii.gz"
    ok.write_bytes(raw_nifti())
    check_gzip_nifti_expansion(ok)
    assert nifti_declared_bytes(gzip.decompress(ok.read_bytes())[:352]) == 352 + 16 ** 3 * 2
    # the integrity check reads at most what the header declares (a lying gzip trailer costs nothing)
    started = time.perf_counter()
    assert check_nifti(bomb)[0] is None
    assert time.perf_counter() - started < 1.0
