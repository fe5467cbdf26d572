"""Training and inference of nnU-Net's ResidualEncoderUNet (the ResEnc presets' network).

A tiny ResEnc plans configuration (nnU-Net's block layout, narrow stages) is trained for a few
iterations; the checkpoint must load strictly into the network nnunetv2 builds from the same
plans and give the same logits (checkpoints are interchangeable), and the trained folder must
predict through kubeseg's predictor.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeseg.inference.model import load_trained_model
from kubeseg.network import build_network_from_plans, load_network_weights
from kubeseg.training import TrainSettings, train_fold
from tests.oracle import run_oracle

from tiny_dataset import make_tiny_preprocessed

ORACLE = str(Path(__file__).resolve().parents[1] / "oracle" / "nnunet_coverage.py")
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resenc")
    pre = make_tiny_preprocessed(root, n_cases=5)
    plans = json.loads((pre / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = RESENC
    kw = arch["arch_kwargs"]
    kw["n_blocks_per_stage"] = [1, 3, 4][:kw["n_stages"]]  # nnU-Net's ResEnc layout, first stages
    kw["n_conv_per_stage_decoder"] = [1] * (kw["n_stages"] - 1)
    del kw["n_conv_per_stage"]
    (pre / "plans.json").write_text(json.dumps(plans))
    fold_dir = train_fold(pre, pre / "plans.json", "3d_fullres", 0, root / "OUT",
                          TrainSettings(device="cpu", schedule="2x3x1", num_workers=0, progress_bar=False,
                                        log_to_console=False))
    return pre, root / "OUT", fold_dir


def test_resenc_trains_and_predicts(trained):
    pre, out, fold_dir = trained
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert any(".blocks." in k for k in ckpt["network_weights"]), "not a residual encoder"
    assert len(json.loads((fold_dir / "metrics.json").read_text())["epochs"]) == 2
    model = load_trained_model(out, folds=[0])
    net = model.build_network(torch.device("cpu"))
    assert type(net).__name__ == "ResidualEncoderUNet"
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert "mean" in summary


@pytest.mark.integration
def test_resenc_checkpoint_loads_into_nnunet(trained, tmp_path):
    pre, out, fold_dir = trained
    run_oracle(ORACLE, "network", str(out / "plans.json"), str(out / "dataset.json"), "3d_fullres",
               str(tmp_path / "net.npz"), "--weights", str(fold_dir / "checkpoint_final.pth"))
    with np.load(tmp_path / "net.npz") as z:
        ref = dict(z)
    assert str(ref["cls"]) == "ResidualEncoderUNet"
    plans, ds = json.loads((out / "plans.json").read_text()), json.loads((out / "dataset.json").read_text())
    net = build_network_from_plans(plans, "3d_fullres", ds, deep_supervision=False)
    assert list(net.state_dict()) == [k[2:] for k in ref if k.startswith("w:")]
    load_network_weights(net, fold_dir / "checkpoint_final.pth")
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(ref["input"])).numpy()
    np.testing.assert_allclose(logits, ref["logits_weights"], rtol=1e-5, atol=1e-5)
