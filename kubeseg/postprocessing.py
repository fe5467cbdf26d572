"""Postprocessing: keep only the largest connected component, where cross-validation says it helps.

The decision follows nnU-Net v2 on the out-of-fold predictions (label maps):

1. all foreground labels taken as one mask: keep its largest component if that raises the mean
   foreground Dice and lowers no class's Dice;
2. then, with more than one class, each class on its own (on top of what was kept so far, in the
   order of ``dataset.json``): keep its largest component if that raises this class's mean Dice.

A *class* is a foreground label, or for region models (BraTS-style, :mod:`kubeseg.labels`) a
region: its mask on the label map is the union of the region's values, so Dice is scored per
region and step 2 keeps the largest component of each region's mask; removed voxels become
background, on the label map, exactly as the rule is later applied. With an ignore label, the
reference's ignored voxels count in no Dice, so a decision never rests on unannotated voxels.

Means follow nnU-Net: per class the mean over cases where the class is in the prediction or the
reference (Dice undefined elsewhere); the foreground mean is the mean over classes (kubeseg
leaves out a class that is absent everywhere, where nnU-Net's mean becomes undefined and no
step is taken).

Components are fully connected (26-neighbourhood in 3D), as nnU-Net's. The rule is stored as
JSON (``postprocessing.json``) with nnU-Net's own ``postprocessing_fns`` / ``postprocessing_kwargs``
keys, never as a pickle, so nnU-Net's ``postprocessing.json`` is read by the same code: each step
is a label, or a list of labels or regions, whose union is one mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json, write_json

log = logging.getLogger(__name__)

FILENAME = "postprocessing.json"
_FN_NAME = "remove_all_but_largest_component_from_segmentation"


@dataclass(frozen=True)
class PostprocessingRule:
    """Steps applied in order; each keeps the largest component of the union of its labels."""

    steps: tuple[tuple[int, ...], ...] = ()

    def to_json(self) -> dict:
        return {"postprocessing_fns": [_FN_NAME] * len(self.steps),
                "postprocessing_kwargs": [{"labels_or_regions": list(s) if len(s) > 1 else s[0]} for s in self.steps]}

    @classmethod
    def from_json(cls, d: dict, source: str = "postprocessing.json") -> "PostprocessingRule":
        fns, kwargs = d.get("postprocessing_fns"), d.get("postprocessing_kwargs")
        if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
            raise KubesegError(f"{source}: needs 'postprocessing_fns' and 'postprocessing_kwargs' lists of equal length")
        steps = []
        for fn, kw in zip(fns, kwargs):
            if fn != _FN_NAME:
                raise KubesegError(f"{source}: unknown postprocessing function {fn!r}")
            labels = _flatten(kw.get("labels_or_regions") if isinstance(kw, dict) else None)
            if not labels:
                raise KubesegError(f"{source}: labels_or_regions must be a label, a region (list of labels) or a "
                                   f"list of them: {kw}")
            steps.append(tuple(labels))
        return cls(tuple(steps))


def _flatten(value) -> tuple[int, ...] | None:
    """The label values of a ``labels_or_regions`` entry (a label, a region, or a list of them), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, list) or not value:
        return None
    out: list[int] = []
    for v in value:
        inner = _flatten(v)
        if inner is None:
            return None
        out += [x for x in inner if x not in out]
    return tuple(out)


def keep_largest_component(seg: np.ndarray, labels: Sequence[int], background: int = 0) -> np.ndarray:
    """A copy of ``seg`` in which voxels of ``labels`` outside the union's largest component become background."""
    mask = np.isin(seg, list(labels))
    if not mask.any():
        return seg.copy()
    components, n = ndimage.label(mask, structure=np.ones((3,) * seg.ndim, dtype=bool))
    out = seg.copy()
    if n > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes == sizes.max()) + 1  # ties: keep all the largest, as nnU-Net
        out[mask & ~np.isin(components, keep)] = background
    return out


def apply_postprocessing(seg: np.ndarray, rule: PostprocessingRule) -> np.ndarray:
    for labels in rule.steps:
        seg = keep_largest_component(seg, labels)
    return seg


def dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    """Dice of one label; NaN when both are empty (ignored by the means, as nnU-Net)."""
    return class_dice(pred, ref, (label,))


def class_dice(pred: np.ndarray, ref: np.ndarray, values: Sequence[int], ignore_label: Optional[int] = None) -> float:
    """Dice of a label or region (the union of ``values``); the reference's ``ignore_label`` voxels count nowhere.

    NaN when neither holds the class (on the annotated voxels)."""
    p = pred == values[0] if len(values) == 1 else np.isin(pred, values)
    r = ref == values[0] if len(values) == 1 else np.isin(ref, values)
    if ignore_label is not None:
        annotated = ref != ignore_label
        p, r = p & annotated, r & annotated
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return float("nan") if denom == 0 else 2.0 * int(np.count_nonzero(p & r)) / denom


def _key(cls: Sequence[int]) -> int | tuple[int, ...]:
    return int(cls[0]) if len(cls) == 1 else tuple(int(v) for v in cls)


def mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence,
              ignore_label: Optional[int] = None) -> dict:
    """Per label (an int) or region (a tuple), the mean Dice over cases (NaN cases left out)."""
    out = {}
    for lab in labels:
        cls = (lab,) if isinstance(lab, (int, np.integer)) else tuple(lab)
        values = [d for d in (class_dice(p, r, cls, ignore_label) for p, r in zip(preds, refs)) if not np.isnan(d)]
        out[_key(cls)] = float(np.mean(values)) if values else float("nan")
    return out


def foreground_mean(per_label: dict) -> float:
    values = [v for v in per_label.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _key_str(key) -> str:
    return str(key) if isinstance(key, int) else "(" + ", ".join(str(v) for v in key) + ")"


def decide_postprocessing(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                          foreground_labels: Sequence[int], classes: Optional[Sequence[Sequence[int]]] = None,
                          ignore_label: Optional[int] = None) -> tuple[PostprocessingRule, dict]:
    """The rule for these out-of-fold label maps, and a report (Dice before and after).

    ``classes``: what is scored, in ``dataset.json`` order: the regions of a region model, by
    default each foreground label. ``ignore_label``: the reference's unannotated value."""
    labels = [int(v) for v in foreground_labels]
    scored = [tuple(int(v) for v in c) for c in classes] if classes is not None else [(v,) for v in labels]
    keys = [_key(c) for c in scored]

    def score(segs):
        return mean_dice(segs, refs, scored, ignore_label)

    base = score(preds)
    current, current_dice, steps = list(preds), dict(base), []

    candidate = [keep_largest_component(p, labels) for p in current]
    cand_dice = score(candidate)
    if foreground_mean(cand_dice) > foreground_mean(current_dice) and \
            all(not (cand_dice[k] < current_dice[k]) for k in keys):
        log.info("keeping the largest foreground component: mean Dice %.5f -> %.5f",
                 foreground_mean(current_dice), foreground_mean(cand_dice))
        current, current_dice, steps = candidate, cand_dice, [tuple(labels)]
    else:
        log.info("keeping the largest foreground component does not help (mean Dice %.5f -> %.5f)",
                 foreground_mean(current_dice), foreground_mean(cand_dice))
    if len(scored) > 1:
        for cls, key in zip(scored, keys):
            candidate = [keep_largest_component(p, cls) for p in current]
            cand_dice = score(candidate)
            if cand_dice[key] > current_dice[key]:
                log.info("%s: keeping its largest component: Dice %.5f -> %.5f", _key_str(key), current_dice[key],
                         cand_dice[key])
                current, current_dice = candidate, cand_dice
                steps.append(cls)
    rule = PostprocessingRule(tuple(steps))
    report = {"dice_before": {_key_str(k): v for k, v in base.items()}, "foreground_dice_before": foreground_mean(base),
              "dice_after": {_key_str(k): v for k, v in current_dice.items()},
              "foreground_dice_after": foreground_mean(current_dice), "num_cases": len(preds)}
    return rule, report


def save_postprocessing(rule: PostprocessingRule, path: str | Path, report: dict | None = None) -> Path:
    return write_json({**rule.to_json(), **({"kubeseg_report": report} if report else {})}, path)


def load_postprocessing(path: str | Path) -> PostprocessingRule:
    path = Path(path)
    try:
        return PostprocessingRule.from_json(read_json(path), str(path))
    except ValueError as e:
        raise KubesegError(f"{path} is not valid JSON: {e}") from None


def folder_postprocessing(folder: str | Path) -> PostprocessingRule:
    """The rule stored in a model folder, or none.

    An unreadable ``postprocessing.json`` is skipped with a warning, and nnU-Net's
    ``postprocessing.pkl`` is never read (a pickle from outside is code, not data).
    """
    folder = Path(folder)
    if (folder / FILENAME).is_file():
        try:
            return load_postprocessing(folder / FILENAME)
        except KubesegError as e:
            log.warning("ignoring %s: %s; going on without postprocessing", folder / FILENAME, e)
    elif (folder / "postprocessing.pkl").is_file():
        log.warning("%s: postprocessing.pkl is a pickle and is not read (no postprocessing.json beside it); "
                    "going on without postprocessing", folder)
    return PostprocessingRule()
