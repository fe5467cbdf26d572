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
* Ignore label (sparse annotation): its voxels are left out of the CE (``ignore_index``) and
  masked out of the Dice sums.
* Regions: Dice (background included, on sigmoid outputs) + binary cross-entropy on logits,
  the target one binary channel per region; with an ignore label the target's last channel
  marks ignored voxels, which are masked out of both terms (nnU-Net's ``DC_and_BCE_loss``).
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

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                sigmoid: bool = False) -> torch.Tensor:
        """``target``: a label map, or (``sigmoid``) binary region channels shaped like ``logits``;
        ``mask``: (b, 1, *s), true where voxels count."""
        probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, 1)
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            if sigmoid:
                onehot = target.to(torch.float32)
            else:
                labels = _as_label_map(target, logits.ndim)
                onehot = torch.zeros(logits.shape, device=logits.device, dtype=torch.float32)
                onehot.scatter_(1, labels, 1)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            if mask is not None:
                onehot = onehot * mask
            sum_gt = onehot.sum(axes, dtype=torch.float32)
        if not self.do_bg:
            probs = probs[:, 1:]
        if mask is not None:
            probs = probs * mask
        intersect = (probs * onehot).sum(axes, dtype=torch.float32)
        sum_pred = probs.sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return -dc.mean()


class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * SoftDice`` for one output resolution."""

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, do_bg: bool = False,
                 weight_ce: float = 1.0, weight_dice: float = 1.0, ignore_label: int | None = None):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = _as_label_map(target, logits.ndim)
        if self.ignore_label is None:
            ce = F.cross_entropy(logits, labels[:, 0])
            return self.weight_ce * ce + self.weight_dice * self.dice(logits, labels)
        mask = labels != self.ignore_label
        dice = self.dice(logits, torch.where(mask, labels, 0), mask=mask)
        if not mask.any():  # nothing annotated in this batch: Dice only, as nnU-Net
            return self.weight_dice * dice
        ce = F.cross_entropy(logits, labels[:, 0], ignore_index=self.ignore_label)
        return self.weight_ce * ce + self.weight_dice * dice


class DiceBCELoss(nn.Module):
    """Region training: ``BCE + SoftDice`` on sigmoid outputs, background included (see module docstring)."""

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, use_ignore_label: bool = False,
                 weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice, do_bg=True, smooth=smooth)
        self.use_ignore_label = use_ignore_label
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.use_ignore_label:
            mask = ~target[:, -1:].bool()
            target = target[:, :-1]
        dice = self.dice(logits, target, mask=mask, sigmoid=True)
        target = target.float()
        if mask is None:
            bce = F.binary_cross_entropy_with_logits(logits, target)
        else:
            bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask).sum() / \
                mask.sum().clamp_min(1e-8)
        return self.weight_ce * bce + self.weight_dice * dice


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


def build_loss(batch_dice: bool, num_ds_outputs: Union[int, None], regions: bool = False,
               ignore_label: int | None = None) -> nn.Module:
    """nnU-Net's loss: Dice + CE, or Dice + BCE for regions; ``num_ds_outputs=None`` means deep supervision off."""
    if regions:
        base = DiceBCELoss(batch_dice=batch_dice, smooth=1e-5, use_ignore_label=ignore_label is not None)
    else:
        base = DiceCELoss(batch_dice=batch_dice, smooth=1e-5, do_bg=False, ignore_label=ignore_label)
    if num_ds_outputs is None:
        return base
    return DeepSupervisionLoss(base, deep_supervision_weights(num_ds_outputs))
