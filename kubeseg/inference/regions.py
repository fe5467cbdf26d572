"""Combining the folds of a region model (sigmoid outputs, see :mod:`kubeseg.labels`).

A region model's outputs are independent per channel, so folds are combined per channel:

* ``probabilities`` (kubeseg's default): the mean of the folds' sigmoid probabilities, handed on
  as its log-odds ``log p - log(1 - p)``. Both logs are accumulated as ``logaddexp`` of
  ``logsigmoid(±logit)``, so nothing saturates, and for one fold the log-odds are the logits
  themselves: exactly nnU-Net's "resample the logits, then sigmoid";
* ``logits`` (nnU-Net's way): the mean of the folds' logits.

The export resamples the log-odds and applies the sigmoid (``export.log_probabilities_to_original``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F


def accumulate_region_logits(combined: Optional[torch.Tensor], logits: torch.Tensor,
                             fold_average: str) -> torch.Tensor:
    """Add one fold's logits ``(regions, *spatial)`` to the running combination."""
    logits = logits.float()
    if fold_average == "logits":
        return logits.clone() if combined is None else combined.add_(logits)
    logs = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)])
    return logs if combined is None else torch.logaddexp(combined, logs, out=combined)


def region_log_odds(combined: torch.Tensor, n_folds: int, fold_average: str) -> torch.Tensor:
    """Per-region log-odds of the combined folds."""
    if fold_average == "logits":
        return combined / n_folds if n_folds > 1 else combined
    return combined[0] - combined[1]  # the 1/n of the mean cancels
