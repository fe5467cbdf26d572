"""The feedback store (kubeseg/feedback_store.py) on a local folder: layout, the review log, the
refresh rule's batches, the export that `kubeseg dataset merge` takes, and the checks of a
corrected label map. Fast and pure (tiny images)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.errors import KubesegError
from kubeseg.feedback_store import (CorrectionError, FeedbackConflict, FeedbackStore, RefreshRule, changed_labels,
                                    check_correction, dataset_case_id)

LABELS = {"background": 0, "organ": 1, "lesion": 2}
CHANNELS = {"0": "CT"}
SPACING, ORIGIN = (0.8, 0.9, 2.5), (10.0, -4.0, 7.0)


def _image(array: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def _case(tmp: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    image = _image(rng.integers(-100, 100, (6, 8, 10)).astype(np.int16), tmp / f"{name}_img.nii.gz")
    label = np.zeros((6, 8, 10), np.uint8)
    label[2:4, 2:6, 3:7] = 1
    return image, _image(label, tmp / f"{name}_seg.nii.gz")


def _review(store: FeedbackStore, tmp: Path, review_id: str, decision: str, seed: int = 0) -> dict:
    stored = None
    if decision != "reject":
        store.ensure_dataset(CHANNELS, LABELS)
        image, label = _case(tmp, review_id, seed)
        stored = dataset_case_id(review_id)
        store.store_case(stored, [image], label)
    return store.append({"case_id": review_id, "decision": decision, "by": "api-key:dr", "reason": None,
                         "model_version": "3", "stored_as": stored})


def test_rule_and_batches(tmp_path):
    rule = RefreshRule(batch_size=4, min_corrected_fraction=0.3)
    assert rule.marked(["approve", "correct", "approve", "approve"], 4) is False  # 25 %
    assert rule.marked(["approve", "correct", "correct", "approve"], 4) is True  # 50 %
    assert rule.marked(["correct", "correct"], 4) is False  # incomplete batch waits
    assert RefreshRule.from_env({"KUBESEG_FEEDBACK_BATCH_SIZE": "5"}).batch_size == 5
    with pytest.raises(ValueError, match="KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION"):
        RefreshRule.from_env({"KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION": "1.5"})

    store = FeedbackStore(tmp_path / "store", rule)
    decisions = ["approve", "correct", "reject", "approve", "approve",  # batch 1: 1 of 4 corrected
                 "correct", "correct", "approve", "approve",  # batch 2: 2 of 4
                 "correct"]  # batch 3: incomplete
    for i, d in enumerate(decisions):
        rec = _review(store, tmp_path, f"r{i:02d}", d, seed=i)
        assert rec["seq"] == i + 1 and rec["at"].endswith("Z")
        assert (rec["batch"] is None) == (d == "reject")
    batches = store.batches()
    assert [(b.number, len(b.records), b.corrected) for b in batches] == [(1, 4, 1), (2, 4, 2), (3, 1, 1)]
    assert [b.number for b in store.marked_batches()] == [2]
    # a changed batch size applies to new batches only; recorded batches keep theirs
    store2 = FeedbackStore(tmp_path / "store", RefreshRule(batch_size=2, min_corrected_fraction=0.3))
    rec = _review(store2, tmp_path, "r10", "approve", seed=10)
    assert (rec["batch"], rec["batch_size"]) == (3, 4)
    # the log as JSON lines, and its layout on disk
    lines = [json.loads(x) for x in store2.log_lines().splitlines()]
    assert [x["case_id"] for x in lines] == [f"r{i:02d}" for i in range(11)]
    assert {"by", "at", "model_version", "decision", "reason"} <= set(lines[2]) and lines[2]["decision"] == "reject"
    root = tmp_path / "store"
    assert (root / "imagesTr" / "review_r00_0000.nii.gz").is_file()
    assert (root / "labelsTr" / "review_r00.nii.gz").is_file()
    assert not (root / "labelsTr" / "review_r02.nii.gz").exists()  # a reject stores no label
    with pytest.raises(FeedbackConflict, match="already reviewed"):
        _review(store2, tmp_path, "r01", "approve")


def test_export_is_a_dataset_that_merge_accepts(tmp_path, monkeypatch):
    from kubeseg.dataset_merge import merge_cases
    from kubeseg.synth import SynthSettings, synthesize

    raw = synthesize(tmp_path / "raw" / "Dataset009_Tiny", SynthSettings(kind="ct", num_cases=2, shape=(8, 8, 10),
                                                                        seed=0, dataset_name="Dataset009_Tiny"))
    ds = json.loads((raw / "dataset.json").read_text())
    store = FeedbackStore(tmp_path / "store", RefreshRule(batch_size=2, min_corrected_fraction=0.5))
    with pytest.raises(KubesegError, match="nothing to export"):
        store.export(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    for i, d in enumerate(["approve", "approve", "correct", "approve"]):  # batch 1: 0 %, batch 2: 50 % -> marked
        store.ensure_dataset(ds["channel_names"], ds["labels"])
        label = np.zeros((8, 8, 10), np.uint8)
        label[1:3, 2:5, 2:6] = 1
        image = _image(np.full((8, 8, 10), 40, np.int16), tmp_path / f"i{i}.nii.gz")
        store.store_case(f"review_c{i}", [image], _image(label, tmp_path / f"l{i}.nii.gz"))
        store.append({"case_id": f"c{i}", "decision": d, "by": "x", "model_version": "1", "stored_as": f"review_c{i}",
                      "confidence": [0.9, 0.8, 0.4, 0.7][i]})
    out = store.export(tmp_path / "export")
    assert out["cases"] == ["review_c2", "review_c3"] and [b["marked"] for b in out["batches"]] == [True]
    export = tmp_path / "export"
    assert sorted(p.name for p in (export / "labelsTr").iterdir()) == ["review_c2.nii.gz", "review_c3.nii.gz"]
    assert [json.loads(x)["case_id"] for x in (export / "feedback.jsonl").read_text().splitlines()] == ["c2", "c3"]
    merged = merge_cases(raw, export, tmp_path / "merged", num_workers=1)
    assert merged.added == ("review_c2", "review_c3") and merged.num_training == 4
    # the store itself as the new cases (what the retraining pipeline imports): only the marked
    # batch is merged (the default rule, 30 %: batch 1 has none corrected, batch 2 half)
    for name in ("KUBESEG_FEEDBACK_BATCH_SIZE", "KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    direct = merge_cases(raw, tmp_path / "store", tmp_path / "merged_from_store", num_workers=1)
    assert direct.added == ("review_c2", "review_c3") and direct.num_training == 4
    # the served model's confidence travels from the review log into the merge record, where a
    # fine-tune with max_new_cases finds it and keeps the least confident case (not the most recent, as without confidences)
    from kubeseg.dataset_merge import RECORD
    from kubeseg.retraining import new_case_confidence
    assert json.loads((tmp_path / "merged_from_store" / RECORD).read_text())["confidence"] == \
        {"review_c2": 0.4, "review_c3": 0.7}
    assert new_case_confidence(tmp_path / "merged_from_store") == {"review_c2": 0.4, "review_c3": 0.7}
    assert new_case_confidence(raw) == {}
    from kubeseg.retraining import incremental_split_plan
    from kubeseg.training.finetune import FinetuneSettings
    bundle = tmp_path / "champion"
    (bundle / "3d_fullres").mkdir(parents=True)
    (bundle / "3d_fullres" / "splits_final.json").write_text(json.dumps(
        [{"train": ["synth_000"], "val": ["synth_001"]}, {"train": ["synth_001"], "val": ["synth_000"]}]))
    splits, _, used, _ = incremental_split_plan(bundle, tmp_path / "merged_from_store",
                                                FinetuneSettings(max_new_cases=1))
    assert used == ["review_c2"] and all("review_c3" not in f["train"] for f in splits)
    assert not list(tmp_path.glob(".reviewed-cases.*"))  # the export beside it is gone
    monkeypatch.setenv("KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION", "0.9")
    with pytest.raises(KubesegError, match="no batch is marked"):
        merge_cases(raw, tmp_path / "store", tmp_path / "merged_none", num_workers=1)
    assert not (tmp_path / "merged_none").exists()
    everything = store.export(tmp_path / "all", all_labelled=True)
    assert len(everything["cases"]) == 4
    # another label set is refused, naming the setting
    with pytest.raises(FeedbackConflict, match="KUBESEG_FEEDBACK_STORE"):
        store.ensure_dataset(ds["channel_names"], {"background": 0, "other": 1})


def test_concurrent_writers_never_share_a_record_number(tmp_path):
    store_root = tmp_path / "store"
    results, errors = [], []

    def review(i):
        try:
            results.append(FeedbackStore(store_root).append({"case_id": f"c{i}", "decision": "reject", "by": "x",
                                                              "reason": "blurred"}))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=review, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r["seq"] for r in results) == list(range(1, 13))
    assert len(FeedbackStore(store_root).records()) == 12


def test_corrected_label_map_checks(tmp_path):
    reference = _case(tmp_path, "ref")[1]
    good = np.zeros((6, 8, 10), np.int16)
    good[1:5, 2:6, 3:7] = 2
    out = check_correction(_image(good, tmp_path / "good.nii.gz"), "good", reference, [0, 1, 2])
    assert out.dtype == np.uint8 and out.max() == 2
    cases = [("size", np.zeros((6, 8, 11), np.uint8), {}, "geometry", "size"),
             ("spacing", good, {"spacing": (1.0, 1.0, 1.0)}, "geometry", "spacing"),
             ("origin", good, {"origin": (0.0, 0.0, 0.0)}, "geometry", "origin"),
             ("labels", good + 5, {}, "labels", "[5, 7]"),
             ("float", good.astype(np.float32) + 0.5, {}, "labels", "non-integer")]
    for name, array, kw, kind, words in cases:
        with pytest.raises(CorrectionError, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
            check_correction(_image(array, tmp_path / f"{name}.nii.gz", **kw), name, reference, [0, 1, 2])
        assert e.value.kind == kind and name in str(e.value)
    pred = np.zeros((4, 4, 4), int)
    pred[:2] = 1
    corr = pred.copy()
    corr[0] = 2
    assert changed_labels(pred, corr, LABELS) == {"organ": pytest.approx(2 / 3, abs=1e-4), "lesion": 0.0}
