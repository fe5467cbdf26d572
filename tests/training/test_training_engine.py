"""End-to-end: train the tiny schedule on CPU, output layout, checkpoints, skipping a
finished fold, and nnunetv2 loading what kubeseg wrote."""
import json
import time

import numpy as np
import pytest
import torch

from kubeseg.training import Schedule, TrainSettings, TrainingCallback, train_fold
from kubeseg.training.checkpoint import CHECKPOINT_KEYS

from tiny_dataset import make_tiny_preprocessed


class Recorder(TrainingCallback):
    def __init__(self):
        self.events = []
        self.artifacts = []
        self.epochs = []

    def on_train_start(self, info):
        self.events.append(("start", dict(info)))

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, dict(metrics)))

    def on_artifact(self, path):
        self.artifacts.append(path)

    def on_train_end(self, info):
        self.events.append(("end", dict(info)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    pre = make_tiny_preprocessed(root)
    rec = Recorder()
    t0 = time.time()
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 0, root / "OUT",
                          TrainSettings(device="cpu", schedule="tiny", num_workers=0, callbacks=[rec],
                                        progress_bar=False, log_to_console=False))
    return {"pre": pre, "root": root, "fold_dir": fold_dir, "rec": rec, "seconds": time.time() - t0}


def test_tiny_training_learns(trained):
    rec = trained["rec"]
    losses = [m["train_loss"] for _, m in rec.epochs]
    assert len(losses) == Schedule(6, 20, 4).num_epochs
    assert losses[-1] < losses[0] - 0.3, losses
    assert rec.epochs[-1][1]["mean_fg_dice"] > 0.6
    summary = json.loads((trained["fold_dir"] / "validation" / "summary.json").read_text())
    dice = summary["mean"]["1"]["Dice"]
    # chance level: the organ covers ~2 % of the volume, so a random labelling scores ~0.04
    assert dice > 0.6, summary["mean"]
    assert summary["foreground_mean"]["HD95"] is not None and summary["geometry"] == "preprocessed"
    print(f"tiny schedule: {trained['seconds']:.1f} s, validation Dice {dice:.3f}")


def test_output_layout_and_checkpoints(trained):
    fold_dir, out = trained["fold_dir"], trained["root"] / "OUT"
    assert fold_dir == out / "fold_0"
    assert (out / "plans.json").is_file() and (out / "dataset.json").is_file()
    assert (trained["pre"] / "splits_final.json").is_file()
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "metrics.json"):
        assert (fold_dir / name).is_file(), name
    assert not (fold_dir / "checkpoint_latest.pth").exists()  # removed after the final one, like nnU-Net
    assert list(fold_dir.glob("training_log_*.txt"))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert set(CHECKPOINT_KEYS) <= set(ckpt)
    assert ckpt["current_epoch"] == 6 and ckpt["trainer_name"] == "nnUNetTrainer"
    assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["init_args"]["fold"] == 0
    assert len(ckpt["logging"]["train_losses"]) == 6 and isinstance(ckpt["logging"]["train_losses"][0], float)
    assert ckpt["inference_allowed_mirroring_axes"] == (0, 1, 2)
    metrics = json.loads((fold_dir / "metrics.json").read_text())["epochs"]
    assert [m["epoch"] for m in metrics] == list(range(6))
    lrs = [m["lr"] for m in metrics]
    np.testing.assert_allclose(lrs, [1e-2 * (1 - e / 6) ** 0.9 for e in range(6)])

    splits = json.loads((trained["pre"] / "splits_final.json").read_text())
    val_cases = splits[0]["val"]
    for case in val_cases:
        with np.load(fold_dir / "validation" / f"{case}.npz") as z:
            probs, seg = z["probabilities"], z["segmentation"]
        assert probs.shape == (2, 24, 48, 48) and seg.shape == (24, 48, 48)
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    rec = trained["rec"]
    assert rec.events[0][0] == "start" and rec.events[-1][0] == "end"
    assert any(p.name == "summary.json" for p in rec.artifacts)


def test_finished_fold_is_not_retrained(trained):
    fold_dir = trained["fold_dir"]
    mtime = (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns
    rec = Recorder()
    pre = trained["pre"]
    t0 = time.time()
    again = train_fold(pre, pre / "plans.json", "3d_fullres", 0, trained["root"] / "OUT",
                       TrainSettings(device="cpu", schedule="tiny", num_workers=0, callbacks=[rec],
                                     progress_bar=False, log_to_console=False))
    assert again == fold_dir and time.time() - t0 < 10
    assert (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns == mtime
    assert rec.epochs == [] and rec.events[-1][1]["already_finished"] is True


def test_missing_validation_is_redone_without_training(trained):
    fold_dir, pre = trained["fold_dir"], trained["pre"]
    (fold_dir / "validation" / "summary.json").unlink()
    mtime = (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns
    rec = Recorder()
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, trained["root"] / "OUT",
               TrainSettings(device="cpu", schedule="tiny", num_workers=0, callbacks=[rec],
                             progress_bar=False, log_to_console=False))
    assert rec.epochs == [] and (fold_dir / "checkpoint_final.pth").stat().st_mtime_ns == mtime
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert summary["mean"]["1"]["Dice"] > 0.6
    assert rec.events[-1][1]["validation"]["mean"]["1"]["Dice"] == pytest.approx(summary["mean"]["1"]["Dice"])


@pytest.mark.integration
def test_nnunetv2_predictor_loads_kubeseg_model(trained, tmp_path):
    from kubeseg.network import build_network_from_plans, load_network_weights
    from kubeseg.inference.sliding_window import SlidingWindowSettings, predict_logits
    from tests.oracle import run_oracle

    out = trained["root"] / "OUT"
    case = trained["pre"] / "nnUNetPlans_3d_fullres" / "case_000.npy"
    run_oracle("-m", "tests.oracle.nnunet_calls", "predict-logits", str(out), str(case), str(tmp_path / "ref.pt"))
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)["logits"]
    data = np.load(case)
    net = build_network_from_plans(json.loads((out / "plans.json").read_text()), "3d_fullres",
                                   json.loads((out / "dataset.json").read_text()), deep_supervision=False)
    load_network_weights(net, out / "fold_0" / "checkpoint_final.pth")
    net.eval()
    mine = predict_logits(net, data, (16, 32, 32), 2, settings=SlidingWindowSettings(use_gaussian=False,
                                                                          accumulator="float32")).float()
    torch.testing.assert_close(mine, ref, atol=0.05, rtol=0.01)  # nnU-Net accumulates in float16 on CPU
    assert (mine.argmax(0) == ref.argmax(0)).float().mean() > 0.999
