"""Training length and optimiser hyper-parameters.

``Schedule`` says how long to train; ``OptimizerSettings`` how (nnU-Net v2's defaults:
SGD with Nesterov momentum 0.99, initial LR 1e-2, weight decay 3e-5, polynomial decay with
exponent 0.9 stepped once per epoch, gradient-norm clipping at 12).

Named schedules: ``"default"`` is nnU-Net's 1000 epochs x 250 iterations (+50 validation
iterations); ``"tiny"`` is a few short epochs for demos and tests; ``"<N>epochs"`` (e.g.
``"100epochs"``) keeps nnU-Net's iterations per epoch and changes only the epoch count, like
nnU-Net's ``nnUNetTrainer_<N>epochs`` variants; ``"EPOCHSxITERS[xVAL]"`` (e.g. ``"2x3x1"``) sets all three.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Schedule:
    """How many epochs, and how many training / validation iterations per epoch."""

    num_epochs: int = 1000
    train_iterations: int = 250
    val_iterations: int = 50
    name: str = "default"

    def __post_init__(self):
        if self.num_epochs < 1 or self.train_iterations < 1 or self.val_iterations < 0:
            raise ValueError(f"invalid schedule {self}")


@dataclass(frozen=True)
class OptimizerSettings:
    """nnU-Net v2's optimiser defaults. ``encoder_lr_scale`` / ``decoder_lr_scale``: layer-wise
    learning rates, multipliers of the scheduled rate for the encoder and the decoder parameter
    groups (:func:`kubeseg.training.finetune.parameter_groups`); 1.0 and 1.0 (nnU-Net) is one group."""

    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    nesterov: bool = True
    poly_exponent: float = 0.9
    grad_clip_norm: float = 12.0
    encoder_lr_scale: float = 1.0
    decoder_lr_scale: float = 1.0


NAMED_SCHEDULES: dict[str, Schedule] = {
    "default": Schedule(1000, 250, 50, "default"),
    "tiny": Schedule(6, 20, 4, "tiny"),
    "short": Schedule(50, 50, 10, "short"),
}


def get_schedule(schedule: Union[str, Schedule]) -> Schedule:
    """Resolve a schedule name (see module docstring) or pass a ``Schedule`` through."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule in NAMED_SCHEDULES:
        return NAMED_SCHEDULES[schedule]
    m = re.fullmatch(r"(\d+)epochs?", schedule)
    if m:
        return Schedule(int(m.group(1)), 250, 50, schedule)
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?", schedule)
    if m:  # EPOCHSxITERS[xVAL]; validation iterations default to a fifth of the training ones
        epochs, iters = int(m.group(1)), int(m.group(2))
        return Schedule(epochs, iters, int(m.group(3)) if m.group(3) else max(1, iters // 5), schedule)
    raise ValueError(f"unknown schedule {schedule!r}; known: {sorted(NAMED_SCHEDULES)}, '<N>epochs' "
                     "or 'EPOCHSxITERS[xVAL]'")


def poly_lr(epoch: int, num_epochs: int, initial_lr: float, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial learning-rate decay: ``lr0 * (1 - epoch / num_epochs) ** exponent``."""
    return initial_lr * (1 - epoch / num_epochs) ** exponent


def make_optimizer(params, settings: OptimizerSettings) -> torch.optim.SGD:
    """SGD over ``params``: tensors, or parameter groups (dicts with ``params`` and an
    ``lr_scale``, see :func:`kubeseg.training.finetune.parameter_groups`)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": settings.initial_lr * float(g.get("lr_scale", 1.0))} for g in params]
    return torch.optim.SGD(params, lr=settings.initial_lr, weight_decay=settings.weight_decay,
                           momentum=settings.momentum, nesterov=settings.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled rate ``lr``; a group with an ``lr_scale`` gets ``lr * lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_scale", 1.0))
