"""The retraining pipeline end to end through kfp.local against a real ``mlflow server`` (SQLite) on a
free port: a champion exists (a tiny bundle, registered and promoted); new labelled cases arrive;

* ``finetune`` through the client (a detached ``kubeseg pipeline retrain --local`` process and its
  status file): merged dataset, the champion's plans and weights, a new version registered as
  challenger and promoted by the gate;
* ``retrain`` through ``run_local`` with a gate that cannot pass: a new version registered as
  challenger, the refusal recorded as the run's outcome, the champion unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytest.importorskip("mlflow")

from kubeseg.registry import GateSettings, get_version, promote, register_bundle  # noqa: E402
from kubeseg.tracking import client  # noqa: E402
from pipelines.client import RetrainRequest, read_status, start_retraining  # noqa: E402
from pipelines.run import run_local, task_dir  # noqa: E402
from tests.pipelines.helpers import new_cases, tiny_bundle  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "tiny-retraining"
QUICK = {"schedule": "2x3x1", "device": "cpu", "num_workers": 0, "torch_threads": 1, "validation_tta": False}


@pytest.fixture(scope="module")
def champion(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    made = tiny_bundle(root)  # 3d_fullres fold 0 of the small preset's plans
    v = register_bundle(made["bundle"], NAME, server.uri, source_run="seed")
    promote(NAME, v.version, GateSettings(tolerance=1.0, holdout=str(made["raw"] / "imagesTs"), device="cpu",
                                          label_floor=0.0),  # tiny model: the floor has its own tests
            server.uri)
    return {**made, "root": root, "version": v.version, "new": new_cases(root, cases=2)}


@pytest.fixture(scope="module")
def finetuned(server, champion, tmp_path_factory):
    work = tmp_path_factory.mktemp("runs")
    q = dict(QUICK)
    run = start_retraining(RetrainRequest(dataset=str(champion["raw"]), new_cases=str(champion["new"]),
                                          model_name=NAME, tracking_uri=server.uri, mode="finetune",
                                          schedule=q.pop("schedule"), work_dir=str(work), tolerance=1.0,
                                          label_floor=0.0,  # a tiny model: the floor has its own tests
                                          reason="drift alert (test)", **q))
    deadline = time.time() + 1200
    while read_status(run)["state"] in ("starting", "running") and time.time() < deadline:
        time.sleep(2)
    return {"run": run, "status": read_status(run)}


def test_finetune_through_the_client(server, champion, finetuned):
    status, run = finetuned["status"], finetuned["run"]
    assert status["state"] == "succeeded", (status, Path(run.log_path).read_text()[-3000:])
    outcome = status["outcome"]
    assert outcome["version"] == "2" and outcome["promoted"] is True, outcome
    assert outcome["previous_champion"] == champion["version"] and outcome["champion"] == "2"
    assert status["reason"] == "drift alert (test)" and status["pid"] == run.pid

    c = client(server.uri)
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"
    v2 = get_version(NAME, "2", server.uri)
    assert v2.tags["source_pipeline_run"].startswith("kubeseg-retraining")

    run_dir = Path(status["run_dir"])
    merged = json.loads((task_dir(run_dir, "merge-cases") / "executor_output.json").read_text())
    assert "new_000" in json.dumps(merged) and json.loads((task_dir(run_dir, "fingerprint") / "executor_output.json")
                                                          .read_text())["artifacts"]["fingerprint"]["artifacts"][0][
        "metadata"]["cases"] == 8  # 6 + 2 new
    # the champion's plans are kept; the fold started from the champion's weights of the same fold
    plans = json.loads((task_dir(run_dir, "plan-retraining") / "plans").read_text())
    assert plans == json.loads((champion["bundle"] / "plans.json").read_text())
    train = json.loads(next(run_dir.glob("for-loop-*/for-loop-*/train/executor_output.json")).read_text())
    meta = train["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert (meta["configuration"], meta["fold"]) == ("3d_fullres", 0)
    assert meta["pretrained"] == "nnUNetTrainer__kubesegSmallPlans__3d_fullres/fold_0/checkpoint_final.pth"
    log = next(run_dir.glob("for-loop-*/for-loop-*/train/model/*/fold_0/training_log_*.txt")).read_text()
    assert "pretrained weights" in log
    bundle = Path(status["bundle"])
    assert json.loads((bundle / "plans.json").read_text()) == plans


def test_retrain_refused_gate_is_an_outcome(server, champion, finetuned, tmp_path):
    args = {"dataset_uri": str(champion["raw"]), "new_cases_uri": str(champion["new"]), "model_name": NAME,
            "mlflow_uri": server.uri, "mode": "retrain", "configurations": ["3d_fullres"], "folds": [0],
            "planner_preset": "small", "experiment": "kubeseg-retrain-test", "tolerance": -1.0, **QUICK}
    result = run_local(args, tmp_path / "root", pipeline="retraining")
    outcome = result["promotion"]
    assert result["version"] == "3" and outcome["version"] == "3" and outcome["promoted"] is False
    assert "below the champion's" in outcome["reasons"][0] and outcome["champion"] == "2"
    c = client(server.uri)
    assert str(c.get_model_version_by_alias(NAME, "challenger").version) == "3"  # registered as challenger
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"  # unchanged
    # no champion weights in retrain mode; the pipeline's MLflow run finished normally
    run_dir = Path(result["run_dir"])
    meta = json.loads(next(run_dir.glob("for-loop-*/for-loop-*/train/executor_output.json")).read_text())["artifacts"][
        "model"]["artifacts"][0]["metadata"]
    assert meta["pretrained"] == ""
    runs = c.search_runs([c.get_experiment_by_name("kubeseg-retrain-test").experiment_id],
                         "tags.`kubeseg.kind` = 'pipeline'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["mode"] == "retrain" and runs[0].data.tags["kubeseg.pipeline"] == "retraining"
