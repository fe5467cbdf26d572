"""The compiled training pipeline spec: fan-out, GPU requests, fan-in, image, caching, retries."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("kfp")

from components import IMAGE  # noqa: E402
from kubeseg.cli import main  # noqa: E402
from pipelines.training import compile_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "training.yaml"
    compile_pipeline(str(path), parallelism=0, retries=2)
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0]


def _tasks(spec):
    """The steps: everything runs inside the exit handler that closes the MLflow run."""
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"close-run", "exit-handler-1"}
    assert root["close-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    return spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]


def _loop(spec):
    loops = {n: t for n, t in _tasks(spec).items() if n.startswith("for-loop")}
    assert len(loops) == 1, f"expected one ParallelFor, got {list(loops)}"
    return next(iter(loops.items()))


def _dag(spec, task):
    return spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]


def _group(spec, loop):
    """The configuration-group sub-pipeline a ParallelFor runs: (its call task, its DAG)."""
    body = _dag(spec, loop)
    assert len(body) == 1, list(body)
    call = next(iter(body.values()))
    return call, _dag(spec, call)


def test_one_group_per_configuration_each_preprocessing_its_own_arrays(spec):
    """ParallelFor over configuration groups (what the training-groups step returns) → a sub-pipeline:
    preprocess that configuration → ParallelFor over its (configuration, fold) items → train on that
    configuration's artifact alone → gather its folds."""
    name, loop = _loop(spec)
    it = loop["parameterIterator"]
    assert it["items"]["inputParameter"].endswith("training-groups-Output")
    tasks = _tasks(spec)
    groups = tasks["training-groups"]["inputs"]
    assert groups["parameters"]["items"]["taskOutputParameter"] == {"producerTask": "plan",
                                                                    "outputParameterKey": "Output"}
    assert groups["parameters"]["dataset_hash"]["taskOutputParameter"]["producerTask"] == "dataset-hash"
    assert "preprocess" not in tasks  # no all-configurations artifact any more
    call, group = _group(spec, loop)
    assert call["inputs"]["parameters"]["preprocess_configuration"]["parameterExpressionSelector"] == \
        "parseJson(string_value)[\"preprocess\"]"
    assert call["inputs"]["parameters"]["items"]["parameterExpressionSelector"] == "parseJson(string_value)[\"items\"]"
    assert "open-run" in loop["dependentTasks"]  # the parent run exists before the folds start
    assert set(group) == {"preprocess", "for-loop-1", "gather-group"}
    pre = group["preprocess"]["inputs"]
    assert pre["parameters"]["configuration"] == {"componentInputParameter": "preprocess_configuration"}
    inner = group["for-loop-1"]
    assert inner["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--items"
    body = _dag(spec, inner)
    assert list(body) == ["train"]
    train = body["train"]
    assert train["inputs"]["artifacts"]["preprocessed"]["componentInputArtifact"] == \
        "pipelinechannel--preprocess-preprocessed"
    assert inner["inputs"]["artifacts"]["pipelinechannel--preprocess-preprocessed"]["taskOutputArtifact"] == {
        "producerTask": "preprocess", "outputArtifactKey": "preprocessed"}
    params = train["inputs"]["parameters"]
    assert params["configuration"]["parameterExpressionSelector"] == "parseJson(string_value)[\"configuration\"]"
    assert params["fold"]["parameterExpressionSelector"] == "parseJson(string_value)[\"fold\"]"
    assert train["retryPolicy"]["maxRetryCount"] == 2
    # the sub-pipeline hands out its gathered folds and the array-free reference
    outs = spec["components"][call["componentRef"]["name"]]["dag"]["outputs"]["artifacts"]
    assert outs["models"]["artifactSelectors"] == [{"producerSubtask": "gather-group", "outputArtifactKey": "gathered"}]
    assert outs["reference"]["artifactSelectors"] == [{"producerSubtask": "preprocess",
                                                       "outputArtifactKey": "reference"}]


def test_gpu_cpu_memory_requests_on_training(spec):
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "gpu_type" in res["accelerator"]["resourceType"]
    assert "gpu_count" in res["accelerator"]["resourceCount"]
    assert "train_cpu" in res["resourceCpuLimit"] and "train_memory" in res["resourceMemoryLimit"]
    res = spec["deploymentSpec"]["executors"]["exec-preprocess"]["container"]["resources"]
    assert "train_cpu" in res["resourceCpuLimit"] and "train_memory" in res["resourceMemoryLimit"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    for p in ("dataset_uri", "configurations", "folds", "schedule", "gpu_type", "gpu_count", "mlflow_uri",
              "model_name"):
        assert p in params
    assert params["gpu_count"]["defaultValue"] == 1


def _branches(spec):
    """The two branches after the first wave: (cascade wave, no cascade), each a dict of its tasks."""
    tasks = _tasks(spec)
    branches = [n for n in tasks if n.startswith("condition-branches")]
    assert len(branches) == 1
    conds = spec["components"][tasks[branches[0]]["componentRef"]["name"]]["dag"]["tasks"]
    assert len(conds) == 2
    (if_name, if_task), (else_name, else_task) = sorted(conds.items(), key=lambda kv: int(kv[0].split("-")[-1]))
    assert if_task["triggerPolicy"]["condition"] == \
        "int(inputs.parameter_values['pipelinechannel--gather-Output']) > 0"
    assert else_task["triggerPolicy"]["condition"].startswith("!(int(inputs.parameter_values["
                                                               "'pipelinechannel--gather-Output']) > 0")
    return tasks[branches[0]], _dag(spec, if_task), _dag(spec, else_task)


def test_fan_in_then_two_branches(spec):
    """First wave → gather (Collected models and references) → If(cascade planned): cascade groups
    (preprocess, cascade inputs, second ParallelFor), select over both waves; Else: select over the
    first wave. Each branch bundles and registers."""
    name, _ = _loop(spec)
    tasks = _tasks(spec)
    gather = tasks["gather"]
    assert gather["inputs"]["artifacts"]["models"]["taskOutputArtifact"] == {
        "producerTask": name, "outputArtifactKey": "pipelinechannel--train-configuration-models"}
    assert gather["inputs"]["artifacts"]["references"]["taskOutputArtifact"] == {
        "producerTask": name, "outputArtifactKey": "pipelinechannel--train-configuration-reference"}
    for a in ("models", "references"):
        assert spec["components"]["comp-gather"]["inputDefinitions"]["artifacts"][a]["isArtifactList"]
    assert gather["inputs"]["parameters"]["cascade_wave"]["taskOutputParameter"] == {
        "producerTask": "plan", "outputParameterKey": "cascade_wave"}
    branches, cascade, plain = _branches(spec)
    assert "gather" in branches["dependentTasks"]

    # the cascade branch: groups of the cascade wave, each preprocessing, exporting its inputs, training
    assert {"training-groups-2", "select", "bundle", "register"} <= set(cascade)
    loops = [n for n in cascade if n.startswith("for-loop")]
    assert len(loops) == 1
    loop = cascade[loops[0]]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("training-groups-2-Output")
    call, group = _group(spec, loop)
    assert call["inputs"]["artifacts"]["first_wave"]["componentInputArtifact"].endswith("gather-gathered")
    assert set(group) == {"preprocess", "cascade-inputs", "for-loop-1", "gather-group"}
    assert group["preprocess"]["componentRef"]["name"] == "comp-preprocess-2"
    ci = group["cascade-inputs"]["inputs"]
    assert ci["artifacts"]["preprocessed"]["taskOutputArtifact"]["producerTask"] == "preprocess"
    assert ci["parameters"]["cascade_wave"] == {"componentInputParameter": "items"}
    inner = group["for-loop-1"]
    assert inner["parameterIterator"]["items"]["inputParameter"].endswith("cascade-inputs-Output")
    body = _dag(spec, inner)
    assert list(body) == ["train"]  # task names are local to the sub-pipeline; its component is the second
    train2 = body["train"]
    assert train2["componentRef"]["name"] == "comp-train-2"
    assert train2["inputs"]["artifacts"]["previous_stage"]["componentInputArtifact"].endswith(
        "cascade-inputs-previous_stage")
    assert train2["inputs"]["artifacts"]["preprocessed"]["componentInputArtifact"].endswith(
        "preprocess-preprocessed")
    assert train2["retryPolicy"]["maxRetryCount"] == 2
    res = spec["deploymentSpec"]["executors"]["exec-train-2"]["container"]["resources"]
    assert "gpu_type" in res["accelerator"]["resourceType"]
    sel = cascade["select"]["inputs"]["artifacts"]
    assert sel["cascade_models"]["taskOutputArtifact"] == {
        "producerTask": loops[0], "outputArtifactKey": "pipelinechannel--train-cascade-configuration-models"}
    assert sel["cascade_references"]["taskOutputArtifact"] == {
        "producerTask": loops[0], "outputArtifactKey": "pipelinechannel--train-cascade-configuration-reference"}
    assert sel["models"]["componentInputArtifact"].endswith("gather-gathered")
    assert sel["reference"]["componentInputArtifact"].endswith("gather-reference")
    assert cascade["bundle"]["inputs"]["artifacts"]["selection"]["taskOutputArtifact"]["producerTask"] == "select"
    assert cascade["register"]["inputs"]["artifacts"]["bundle"]["taskOutputArtifact"]["producerTask"] == "bundle"

    # no cascade: the same tail over the first wave alone
    assert set(plain) == {"select-2", "bundle-2", "register-2"}
    assert "cascade_models" not in plain["select-2"]["inputs"]["artifacts"]
    assert plain["select-2"]["inputs"]["artifacts"]["models"]["componentInputArtifact"].endswith("gather-gathered")
    assert plain["select-2"]["inputs"]["artifacts"]["reference"]["componentInputArtifact"].endswith(
        "gather-reference")
    assert plain["register-2"]["cachingOptions"] == {}
    for a in ("cascade_models", "cascade_references"):
        assert spec["components"]["comp-select"]["inputDefinitions"]["artifacts"][a]["isArtifactList"]
        assert spec["components"]["comp-select"]["inputDefinitions"]["artifacts"][a]["isOptional"]
    assert "preprocessed" not in spec["components"]["comp-select"]["inputDefinitions"]["artifacts"]


def test_image_on_every_task_and_nothing_installed(spec):
    executors = spec["deploymentSpec"]["executors"]
    containers = {k: v["container"] for k, v in executors.items() if "container" in v}
    assert {"exec-fingerprint", "exec-plan", "exec-preprocess", "exec-train", "exec-gather", "exec-cascade-inputs",
            "exec-training-groups", "exec-gather-group", "exec-preprocess-2",
            "exec-train-2", "exec-select", "exec-bundle", "exec-register", "exec-open-run",
            "exec-close-run"} <= set(containers)
    for name, c in containers.items():
        assert c["image"] == IMAGE, name
        assert "pip install" not in " ".join(c["command"]), f"{name} installs packages at start"


def test_caching_off_only_where_runs_are_recorded(spec):
    tasks = _tasks(spec)
    _, cascade, plain = _branches(spec)
    assert spec["root"]["dag"]["tasks"]["close-run"]["cachingOptions"] == {}
    assert cascade["register"]["cachingOptions"] == {} and plain["register-2"]["cachingOptions"] == {}
    assert tasks["open-run"]["cachingOptions"] == {}
    call, group = _group(spec, cascade[next(n for n in cascade if n.startswith("for-loop"))])
    assert group["cascade-inputs"]["cachingOptions"]["enableCache"] is True
    assert group["preprocess"]["cachingOptions"]["enableCache"] is True
    assert tasks["fingerprint"]["cachingOptions"]["enableCache"] is True


def test_component_docstrings_are_their_descriptions(tmp_path):
    """KFP's IR keeps no per-task description inside a pipeline; a component compiled on its own
    (or loaded in the UI as a pipeline) carries its docstring as the description."""
    from kfp import compiler

    import components

    for name in ("fingerprint", "plan", "preprocess", "train", "gather", "cascade_inputs", "select", "bundle",
                 "register", "open_run", "merge_cases", "plan_retraining", "promote", "training_groups",
                 "gather_group"):
        comp = getattr(components, name)
        assert len(comp.component_spec.description or "") > 40, name
    compiler.Compiler().compile(components.train, str(tmp_path / "train.yaml"))
    header = (tmp_path / "train.yaml").read_text().split("\n")[:6]
    assert any(line.startswith("# Description: Train one configuration x one fold") for line in header)


def test_cli_compile_with_image(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "training.yaml"
    res = subprocess.run([sys.executable, "-m", "kubeseg.cli", "pipeline", "compile", "-o", str(out),
                          "--image", "registry.example/kubeseg:test"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "training pipeline spec written" in res.stdout and "upload it in the Kubeflow Pipelines UI" in res.stdout
    images = {line.strip() for line in out.read_text().splitlines() if line.strip().startswith("image:")}
    assert images == {"image: registry.example/kubeseg:test"}


def test_cli_submit_goes_through_kfp_client(monkeypatch, capsys):
    """No cluster here: the client is replaced; the arguments it gets are the pipeline's parameters."""
    import kfp

    seen = {}

    class FakeClient:
        def __init__(self, host, namespace=None, existing_token=None):
            seen["host"] = host

        def create_run_from_pipeline_func(self, func, arguments, run_name=None, experiment_name=None):
            seen.update(func=func, arguments=arguments, run_name=run_name)
            return type("Run", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:8888", "--dataset-uri", "s3://b/Dataset001_X",
                 "--folds", "0", "1", "--gpu-type", "nvidia.com/gpu", "--gpu-count", "2",
                 "--mlflow-uri", "http://mlflow:5000", "--run-name", "r1"]) == 0
    assert "started run run-123" in capsys.readouterr().out
    args = seen["arguments"]
    assert seen["host"] == "http://127.0.0.1:8888" and seen["run_name"] == "r1"
    assert args["dataset_uri"] == "s3://b/Dataset001_X" and args["folds"] == [0, 1] and args["gpu_count"] == 2
    assert args["configurations"] == ["2d", "3d_fullres"] and args["mlflow_uri"] == "http://mlflow:5000"
    assert seen["func"].name == "kubeseg-training"


def test_cli_run_local_arguments(monkeypatch, tmp_path, capsys):
    import pipelines.run

    seen = {}

    def fake_run_local(arguments, pipeline_root, parallelism=2, enable_caching=False):
        seen.update(arguments=arguments, root=pipeline_root, parallelism=parallelism)
        return {"version": "7", "run_dir": str(tmp_path / "r"), "seconds": 1.0}

    monkeypatch.setattr(pipelines.run, "run_local", fake_run_local)
    monkeypatch.delenv("KUBESEG_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["pipeline", "run", "--dataset", str(tmp_path / "raw"), "--folds", "0"]) == 2
    assert "only --local runs" in capsys.readouterr().err
    assert main(["pipeline", "run", "--local", "--dataset", str(tmp_path / "raw"), "--folds", "0", "3",
                 "--schedule", "2x3x1", "--preset", "small", "--configurations", "2d",
                 "--pipeline-root", str(tmp_path / "root"), "--model-name", "m"]) == 0
    args = seen["arguments"]
    assert args["dataset_uri"] == str((tmp_path / "raw").resolve()) and args["folds"] == [0, 3]
    assert args["configurations"] == ["2d"] and args["schedule"] == "2x3x1" and args["planner_preset"] == "small"
    assert args["mlflow_uri"] == "sqlite:///mlflow.db" and seen["parallelism"] == 2
    assert "m version 7 (challenger)" in capsys.readouterr().out


def test_cluster_pods_get_mlflow_credentials_and_only_register_the_signing_key(tmp_path, monkeypatch):
    """On a cluster, MLflow runs with authentication and the service serves signed versions only:
    every task that talks to MLflow gets the pipelines' account from a Secret, the register task
    alone mounts the registration key (pipelines/secrets.py)."""
    import yaml

    from pipelines.secrets import SIGNING_MOUNT
    from pipelines.training import compile_pipeline

    monkeypatch.setenv("KUBESEG_MLFLOW_SECRET", "team-mlflow")
    monkeypatch.setenv("KUBESEG_SIGNING_SECRET", "team-signing")
    for pipeline, mlflow_tasks in (("training", {"open-run", "close-run", "train", "select", "register"}),
                                   ("retraining", {"open-run", "close-run", "train", "select", "register",
                                                   "plan-retraining", "promote"})):
        out = tmp_path / f"{pipeline}.yaml"
        compile_pipeline(str(out), pipeline=pipeline)
        docs = list(yaml.safe_load_all(out.read_text()))
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        base = {name.removeprefix("exec-").rsplit("-", 1)[0] if name[-1].isdigit() else name.removeprefix("exec-"): v
                for name, v in executors.items()}
        assert mlflow_tasks <= set(base), (pipeline, sorted(base))
        for name, spec in executors.items():
            envs = {e["secretName"]: {k["envVar"] for k in e["keyToEnv"]} for e in spec.get("secretAsEnv", [])}
            if any(name.removeprefix("exec-").startswith(t) for t in mlflow_tasks):
                assert envs.get("team-mlflow") == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, name
            volumes = spec.get("secretAsVolume", [])
            if name.removeprefix("exec-").startswith("register"):
                assert [(v["secretName"], v["mountPath"]) for v in volumes] == [("team-signing", SIGNING_MOUNT)]
            else:
                assert volumes == [], f"{name} must not see the registration key"
