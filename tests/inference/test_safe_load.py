"""Checkpoints are data: nnU-Net's numpy scalars and torch.device load, code does not run."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kubeseg.inference.safe_load import UnsafeCheckpointError, load_checkpoint_safe, weights_only_checkpoint


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights():
    return {"conv.weight": torch.randn(2, 1, 3, 3, 3), "conv.bias": torch.zeros(2)}


def test_nnunet_style_checkpoint_loads(tmp_path):
    ckpt = {"network_weights": _weights(), "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.25)]},
            "_best_ema": np.float64(0.5), "init_args": {"configuration": "3d_fullres", "fold": 0,
                                                         "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
            "extra_array": np.arange(3)}
    torch.save(ckpt, tmp_path / "c.pth")
    loaded = load_checkpoint_safe(tmp_path / "c.pth")
    assert loaded["init_args"]["device"] == torch.device("cpu")
    assert float(loaded["logging"]["mean_fg_dice"][0]) == 0.5
    slim = weights_only_checkpoint(loaded, "3d_fullres")
    assert set(slim) == {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    torch.save(slim, tmp_path / "slim.pth")
    again = torch.load(tmp_path / "slim.pth", weights_only=True)  # plain torch, no allow-list needed
    assert again["init_args"] == {"configuration": "3d_fullres", "fold": 0}


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"network_weights": _weights(), "init_args": {"x": _Evil(str(marker))}}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*cannot be loaded safely"):
        load_checkpoint_safe(tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_and_broken_files_are_named(tmp_path):
    from kubeseg.errors import KubesegError
    with pytest.raises(KubesegError, match="does not exist"):
        load_checkpoint_safe(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(KubesegError, match="junk.pth"):
        load_checkpoint_safe(tmp_path / "junk.pth")
    torch.save({"weights": 1}, tmp_path / "nw.pth")
    with pytest.raises(KubesegError, match="network_weights"):
        load_checkpoint_safe(tmp_path / "nw.pth")
