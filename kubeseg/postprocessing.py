"""Postprocessing: keep only the largest connected component, where cross-validation says it helps.

The decision follows nnU-Net v2 on the out-of-fold predictions:

1. all foreground labels taken as one region: keep its largest component if that raises the
   mean foreground Dice and lowers no label's Dice;
2. then, with more than one foreground label, each label on its own (on top of what was kept so
   far): keep its largest component if that raises this label's mean Dice.

Components are fully connected (26-neighbourhood in 3D), as nnU-Net's. The rule is stored as
JSON (``postprocessing.json``) with nnU-Net's own ``postprocessing_fns`` / ``postprocessing_kwargs``
keys, never as a pickle, so nnU-Net's ``postprocessing.json`` is read by the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
            labels = kw.get("labels_or_regions") if isinstance(kw, dict) else None
            labels = labels if isinstance(labels, list) else [labels]
            if not labels or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
                raise KubesegError(f"{source}: labels_or_regions must be labels (regions are not supported): {kw}")
            steps.append(tuple(labels))
        return cls(tuple(steps))


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
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom


def mean_dice(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]) -> dict[int, float]:
    """Per label, the mean Dice over cases (NaN cases left out)."""
    out = {}
    for lab in labels:
        values = [d for d in (dice(p, r, lab) for p, r in zip(preds, refs)) if not np.isnan(d)]
        out[int(lab)] = float(np.mean(values)) if values else float("nan")
    return out


def foreground_mean(per_label: dict[int, float]) -> float:
    values = [v for v in per_label.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def decide_postprocessing(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                          foreground_labels: Sequence[int]) -> tuple[PostprocessingRule, dict]:
    """The rule for these out-of-fold predictions, and a report (Dice before and after)."""
    labels = [int(v) for v in foreground_labels]
    base = mean_dice(preds, refs, labels)
    current, current_dice, steps = list(preds), dict(base), []

    candidate = [keep_largest_component(p, labels) for p in current]
    cand_dice = mean_dice(candidate, refs, labels)
    if foreground_mean(cand_dice) > foreground_mean(current_dice) and \
            all(not (cand_dice[k] < current_dice[k]) for k in labels):
        log.info("keeping the largest foreground component: mean Dice %.5f -> %.5f",
                 foreground_mean(current_dice), foreground_mean(cand_dice))
        current, current_dice, steps = candidate, cand_dice, [tuple(labels)]
    else:
        log.info("keeping the largest foreground component does not help (mean Dice %.5f -> %.5f)",
                 foreground_mean(current_dice), foreground_mean(cand_dice))
    if len(labels) > 1:
        for lab in labels:
            candidate = [keep_largest_component(p, [lab]) for p in current]
            cand_dice = mean_dice(candidate, refs, labels)
            if cand_dice[lab] > current_dice[lab]:
                log.info("label %d: keeping its largest component: Dice %.5f -> %.5f", lab, current_dice[lab],
                         cand_dice[lab])
                current, current_dice = candidate, cand_dice
                steps.append((lab,))
    rule = PostprocessingRule(tuple(steps))
    report = {"dice_before": {str(k): v for k, v in base.items()}, "foreground_dice_before": foreground_mean(base),
              "dice_after": {str(k): v for k, v in current_dice.items()},
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
