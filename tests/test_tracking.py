"""MLflow tracking through the trainer's callback interface (no training: the hooks are driven
the way the trainer drives them), and the selection on the parent run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlflow")

from kubeseg.tracking import (MlflowTrainingCallback, client, finish_run, log_selection,  # noqa: E402
                              read_run_ref, start_pipeline_run, write_run_ref)

PLANS = {"plans_name": "kubesegSmallPlans", "dataset_name": "Dataset001_SynthCT", "configurations": {
    "3d_fullres": {"data_identifier": "d3", "batch_size": 2, "patch_size": [16, 32, 32], "spacing": [1, 1, 1],
                   "architecture": {"arch_kwargs": {"n_stages": 3, "features_per_stage": [8, 16, 32]}}}}}


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_nested_fold_run_gets_params_metrics_artifacts(tmp_path, uri):
    parent = start_pipeline_run(uri, "exp", "training test", params={"folds": [0, 1]}, tags={"k": "v"})
    fold_dir = tmp_path / "fold_0"
    (fold_dir / "validation").mkdir(parents=True)
    cb = MlflowTrainingCallback(uri, parent, plans=PLANS)
    cb.on_train_start({"fold": 0, "configuration": "3d_fullres", "device": "cpu", "train_cases": 4, "val_cases": 2,
                       "settings": {"seed": 1, "schedule": {"num_epochs": 2, "train_iterations": 3}}})
    for epoch in range(2):
        (fold_dir / "progress.png").write_bytes(b"\x89PNG")
        (fold_dir / "metrics.json").write_text("{}")
        cb.on_artifact(fold_dir / "progress.png")
        cb.on_artifact(fold_dir / "metrics.json")
        cb.on_artifact(fold_dir / "checkpoint_latest.pth")
        cb.on_epoch_end(epoch, {"epoch": epoch, "train_loss": 1.0 - epoch / 10, "val_loss": float("nan"),
                                "pseudo_dice": {"1": 0.1 * epoch, "2": float("nan")}, "mean_fg_dice": 0.1,
                                "ema_fg_dice": 0.1, "lr": 0.01, "epoch_time_s": 1.0})
    (fold_dir / "validation" / "summary.json").write_text("{}")
    cb.on_artifact(fold_dir / "validation" / "summary.json")
    (fold_dir / "training_log_x.txt").write_text("log")
    cb.on_train_end({"fold": 0, "fold_dir": str(fold_dir), "validation": {
        "mean": {"1": {"Dice": 0.8}, "2": {"Dice": None}}, "foreground_mean": {"Dice": 0.8}}})

    c = client(uri)
    run = c.get_run(cb.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.status == "FINISHED" and run.info.run_name == "3d_fullres fold 0"
    assert run.data.params["plans.patch_size"] == "[16, 32, 32]"
    assert run.data.params["plans.arch.features_per_stage"] == "[8, 16, 32]"
    assert run.data.params["schedule.num_epochs"] == "2"
    assert [m.value for m in c.get_metric_history(cb.run_id, "train_loss")] == [1.0, 0.9]
    assert [m.step for m in c.get_metric_history(cb.run_id, "pseudo_dice_1")] == [0, 1]
    assert "val_loss" not in run.data.metrics and "pseudo_dice_2" not in run.data.metrics
    assert run.data.metrics["val_dice_1"] == 0.8 and run.data.metrics["val_fg_dice"] == 0.8
    names = {a.path for a in c.list_artifacts(cb.run_id)}
    assert {"progress.png", "metrics.json", "validation", "logs"} == names
    assert [a.path for a in c.list_artifacts(cb.run_id, "validation")] == ["validation/summary.json"]

    selection = {"members": [{"configuration": "3d_fullres"}], "expected_dice": {"1": 0.8, "2": 0.6},
                 "expected_foreground_dice": 0.7, "expected_foreground_dice_after_postprocessing": 0.71,
                 "candidates": [{"name": "3d_fullres", "dice": {"1": 0.8, "2": 0.6}, "foreground_dice": 0.7},
                                {"name": "2d + 3d_fullres", "dice": {"1": 0.7, "2": 0.5}, "foreground_dice": 0.6}]}
    log_selection(uri, parent, selection, "<html></html>")
    finish_run(uri, parent)
    prun = c.get_run(parent)
    assert prun.data.metrics["cv_fg_dice"] == 0.7 and prun.data.metrics["cv_dice_2"] == 0.6
    assert prun.data.metrics["cv_fg_dice.2d-3d_fullres"] == 0.6
    assert prun.data.params["folds"] == "[0, 1]" and prun.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parent, "selection")} == {
        "selection/cv_table.md", "selection/selection.json", "selection/summary.html"}
    # artifacts of a server-less SQLite store go beside the database, not into the working directory
    assert (tmp_path / "mlartifacts" / "exp").is_dir()


def test_run_ref_roundtrip(tmp_path):
    write_run_ref(tmp_path / "ref", "sqlite:///x.db", "abc")
    assert read_run_ref(tmp_path / "ref") == ("sqlite:///x.db", "abc")
    write_run_ref(tmp_path / "off", "", "")
    assert read_run_ref(tmp_path / "off") == ("", "")
    assert json.loads((tmp_path / "off").read_text())["experiment"] == "kubeseg"


def test_register_needs_a_tracking_uri(monkeypatch):
    from kubeseg.errors import KubesegError
    from kubeseg.tracking import require_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(KubesegError, match="no MLflow tracking URI"):
        require_tracking_uri("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert require_tracking_uri("") == "http://127.0.0.1:5000"
    assert require_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
