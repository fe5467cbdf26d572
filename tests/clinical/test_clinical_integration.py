"""Clinical paths end to end on a tiny trained bundle: ``kubeseg predict`` on a DICOM folder, the PACS
round trip through a real Orthanc (WADO-RS in, STOW-RS out, QIDO-RS finds the SEG), and the service's
DICOM-SEG and FHIR answers through ``bentoml serve``."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from kubeseg.clinical.dicom_io import read_dicom_input
from kubeseg.clinical.dicom_seg import read_segmentation
from kubeseg.clinical.synth_dicom import SeriesInfo, write_series
from kubeseg.imageio import read_image
from tests.clinical.orthanc import Orthanc, orthanc_available

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import torch

    from tests.pipelines.helpers import tiny_bundle

    root = tmp_path_factory.mktemp("clinical")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = tiny_bundle(root / "model")
    finally:
        torch.set_num_threads(threads)
    case = sorted((made["raw"] / "imagesTs").iterdir())[0]
    data, geometry = read_image([case])
    study = root / "study"
    write_series(data[0], geometry, study, SeriesInfo(patient_id="PAT-42", description="CT abdomen"))
    return {"root": root, "bundle": made["bundle"], "raw": made["raw"], "study": study,
            "labels": json.loads((made["bundle"] / "dataset.json").read_text())["labels"]}


def _check_outputs(folder: Path, study: Path, labels: dict) -> dict:
    from fhir.resources.R4B.bundle import Bundle

    src = read_dicom_input(study, {0: "CT"})
    seg = sitk.ReadImage(str(folder / "segmentation.nii.gz"))
    label_map = sitk.GetArrayFromImage(seg)
    assert np.allclose(seg.GetOrigin(), src.geometry.origin) and np.allclose(seg.GetSpacing(), src.geometry.spacing[::-1])
    np.testing.assert_array_equal(read_segmentation(folder / "segmentation.seg.dcm", src.reference, labels), label_map)
    summary = json.loads((folder / "summary.json").read_text())
    assert {"flagged", "flags", "per_label_confidence"} <= set(summary["qa"])
    bundle = Bundle.model_validate_json((folder / "report.fhir.json").read_text())
    report = bundle.entry[0].resource
    assert report.subject.identifier.value == "PAT-42"
    assert summary["input"]["study_instance_uid"] == src.reference.series.first.StudyInstanceUID
    return summary


def test_predict_on_a_dicom_folder_writes_seg_report_and_saliency(model, tmp_path):
    from kubeseg.cli import main

    out = tmp_path / "out"
    assert main(["predict", "-i", str(model["study"]), "-o", str(out), "-m", str(model["bundle"]),
                 "--device", "cpu", "--disable-tta", "--saliency"]) == 0
    summary = _check_outputs(out, model["study"], model["labels"])
    heat = sitk.ReadImage(str(out / "saliency.nii.gz"))
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert heat.GetSize() == seg.GetSize() and np.allclose(heat.GetOrigin(), seg.GetOrigin())
    assert np.allclose(heat.GetDirection(), seg.GetDirection())
    h = sitk.GetArrayFromImage(heat)
    assert 0 <= h.min() and h.max() == pytest.approx(1.0)
    assert summary["saliency"]["label"] in summary["qa"]["per_label_confidence"]
    assert (out / "saliency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(bool(orthanc_available()), reason=orthanc_available() or "")
def test_pacs_round_trip_with_orthanc(model, tmp_path):
    from kubeseg.cli import main
    from kubeseg.clinical.dicomweb import DicomWebClient

    study_uid = pydicom.dcmread(sorted(model["study"].glob("*.dcm"))[0]).StudyInstanceUID
    with Orthanc(tmp_path / "orthanc") as pacs:
        client = DicomWebClient(pacs.dicomweb)
        client.store(sorted(model["study"].glob("*.dcm")))
        out = tmp_path / "out"
        assert main(["pacs", "segment", "--url", pacs.dicomweb, "--study", study_uid, "-m", str(model["bundle"]),
                     "-o", str(out), "--device", "cpu", "--disable-tta"]) == 0
        _check_outputs(out, model["study"], model["labels"])
        series = client.search_series(study_uid)
        modalities = sorted(client.value(s, "00080060") for s in series)
        assert modalities == ["CT", "SEG"]
        seg_uid = next(client.value(s, "0020000E") for s in series if client.value(s, "00080060") == "SEG")
        assert seg_uid == json.loads((out / "summary.json").read_text())["dicom_seg"]["series_instance_uid"]
        fetched = client.retrieve_series(study_uid, seg_uid, tmp_path / "fetched")
        src = read_dicom_input(model["study"], {0: "CT"})
        back = read_segmentation(fetched[0], src.reference, model["labels"])
        np.testing.assert_array_equal(back, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz"))))


def test_service_answers_dicom_seg_and_a_fhir_report(model, tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    from tests.services.servers import bentoml_server

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(model["study"].glob("*.dcm")):
            zf.write(f, f"study/{f.name}")
    study_zip = buf.getvalue()
    queue = tmp_path / "queue"
    from services.auth import new_key

    key, key_line = new_key("clinical-test")
    # a bundle folder, not a registered version: signatures are the registry's (tests/services)
    env = {"KUBESEG_MODEL_BUNDLE": str(model["bundle"]), "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false",
           "KUBESEG_REVIEW_QUEUE_DIR": str(queue), "KUBESEG_QA_MIN_DICE": "0.99", "OMP_NUM_THREADS": "1",
           "KUBESEG_API_KEYS": key_line, "KUBESEG_MODEL_SIGNATURES": "disabled", "PYTHONPATH": str(Path.cwd())}
    with bentoml_server(tmp_path, env) as service:
        url = service.url
        files = [("images", ("study.zip", study_zip))]
        # the clinical endpoints are behind the service's authentication like every other door
        assert requests.post(f"{url}/segment_report", files=files, timeout=60).status_code == 401
        client = _Authorized(key)
        nifti = client.post(f"{url}/segment", files=files, timeout=300)
        assert nifti.status_code == 200, nifti.text[:300]
        r = client.post(f"{url}/segment", files=files, headers={"Accept": "application/dicom"}, timeout=300)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom"), r.text[:300]
        (tmp_path / "seg.dcm").write_bytes(r.content)
        (tmp_path / "seg.nii.gz").write_bytes(nifti.content)
        src = read_dicom_input(model["study"], {0: "CT"})
        np.testing.assert_array_equal(read_segmentation(tmp_path / "seg.dcm", src.reference, model["labels"]),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz"))))
        # a NIfTI input cannot be answered with DICOM-SEG: 406 names why
        case = sorted((model["raw"] / "imagesTr").iterdir())[0]
        r = client.post(f"{url}/segment", files=[("images", (case.name, case.read_bytes()))],
                          data={"output": "dicom-seg"}, timeout=300)
        assert r.status_code == 406 and "DICOM input" in r.text
        # FHIR report with a reference: Dice below the (raised) threshold flags the case for review
        reference = model["raw"] / "labelsTr" / case.name.replace("_0000", "")
        r = client.post(f"{url}/segment_report", files=[("images", (case.name, case.read_bytes())),
                                                          ("reference", (reference.name, reference.read_bytes()))],
                          timeout=300)
        assert r.status_code == 200, r.text[:300]
        bundle = Bundle.model_validate(r.json())
        codes = {e.resource.code.coding[0].code for e in bundle.entry[1:]
                 if e.resource.get_resource_type() == "Observation" and e.resource.code.coding}
        assert "low_dice" in codes and "review-needed" in codes
        r = client.post(f"{url}/segment_report", files=files, data={"saliency": "true"}, timeout=300)
        assert r.status_code == 200, r.text[:300]
        report = Bundle.model_validate(r.json()).entry[0].resource
        assert {a.contentType for a in report.presentedForm} == {"application/dicom", "application/gzip", "image/png"}
        assert report.subject.identifier.value == "PAT-42"
        metrics = client.get(f"{url}/metrics", timeout=10).text
        assert 'kubeseg_qa_flags_total{flag="low_dice"}' in metrics
    entries = [json.loads(line) for line in (queue / "queue.jsonl").read_text().splitlines()]
    assert any("low_dice" in {f["flag"] for f in e["qa"]["flags"]} for e in entries)


class _Authorized:
    """``requests`` with the service's API key on every call."""

    def __init__(self, key: str):
        self.headers = {"Authorization": f"Bearer {key}"}

    def post(self, url, headers=None, **kw):
        import requests as http
        return http.post(url, headers={**self.headers, **(headers or {})}, **kw)

    def get(self, url, headers=None, **kw):
        import requests as http
        return http.get(url, headers={**self.headers, **(headers or {})}, **kw)
