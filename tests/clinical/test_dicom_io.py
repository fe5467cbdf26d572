"""DICOM in: geometry as SimpleITK reads it, enhanced multi-frame, several series per channel, and
refusals judged from headers before any pixel is decoded."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from kubeseg.clinical.dicom_io import DicomInputError, DicomLimits, read_dicom_input, read_headers
from kubeseg.imageio import Geometry
from tests.clinical.helpers import OBLIQUE, study


def test_single_frame_series_reads_like_simpleitk(tmp_path):
    image, _, files = study(tmp_path / "ct")
    got = read_dicom_input(tmp_path / "ct", {0: "CT"})
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "ct")))  # GDCM sorts by position
    ref = reader.Execute()
    np.testing.assert_array_equal(got.data[0], sitk.GetArrayFromImage(ref).astype(np.float32))
    assert got.geometry.spacing == pytest.approx(ref.GetSpacing()[::-1])
    assert got.geometry.origin == pytest.approx(ref.GetOrigin())
    assert got.geometry.direction == pytest.approx(ref.GetDirection(), abs=1e-6)
    np.testing.assert_array_equal(got.data[0], np.rint(image))


def test_enhanced_multiframe_equals_the_classic_series(tmp_path):
    study(tmp_path / "classic")
    study(tmp_path / "enhanced", multiframe=True)
    a = read_dicom_input(tmp_path / "classic", {0: "CT"})
    b = read_dicom_input(tmp_path / "enhanced", {0: "CT"})
    np.testing.assert_array_equal(a.data, b.data)
    assert a.geometry == b.geometry
    assert len(b.reference.source_datasets) == 1 and b.reference.frame_order == list(range(12))


def test_several_series_map_to_channels(tmp_path):
    study(tmp_path / "t2", description="T2 axial", modality="MR", series_number=1)
    study(tmp_path / "adc", description="ADC map", modality="MR", series_number=2)
    got = read_dicom_input(tmp_path, {0: "T2", 1: "ADC"})
    assert [v.series.description for v in got.volumes] == ["T2 axial", "ADC map"]
    # an explicit mapping by description wins over the names; an ambiguous one is refused with the list
    swapped = read_dicom_input(tmp_path, {0: "T2", 1: "ADC"}, mapping={"0": "ADC map", "1": "T2 axial"})
    assert [v.series.description for v in swapped.volumes] == ["ADC map", "T2 axial"]
    with pytest.raises(DicomInputError) as e:
        read_dicom_input(tmp_path, {0: "MR"})
    assert e.value.kind == "unprocessable" and "T2 axial" in e.value.message and "ADC map" in e.value.message


def test_channels_on_different_grids_are_refused(tmp_path):
    study(tmp_path / "a", description="T2")
    moved = Geometry(OBLIQUE.spacing, (0.0, 0.0, 0.0), OBLIQUE.direction)
    study(tmp_path / "b", description="ADC", geometry=moved, series_number=2)
    with pytest.raises(DicomInputError, match="does not share the grid"):
        read_dicom_input(tmp_path, {0: "T2", 1: "ADC"})


def _edit_first(folder, **changes):
    f = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    for k, v in changes.items():
        if k == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = v
        else:
            setattr(ds, k, v)
    ds.save_as(f)
    return f


@pytest.mark.parametrize("changes,kind,words", [
    ({"Rows": 60000, "Columns": 60000}, "too_large", "per side"),
    ({"NumberOfFrames": 10 ** 6}, "too_large", "exceed"),
    ({"SamplesPerPixel": 3}, "unprocessable", "colour"),
    ({"BitsAllocated": 1}, "unsupported", "bits"),
])
def test_header_checks_refuse_before_pixels(tmp_path, changes, kind, words):
    study(tmp_path / "s")
    _edit_first(tmp_path / "s", **changes)
    with pytest.raises(DicomInputError) as e:
        read_headers(tmp_path / "s", DicomLimits(max_voxels=64 ** 3))
    assert e.value.kind == kind and words in e.value.message


def test_compressed_syntax_is_refused_by_name(tmp_path):
    study(tmp_path / "s")
    f = sorted((tmp_path / "s").glob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline; the pixels are garbage for it
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg"])
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(DicomInputError) as e:
        read_dicom_input(tmp_path / "s", {0: "CT"})
    assert e.value.kind == "unsupported" and "1.2.840.10008.1.2.4.50" in e.value.message


def test_voxel_limit_counts_the_whole_series(tmp_path):
    study(tmp_path / "s")  # 12 x 32 x 32
    with pytest.raises(DicomInputError) as e:
        read_dicom_input(tmp_path / "s", {0: "CT"}, DicomLimits(max_voxels=32 * 32 * 11))
    assert e.value.kind == "too_large"


def test_missing_slice_is_refused(tmp_path):
    _, _, files = study(tmp_path / "s")
    files[5].unlink()
    with pytest.raises(DicomInputError, match="missing slices"):
        read_dicom_input(tmp_path / "s", {0: "CT"})
