"""Engine helpers the pipeline steps share with the CLI (kubeseg.workflow)."""

from __future__ import annotations

import json

import pytest

from kubeseg.errors import KubesegError
from kubeseg.training.schedule import Schedule
from kubeseg.workflow import (cv_table_rows, gather_folds, markdown_table, parse_schedule, preprocess_configurations,
                              text_table, training_items)

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
