"""DICOM-SEG: one segment per label with its coded concept, referencing the source, mapping back
voxel for voxel (our reader by plane position, and highdicom's by source instance); dciodvfy clean."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from kubeseg.clinical.dicom_io import read_dicom_input
from kubeseg.clinical.dicom_seg import read_segmentation, write_segmentation
from kubeseg.clinical.label_codes import default_label_code, default_label_codes, load_label_codes
from tests.clinical.helpers import study

LABELS = {"background": 0, "liver": 2, "lesion": 3, "left_kidney": 5}  # not consecutive on purpose


def _labelmap(label):
    lab = label.astype(np.int64) * 2
    lab[2:4, 3:6, 3:6] = 3
    lab[8, 20:25, 5:9] = 5
    return lab


@pytest.mark.parametrize("multiframe", [False, True])
def test_seg_maps_back_voxel_for_voxel(tmp_path, multiframe):
    _, label, _ = study(tmp_path / "ct", multiframe=multiframe)
    src = read_dicom_input(tmp_path / "ct", {0: "CT"})
    lab = _labelmap(label)
    path = write_segmentation(lab, src.reference, LABELS, default_label_codes(LABELS), tmp_path / "seg.dcm",
                              model_name="m", model_version="7")
    np.testing.assert_array_equal(read_segmentation(path, src.reference, LABELS), lab)
    seg = pydicom.dcmread(path)
    first = src.reference.source_datasets[0]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.PatientID == first.PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [segments[i].SegmentLabel for i in sorted(segments)] == ["liver", "lesion", "left_kidney"]
    liver = segments[1].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodeValue, liver.CodingSchemeDesignator) == ("10200004", "SCT")
    assert segments[2].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # abnormal structure


def test_highdicom_reads_it_by_source_instance(tmp_path):
    import highdicom as hd

    _, label, _ = study(tmp_path / "ct")
    src = read_dicom_input(tmp_path / "ct", {0: "CT"})
    lab = _labelmap(label)
    path = write_segmentation(lab, src.reference, LABELS, default_label_codes(LABELS), tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    uids = [ds.SOPInstanceUID for ds in src.reference.source_datasets]
    numbers = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    to_label = np.array([0, 2, 3, 5])
    np.testing.assert_array_equal(to_label[numbers], lab)


def test_label_codes_defaults_and_bundle_override(tmp_path):
    assert default_label_code("Spleen").type.value == "78961009"
    assert default_label_code("left_kidney").type.meaning == "Kidney"
    assert default_label_code("whatever_thing").type.meaning == "Tissue"
    (tmp_path / "label_codes.json").write_text(
        '{"liver": {"category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},'
        ' "type": {"value": "T-62000", "scheme": "SRT", "meaning": "Liver"}}}')
    codes = load_label_codes(tmp_path, LABELS)
    assert codes["liver"].type.scheme == "SRT" and codes["lesion"].type.value == "52988006"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
@pytest.mark.parametrize("multiframe", [False, True])
def test_dciodvfy_reports_no_errors(tmp_path, multiframe):
    _, label, _ = study(tmp_path / "ct", multiframe=multiframe)
    src = read_dicom_input(tmp_path / "ct", {0: "CT"})
    path = write_segmentation(_labelmap(label), src.reference, LABELS, default_label_codes(LABELS), tmp_path / "s.dcm")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Segmentation" in text  # it recognised the IOD it checked
    assert not [ln for ln in text.splitlines() if ln.startswith("Error")], text
