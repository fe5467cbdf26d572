"""nnU-Net v2's training loss: soft Dice + cross-entropy, with deep supervision.

* Soft Dice on softmax probabilities, smooth 1e-5, background excluded (``do_bg=False``),
  computed per sample and averaged, or over the whole batch at once when the plans set
  ``batch_dice`` (nnU-Net's "memory efficient" formulation: the smoothing term is added to
  numerator and denominator, the loss is ``-dice`` so a perfect prediction gives about -1).
* Cross-entropy on logits; the total is ``CE + Dice`` with weight 1 each.
* Deep supervision: one loss per decoder output, weights ``1/2**i``, the lowest-resolution
  output weighted 0, normalised to sum 1.
* Target value -1 (outside the nonzero mask) counts as background, as nnU-Net's
  ``RemoveLabelTransform(-1, 0)`` makes it before the loss ever sees it.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _as_label_map(target: torch.Tensor, ndim: int) -> torch.Tensor:
    """(b, 1, *s) or (b, *s) label tensor -> (b, 1, *s) long, with -1 mapped to 0."""
    if target.ndim == ndim - 1:
        target = target[:, None]
    target = target.long()
    return torch.where(target < 0, torch.zeros_like(target), target)


class SoftDiceLoss(nn.Module):
    """Negative mean soft Dice over foreground classes (see module docstring)."""

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, 1)
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            labels = _as_label_map(target, logits.ndim)
            onehot = torch.zeros(logits.shape, device=logits.device, dtype=torch.float32)
            onehot.scatter_(1, labels, 1)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            sum_gt = onehot.sum(axes, dtype=torch.float32)
        if not self.do_bg:
            probs = probs[:, 1:]
        intersect = (probs * onehot).sum(axes, dtype=torch.float32)
        sum_pred = probs.sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -dc.mean()


class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * SoftDice`` for one output resolution."""

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, do_bg: bool = False,
                 weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _as_label_map(target, logits.ndim)
        ce = F.cross_entropy(logits, labels[:, 0])
        return self.weight_ce * ce + self.weight_dice * self.dice(logits, labels)


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """``1/2**i`` per output, last (coarsest) set to 0, normalised to sum 1."""
    w = np.array([1 / (2 ** i) for i in range(num_outputs)], dtype=np.float64)
    if num_outputs > 1:
        w[-1] = 0
    return w / w.sum()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss(output_i, target_i)`` over deep-supervision outputs."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        if not any(w != 0 for w in weights):
            raise ValueError("at least one deep supervision weight must be non-zero")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
        total = None
        for w, o, t in zip(self.weights, outputs, targets):
            if w == 0:
                continue
            term = w * self.loss(o, t)
            total = term if total is None else total + term
        return total


def build_loss(batch_dice: bool, num_ds_outputs: Union[int, None]) -> nn.Module:
    """nnU-Net's default loss; ``num_ds_outputs=None`` means deep supervision off."""
    base = DiceCELoss(batch_dice=batch_dice, smooth=1e-5, do_bg=False)
    if num_ds_outputs is None:
        return base
    return DeepSupervisionLoss(base, deep_supervision_weights(num_ds_outputs))
