"""What a person asks of a segmentation before opening it: volumes per label and how sure the model was."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from kubeseg.labels import IGNORE_KEY


def label_volumes_ml(segmentation: np.ndarray, spacing_mm,
                     labels: Mapping[str, "int | list[int]"]) -> dict[str, float]:
    """Volume in millilitres of every foreground label or region (``labels``: name → value or region
    values, as dataset.json); a region's volume counts every voxel holding one of its values. The
    ignore label is not a structure and has no volume."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    values = {name: [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
              for name, value in labels.items() if name != IGNORE_KEY}
    top = max(max(v) for v in values.values())
    counts = np.bincount(segmentation.ravel().astype(np.int64), minlength=top + 1)
    return {name: float(sum(counts[v] for v in vs if v < len(counts))) * voxel_ml
            for name, vs in values.items() if set(vs) != {0}}


def confidence(probabilities: np.ndarray, segmentation: np.ndarray) -> float:
    """Mean probability of the chosen label over the predicted foreground (1 = certain everywhere).

    Over the whole image where nothing is predicted as foreground. Background far from anything
    is easy; averaging only where the model says "structure" keeps the score informative.
    """
    top = probabilities.max(axis=0)
    foreground = segmentation > 0
    return float(top[foreground].mean() if foreground.any() else top.mean())
