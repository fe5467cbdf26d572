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
from kubeseg.errors import KubesegError
from kubeseg.inference.safe_load import load_checkpoint_safe
from kubeseg.network import _unwrap

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


# segmentation output heads (the 1x1 convolutions producing class logits) of nnU-Net v2 /
# dynamic_network_architectures U-Nets: decoder.seg_layers.<i>.weight/bias
HEAD_KEY_MARKER = "seg_layers."


def load_pretrained_weights(network: torch.nn.Module, path: Union[str, Path]) -> dict:
    """Initialise ``network`` from another training's checkpoint (fine-tuning).

    nnU-Net's ``-pretrained_weights``: every parameter/buffer must exist in the checkpoint
    with the same shape. The segmentation output heads (``seg_layers``) are the one
    exception: when their shapes differ (another label set) they all keep their fresh
    initialisation; when they match they are loaded too. Anything else that differs (a
    missing or extra key, another shape) is refused with a :class:`KubesegError` naming
    the file, before the network is touched. The file is read with the safe loader (data,
    never code). Returns ``{"loaded": n_tensors, "heads": "loaded" | "skipped"}``.
    """
    path = Path(path)
    ckpt = load_checkpoint_safe(path, map_location="cpu")
    state = {}
    for k, v in ckpt["network_weights"].items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    target = _unwrap(network)  # DDP / torch.compile wrappers
    own = target.state_dict()

    def is_head(key: str) -> bool:
        return HEAD_KEY_MARKER in key

    problems = []
    for k, v in own.items():
        if is_head(k):
            continue
        if k not in state:
            problems.append(f"{k} is missing")
        elif tuple(state[k].shape) != tuple(v.shape):
            problems.append(f"{k} has shape {tuple(state[k].shape)}, the network needs {tuple(v.shape)}")
    problems += [f"{k} is not part of this network" for k in state if not is_head(k) and k not in own]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise KubesegError(f"pretrained weights {path} do not fit this configuration's network: {shown}")

    own_heads = [k for k in own if is_head(k)]
    heads_match = all(k in state and tuple(state[k].shape) == tuple(own[k].shape) for k in own_heads) \
        and all(k in own for k in state if is_head(k))
    new = {k: state[k].to(dtype=own[k].dtype) for k in own if not is_head(k) or heads_match}
    merged = dict(own)
    merged.update(new)
    target.load_state_dict(merged, strict=True)
    return {"loaded": len(new), "heads": "loaded" if heads_match else "skipped"}
