"""The retraining pipeline's spec, its CLI verbs and the client the service layer uses (cluster path
through a stand-in kfp.Client; local path: a real detached process and its status file)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kfp")

from kubeseg.cli import main  # noqa: E402
from pipelines.client import RetrainRequest, RetrainRun, read_status, start_retraining, write_status  # noqa: E402
from pipelines.training import compile_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "retraining.yaml"
    compile_pipeline(str(path), parallelism=0, retries=2, pipeline="retraining")
    return next(yaml.safe_load_all(path.read_text()))  # the pipeline spec (a platform spec may follow)


def _dag(spec, task):
    return spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


def test_retraining_spec(spec):
    assert spec["pipelineInfo"]["name"] == "kubeseg-retraining"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["mode"]["defaultValue"] == "finetune" and params["tolerance"]["defaultValue"] == 0.02
    assert params["configurations"]["defaultValue"] == [] and params["folds"]["defaultValue"] == []
    assert {"dataset_uri", "new_cases_uri", "model_name", "mlflow_uri", "schedule", "gpu_type", "gpu_count",
            "holdout_uri"} <= set(params)
    # incremental fine-tuning's defaults (the design's) and the registered holdout's
    assert {k: params[k]["defaultValue"] for k in ("finetune_epochs", "finetune_lr", "encoder_lr_scale",
                                                   "decoder_lr_scale", "max_new_cases", "holdout_set",
                                                   "label_tolerance")} == \
        {"finetune_epochs": 10, "finetune_lr": 1e-4, "encoder_lr_scale": 0.5, "decoder_lr_scale": 1.0,
         "max_new_cases": 0, "holdout_set": "", "label_tolerance": 0.02}
    tasks = _dag(spec, spec["root"]["dag"]["tasks"]["exit-handler-1"])
    # merged dataset → fingerprint → plan (champion or new) → preprocess per configuration, all on the merged copy
    merge = tasks["merge-cases"]["inputs"]["artifacts"]
    assert {merge["raw"]["taskOutputArtifact"]["producerTask"], merge["new_cases"]["taskOutputArtifact"][
        "producerTask"]} == {"importer", "importer-2"}
    for t in ("fingerprint", "plan-retraining"):
        assert tasks[t]["inputs"]["artifacts"]["raw"]["taskOutputArtifact"]["producerTask"] == "merge-cases", t
    assert tasks["plan-retraining"]["cachingOptions"] == {}  # the champion moves between runs
    plan_params = tasks["plan-retraining"]["inputs"]["parameters"]
    for k in ("finetune_epochs", "finetune_lr", "encoder_lr_scale", "decoder_lr_scale", "max_new_cases",
              "case_confidence"):
        assert plan_params[k]["componentInputParameter"] == f"pipelinechannel--{k}", k
    assert tasks["merge-cases"]["cachingOptions"] == {}  # and the new cases' folder fills up
    assert tasks["training-groups"]["inputs"]["parameters"]["items"]["taskOutputParameter"] == {
        "producerTask": "plan-retraining", "outputParameterKey": "Output"}
    # one sub-pipeline per configuration group: preprocess (merged copy, champion's plans) → train
    loop = next(t for n, t in tasks.items() if n.startswith("for-loop"))
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("training-groups-Output")
    call = next(iter(_dag(spec, loop).values()))
    group = _dag(spec, call)
    assert call["inputs"]["artifacts"]["raw"]["componentInputArtifact"].endswith("merge-cases-merged")
    assert call["inputs"]["artifacts"]["plans"]["componentInputArtifact"].endswith("plan-retraining-plans")
    assert group["preprocess"]["inputs"]["artifacts"]["plans"] == {"componentInputArtifact": "plans"}
    # every fold starts from the champion's weights (an empty artifact in retrain mode)
    assert call["inputs"]["artifacts"]["pretrained"]["componentInputArtifact"].endswith("plan-retraining-champion")
    train = _dag(spec, next(t for n, t in group.items() if n.startswith("for-loop")))["train"]
    assert train["inputs"]["artifacts"]["pretrained"]["componentInputArtifact"] == "pipelinechannel--pretrained"
    # both branches: ... → register → gated promotion of the registered version
    branches = _dag(spec, next(t for n, t in tasks.items() if n.startswith("condition-branches")))
    tails = [_dag(spec, t) for t in branches.values()]
    for tail in tails:
        promote = next(n for n in tail if n.startswith("promote"))
        register = next(n for n in tail if n.startswith("register"))
        version = tail[promote]["inputs"]["parameters"]["version"]["taskOutputParameter"]
        assert version == {"producerTask": register, "outputParameterKey": "Output"}
        gate_params = tail[promote]["inputs"]["parameters"]
        assert {"holdout_set", "label_tolerance", "label_floor"} <= set(gate_params)
        assert tail[promote]["cachingOptions"] == {}
    cascade = next(t for t in tails if any(n.startswith("for-loop") for n in t))
    group = _dag(spec, next(iter(_dag(spec, next(t for n, t in cascade.items() if n.startswith("for-loop"))).values())))
    assert "cascade-inputs" in group
    inner = _dag(spec, next(t for n, t in group.items() if n.startswith("for-loop")))
    assert set(inner["train"]["inputs"]["artifacts"]) >= {"previous_stage", "pretrained", "preprocessed"}


def test_cli_compile_retraining(tmp_path, capsys):
    assert main(["pipeline", "compile", "--pipeline", "retraining", "-o", str(tmp_path / "r.yaml")]) == 0
    assert "retraining pipeline spec written" in capsys.readouterr().out
    assert next(yaml.safe_load_all((tmp_path / "r.yaml").read_text()))["pipelineInfo"]["name"] == "kubeseg-retraining"


class FakeClient:
    """Stands in for kfp.Client: no cluster here."""

    seen: dict = {}

    def __init__(self, host, namespace=None, existing_token=None):
        FakeClient.seen = {"host": host, "namespace": namespace}

    def create_run_from_pipeline_func(self, func, arguments, run_name=None, experiment_name=None):
        FakeClient.seen.update(func=func, arguments=arguments, run_name=run_name, experiment=experiment_name)
        return type("Run", (), {"run_id": "run-42"})()


def test_client_cluster(monkeypatch):
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    run = start_retraining(RetrainRequest(dataset="s3://b/Dataset001_X", new_cases="s3://b/new", model_name="m",
                                          tracking_uri="http://mlflow:5000", host="http://kfp:8888",
                                          folds=[0, "1"], reason="drift"))
    assert isinstance(run, RetrainRun) and run.run_id == "run-42" and run.mode == "cluster"
    assert run.retrain_mode == "finetune" and run.host == "http://kfp:8888" and run.pid is None
    assert run.started_at.endswith("Z")
    seen = FakeClient.seen
    assert seen["host"] == "http://kfp:8888" and seen["func"].name == "kubeseg-retraining"
    assert seen["experiment"] == "kubeseg-retraining" and seen["run_name"].startswith("retraining m ")
    args = seen["arguments"]
    assert args["dataset_uri"] == "s3://b/Dataset001_X" and args["new_cases_uri"] == "s3://b/new"
    assert args["mode"] == "finetune" and args["folds"] == [0, 1] and args["mlflow_uri"] == "http://mlflow:5000"
    assert args["configurations"] == [] and args["tolerance"] == 0.02 and args["holdout_uri"] == ""

    from kubeseg.errors import KubesegError
    with pytest.raises(KubesegError, match="mode must be one of"):
        start_retraining(RetrainRequest(dataset="d", new_cases="n", mode="fast", host="http://kfp"))


def test_cli_retrain_on_a_cluster(monkeypatch, capsys):
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    assert main(["pipeline", "retrain", "--host", "http://kfp:8888", "--dataset", "s3://b/D", "--new-cases",
                 "s3://b/n", "--mode", "retrain", "--configurations", "3d_fullres", "--gpu-count", "2",
                 "--mlflow-uri", "http://mlflow:5000", "--model-name", "m"]) == 0
    assert "started retraining run run-42 (retrain) on http://kfp:8888" in capsys.readouterr().out
    args = FakeClient.seen["arguments"]
    assert args["mode"] == "retrain" and args["configurations"] == ["3d_fullres"] and args["folds"] == []
    assert args["gpu_count"] == 2 and args["model_name"] == "m"
    assert main(["pipeline", "retrain", "--dataset", "d", "--new-cases", "n"]) == 2
    assert "--local" in capsys.readouterr().err


def test_cli_retrain_local_arguments(monkeypatch, tmp_path, capsys):
    import pipelines.run

    seen = {}

    def fake_run_local(arguments, pipeline_root, parallelism=2, enable_caching=False, pipeline="training"):
        seen.update(arguments=arguments, root=pipeline_root, pipeline=pipeline)
        return {"version": "3", "run_dir": str(tmp_path / "r"), "seconds": 1.0,
                "promotion": {"version": "3", "promoted": False, "reasons": ["refusing: below the champion's"]}}

    monkeypatch.setattr(pipelines.run, "run_local", fake_run_local)
    conf = tmp_path / "queue.json"  # the review queue's items
    conf.write_text(json.dumps({"items": [{"id": "a", "confidence": 0.3}, {"id": "b", "confidence": 0.9}]}))
    assert main(["pipeline", "retrain", "--local", "--dataset", str(tmp_path / "raw"), "--new-cases",
                 str(tmp_path / "new"), "--schedule", "2x3x1", "--folds", "0", "--mlflow-uri", "sqlite:///x.db",
                 "--status-file", str(tmp_path / "s.json"), "--pipeline-root", str(tmp_path / "root"),
                 "--finetune-epochs", "3", "--finetune-lr", "2e-4", "--encoder-lr-scale", "0.25",
                 "--max-new-cases", "50", "--case-confidence", str(conf), "--holdout-set", "h@2"]) == 0
    assert seen["pipeline"] == "retraining"
    args = seen["arguments"]
    assert (args["finetune_epochs"], args["finetune_lr"], args["encoder_lr_scale"], args["decoder_lr_scale"]) == \
        (3, 2e-4, 0.25, 1.0)
    assert args["max_new_cases"] == 50 and args["case_confidence"] == {"a": 0.3, "b": 0.9}
    assert args["holdout_set"] == "h@2" and args["label_tolerance"] == 0.02
    assert args["dataset_uri"] == str((tmp_path / "raw").resolve()) and args["folds"] == [0]
    assert args["mode"] == "finetune" and args["schedule"] == "2x3x1" and args["mlflow_uri"] == "sqlite:///x.db"
    assert "version 3 (challenger) not promoted: refusing: below the champion's" in capsys.readouterr().out
    status = json.loads((tmp_path / "s.json").read_text())
    assert status["state"] == "succeeded" and status["outcome"]["promoted"] is False and status["version"] == "3"
    assert status["pid"] == os.getpid() and status["finished_at"]


def test_client_local_starts_a_detached_run(tmp_path):
    """A real start: the process runs the pipeline in the background and keeps the status file; here
    the new cases do not exist, so it ends quickly, as failed, saying why."""
    from tests.pipelines.helpers import tiny_raw

    raw = tiny_raw(tmp_path, cases=2, test_cases=0)
    started = time.time()
    run = start_retraining(RetrainRequest(dataset=str(raw), new_cases=str(tmp_path / "missing"),
                                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                          work_dir=str(tmp_path / "runs"), reason="test"))
    assert time.time() - started < 10  # returns at once
    assert run.mode == "local" and run.pid and Path(run.log_path).parent == Path(run.status_path).parent
    assert Path(run.status_path).parent.parent == (tmp_path / "runs").resolve()
    status = read_status(run)
    assert status["run_id"] == run.run_id and status["state"] in ("starting", "running", "failed")
    assert status["reason"] == "test" and status["mode"] == "finetune"
    deadline = time.time() + 300
    while read_status(run)["state"] in ("starting", "running") and time.time() < deadline:
        time.sleep(1)
    status = read_status(run)
    assert status["state"] == "failed" and status["pid"] == run.pid, status
    assert "merge-cases" in status["error"] and status["finished_at"]
    assert f"KubesegError: new cases {tmp_path / 'missing'} is not a folder" in status["error"]
    assert "missing" in Path(run.log_path).read_text()


def test_read_status_of_a_vanished_process(tmp_path):
    path = write_status(tmp_path / "status.json", {"state": "running", "pid": 2 ** 22 + 12345, "log_path": "x"})
    assert path["state"] == "running"
    status = read_status(tmp_path / "status.json")
    assert status["state"] == "failed" and "ended without a final status" in status["error"]
