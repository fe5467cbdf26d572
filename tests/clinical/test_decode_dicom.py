"""The service's DICOM branch (services/decode.py → kubeseg.clinical.dicom_io): loose files, several
series mapped by the ``series`` option, and header refusals as HTTP statuses naming the upload."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
import pytest

from kubeseg.dataset import DatasetSpec
from services.clinical import parse_series
from services.decode import BadInput, Limits, decode
from tests.clinical.helpers import study

TWO = DatasetSpec({0: "T2", 1: "ADC"}, {"background": 0, "lesion": 1}, 1, ".nii.gz")
ONE = DatasetSpec({0: "CT"}, {"background": 0, "organ": 1}, 1, ".nii.gz")
LIMITS = Limits(max_voxels=64 ** 3, min_size=2, max_bytes=50_000_000)


def _zip(folder, target):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.rglob("*.dcm")):
            zf.write(f, str(f.relative_to(folder)))
    target.write_bytes(buf.getvalue())
    return target


def test_loose_dicom_files_decode_with_their_sources(tmp_path):
    image, _, files = study(tmp_path / "ct")
    (tmp_path / "w").mkdir()
    got = decode([(f.name, f) for f in files], ONE, LIMITS, tmp_path / "w")
    np.testing.assert_array_equal(got.data[0], np.rint(image))
    assert got.dicom is not None and got.ending == ".nii.gz" and len(got.dicom.reference.source_datasets) == 12


def test_a_zip_of_two_series_maps_by_the_series_option(tmp_path):
    study(tmp_path / "s" / "a", description="axial t2 tse", modality="MR")
    study(tmp_path / "s" / "b", description="dwi adc", modality="MR", series_number=2)
    up = _zip(tmp_path / "s", tmp_path / "study.zip")
    (tmp_path / "w1").mkdir()
    got = decode([("study.zip", up)], TWO, LIMITS, tmp_path / "w1")  # by description words
    assert [v.series.description for v in got.dicom.volumes] == ["axial t2 tse", "dwi adc"]
    (tmp_path / "w2").mkdir()
    mapping = parse_series("0=dwi adc,1=axial t2 tse")
    got = decode([("study.zip", up)], TWO, LIMITS, tmp_path / "w2", series_mapping=mapping)
    assert [v.series.description for v in got.dicom.volumes] == ["dwi adc", "axial t2 tse"]


def test_header_over_the_limit_is_413_naming_the_upload(tmp_path):
    _, _, files = study(tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.Rows = ds.Columns = 4000  # the pixel data is not read: the header alone is refused
    ds.save_as(files[0])
    up = _zip(tmp_path / "s", tmp_path / "big.zip")
    (tmp_path / "w").mkdir()
    with pytest.raises(BadInput) as e:
        decode([("big.zip", up)], ONE, LIMITS, tmp_path / "w")
    assert int(e.value.status) == 413 and e.value.message.startswith("big.zip:")


def test_series_option_is_parsed_or_refused():
    assert parse_series('{"0": "T2"}') == {"0": "T2"}
    assert parse_series("") is None
    with pytest.raises(BadInput):
        parse_series("T2")
