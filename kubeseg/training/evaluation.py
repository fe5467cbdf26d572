"""Per-case, per-label Dice and 95th-percentile Hausdorff distance, and nnU-Net-style
``summary.json``.

Computed on label maps in the *preprocessed* geometry (the model's own resolution, with
the preprocessed segmentation as reference, -1 counted as background); distances are in
physical units using the configuration's spacing.  Conventions follow nnU-Net's
evaluation: Dice is NaN when both reference and prediction are empty for a label (and is
ignored by the means); HD95 is NaN whenever one of the two is empty.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from kubeseg.labels import region_key


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Symmetric 95th percentile surface distance between two binary masks (NaN if either is empty)."""
    pred = pred.astype(bool)
    ref = ref.astype(bool)
    if not pred.any() or not ref.any():
        return float("nan")
    spacing = None if spacing is None else [float(s) for s in spacing]
    sp, sr = _surface(pred), _surface(ref)
    dt_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    dists = np.concatenate([dt_ref[sp], dt_pred[sr]])
    return float(np.percentile(dists, 95))


def label_metrics(pred: np.ndarray, ref: np.ndarray, label: "int | Sequence[int]",
                  spacing: Optional[Sequence[float]] = None, annotated: Optional[np.ndarray] = None) -> dict:
    """Metrics of one label, or of a region (a sequence of labels: voxels holding any of them).

    ``annotated``: where the reference is annotated (ignore-label datasets); other voxels count
    nowhere, as in nnU-Net's evaluation.
    """
    if isinstance(label, (int, np.integer)):
        p, r = pred == label, ref == label
    else:
        p, r = np.isin(pred, label), np.isin(ref, label)
    if annotated is not None:
        p, r = p & annotated, r & annotated
    tp = int(np.sum(p & r))
    fp = int(np.sum(p & ~r))
    fn = int(np.sum(~p & r))
    tn = int((p.size if annotated is None else np.sum(annotated)) - tp - fp - fn)
    denom = 2 * tp + fp + fn
    return {
        "Dice": float("nan") if denom == 0 else 2 * tp / denom,
        "IoU": float("nan") if tp + fp + fn == 0 else tp / (tp + fp + fn),
        "HD95": hd95(p, r, spacing),
        "TP": tp, "FP": fp, "FN": fn, "TN": tn,
        "n_pred": int(tp + fp), "n_ref": int(tp + fn),
    }


def _nanmean(values: list) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def metric_key(label) -> str:
    """``"2"`` for a label, ``"(2, 3)"`` for a region (nnU-Net's summary.json keys)."""
    return str(label) if isinstance(label, (int, np.integer)) else region_key(tuple(int(v) for v in label))


def summarize(per_case: list[dict], labels: Sequence) -> dict:
    """nnU-Net's summary layout: ``metric_per_case``, ``mean`` per label or region, ``foreground_mean``."""
    mean = {}
    for lab in labels:
        key = metric_key(lab)
        mean[key] = {m: _nanmean([c["metrics"][key][m] for c in per_case])
                     for m in ("Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref")}
    fg = {m: _nanmean([mean[metric_key(lab)][m] for lab in labels]) for m in ("Dice", "IoU", "HD95")}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": fg}


def _json_safe(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def write_summary(summary: dict, path: Path, extra: Optional[dict] = None) -> Path:
    """Write ``summary.json`` (NaN written as null so it is strict JSON)."""
    path = Path(path)
    obj = dict(summary)
    if extra:
        obj.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(obj), f, indent=2)
    os.replace(tmp, path)
    return path
