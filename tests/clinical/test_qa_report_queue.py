"""QA flags and their thresholds, Dice/HD95, the FHIR Bundle parsed back, the bounded review queue."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kubeseg.clinical.fhir_report import ReportAttachment, ReportInput, build_report
from kubeseg.clinical.qa import QASettings, dice, hd95, label_volume_ranges, qa_flags, reference_metrics
from services.review_queue import ReviewQueue

RANGES = {"liver": {"min": 20.0, "max": 30.0, "cases": 3, "present_in": 3},
          "lesion": {"min": 1.0, "max": 2.0, "cases": 3, "present_in": 2}}


def _flags(report):
    return sorted((f.flag, f.label) for f in report.flags)


def test_each_flag_fires_and_only_then():
    clean = qa_flags({"liver": 25.0, "lesion": 0.0}, 0.95, {"liver": 0.95}, {"intensity": False}, {}, RANGES)
    assert not clean.flagged  # lesion absent is fine: it was not in every training case
    bad = qa_flags({"liver": 0.0, "lesion": 5.0}, 0.5, {"lesion": 0.5}, {"intensity": True}, {"intensity": 3.0},
                   RANGES, reference_metrics={"lesion": {"dice": 0.6, "hd95_mm": 20.0}})
    assert _flags(bad) == [("drift", "intensity"), ("high_hd95", "lesion"), ("label_missing", "liver"),
                           ("low_confidence", None), ("low_dice", "lesion"), ("volume_out_of_range", "lesion")]
    # thresholds are settable: a looser setting clears the same case of the reference flags
    loose = QASettings(min_confidence=0.4, min_dice=0.5, max_hd95_mm=25, volume_margin=2.0)
    again = qa_flags({"liver": 25.0, "lesion": 5.0}, 0.5, {}, None, None, RANGES, loose,
                     {"lesion": {"dice": 0.6, "hd95_mm": 20.0}})
    assert not again.flagged and "drift" in again.not_checked


def test_settings_from_env():
    s = QASettings.from_env({"KUBESEG_QA_MIN_DICE": "0.8", "KUBESEG_QA_MAX_HD95_MM": "10"})
    assert (s.min_dice, s.max_hd95_mm, s.min_confidence) == (0.8, 10.0, 0.8)
    with pytest.raises(ValueError, match="KUBESEG_QA_MIN_DICE"):
        QASettings.from_env({"KUBESEG_QA_MIN_DICE": "high"})


def test_dice_and_hd95_on_known_shapes():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 3, axis=0)  # shifted by 3 voxels along z, spacing 2 mm there
    assert dice(a, b) == pytest.approx(2 * 7 / 20)
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) == float("inf")
    m = reference_metrics(a.astype(int), b.astype(int), (2.0, 1.0, 1.0), {"background": 0, "x": 1})
    assert m["x"]["dice"] == pytest.approx(0.7)
    ranges = label_volume_ranges([(a.astype(int), (1, 1, 1)), (np.zeros_like(a, int), (1, 1, 1))], {"x": 1})
    assert ranges["x"] == {"min": 1.0, "median": 1.0, "max": 1.0, "cases": 2, "present_in": 1}


def test_region_volume_ranges_flag_a_region_model_prediction():
    """nnU-Net's region labels (lists of values): the training range of a region counts every voxel
    of its values, the way a prediction's region volume does, so a region model's QA checks volumes."""
    a = np.zeros((10, 10, 10), int)
    a[2:8, 2:8, 2:8] = 1  # 216 voxels of label 1
    a[4:6, 4:6, 4:6] = 2  # 8 of them are label 2
    regions = {"background": 0, "whole": [1, 2], "core": [2], "ignore": 3}
    ranges = label_volume_ranges([(a, (1, 1, 1)), (a, (2, 1, 1))], regions)
    assert set(ranges) == {"whole", "core"}  # no range for the background or the ignore label
    assert (ranges["whole"]["min"], ranges["whole"]["max"]) == (pytest.approx(0.216), pytest.approx(0.432))
    assert ranges["core"]["min"] == pytest.approx(0.008)
    flags = qa_flags({"whole": 5.0, "core": 0.01}, 0.9, {}, None, None, ranges).to_json()["flags"]
    assert [(f["flag"], f["label"]) for f in flags] == [("volume_out_of_range", "whole")]


def test_fhir_bundle_parses_back():
    from fhir.resources.R4B.bundle import Bundle

    qa = qa_flags({"liver": 10.0}, 0.6, {"liver": 0.6}, None, None, RANGES).to_json()
    ids = {"patient_id": "P-7", "patient_name": "Doe^Jane", "study_instance_uid": "1.2.3", "accession_number": "A9"}
    bundle = build_report(ReportInput(ids, {"name": "m", "version": "3"}, {"liver": 10.0}, 0.6, qa,
                                      seg_series_uid="1.2.3.9", seg_sop_instance_uid="1.2.3.9.1",
                                      source_series=[{"uid": "1.2.3.1", "modality": "CT", "number": "1"}],
                                      attachments=[ReportAttachment("application/dicom", "DICOM-SEG", b"seg")]))
    back = Bundle.model_validate_json(bundle.model_dump_json(exclude_none=True))
    kinds = [e.resource.get_resource_type() for e in back.entry]
    assert kinds[0] == "DiagnosticReport" and "ImagingStudy" in kinds
    report = back.entry[0].resource
    assert report.subject.identifier.value == "P-7"
    assert report.presentedForm[0].data == b"seg"  # fhir.resources decodes base64Binary
    by_url = {e.fullUrl: e.resource for e in back.entry}
    study = by_url[report.imagingStudy[0].reference]
    assert study.identifier[0].value == "urn:oid:1.2.3"
    assert {s.uid for s in study.series} == {"1.2.3.1", "1.2.3.9"}
    results = [by_url[r.reference] for r in report.result]
    volume = next(o for o in results if o.code.text == "Volume of liver")
    assert (volume.valueQuantity.value, volume.valueQuantity.system, volume.valueQuantity.code) == \
        (10.0, "http://unitsofmeasure.org", "mL")
    flags = {o.code.coding[0].code for o in results if o.code.coding and o.code.coding[0].system == "urn:kubeseg:qa-flag"}
    assert {"low_confidence", "volume_out_of_range", "confidence", "review-needed"} <= flags


def test_review_queue_is_bounded_and_persistent(tmp_path):
    q = ReviewQueue(tmp_path / "q", max_items=3)
    ids = [q.put({"case": i}) for i in range(5)]
    again = ReviewQueue(tmp_path / "q", max_items=3)
    assert [e["case"] for e in again.items()] == [2, 3, 4]
    assert [e["id"] for e in again.take(2)] == ids[2:4]
    assert [e["case"] for e in again.items()] == [4]
    (tmp_path / "q" / "queue.jsonl").open("a").write('{"broken": \n')  # a line cut by a crash
    q.put({"case": 5})
    assert [e["case"] for e in q.items()] == [4, 5]
    assert json.loads((tmp_path / "q" / "queue.jsonl").read_text().splitlines()[0])["case"] == 4


def test_hd95_takes_the_worse_direction():
    a = np.zeros((30, 30, 30), bool)
    a[10:20, 10:20, 10:20] = True
    b = a.copy()
    b[10:20, 10:20, 20:28] = True  # b grows 8 voxels beyond a on one side: a→b is 0, b→a is up to 8
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(hd95(b, a, (1, 1, 1)))
    assert hd95(a, b, (1, 1, 1)) > 4.0
