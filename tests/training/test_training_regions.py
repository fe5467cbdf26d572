"""Training region-based and sparsely annotated (ignore-label) datasets, end to end on the CPU.

A tiny preprocessed dataset whose organ has a bright core (label 2), declared either as nested
regions (``whole`` = [1, 2], ``core`` = [2]: two sigmoid outputs) or as plain labels with only
every other slice annotated (ignore label 3). A short schedule must run; the network must have
the right heads; validation must score regions / annotated voxels only.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kubeseg.labels import label_scheme
from kubeseg.preprocessing.preprocess import sample_class_locations
from kubeseg.training import TrainSettings, train_fold

from tiny_dataset import make_tiny_preprocessed

REGIONS = {"labels": {"background": 0, "whole": [1, 2], "core": [2]}, "regions_class_order": [1, 2]}
SPARSE = {"labels": {"background": 0, "organ": 1, "core": 2, "ignore": 3}}


def _relabel(pre, variant: dict) -> None:
    ds = json.loads((pre / "dataset.json").read_text())
    ds.update(variant)
    (pre / "dataset.json").write_text(json.dumps(ds))
    scheme = label_scheme(ds)
    folder = pre / "nnUNetPlans_3d_fullres"
    for seg_file in sorted(folder.glob("*_seg.npy")):
        case = seg_file.name[: -len("_seg.npy")]
        img, seg = np.load(folder / f"{case}.npy"), np.load(seg_file)
        seg[(seg == 1) & (img > np.percentile(img[seg == 1], 50))] = 2  # the organ's brighter half: its core
        if scheme.has_ignore_label:
            seg[:, 1::2][seg[:, 1::2] >= 0] = scheme.ignore_label  # odd slices not annotated
        np.save(seg_file, seg)
        props = json.loads((folder / f"{case}.json").read_text())
        props["class_locations"] = sample_class_locations(seg, scheme)
        (folder / f"{case}.json").write_text(json.dumps(props))


@pytest.mark.parametrize("variant", ["regions", "sparse"])
def test_region_and_sparse_training(tmp_path, variant):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    _relabel(pre, REGIONS if variant == "regions" else SPARSE)
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 0, tmp_path / "OUT",
                          TrainSettings(device="cpu", schedule="3x4x2", num_workers=0, progress_bar=False,
                                        log_to_console=False))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    heads = ckpt["network_weights"]["decoder.seg_layers.0.weight"].shape[0]
    assert heads == (2 if variant == "regions" else 3)  # sigmoid per region / softmax per label, no ignore head
    epochs = json.loads((fold_dir / "metrics.json").read_text())["epochs"]
    assert all(np.isfinite(e["train_loss"]) for e in epochs)
    expected = ["(1, 2)", "2"] if variant == "regions" else ["1", "2"]
    assert len(epochs[-1]["pseudo_dice"]) == 2  # per region / foreground label
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert sorted(summary["mean"]) == expected
    case = summary["metric_per_case"][0]
    with np.load(case["prediction_file"]) as z:
        seg, probs = z["segmentation"], z["probabilities"]
    assert probs.shape[0] == heads
    assert set(np.unique(seg)) <= {0, 1, 2}
    if variant == "sparse":
        # ignored voxels count nowhere: the counts cover exactly the annotated voxels
        m = case["metrics"]["1"]
        ref = np.load(pre / "nnUNetPlans_3d_fullres" / f"{case['case']}_seg.npy")
        assert m["TP"] + m["FP"] + m["FN"] + m["TN"] == int((ref != 3).sum()) < seg.size
