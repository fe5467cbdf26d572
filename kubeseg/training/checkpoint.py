"""nnU-Net v2 compatible checkpoints, written atomically.

A checkpoint is a dict with nnU-Net v2's keys::

    network_weights, optimizer_state, grad_scaler_state, logging, _best_ema,
    current_epoch, init_args, trainer_name, inference_allowed_mirroring_axes

``current_epoch`` is the number of *finished* epochs (the epoch to start from when
resuming), as in nnU-Net.  ``trainer_name`` is ``"nnUNetTrainer"`` and ``init_args`` holds
``plans``, ``configuration``, ``fold``, ``dataset_json`` and ``device`` (a string), so
nnU-Net's own predictor can load kubeseg checkpoints.  Everything is tensors or plain
python containers/scalars: ``torch.load(path, weights_only=True)`` works.

Files are written to a temporary name in the same folder and moved into place with
``os.replace``, so a crash never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from kubeseg.atomic import atomic_path

CHECKPOINT_KEYS = ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                   "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes")
TRAINER_NAME = "nnUNetTrainer"


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` through a temporary file, fsynced before the rename (a killed pod leaves the old file)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return Path(path)


def make_checkpoint(network_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any],
                    grad_scaler_state: Optional[Mapping[str, Any]], logging_state: Mapping[str, list],
                    best_ema: Optional[float], current_epoch: int, init_args: Mapping[str, Any],
                    mirror_axes: Optional[tuple], extra: Optional[Mapping[str, Any]] = None) -> dict:
    ckpt = {
        "network_weights": {k: v.detach().cpu() for k, v in network_state.items()},
        "optimizer_state": optimizer_state,
        "grad_scaler_state": dict(grad_scaler_state) if grad_scaler_state is not None else None,
        "logging": {k: list(v) for k, v in logging_state.items()},
        "_best_ema": None if best_ema is None else float(best_ema),
        "current_epoch": int(current_epoch),
        "init_args": dict(init_args),
        "trainer_name": TRAINER_NAME,
        "inference_allowed_mirroring_axes": None if mirror_axes is None else tuple(int(i) for i in mirror_axes),
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu",
                    trusted: bool = False) -> dict:
    """Load a kubeseg or nnU-Net checkpoint with safe loading (``weights_only=True``).

    Checkpoints written by nnU-Net itself can contain other pickled objects (numpy scalars
    in ``logging``); those need ``trusted=True``, which unpickles fully - only do that for
    files you trust."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:
        if not trusted:
            raise
        return torch.load(path, map_location=map_location, weights_only=False)
