"""The retraining pipeline end to end through kfp.local against a real ``mlflow server`` (SQLite) on a
free port: a champion exists (a tiny bundle, registered and promoted), a fixed labelled holdout is
registered (``NAME-holdout``), new labelled cases arrive (an nnU-Net folder, merged by ``dataset merge``);

* incremental ``finetune`` through the client (a detached ``kubeseg pipeline retrain --local`` process
  and its status file): merged dataset, the champion's plans, weights and splits (no fold validates on
  a case its champion fold trained on; new cases in training sets only), at most 10 epochs at lr 1e-4
  with encoder x0.5 / decoder x1.0 (read back from the checkpoint and the log), a new version promoted
  by the holdout gate with both models' per-label Dice recorded;
* a challenger whose one label regresses (that label's output switched off) is refused by the holdout
  gate, naming that label;
* ``retrain`` through ``run_local`` with a holdout gate that cannot pass: a new version registered as
  challenger, the refusal recorded as the run's outcome, the champion unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytest.importorskip("mlflow")

import torch  # noqa: E402

from kubeseg.holdout import register_holdout  # noqa: E402
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
    made = tiny_bundle(root, schedule=(3, 4, 1))  # 3d_fullres fold 0 of the small preset's plans
    v = register_bundle(made["bundle"], NAME, server.uri, source_run="seed")
    promote(NAME, v.version, GateSettings(tolerance=1.0, holdout=str(made["raw"] / "imagesTs"), device="cpu",
                                          label_floor=0.0),  # tiny model: the floor has its own tests
            server.uri)
    # the fixed holdout: two labelled cases no model trains on (imagesTr/labelsTr of their own folder)
    hv, created = register_holdout(new_cases(root, cases=2, prefix="hold", seed=11), NAME, server.uri)
    assert created and (hv.name, hv.version, hv.cases) == (f"{NAME}-holdout", "1", 2)
    assert register_holdout(root / "hold_cases", NAME, server.uri) == (hv, False)  # same contents: same version
    return {**made, "root": root, "version": v.version, "new": new_cases(root, cases=2), "holdout": hv}


@pytest.fixture(scope="module")
def finetuned(server, champion, tmp_path_factory):
    work = tmp_path_factory.mktemp("runs")
    q = dict(QUICK)
    q.pop("schedule")
    run = start_retraining(RetrainRequest(dataset=str(champion["raw"]), new_cases=str(champion["new"]),
                                          model_name=NAME, tracking_uri=server.uri, mode="finetune",
                                          schedule="12x1x1",  # longer than the fine-tune's 10 epochs: capped
                                          work_dir=str(work), label_floor=0.0,  # a tiny model
                                          label_tolerance=0.1,  # 10 gentle steps move a tiny model's Dice a little
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
    train = json.loads(next(run_dir.glob("for-loop-*/**/train/executor_output.json")).read_text())
    meta = train["artifacts"]["model"]["artifacts"][0]["metadata"]
    assert (meta["configuration"], meta["fold"]) == ("3d_fullres", 0)
    folder = "nnUNetTrainer__kubesegSmallPlans__3d_fullres"
    assert meta["pretrained"] == f"{folder}/fold_0/checkpoint_final.pth"
    fold_dir = next(run_dir.glob(f"for-loop-*/**/train/model/{folder}/fold_0"))
    log = next(fold_dir.glob("training_log_*.txt")).read_text()
    assert "pretrained weights" in log

    # no leak: every fold's validation cases are the champion fold's, none of its training cases;
    # the new cases are in every training set and no validation set
    old = json.loads((champion["bundle"] / folder / "splits_final.json").read_text())
    used = json.loads((fold_dir.parent / "splits_final.json").read_text())
    new = ["new_000", "new_001"]
    assert len(used) == len(old) == 5
    for k, (o, u) in enumerate(zip(old, used)):
        assert not set(u["val"]) & set(o["train"]), k
        assert sorted(u["val"]) == sorted(o["val"]) and set(new) <= set(u["train"]) and not set(new) & set(u["val"])
    bundle = Path(status["bundle"])
    assert json.loads((bundle / "plans.json").read_text()) == plans
    assert json.loads((bundle / folder / "splits_final.json").read_text()) == used  # travels for the next fine-tune

    # the schedule actually used: 10 epochs (the run asked 12) x 1 iteration, lr 1e-4, encoder x0.5
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert ckpt["current_epoch"] == 10 and ckpt["init_args"]["schedule"]["train_iterations"] == 1
    opt = ckpt["init_args"]["optimizer"]
    assert (opt["initial_lr"], opt["encoder_lr_scale"], opt["decoder_lr_scale"]) == (1e-4, 0.5, 1.0)
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer_state"]["param_groups"]}
    assert set(groups) == {"encoder", "decoder"} and groups["encoder"] == pytest.approx(0.5 * groups["decoder"])
    assert "epoch 0  lr 0.0001 (encoder 5e-05, decoder 0.0001)" in log and "epoch 9  " in log
    assert "epoch 10  " not in log

    # the holdout decided, per label, with both models scored in the same run
    h = outcome["holdout"]
    assert (h["holdout"], h["version"], h["sha256"]) == (f"{NAME}-holdout", "1", champion["holdout"].sha256)
    assert h["passed"] and h["champion_version"] == champion["version"]
    assert set(h["challenger"]) == set(h["champion"]) == {"body", "organ", "lesion"}
    assert any("holdout tiny-retraining-holdout version 1" in r for r in outcome["reasons"])
    assert json.loads(v2.tags["kubeseg.holdout"])["challenger"] == h["challenger"]


def test_a_label_that_regresses_on_the_holdout_is_refused(server, champion, finetuned, tmp_path):
    """Version 2 with one label's output switched off (that head's bias very negative): the other
    labels are as good as the champion's, that one is not; the gate names it."""
    from kubeseg.registry import load_version
    from kubeseg.retraining import gated_promotion

    assert finetuned["status"]["outcome"]["promoted"]
    scores = finetuned["status"]["outcome"]["holdout"]["challenger"]  # version 2's, now the champion's
    label = max(scores, key=lambda k: scores[k] or 0)
    assert scores[label] > 0.2, scores  # something to lose
    names = json.loads((champion["bundle"] / "dataset.json").read_text())["labels"]
    value = int(names[label])
    bundle = load_version(NAME, "2", tmp_path / "v2", server.uri)
    for f in bundle.glob("*/fold_*/checkpoint_final.pth"):
        ckpt = torch.load(f, weights_only=True)
        for k, v in ckpt["network_weights"].items():
            if "seg_layers" in k and k.endswith(".bias"):
                v[value] = -1e4
        torch.save(ckpt, f)
    (bundle / "kubeseg-signature.json").unlink(missing_ok=True)
    v3 = register_bundle(bundle, NAME, server.uri, source_run="sabotaged")
    outcome = gated_promotion(NAME, v3.version, server.uri, None, label_floor=0.0, device="cpu")
    assert outcome.promoted is False and outcome.champion == "2", outcome
    reason = outcome.reasons[0]
    assert f"label {label!r} ({value}): holdout Dice 0.000 is below the champion's" in reason
    others = [k for k in names if k not in ("background", label)]
    assert not any(f"label {o!r}" in reason for o in others)  # only the label that regressed is named
    assert outcome.holdout["challenger"][label] == 0.0 and outcome.holdout["champion"][label] == scores[label]
    assert outcome.holdout["passed"] is False and outcome.holdout["champion_version"] == "2"
    assert str(client(server.uri).get_model_version_by_alias(NAME, "champion").version) == "2"


def test_retrain_refused_gate_is_an_outcome(server, champion, finetuned, tmp_path):
    args = {"dataset_uri": str(champion["raw"]), "new_cases_uri": str(champion["new"]), "model_name": NAME,
            "mlflow_uri": server.uri, "mode": "retrain", "configurations": ["3d_fullres"], "folds": [0],
            "planner_preset": "small", "experiment": "kubeseg-retrain-test", "label_floor": 0.0,
            "holdout_set": f"{NAME}-holdout@1", "label_tolerance": -1.0,  # must beat the champion by 1: never
            **QUICK}
    result = run_local(args, tmp_path / "root", pipeline="retraining")
    outcome = result["promotion"]
    version = result["version"]
    assert int(version) > 2 and outcome["version"] == version and outcome["promoted"] is False
    assert "is below the champion's" in outcome["reasons"][0] and outcome["champion"] == "2"
    assert outcome["holdout"]["version"] == "1" and outcome["holdout"]["passed"] is False
    c = client(server.uri)
    assert str(c.get_model_version_by_alias(NAME, "challenger").version) == version  # registered as challenger
    assert str(c.get_model_version_by_alias(NAME, "champion").version) == "2"  # unchanged
    # no champion weights in retrain mode; the pipeline's MLflow run finished normally
    run_dir = Path(result["run_dir"])
    meta = json.loads(next(run_dir.glob("for-loop-*/**/train/executor_output.json")).read_text())["artifacts"][
        "model"]["artifacts"][0]["metadata"]
    assert meta["pretrained"] == ""
    runs = c.search_runs([c.get_experiment_by_name("kubeseg-retrain-test").experiment_id],
                         "tags.`kubeseg.kind` = 'pipeline'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["mode"] == "retrain" and runs[0].data.tags["kubeseg.pipeline"] == "retraining"
