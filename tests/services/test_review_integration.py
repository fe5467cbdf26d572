"""Review feedback end to end with real parts: `bentoml serve` on a tiny bundle queues low-confidence
cases (NIfTI and DICOM input) with their files; a reviewer lists the queue (HTTP and `kubeseg review
queue`), fetches a case's image, segmentation and saliency, approves one, corrects one (geometry
kept), rejects one; hostile feedback gets its 4xx with nothing written; Prometheus counters move;
the feedback store is a real S3 server (moto), and its export merges into the raw dataset."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.services.servers import bentoml_server, http_get

pytestmark = pytest.mark.integration
pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import torch

    from services.auth import new_key
    from tests.pipelines.helpers import MotoS3, tiny_bundle

    root = tmp_path_factory.mktemp("review")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = tiny_bundle(root / "model", (1, 2, 1))
    finally:
        torch.set_num_threads(threads)
    key, line = new_key("reviewer")
    with MotoS3(root / "s3", bucket="kubeseg-feedback") as s3:
        env = {"KUBESEG_MODEL_BUNDLE": str(made["bundle"]), "KUBESEG_MODEL_SIGNATURES": "disabled",
               "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false", "KUBESEG_API_KEYS": line, "KUBESEG_AUTH": "",
               "KUBESEG_REVIEW_QUEUE_DIR": str(root / "queue"), "KUBESEG_REVIEW_CONFIDENCE_BELOW": "1.0",
               "KUBESEG_FEEDBACK_STORE": f"s3://{s3.bucket}/store", "KUBESEG_FEEDBACK_BATCH_SIZE": "2",
               "KUBESEG_FEEDBACK_MAX_BYTES": "200000", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd()),
               **s3.env}
        with bentoml_server(root, env) as service:
            yield {"root": root, "raw": made["raw"], "url": service.url, "key": key, "s3": s3, "service": service}


def _h(key):
    return {"Authorization": f"Bearer {key}"}


def _feedback(stack, data: dict, file: tuple[str, bytes] | None = None):
    import httpx

    files = {"segmentation": (file[0], file[1], "application/octet-stream")} if file else None
    return httpx.post(f"{stack['url']}/feedback", data=data, files=files, headers=_h(stack["key"]), timeout=120)


def _read(data: bytes, path: Path) -> sitk.Image:
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


def _nifti_bytes(array: np.ndarray, like: sitk.Image, tmp: Path, **change) -> bytes:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(like)
    for k, v in change.items():
        getattr(img, f"Set{k}")(v)
    sitk.WriteImage(img, str(tmp), useCompression=True)
    return tmp.read_bytes()


def test_queue_review_store_and_export(stack, tmp_path, monkeypatch, capsys):
    import httpx

    from tests.services.bad_inputs import dicom_zip

    url, key, h = stack["url"], stack["key"], _h(stack["key"])
    cases = sorted((stack["raw"] / "imagesTr").glob("*_0000.nii.gz"))[:2]
    ids = []
    for case in cases:  # NIfTI input
        r = httpx.post(f"{url}/segment_summary", files=[("images", (case.name, case.read_bytes()))], headers=h,
                       timeout=300)
        assert r.status_code == 200, r.text[:300]
        ids.append(r.json()["qa"]["review_id"])
    # DICOM input with saliency: the queued case keeps the NIfTI made from the series, and the saliency map
    r = httpx.post(f"{url}/segment", files=[("images", ("study.zip", dicom_zip(sitk.ReadImage(str(cases[0])))))],
                   data={"saliency": "true"}, headers=h, timeout=300)
    assert r.status_code == 200, r.text[:300]
    ids.append(json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("summary.json"))["qa"]["review_id"])

    assert httpx.get(f"{url}/review/queue", timeout=30).status_code == 401  # behind the service's authentication
    items = httpx.get(f"{url}/review/queue", headers=h, timeout=30).json()["items"]
    assert sorted(i["id"] for i in items) == sorted(ids)
    from services.review_queue import review_order

    assert items == sorted(items, key=review_order) and all(i["status"] == "pending" for i in items)
    assert {"id", "queued_at", "confidence", "qa_flags", "model", "volumes_ml", "status"} <= set(items[0])
    monkeypatch.setenv("KUBESEG_API_KEY", key)
    from kubeseg.cli import main

    assert main(["review", "queue", "--url", url]) == 0
    printed = capsys.readouterr().out
    assert all(i in printed for i in ids) and "pending" in printed

    # the case files, in the input's geometry
    source = sitk.ReadImage(str(cases[0]))
    for case_id, dicom in ((ids[0], False), (ids[2], True)):
        case = httpx.get(f"{url}/review/cases/{case_id}", headers=h, timeout=30).json()
        assert case["channels"] == 1 and case["labels"] and case["saliency"] is dicom and "qa" in case
        image = httpx.get(f"{url}/review/cases/{case_id}/image/0", headers=h, timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "application/gzip"
        seg = httpx.get(f"{url}/review/cases/{case_id}/segmentation", headers=h, timeout=30)
        img, lab = _read(image.content, tmp_path / "i.nii.gz"), _read(seg.content, tmp_path / "s.nii.gz")
        for got in (img, lab):
            assert got.GetSize() == source.GetSize() and np.allclose(got.GetSpacing(), source.GetSpacing(), atol=1e-4)
            assert np.allclose(got.GetOrigin(), source.GetOrigin(), atol=1e-3)
        if not dicom:
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(source))
    assert httpx.get(f"{url}/review/cases/{ids[2]}/saliency", headers=h, timeout=30).status_code == 200
    for path in (f"{ids[0]}/saliency", f"{ids[0]}/image/1", "0123abcd/segmentation", f"{ids[0]}/image/x"):
        assert httpx.get(f"{url}/review/cases/{path}", headers=h, timeout=30).status_code == 404, path

    # hostile feedback: 4xx naming the problem, nothing written
    pred = _read(httpx.get(f"{url}/review/cases/{ids[1]}/segmentation", headers=h, timeout=30).content,
                 tmp_path / "p.nii.gz")
    corrected = sitk.GetArrayFromImage(pred).copy()
    corrected[:, :5, :5] = 1
    bad = [({"case_id": ids[0], "decision": "maybe"}, None, 400, "decision"),
           ({"case_id": "f" * 32, "decision": "approve"}, None, 404, "no case"),
           ({"case_id": ids[2], "decision": "reject"}, None, 400, "reason"),
           ({"case_id": ids[1], "decision": "correct"}, None, 400, "segmentation"),
           ({"case_id": ids[1], "decision": "correct"}, ("mask.png", b"\x89PNG\r\n\x1a\n" + b"0" * 400), 415, "NIfTI"),
           ({"case_id": ids[1], "decision": "correct"},
            ("mask.nii.gz", _nifti_bytes(corrected, pred, tmp_path / "g.nii.gz", Spacing=(9.0, 9.0, 9.0))), 422,
            "spacing"),
           ({"case_id": ids[1], "decision": "correct"},
            ("mask.nii.gz", _nifti_bytes(corrected * 0 + 77, pred, tmp_path / "l.nii.gz")), 422, "[77]"),
           ({"case_id": ids[1], "decision": "correct"}, ("big.nii", os.urandom(300_000)), 413, "exceeds")]
    for data, file, status, words in bad:
        r = _feedback(stack, data, file)
        assert r.status_code == status and words in r.json()["error"], (data, status, r.status_code, r.text[:300])
    assert stack["s3"].keys("store/") == []

    # approve, correct, reject
    r = _feedback(stack, {"case_id": ids[0], "decision": "approve"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["by"] == "api-key:reviewer" and answer["stored_as"] == f"review_{ids[0]}" and answer["at"]
    assert set(answer) == {"case_id", "decision", "by", "at", "model_version", "stored_as"}
    r = _feedback(stack, {"case_id": ids[1], "decision": "correct", "reason": "missed the edge"},
                  ("fixed.nii.gz", _nifti_bytes(corrected, pred, tmp_path / "c.nii.gz")))
    assert r.status_code == 200, r.text
    assert _feedback(stack, {"case_id": ids[2], "decision": "reject", "reason": "motion"}).json()["stored_as"] is None
    assert _feedback(stack, {"case_id": ids[0], "decision": "approve"}).status_code == 409
    statuses = {i["id"]: i["status"] for i in httpx.get(f"{url}/review/queue", headers=h, timeout=30).json()["items"]}
    assert statuses == {ids[0]: "approved", ids[1]: "corrected", ids[2]: "rejected"}

    # counters
    metrics = http_get(f"{url}/metrics")[1].decode()
    version = answer["model_version"]
    for outcome in ("approve", "correct", "reject"):
        assert f'kubeseg_reviews_total{{model_version="{version}",outcome="{outcome}"}} 1.0' in metrics, outcome
    assert "kubeseg_review_queue_length 0.0" in metrics
    assert "kubeseg_review_queued_total 3.0" in metrics

    # the S3 store: raw layout + the review log; the corrected label on the input's grid
    keys = stack["s3"].keys("store/")
    stored = f"review_{ids[1]}"
    assert {"store/dataset.json", f"store/imagesTr/{stored}_0000.nii.gz", f"store/labelsTr/{stored}.nii.gz",
            f"store/labelsTr/review_{ids[0]}.nii.gz"} <= set(keys)
    assert not any(ids[2] in k for k in keys if "Tr/" in k) and len([k for k in keys if "/feedback/" in k]) == 3
    for k, v in stack["s3"].env.items():
        monkeypatch.setenv(k, v)
    from kubeseg.dataset_merge import merge_cases
    from kubeseg.feedback_store import FeedbackStore, RefreshRule

    store = FeedbackStore(f"s3://{stack['s3'].bucket}/store", RefreshRule(batch_size=2))
    log = [json.loads(x) for x in store.log_lines().splitlines()]
    assert [(x["decision"], x["by"], x["model_version"]) for x in log] == [
        ("approve", "api-key:reviewer", version), ("correct", "api-key:reviewer", version),
        ("reject", "api-key:reviewer", version)]
    assert log[2]["reason"] == "motion"
    # the 30 % rule: one batch of two, one corrected -> marked; exported, and merge takes it
    assert main(["review", "export", "--store", f"s3://{stack['s3'].bucket}/store", "--to", str(tmp_path / "new"),
                 "--batch-size", "2"]) == 0
    label = sitk.ReadImage(str(tmp_path / "new" / "labelsTr" / f"{stored}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), corrected)
    assert np.allclose(label.GetOrigin(), pred.GetOrigin()) and np.allclose(label.GetDirection(), pred.GetDirection())
    merged = merge_cases(stack["raw"], tmp_path / "new", tmp_path / "merged", num_workers=1)
    assert set(merged.added) == {stored, f"review_{ids[0]}"}
