"""Engine helpers the pipeline steps share with the CLI (kubeseg.workflow)."""

from __future__ import annotations

import json

import pytest

from kubeseg.errors import KubesegError
from kubeseg.training.schedule import Schedule
from kubeseg.workflow import (copy_reference, cv_table_rows, gather_folds, markdown_table, merge_references,
                              parse_schedule, preprocess_configurations, text_table, training_groups, training_items)

PLANS = {"plans_name": "P", "configurations": {
    "2d": {}, "3d_fullres": {}, "3d_lowres": {"next_stage": "3d_cascade_fullres"},
    "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}


@pytest.mark.parametrize("text,expected", [
    ("2x3x1", Schedule(2, 3, 1, "2x3x1")), ("10x20", Schedule(10, 20, 4, "10x20")),
    ("tiny", Schedule(6, 20, 4, "tiny")), ("5epochs", Schedule(5, 250, 50, "5epochs"))])
def test_parse_schedule(text, expected):
    assert parse_schedule(text) == expected


@pytest.mark.parametrize("text", ["0x3", "fast", "2x"])
def test_parse_schedule_refuses(text):
    with pytest.raises(KubesegError, match="schedule"):
        parse_schedule(text)


def test_training_items_waves():
    first, cascade = training_items(PLANS, ["2d", "3d_lowres", "3d_cascade_fullres"], [0, "1"])
    # the cascade trains on out-of-fold low-res predictions of every case: low-res gets all five folds
    assert first == [{"configuration": "2d", "fold": 0}, {"configuration": "2d", "fold": 1}] + [
        {"configuration": "3d_lowres", "fold": f} for f in range(5)]
    assert cascade == [{"configuration": "3d_cascade_fullres", "fold": 0},
                       {"configuration": "3d_cascade_fullres", "fold": 1}]
    # the first stage is added when only the cascade is asked for; "all" stays last
    first, cascade = training_items(PLANS, ["3d_cascade_fullres"], ["all", 2])
    assert [i["fold"] for i in first] == [0, 1, 2, 3, 4, "all"] and {i["configuration"] for i in first} == {
        "3d_lowres"}
    assert cascade == [{"configuration": "3d_cascade_fullres", "fold": 2},
                       {"configuration": "3d_cascade_fullres", "fold": "all"}]
    first, cascade = training_items(PLANS, ["3d_fullres", "2d"], [3])
    assert cascade == [] and [i["configuration"] for i in first] == ["3d_fullres", "2d"]


def test_preprocess_configurations():
    plans = {"configurations": {**PLANS["configurations"],
                                "3d_fullres": {"data_identifier": "P_3d_fullres"}, "2d": {"data_identifier": "P_2d"},
                                "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "P_3d_lowres"}}}
    # the cascade shares 3d_fullres's arrays and needs its first stage's
    assert preprocess_configurations(plans, ["3d_cascade_fullres"]) == ["3d_lowres", "3d_cascade_fullres"]
    assert preprocess_configurations(plans, ["2d", "3d_fullres", "3d_cascade_fullres"]) == [
        "2d", "3d_fullres", "3d_lowres"]


def test_training_groups_one_per_data_identifier():
    plans = {"configurations": {"2d": {"data_identifier": "P_2d"}, "3d_lowres": {"data_identifier": "P_3d_lowres"},
                                "3d_fullres": {"data_identifier": "P_3d_fullres"},
                                "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}
    first, cascade = training_items(plans, ["2d", "3d_cascade_fullres"], [0])
    groups = training_groups(plans, first)
    assert [(g["preprocess"], g["configurations"], len(g["items"])) for g in groups] == [
        ("2d", ["2d"], 1), ("3d_lowres", ["3d_lowres"], 5)]
    assert all(i["configuration"] == g["configurations"][0] for g in groups for i in g["items"])
    # the cascade reads 3d_fullres's arrays: its group preprocesses exactly what a 3d_fullres group would
    assert training_groups(plans, cascade) == [{"preprocess": "3d_fullres", "configurations": ["3d_cascade_fullres"],
                                                "items": [{"configuration": "3d_cascade_fullres", "fold": 0}]}]
    both = training_groups(plans, [{"configuration": "3d_fullres", "fold": 0.0},
                                   {"configuration": "3d_cascade_fullres", "fold": 1}])
    assert len(both) == 1 and both[0]["configurations"] == ["3d_fullres", "3d_cascade_fullres"]
    assert both[0]["items"][0]["fold"] == 0  # JSON through KFP turns 0 into 0.0
    with pytest.raises(KubesegError, match="no training item"):
        training_groups(plans, [])


def test_reference_has_no_arrays_and_merges(tmp_path):
    import numpy as np

    def preprocessed(root, ident, plans="{}"):
        (root / ident).mkdir(parents=True)
        np.save(root / ident / "case_0.npy", np.zeros((1, 4, 4)))
        np.save(root / ident / "case_0_seg.npy", np.zeros((1, 4, 4)))
        (root / ident / "case_0.json").write_text('{"spacing": [1, 1], "class_locations": {"1": [[0, 1, 2]]}}')
        (root / "gt_segmentations").mkdir()
        (root / "gt_segmentations" / "case_0.nii.gz").write_bytes(b"x")
        (root / "plans.json").write_text(plans)
        (root / "dataset.json").write_text("{}")
        return root

    a = preprocessed(tmp_path / "a", "P_2d")
    b = preprocessed(tmp_path / "b", "P_3d_fullres")
    assert copy_reference(a, tmp_path / "ra") == ["P_2d"]
    assert copy_reference(b, tmp_path / "rb") == ["P_3d_fullres"]
    assert not list((tmp_path / "ra").rglob("*.npy"))
    # the geometry selection needs, not the sampler's foreground locations
    assert json.loads((tmp_path / "ra" / "P_2d" / "case_0.json").read_text()) == {"spacing": [1, 1]}
    assert (tmp_path / "ra" / "gt_segmentations" / "case_0.nii.gz").is_file()
    merged = merge_references([tmp_path / "ra", tmp_path / "rb"], tmp_path / "m")
    assert sorted(p.name for p in merged.iterdir()) == ["P_2d", "P_3d_fullres", "dataset.json", "gt_segmentations",
                                                        "plans.json"]
    c = preprocessed(tmp_path / "c", "P_3d_lowres", plans='{"other": 1}')
    copy_reference(c, tmp_path / "rc")
    with pytest.raises(KubesegError, match="plans.json differs"):
        merge_references([tmp_path / "ra", tmp_path / "rc"], tmp_path / "m2")
    with pytest.raises(KubesegError, match="no plans.json"):
        copy_reference(tmp_path / "nothing", tmp_path / "x")


@pytest.mark.parametrize("confs,folds,match", [(["3d"], [0], "not in the plans"), (["2d"], [5], "out of range"),
                                               ([], [0], "no configuration"), (["2d"], [], "no fold")])
def test_training_items_refuses(confs, folds, match):
    with pytest.raises(KubesegError, match=match):
        training_items(PLANS, confs, folds)


def test_gather_folds(tmp_path):
    for fold, conf in [(0, "2d"), (1, "2d"), (0, "3d_fullres")]:
        m = tmp_path / f"task{fold}{conf}" / f"nnUNetTrainer__P__{conf}"
        (m / f"fold_{fold}").mkdir(parents=True)
        (m / f"fold_{fold}" / "checkpoint_final.pth").write_text(str(fold))
        (m / "plans.json").write_text("{}")
    out = gather_folds(sorted(tmp_path.glob("task*")), tmp_path / "models")
    assert [p.name for p in out] == ["nnUNetTrainer__P__2d", "nnUNetTrainer__P__3d_fullres"]
    assert sorted(p.name for p in out[0].iterdir()) == ["fold_0", "fold_1", "plans.json"]
    with pytest.raises(KubesegError, match="two training outputs"):
        gather_folds([tmp_path / "task02d", tmp_path / "task02d"], tmp_path / "again")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KubesegError, match="no training output"):
        gather_folds([tmp_path / "empty"], tmp_path / "x")


def test_cv_tables():
    sel = {"members": [{"configuration": "3d_fullres"}], "candidates": [
        {"name": "2d", "dice": {"1": 0.5, "2": float("nan")}, "foreground_dice": 0.5},
        {"name": "3d_fullres", "dice": {"1": 0.7, "2": 0.6}, "foreground_dice": 0.65}]}
    header, rows = cv_table_rows(sel)
    assert header == ["candidate", "Dice 1", "Dice 2", "foreground mean"]
    assert rows[1] == ["3d_fullres (selected)", "0.7000", "0.6000", "0.6500"] and rows[0][2] == "n/a"
    assert markdown_table(header, rows).count("\n") == 3
    assert "3d_fullres (selected)" in text_table(header, rows)
    json.dumps(rows)


def _bundle(root, members, folds=("0", "1")):
    """A bundle's layout with empty checkpoints: enough for planning and for finding weights."""
    plans = {"plans_name": "P", "configurations": {
        **PLANS["configurations"], "3d_fullres": {"data_identifier": "P_3d_fullres"}, "2d": {"data_identifier": "P_2d"},
        "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "P_3d_lowres"}}}
    ds = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 4,
          "file_ending": ".nii.gz"}
    for conf in members:
        for f in folds:
            ckpt = root / f"nnUNetTrainer__P__{conf}" / f"fold_{f}" / "checkpoint_final.pth"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(f"{conf}{f}")
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(ds))
    (root / "selection.json").write_text(json.dumps({"members": [
        {"configuration": c, "folder": f"nnUNetTrainer__P__{c}", "folds": list(folds)} for c in members]}))
    return ds


def test_pretrained_checkpoint_and_task_inputs(tmp_path):
    from kubeseg.workflow import pretrained_checkpoint, task_inputs

    _bundle(tmp_path, ["3d_fullres"], folds=("1", "3"))
    ck = lambda f: pretrained_checkpoint(tmp_path, "3d_fullres", f)  # noqa: E731
    assert ck(3).read_text() == "3d_fullres3" and ck(3.0).read_text() == "3d_fullres3"
    assert ck(0).read_text() == "3d_fullres1"  # a fold the champion lacks starts from its first fold
    assert pretrained_checkpoint(tmp_path, "2d", 0) is None  # not in the champion: from scratch
    assert pretrained_checkpoint(tmp_path / "empty", "2d", 0) is None
    assert task_inputs(tmp_path, "3d_fullres", 1) == (None, None)
    assert task_inputs(tmp_path, "3d_fullres", 1, pretrained_root=tmp_path)[1] == ck(1)


def test_finetune_plan(tmp_path):
    from kubeseg.retraining import finetune_plan

    from kubeseg.dataset_merge import RECORD
    from kubeseg.training.finetune import FINETUNE_FILE, FINETUNE_SPLITS
    from kubeseg.training.splits import generate_crossval_split

    bundle, raw = tmp_path / "bundle", tmp_path / "raw"
    old, new = [f"c{i:02d}" for i in range(7)], ["n0", "n1"]
    for sub, name in (("imagesTr", "{}_0000.nii.gz"), ("labelsTr", "{}.nii.gz")):  # names are enough here
        (raw / sub).mkdir(parents=True)
        for c in old + new:
            (raw / sub / name.format(c)).write_text("")
    (raw / RECORD).write_text(json.dumps({"added": new}))
    ds = _bundle(bundle, ["2d", "3d_cascade_fullres"])
    (raw / "dataset.json").write_text(json.dumps({**ds, "numTraining": 9}))
    with pytest.raises(KubesegError, match="cascade.*not supported.*out-of-fold"):
        finetune_plan(bundle, raw)  # new cases have no out-of-fold first-stage prediction
    p = finetune_plan(bundle, raw, ["2d"])  # a champion without splits: nnU-Net's default over the earlier cases
    spec = json.loads((bundle / FINETUNE_FILE).read_text())
    assert spec["champion_splits"] == generate_crossval_split(old) and "default 5-fold split" in spec["splits_source"]
    assert spec["new_cases"] == new and spec["settings"]["epochs"] == 10
    assert all(set(new) <= set(f["train"]) and not set(new) & set(f["val"]) for f in spec["splits"])
    assert json.loads((bundle / FINETUNE_SPLITS).read_text()) == spec["splits"]
    champ = [{"train": old[2:] , "val": old[:2]}] * 5  # the champion's own (odd) splits win
    for m in ("2d", "3d_cascade_fullres"):
        (bundle / f"nnUNetTrainer__P__{m}" / "splits_final.json").write_text(json.dumps(champ))
    p = finetune_plan(bundle, raw, ["2d"])
    spec = json.loads((bundle / FINETUNE_FILE).read_text())
    assert spec["splits"] == [{"train": old[2:] + new, "val": old[:2]}] * 5
    assert any("in every fold's training set only" in n for n in p.notes)
    (raw / RECORD).write_text(json.dumps({"added": []}))  # no new case: the cascade's inputs stay out-of-fold
    for c in new:
        for f in list(raw.rglob(f"{c}*")):
            f.unlink()
    (raw / "dataset.json").write_text(json.dumps({**ds, "numTraining": 7}))
    p = finetune_plan(bundle, raw)
    assert p.mode == "finetune" and p.plans["plans_name"] == "P" and p.candidates == ["2d", "3d_cascade_fullres"]
    assert p.preprocess_configurations == ["2d", "3d_lowres", "3d_cascade_fullres"]
    assert p.first_wave == [{"configuration": "2d", "fold": 0}, {"configuration": "2d", "fold": 1}] + [
        {"configuration": "3d_lowres", "fold": f} for f in range(5)]
    assert p.cascade_wave == [{"configuration": "3d_cascade_fullres", "fold": f} for f in (0, 1)]
    p = finetune_plan(bundle, raw, ["2d"], [4])
    assert p.first_wave == [{"configuration": "2d", "fold": 4}] and p.cascade_wave == []
    (raw / "dataset.json").write_text(json.dumps({**ds, "numTraining": 7,
                                                  "labels": {"background": 0, "organ": 1, "tumour": 2}}))
    with pytest.raises(KubesegError, match="other channels or labels"):
        finetune_plan(bundle, raw)
