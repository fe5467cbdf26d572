"""Postprocessing decisions for region models (per region mask) and ignore-label models (ignored voxels
left out), and the selection that stores them. Pure and fast; parity with nnunetv2's
``determine_postprocessing`` is in tests/test_parity_regions.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kubeseg.errors import KubesegError
from kubeseg.labels import label_scheme
from kubeseg.postprocessing import (PostprocessingRule, apply_postprocessing, class_dice, decide_postprocessing,
                                    load_postprocessing)
from kubeseg.selection import SelectSettings, select_model

REGIONS = {"labels": {"background": 0, "body": [1, 2, 3], "organ": [2, 3], "lesion": [3]},
           "regions_class_order": [1, 2, 3]}


def _body_organ_lesion(shape=(12, 24, 24)) -> np.ndarray:
    ref = np.zeros(shape, np.uint8)
    ref[1:11, 2:22, 2:22] = 1
    ref[3:9, 4:12, 4:12] = 2
    ref[5:7, 6:9, 6:9] = 3
    return ref


def test_region_steps_are_decided_on_region_masks():
    """A spurious lesion blob inside the body, away from the organ: one component of the body region,
    a second one of the organ region [2, 3]; removing it helps the organ *region* (and the lesion),
    so the rule keeps the organ region's largest component, and the lesion needs nothing more."""
    scheme = label_scheme(REGIONS)
    refs, preds = [], []
    for shift in (0, 1):
        ref = np.roll(_body_organ_lesion(), shift, axis=2)
        pred = ref.copy()
        pred[4:6, 16:18, 15 + shift:17 + shift] = 3  # inside the body (label 1 in the reference)
        refs.append(ref)
        preds.append(pred)
    rule, report = decide_postprocessing(preds, refs, scheme.foreground_labels, scheme.classes)
    assert rule.steps == ((2, 3),)  # the body is one component; the organ region has two
    assert set(report["dice_after"]) == {"(1, 2, 3)", "(2, 3)", "3"}
    assert report["dice_after"]["(2, 3)"] > report["dice_before"]["(2, 3)"]
    out = apply_postprocessing(preds[0], rule)
    assert (out[4:6, 16:18, 15:17] == 0).all()  # removed voxels become background, on the label map
    # the same predictions scored per label (no regions) would decide on label 3 alone
    assert decide_postprocessing(preds, refs, scheme.foreground_labels)[0].steps == ((3,),)


def test_ignored_voxels_do_not_decide():
    """An island only in unannotated voxels changes no Dice: no rule. The same island on annotated voxels does."""
    ignore = 3
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 4:12, 4:12] = 1
    ref[3:6, 6:10, 6:10] = 2
    pred = ref.copy()  # right everywhere, as a network trained on sparse labels may be
    ref[1::2] = ignore  # odd slices not annotated
    on_ignored = pred.copy()
    on_ignored[9, 0:2, 0:2] = 1  # slice 9: unannotated
    rule, report = decide_postprocessing([on_ignored], [ref], [1, 2], ignore_label=ignore)
    assert rule.steps == ()
    assert report["dice_before"] == {"1": 1.0, "2": 1.0}
    assert decide_postprocessing([on_ignored], [ref], [1, 2])[0].steps  # unaware of the ignore label: a rule
    on_annotated = pred.copy()
    on_annotated[8, 0:2, 0:2] = 1
    assert decide_postprocessing([on_annotated], [ref], [1, 2], ignore_label=ignore)[0].steps == ((1, 2),)
    assert class_dice(on_annotated, ref, (1,), ignore) < 1.0 == class_dice(on_ignored, ref, (1,), ignore)


def test_rules_with_regions_round_trip(tmp_path):
    rule = PostprocessingRule(((1, 2, 3), (2, 3), (3,)))
    (tmp_path / "pp.json").write_text(json.dumps(rule.to_json()))
    assert load_postprocessing(tmp_path / "pp.json") == rule
    # nnU-Net writes a one-value region as [3] and might write a list of regions: both are unions
    (tmp_path / "nn.json").write_text(json.dumps({
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 3,
        "postprocessing_kwargs": [{"labels_or_regions": [[1, 2], [3]]}, {"labels_or_regions": [3]},
                                  {"labels_or_regions": 2}]}))
    assert load_postprocessing(tmp_path / "nn.json").steps == ((1, 2, 3), (3,), (2,))
    for bad in ([], [True], ["1"], [[1, "x"]], None):
        (tmp_path / "bad.json").write_text(json.dumps({
            "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
            "postprocessing_kwargs": [{"labels_or_regions": bad}]}))
        with pytest.raises(KubesegError, match="labels_or_regions"):
            load_postprocessing(tmp_path / "bad.json")


def _fake_model(folder, dataset_json: dict, probabilities: dict) -> None:
    """A training output folder as selection reads it: out-of-fold probabilities already on the image grid."""
    (folder / "fold_0" / "validation").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"plans_name": "p", "configurations": {"3d_fullres": {}}}))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    torch.save({"network_weights": {}, "init_args": {"configuration": "3d_fullres"}}, folder / "fold_0" / "checkpoint_final.pth")
    for case, p in probabilities.items():
        np.savez(folder / "fold_0" / "validation" / f"{case}.npz", probabilities=p)


def test_selection_stores_a_region_rule(tmp_path):
    """select on a region model: scores per region, and the rule decided on region masks is stored."""
    dataset_json = {**REGIONS, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 2}
    (tmp_path / "pre" / "gt_segmentations").mkdir(parents=True)
    probabilities = {}
    for i in range(2):
        ref = np.roll(_body_organ_lesion(), i, axis=2)
        image = sitk.GetImageFromArray(ref)
        sitk.WriteImage(image, str(tmp_path / "pre" / "gt_segmentations" / f"c{i}.nii.gz"))
        pred = ref.copy()
        pred[4:6, 16:18, 15 + i:17 + i] = 3
        probabilities[f"c{i}"] = np.stack([np.isin(pred, r).astype(np.float32) * 0.8 + 0.1
                                           for r in ([1, 2, 3], [2, 3], [3])])
    _fake_model(tmp_path / "model", dataset_json, probabilities)
    sel = select_model([tmp_path / "model"], tmp_path / "pre", tmp_path / "sel", SelectSettings(progress=False))
    assert set(sel["expected_dice"]) == {"(1, 2, 3)", "(2, 3)", "3"}
    assert load_postprocessing(tmp_path / "sel" / "postprocessing.json").steps == ((2, 3),)
    assert sel["expected_dice_after_postprocessing"]["(2, 3)"] > sel["expected_dice"]["(2, 3)"]
