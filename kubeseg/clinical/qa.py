"""QA flags for every prediction: what makes a case worth a person's second look.

Flags (names are the ``flag`` values in the summary JSON, the FHIR report and the Prometheus
counter ``kubeseg_qa_flags_total{flag=...}``):

* ``low_confidence``: mean top-class probability over the predicted foreground below
  ``min_confidence``;
* ``drift``: an input drift check over its threshold (the thresholds are the drift settings'; QA
  only reads the verdicts);
* ``label_missing``: a label present in every training case is absent from the prediction;
* ``volume_out_of_range``: a label's volume outside ``[min, max]`` of the training labels (widened
  by ``volume_margin``; the ranges are stored in the bundle's ``selection.json`` at selection time);
* ``low_dice`` / ``high_hd95``: with a reference segmentation, a label's Dice below ``min_dice``
  (0.70) or its 95th-percentile Hausdorff distance above ``max_hd95_mm`` (15 mm).

:class:`QASettings` is the one owner of these thresholds.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

FLAGS = ("low_confidence", "drift", "label_missing", "volume_out_of_range", "low_dice", "high_hd95")
VOLUME_RANGES_KEY = "label_volumes_ml"  # selection.json / bundle: training volume range per label


@dataclass(frozen=True)
class QASettings:
    """Thresholds of the QA flags (env ``KUBESEG_QA_MIN_CONFIDENCE`` ... in :meth:`from_env`)."""

    min_confidence: float = 0.80
    min_dice: float = 0.70
    max_hd95_mm: float = 15.0
    volume_margin: float = 0.0  # fraction: 0.1 accepts 10 % beyond the training range

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "QASettings":
        d = cls()
        out = {}
        for name in ("min_confidence", "min_dice", "max_hd95_mm", "volume_margin"):
            raw = env.get(f"KUBESEG_QA_{name.upper()}")
            if raw is None or raw == "":
                out[name] = getattr(d, name)
                continue
            try:
                out[name] = float(raw)
            except ValueError:
                raise ValueError(f"KUBESEG_QA_{name.upper()}={raw!r} is not a number") from None
        return cls(**out)


@dataclass
class Flag:
    flag: str
    message: str
    label: Optional[str] = None
    value: Optional[float] = None
    threshold: Optional[float] = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class QAReport:
    flags: list[Flag] = field(default_factory=list)
    per_label_confidence: dict[str, float] = field(default_factory=dict)
    reference_metrics: Optional[dict[str, dict[str, float]]] = None
    not_checked: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def to_json(self) -> dict:
        """JSON-ready: an infinite distance (a label on one side only) is written as null."""
        return _finite({"flagged": self.flagged, "flags": [f.to_json() for f in self.flags],
                        "per_label_confidence": {k: round(v, 6) for k, v in self.per_label_confidence.items()},
                        "reference": self.reference_metrics, "not_checked": self.not_checked})


def _finite(x):
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def per_label_confidence(probabilities: np.ndarray, segmentation: np.ndarray,
                         labels: Mapping[str, int]) -> dict[str, float]:
    """Mean top-class probability over each predicted foreground label's voxels (absent labels left out)."""
    top = probabilities.max(axis=0)
    out = {}
    for name, value in labels.items():
        if int(value) == 0:
            continue
        mask = segmentation == int(value)
        if mask.any():
            out[name] = float(top[mask].mean())
    return out


def most_uncertain_label(confidences: Mapping[str, float]) -> Optional[str]:
    """The predicted foreground label with the lowest mean top-class probability."""
    return min(confidences, key=lambda k: (confidences[k], k)) if confidences else None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95 % Hausdorff distance in mm: the larger of the two directed 95th percentiles of surface-voxel
    distances (as MONAI's ``compute_hausdorff_distance(percentile=95)``); 0 when both masks are
    empty, inf when only one is."""
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return float(max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95)))


def label_volume_ranges(cases: Sequence[tuple[np.ndarray, Sequence[float]]],
                        labels: Mapping[str, int | Sequence[int]]) -> dict:
    """Per foreground label or region over training label maps ``(array, spacing)``: min/median/max
    ml and how many cases hold it (the reference for ``volume_out_of_range`` and ``label_missing``).
    Volumes are measured as a prediction's are (:func:`kubeseg.inference.quality.label_volumes_ml`:
    a region counts the voxels of any of its values; the ignore label has none)."""
    from kubeseg.inference.quality import label_volumes_ml

    per_case = [label_volumes_ml(np.asarray(a), sp, labels) for a, sp in cases]
    out = {}
    for name in (per_case[0] if per_case else {}):
        vols = [v[name] for v in per_case]
        present = [v for v in vols if v > 0]
        out[name] = {"min": min(present) if present else 0.0, "median": float(np.median(present)) if present else 0.0,
                     "max": max(present) if present else 0.0, "cases": len(vols), "present_in": len(present)}
    return out


def qa_flags(volumes_ml: Mapping[str, float], confidence: float, label_confidence: Mapping[str, float],
             drifted: Optional[Mapping[str, bool]], drift_scores: Optional[Mapping[str, float]],
             volume_ranges: Optional[Mapping[str, Mapping]], settings: QASettings = QASettings(),
             reference_metrics: Optional[Mapping[str, Mapping[str, float]]] = None) -> QAReport:
    """Every flag that applies to one prediction."""
    report = QAReport(per_label_confidence=dict(label_confidence),
                      reference_metrics={k: dict(v) for k, v in reference_metrics.items()} if reference_metrics else None)
    if confidence < settings.min_confidence:
        report.flags.append(Flag("low_confidence", f"confidence {confidence:.3f} is below {settings.min_confidence}",
                                 value=confidence, threshold=settings.min_confidence))
    if drifted is None:
        report.not_checked.append("drift")
    else:
        for check, bad in drifted.items():
            if bad:
                score = (drift_scores or {}).get(check)
                report.flags.append(Flag("drift", f"input drift check {check} is over its threshold",
                                         label=check, value=score))
    if not volume_ranges:
        report.not_checked += ["label_missing", "volume_out_of_range"]
    else:
        m = settings.volume_margin
        for name, volume in volumes_ml.items():
            r = volume_ranges.get(name)
            if not r:
                continue
            if volume == 0:
                if r.get("present_in", 0) and r.get("present_in") == r.get("cases"):
                    report.flags.append(Flag("label_missing", f"{name} is absent; it was present in all "
                                                              f"{r['cases']} training cases", label=name, value=0.0))
                continue
            lo, hi = float(r["min"]) * (1 - m), float(r["max"]) * (1 + m)
            if not lo <= volume <= hi:
                report.flags.append(Flag("volume_out_of_range", f"{name}: {volume:.2f} ml is outside the training "
                                                                f"range {lo:.2f}-{hi:.2f} ml", label=name,
                                         value=volume, threshold=hi if volume > hi else lo))
    for name, metrics in (reference_metrics or {}).items():
        if metrics.get("dice", 1.0) < settings.min_dice:
            report.flags.append(Flag("low_dice", f"{name}: Dice {metrics['dice']:.3f} against the reference is below "
                                                 f"{settings.min_dice}", label=name, value=metrics["dice"],
                                     threshold=settings.min_dice))
        if metrics.get("hd95_mm", 0.0) > settings.max_hd95_mm:
            report.flags.append(Flag("high_hd95", f"{name}: HD95 {metrics['hd95_mm']:.1f} mm against the reference "
                                                  f"exceeds {settings.max_hd95_mm} mm", label=name,
                                     value=metrics["hd95_mm"], threshold=settings.max_hd95_mm))
    return report


def reference_metrics(segmentation: np.ndarray, reference: np.ndarray, spacing: Sequence[float],
                      labels: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Dice and HD95 (mm) per foreground label against a reference label map on the same grid."""
    if segmentation.shape != reference.shape:
        raise ValueError(f"the reference's shape {reference.shape} differs from the prediction's {segmentation.shape}")
    out = {}
    for name, value in labels.items():
        if int(value) == 0:
            continue
        a, b = segmentation == int(value), reference == int(value)
        out[name] = {"dice": dice(a, b), "hd95_mm": hd95(a, b, spacing)}
    return out
