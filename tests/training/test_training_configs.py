"""Short smoke runs of the other configuration kinds: 2D (with worker processes) and the
cascade full-resolution stage (previous stage's segmentation as extra input)."""
import json
import multiprocessing

import numpy as np
import torch

from kubeseg.training import Schedule, TrainSettings, TrainingCallback, train_fold

from tiny_dataset import make_tiny_preprocessed


class Starts(TrainingCallback):
    def __init__(self):
        self.info = None

    def on_train_start(self, info):
        self.info = dict(info)


def test_2d_configuration_with_workers(tmp_path):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5, configurations=("2d",))
    before = len(multiprocessing.active_children())
    fold_dir = train_fold(pre, pre / "plans.json", "2d", "all", tmp_path / "OUT2d",
                          TrainSettings(device="cpu", schedule=Schedule(2, 3, 1, "smoke"), num_workers=2,
                                        progress_bar=False, log_to_console=False, validation_mirroring=False))
    assert len(multiprocessing.active_children()) == before  # workers shut down
    assert fold_dir.name == "fold_all"
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 5  # fold "all" validates on every case
    with np.load(fold_dir / "validation" / "case_000.npz") as z:
        assert z["probabilities"].shape == (2, 24, 48, 48)


def test_cascade_configuration(tmp_path):
    pre = make_tiny_preprocessed(tmp_path, n_cases=5)
    prev = tmp_path / "predicted_next_stage" / "3d_cascade_fullres"
    prev.mkdir(parents=True)
    for p in (pre / "nnUNetPlans_3d_fullres").glob("*_seg.npy"):
        seg = np.load(p)[0]
        np.savez_compressed(prev / p.name.replace("_seg.npy", ".npz"), seg=np.clip(seg, 0, None).astype(np.uint8))
    rec = Starts()
    fold_dir = train_fold(pre, pre / "plans.json", "3d_cascade_fullres", 0, tmp_path / "OUTc",
                          TrainSettings(device="cpu", schedule=Schedule(1, 2, 1, "smoke"), num_workers=0,
                                        previous_stage_dir=prev, callbacks=[rec], progress_bar=False,
                                        log_to_console=False, validation_mirroring=False))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    first_conv = ckpt["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"]
    assert first_conv.shape[1] == 2  # image + one-hot of label 1
    assert (fold_dir / "validation" / "summary.json").is_file()
