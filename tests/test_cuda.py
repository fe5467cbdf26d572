"""The CUDA path: an AMP training run and GPU inference. Skipped without a CUDA device.

These have not run on a GPU in this project's CI (no GPU there); benchmarks/gpu_check.sh runs
them first on a machine with one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

sys.path.insert(0, str(Path(__file__).parent / "training"))  # tiny_dataset, as the training tests import it


def test_amp_training_steps_on_cuda(tmp_path):
    from kubeseg.training import Schedule, TrainSettings, train_fold
    from tiny_dataset import make_tiny_preprocessed

    pre = make_tiny_preprocessed(tmp_path)
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 0, tmp_path / "OUT",
                          TrainSettings(device="cuda", schedule=Schedule(2, 5, 1, "cuda-test"), num_workers=0,
                                        progress_bar=False, log_to_console=False))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["grad_scaler_state"] is not None  # AMP: a GradScaler was used, as nnU-Net on CUDA
    losses = ckpt["logging"]["train_losses"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.isfinite(v).all() for v in ckpt["network_weights"].values() if v.is_floating_point())


@pytest.mark.parametrize("accumulate_on_device", [True, False])
def test_gpu_inference_matches_cpu(tmp_path, accumulate_on_device):
    from kubeseg.inference.predictor import PredictSettings
    from kubeseg.inference.run import predict
    from tests.inference.helpers import make_model_folder, make_plans, make_raw
    import SimpleITK as sitk

    raw = make_raw(tmp_path, "ct", cases=2, shape=(16, 40, 36))
    plans, _ = make_plans(raw, tmp_path / "pre")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    folder = make_model_folder(plans, dataset_json, "3d_fullres", tmp_path / "nnUNetTrainer__P__3d_fullres")
    image = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]
    predict(image, tmp_path / "cpu", folder, PredictSettings(device="cpu", progress=False))
    predict(image, tmp_path / "gpu", folder, PredictSettings(device="cuda", progress=False,
                                                             results_on_device=accumulate_on_device))
    case = image.name[: -len("_0000.nii.gz")]
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cpu" / f"{case}.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "gpu" / f"{case}.nii.gz")))
    assert len(np.unique(a)) > 1
    assert (a == b).mean() >= 0.999  # autocast (float16 convolutions) against float32 on the CPU
