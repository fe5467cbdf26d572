"""The review queue (services/review_queue.py: the active-learning rule, bounds, eviction,
persistence) and the review API's work (services/review_api.py's ReviewApi on a local feedback
store: approve, correct, reject, and the refusals). Fast and pure: no server, tiny images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.feedback_store import FeedbackStore, RefreshRule
from services.review_api import Refusal, ReviewApi
from services.review_queue import QueueRule, ReviewQueue, review_order

SHAPE = (5, 6, 7)


def test_rule_queues_flagged_low_threshold_and_lowest_percent():
    rule = QueueRule(lowest_percent=10, window=20, min_window=10, below=0.5)
    assert rule.reasons(0.99, True, []) == ["qa_flagged"]
    assert rule.reasons(0.4, False, []) == ["below_threshold"]
    assert rule.reasons(0.6, False, [0.9] * 9) == []  # window not yet filled: percentile rule waits
    recent = [0.80 + 0.01 * i for i in range(20)]  # 0.80 .. 0.99
    assert rule.reasons(0.795, False, recent) == ["lowest_confidence"]  # below every recent case
    assert rule.reasons(0.81, False, recent) == []  # 2 of 20 at or below: 10 %, not below it
    assert rule.reasons(0.80, False, recent) == ["lowest_confidence"]  # 1 of 20 = 5 %
    assert rule.reasons(1.0, False, [1.0] * 20) == []  # ties never make everything "lowest"
    assert rule.reasons(0.1, False, [0.9] * 300)[-1] == "lowest_confidence"  # only the last `window` count
    assert QueueRule.from_env({"KUBESEG_REVIEW_CONFIDENCE_BELOW": "0.7"}).below == 0.7
    for bad in ({"KUBESEG_REVIEW_LOWEST_PERCENT": "150"}, {"KUBESEG_REVIEW_WINDOW": "many"},
                {"KUBESEG_REVIEW_MIN_WINDOW": "500"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QueueRule.from_env(bad)


def _files(tmp: Path, n: int, size: int = 1000) -> dict:
    out = {}
    for name in ("segmentation.nii.gz", "summary.json"):
        p = tmp / f"{n}_{name}"
        p.write_bytes(b"x" * size)
        out[name] = p
    return out


def test_queue_bounds_evict_reviewed_then_least_useful_and_delete_files(tmp_path):
    q = ReviewQueue(tmp_path / "q", max_items=4, max_bytes=10_000)
    a = q.put({"confidence": 0.9}, _files(tmp_path, 0))
    b = q.put({"confidence": 0.6, "qa_flags": ["drift:intensity"]}, _files(tmp_path, 1))
    c = q.put({"confidence": 0.7}, _files(tmp_path, 2))
    d = q.put({"confidence": 0.95}, _files(tmp_path, 3))
    assert [i["id"] for i in sorted(q.items(), key=review_order)] == [b, c, a, d]  # flagged, then lowest confidence
    q.set_status(c, "approved", review={"by": "x"})
    e = q.put({"confidence": 0.8}, _files(tmp_path, 4))  # over the count: the reviewed case goes first
    assert {i["id"] for i in q.items()} == {a, b, d, e}
    assert not (tmp_path / "q" / "cases" / c).exists()
    f = q.put({"confidence": 0.85}, _files(tmp_path, 5))  # then the unflagged highest confidence (d)
    assert {i["id"] for i in q.items()} == {a, b, e, f} and not (tmp_path / "q" / "cases" / d).exists()
    # bytes: each case holds 2000 bytes; a 9000-byte bound keeps 4, a 5000-byte bound keeps 2 (flagged kept)
    small = ReviewQueue(tmp_path / "q", max_items=100, max_bytes=5000)
    g = small.put({"confidence": 0.5}, _files(tmp_path, 6))
    assert {i["id"] for i in small.items()} == {b, g}
    assert sorted(p.name for p in (tmp_path / "q" / "cases").iterdir()) == sorted([b, g])
    assert sum(i["bytes"] for i in small.items()) == 4000
    # persistent: a new object on the folder (a restarted service) sees the same queue and files
    again = ReviewQueue(tmp_path / "q")
    assert again.get(g)["confidence"] == 0.5 and again.file(g, "summary.json").read_bytes() == b"x" * 1000
    assert again.file(g, "../queue.jsonl") is None and again.file("nope", "summary.json") is None
    assert again.pending() == 2


def test_observe_keeps_the_recent_window_across_restarts(tmp_path):
    q = ReviewQueue(tmp_path / "q")
    for c in (0.9, 0.8, float("nan"), 0.7):
        q.observe(c, window=2)
    assert ReviewQueue(tmp_path / "q").observe(None, window=2) == [0.8, 0.7]


def test_stale_staging_and_orphans_are_removed(tmp_path):
    q = ReviewQueue(tmp_path / "q")
    keep = q.put({"confidence": 0.5}, _files(tmp_path, 0))
    orphan, stale = tmp_path / "q" / "cases" / "deadbeef", tmp_path / "q" / "cases" / ".tmp-x.1"
    orphan.mkdir()
    stale.mkdir()
    old = time.time() - 7200
    import os

    os.utime(stale, (old, old))
    q.put({"confidence": 0.6}, _files(tmp_path, 1))
    assert (tmp_path / "q" / "cases" / keep).is_dir() and not orphan.exists() and not stale.exists()


# -- the API's work on a real queue and a local store --------------------------------------------------------
def _nifti(array, path: Path, spacing=(0.7, 0.8, 3.0)) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((5.0, 6.0, 7.0))
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def _queued(q: ReviewQueue, tmp: Path, n: int, flagged=False) -> str:
    seg = np.zeros(SHAPE, np.uint8)
    seg[1:3, 2:4, 2:5] = 1
    image = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    files = {"image_0000.nii.gz": _nifti(image, tmp / f"i{n}.nii.gz"),
             "segmentation.nii.gz": _nifti(seg, tmp / f"s{n}.nii.gz"), "summary.json": tmp / f"j{n}.json"}
    files["summary.json"].write_text("{}")
    return q.put({"confidence": 0.5 + n / 100, "qa_flags": ["low_confidence"] if flagged else [],
                  "model": {"name": "m", "version": "7"}, "channels": 1, "labels": {"1": "organ", "2": "lesion"},
                  "dataset_labels": {"background": 0, "organ": 1, "lesion": 2}, "label_values": [0, 1, 2],
                  "channel_names": {"0": "CT"}}, files)


class _Counter:
    def __init__(self):
        self.seen = []

    def labels(self, *a):
        self.seen.append(a)
        return self

    def inc(self):
        pass

    def set(self, v):
        self.value = v


class _Metrics:
    def __init__(self):
        self.reviews, self.review_queue_length = _Counter(), _Counter()


def test_feedback_approve_correct_reject_and_refusals(tmp_path):
    q = ReviewQueue(tmp_path / "q")
    ids = [_queued(q, tmp_path, n) for n in range(4)]
    metrics = _Metrics()
    api = ReviewApi(q, FeedbackStore(tmp_path / "store", RefreshRule(batch_size=2)), metrics)
    assert [i["id"] for i in api.listing()["items"]] == ids
    case = api.case(ids[0])
    assert case["labels"] == {"1": "organ", "2": "lesion"} and case["channels"] == 1 and case["saliency"] is False

    def refused(status, words, *args):
        with pytest.raises(Refusal) as e:
            api.feedback(*args)
        assert e.value.status == status and words in e.value.message, e.value.message

    up = tmp_path / "upload"
    refused(400, "not one of", ids[0], "maybe", "", None, "x")
    refused(404, "no case", "0" * 32, "approve", "", None, "x")
    refused(404, "no case", "../etc", "approve", "", None, "x")
    refused(400, "needs a reason", ids[2], "reject", "  ", None, "x")
    refused(400, "needs the corrected", ids[1], "correct", "", None, "x")
    up.write_bytes(b"not an image at all")
    refused(415, "not a NIfTI", ids[1], "correct", "", ("mask.png", up), "x")
    wrong = np.zeros((5, 6, 8), np.uint8)
    up = _nifti(wrong, tmp_path / "up.nii.gz")
    refused(422, "size", ids[1], "correct", "", ("mask.nii.gz", up), "x")
    bad_labels = np.full(SHAPE, 9, np.uint8)
    up = _nifti(bad_labels, tmp_path / "up.nii.gz")
    refused(422, "[9]", ids[1], "correct", "", ("mask.nii.gz", up), "x")
    assert api.store.records() == [] and not (tmp_path / "store" / "labelsTr").exists()  # nothing half-written

    r = api.feedback(ids[0], "approve", "", None, "api-key:dr")
    assert (r["stored_as"], r["model_version"], r["by"]) == (f"review_{ids[0]}", "7", "api-key:dr")
    corrected = np.zeros(SHAPE, np.uint8)
    corrected[1:4, 2:4, 2:5] = 2
    up = _nifti(corrected, tmp_path / "up.nii.gz")
    r = api.feedback(ids[1], "correct", "missed the lesion", ("mask.nii.gz", up), "api-key:dr")
    stored = sitk.ReadImage(str(tmp_path / "store" / "labelsTr" / f"{r['stored_as']}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), corrected)
    assert stored.GetSpacing() == pytest.approx((0.7, 0.8, 3.0)) and stored.GetOrigin() == pytest.approx((5, 6, 7))
    r = api.feedback(ids[2], "reject", "wrong body part", None, "jwt:house")
    assert r["stored_as"] is None
    refused(409, "already reviewed", ids[0], "approve", "", None, "x")
    log = [json.loads(x) for x in api.store.log_lines().splitlines()]
    assert [(x["decision"], x["by"], x["model_version"]) for x in log] == [
        ("approve", "api-key:dr", "7"), ("correct", "api-key:dr", "7"), ("reject", "jwt:house", "7")]
    assert log[1]["changed_labels"] == {"organ": 0.0, "lesion": 0.0} and log[2]["reason"] == "wrong body part"
    assert [b.to_json(api.store.rule)["marked"] for b in api.store.batches()] == [True]  # 1 of 2 corrected
    assert [i["status"] for i in api.listing()["items"]][0] == "pending"  # pending first
    assert api.listing(status="pending")["items"][0]["id"] == ids[3]
    assert metrics.reviews.seen == [("approve", "7"), ("correct", "7"), ("reject", "7")]
    assert metrics.review_queue_length.value == 1
    with pytest.raises(Refusal):
        api.listing(status="done")
    with pytest.raises(Refusal) as e:
        api.file(ids[0], "image", "1")
    assert e.value.status == 404
    assert api.file(ids[0], "segmentation", None).name == "segmentation.nii.gz"
    # a store that cannot be written: 503 naming it, the case stays pending
    (tmp_path / "not-a-folder").write_text("x")
    broken = ReviewApi(q, FeedbackStore(tmp_path / "not-a-folder" / "store"))
    with pytest.raises(Refusal) as e:
        broken.feedback(ids[3], "approve", "", None, "x")
    assert e.value.status == 503 and "not-a-folder" in e.value.message
    assert q.get(ids[3])["status"] == "pending"
