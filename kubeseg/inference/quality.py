"""What a person asks of a segmentation before opening it: volumes per label and how sure the model was."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def label_volumes_ml(segmentation: np.ndarray, spacing_mm, labels: Mapping[str, int]) -> dict[str, float]:
    """Volume in millilitres of every foreground label (``labels``: name → value, as dataset.json)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = np.bincount(segmentation.ravel().astype(np.int64), minlength=max(labels.values()) + 1)
    return {name: float(counts[value]) * voxel_ml for name, value in labels.items() if value != 0}


def confidence(probabilities: np.ndarray, segmentation: np.ndarray) -> float:
    """Mean probability of the chosen label over the predicted foreground (1 = certain everywhere).

    Over the whole image where nothing is predicted as foreground. Background far from anything
    is easy; averaging only where the model says "structure" keeps the score informative.
    """
    top = probabilities.max(axis=0)
    foreground = segmentation > 0
    return float(top[foreground].mean() if foreground.any() else top.mean())
