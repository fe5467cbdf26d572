"""Postprocessing: largest component, the CV decision, JSON (ours and nnU-Net's)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kubeseg.errors import KubesegError
from kubeseg.postprocessing import (PostprocessingRule, apply_postprocessing, decide_postprocessing,
                                    keep_largest_component, load_postprocessing, save_postprocessing)


def _case(island: bool):
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 5:15, 5:15] = 1
    ref[4:6, 8:12, 8:12] = 2
    pred = ref.copy()
    if island:
        pred[0, 0:2, 0:2] = 1  # a false positive far away
    return pred, ref


def test_keep_largest_component_is_fully_connected():
    seg = np.zeros((5, 5, 5), np.uint8)
    seg[0, 0, 0] = seg[1, 1, 1] = 1  # diagonal neighbours: one component
    seg[4, 4, 4] = 1
    out = keep_largest_component(seg, [1])
    assert out[0, 0, 0] == out[1, 1, 1] == 1 and out[4, 4, 4] == 0
    assert keep_largest_component(np.zeros((3, 3), np.uint8), [1]).sum() == 0


def test_decision_keeps_only_what_helps():
    preds, refs = zip(*[_case(True), _case(True)])
    rule, report = decide_postprocessing(preds, refs, [1, 2])
    assert rule.steps[0] == (1, 2)
    assert report["foreground_dice_after"] > report["foreground_dice_before"]
    assert np.array_equal(apply_postprocessing(preds[0], rule), refs[0])
    clean, refs = zip(*[_case(False), _case(False)])
    rule, _ = decide_postprocessing(clean, refs, [1, 2])
    assert rule.steps == ()


def test_json_round_trip_and_nnunet_format(tmp_path):
    rule = PostprocessingRule(((1, 2), (2,)))
    assert load_postprocessing(save_postprocessing(rule, tmp_path / "pp.json")) == rule
    nnunet = {"input_folder": {}, "postprocessed": {},
              "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
              "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]}]}
    (tmp_path / "nn.json").write_text(json.dumps(nnunet))
    assert load_postprocessing(tmp_path / "nn.json").steps == ((1, 2, 3),)
    (tmp_path / "bad.json").write_text(json.dumps({"postprocessing_fns": ["os.system"],
                                                   "postprocessing_kwargs": [{}]}))
    with pytest.raises(KubesegError, match="unknown postprocessing function"):
        load_postprocessing(tmp_path / "bad.json")
