"""The whole training pipeline through kfp.local on a tiny synthetic dataset, tracked and registered
in a real ``mlflow server`` (SQLite, local artifacts) on a free port of 127.0.0.1; then the model
lifecycle: promote, register again, promote, roll back, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytest.importorskip("mlflow")

from kubeseg.errors import KubesegError  # noqa: E402
from kubeseg.registry import GateSettings, champion_history, load_version, promote, register_bundle, rollback  # noqa: E402
from kubeseg.tracking import client  # noqa: E402
from pipelines.run import run_local, task_dir  # noqa: E402
from tests.pipelines.helpers import tiny_raw  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "tiny-pipeline"


@pytest.fixture(scope="module")
def pipeline_run(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfp")
    raw = tiny_raw(root)
    args = {"dataset_uri": str(raw), "configurations": ["2d", "3d_fullres"], "folds": [0, 1], "schedule": "2x3x1",
            "planner_preset": "small", "device": "cpu", "num_workers": 0, "torch_threads": 1,
            "mlflow_uri": server.uri, "experiment": "kubeseg-test", "model_name": NAME}
    result = run_local(args, root / "pipeline_root", parallelism=2)
    return {"raw": raw, "result": result, "run_dir": Path(result["run_dir"])}


def _champion(server) -> str:
    return str(client(server.uri).get_model_version_by_alias(NAME, "champion").version)


def test_runs_metrics_artifacts(server, pipeline_run):
    c = client(server.uri)
    exp = c.get_experiment_by_name("kubeseg-test")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kubeseg.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    folds = [r for r in runs if r.data.tags.get("kubeseg.kind") == "fold"]
    assert sorted((r.data.tags["kubeseg.configuration"], r.data.tags["kubeseg.fold"]) for r in folds) == [
        ("2d", "0"), ("2d", "1"), ("3d_fullres", "0"), ("3d_fullres", "1")]
    for r in folds:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["plans.name"] == "kubesegSmallPlans" and "plans.patch_size" in r.data.params
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")] == [0, 1]
        assert len(c.get_metric_history(r.info.run_id, "pseudo_dice_1")) == 2
        assert "val_fg_dice" in r.data.metrics
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"progress.png", "metrics.json", "validation"} <= arts
    assert {"cv_fg_dice", "cv_dice_1", "cv_dice_2", "cv_dice_3"} <= set(parent.data.metrics)
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "selection")} >= {
        "selection/cv_table.md", "selection/summary.html", "selection/selection.json"}

    # what the Kubeflow UI shows: metrics, the Markdown plans, the HTML summary, the bundle
    run_dir = pipeline_run["run_dir"]
    assert "| 3d_fullres |" in (run_dir / "plan" / "summary").read_text()
    select = task_dir(run_dir, "select")
    page = (select / "summary").read_text()
    assert "data:image/png;base64" in page and "(selected)" in page
    metrics = json.loads((select / "executor_output.json").read_text())
    assert "cv.foreground_dice" in json.dumps(metrics)
    assert (Path(pipeline_run["result"]["bundle"]) / "selection.json").is_file()
    # no cascade planned: the gather step says so, and the cascade branch did not run
    gathered = json.loads((task_dir(run_dir, "gather") / "executor_output.json").read_text())
    assert gathered["parameterValues"]["Output"] == 0
    assert not list(run_dir.glob("**/cascade-inputs")) and not list(run_dir.glob("**/train-2"))


def test_one_preprocessed_artifact_per_configuration(pipeline_run):
    """Each configuration group preprocesses its own artifact; its training tasks (same loop
    iteration) read only that one: the 2d folds' input holds no 3d arrays. Selection reads a
    reference without arrays."""
    run_dir = pipeline_run["run_dir"]
    groups = {}
    for done in sorted(run_dir.glob("**/preprocess/executor_output.json")):
        group = done.parent.parent
        pre = done.parent / "preprocessed"
        idents = sorted(d.name for d in pre.iterdir() if d.is_dir() and any(d.glob("*.npy"))
                        and d.name != "gt_segmentations")
        trained = sorted({m.name.split("__")[-1] for m in group.glob("**/train/model/*__*__*")})
        groups[tuple(trained)] = idents
        ref = done.parent / "reference"
        assert not [p for p in ref.rglob("*.npy")], f"{ref} holds arrays"
        assert sorted(p.name for p in ref.iterdir() if p.is_dir() and p.name != "gt_segmentations") == idents
    assert groups == {("2d",): ["kubesegSmallPlans_2d"], ("3d_fullres",): ["kubesegSmallPlans_3d_fullres"]}, groups
    gathered = task_dir(run_dir, "gather") / "reference"
    assert {"plans.json", "dataset.json", "gt_segmentations", "kubesegSmallPlans_2d",
            "kubesegSmallPlans_3d_fullres"} <= {p.name for p in gathered.iterdir()}
    assert not list(gathered.rglob("*.npy")) and list(gathered.glob("kubesegSmallPlans_2d/*.json"))


def test_model_lifecycle(server, pipeline_run, tmp_path, monkeypatch):
    uri = server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pipeline_run["result"]["version"] == "1"
    c = client(uri)
    mv = c.get_model_version_by_alias(NAME, "challenger")
    assert str(mv.version) == "1"
    assert mv.tags["source_pipeline_run"].startswith("kubeseg-training")
    # label_floor=0: a tiny model misses labels; the per-label floor has its own tests (test_registry)
    holdout = GateSettings(holdout=str(pipeline_run["raw"] / "imagesTs"), device="cpu", tolerance=1.0, label_floor=0.0)

    with pytest.raises(KubesegError, match="no champion to roll back"):
        rollback(NAME, uri)
    promote(NAME, gate=holdout, uri=uri)
    assert _champion(server) == "1"

    bundle = Path(pipeline_run["result"]["bundle"])
    v2 = register_bundle(bundle, NAME, uri, source_run="manual")
    assert v2.version == "2" and str(c.get_model_version_by_alias(NAME, "challenger").version) == "2"
    promote(NAME, gate=holdout, uri=uri)
    assert _champion(server) == "2" and champion_history(NAME, uri) == ["1", "2"]

    # a failed gate changes nothing
    v3 = register_bundle(bundle, NAME, uri, tags={"cv_foreground_dice": "0.0"})
    with pytest.raises(KubesegError, match="below the champion's"):
        promote(NAME, gate=GateSettings(holdout=holdout.holdout, tolerance=0.0, label_floor=0.0), uri=uri)
    assert _champion(server) == "2" and str(c.get_model_version_by_alias(NAME, "challenger").version) == v3.version

    rollback(NAME, uri)
    assert _champion(server) == "1" and champion_history(NAME, uri) == ["1"]
    with pytest.raises(KubesegError, match="no previous champion"):
        rollback(NAME, uri)
    assert _champion(server) == "1"

    # models:/NAME@champion resolves to version 1's files, and the verified download matches them
    import mlflow.artifacts

    got = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "a"),
                                                   tracking_uri=uri))
    sel = json.loads((got / "selection.json").read_text())
    assert sel == json.loads((bundle / "selection.json").read_text())
    verified = load_version(NAME, "champion", tmp_path / "b", uri)
    assert verified.name == f"{NAME}-v1" and (verified / "selection.json").is_file()


def test_failed_pipeline_closes_its_run_as_failed(server, pipeline_run, tmp_path):
    """The exit handler ends the parent run FAILED when a step fails (here: plan refuses an
    unknown configuration)."""
    args = {"dataset_uri": str(pipeline_run["raw"]), "configurations": ["3d_huge"], "folds": [0],
            "schedule": "2x3x1", "planner_preset": "small", "device": "cpu", "num_workers": 0,
            "mlflow_uri": server.uri, "experiment": "kubeseg-failing", "model_name": NAME}
    with pytest.raises(RuntimeError, match="FAILURE"):
        run_local(args, tmp_path / "root")
    c = client(server.uri)
    runs = c.search_runs([c.get_experiment_by_name("kubeseg-failing").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.tags["kubeseg.pipeline_state"] == "FAILED"
