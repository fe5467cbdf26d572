"""Input drift: how far one incoming scan lies from the training data's fingerprint.

Three checks, each a score that is 0 for an input that looks like the training data:

* ``intensity`` — population stability index (PSI) of the input's intensities inside the
  predicted foreground against the training foreground distribution, per channel (the largest
  channel counts). The reference bins come from the percentiles every nnU-Net v2 fingerprint
  stores (0.5 / 50 / 99.5, min, max), so any bundle — imported nnU-Net models included — has
  one: six bins, below-min … above-max, with the training mass of each. A PSI above 0.25 is the
  usual "significant shift" mark.
* ``spacing`` — how far the voxel spacing lies outside the training range, per axis, relative
  to the training median (0.1 = 10 % beyond the largest or smallest training spacing).
* ``shape`` — the same for the shape after cropping to the nonzero region.

Every score is finite, whatever the input. An input with no intensity distribution to compare
(all zero, or one constant value inside the mask) is *degenerate*: its report says why
(``degenerate``), its intensity score is the PSI of what it has (finite, usually large), and the
service counts it apart and keeps it out of the rolling window, so that one blank upload can
neither fire the drift alert nor hide real drift.

Pure numpy; the service turns these numbers into metrics and alerts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kubeseg.preprocessing.cropping import bounding_box

CHECKS = ("intensity", "spacing", "shape")
_EPS = 1e-4  # PSI smoothing: an empty bin counts as this mass, so the index stays finite
_MIN_FOREGROUND = 64  # fewer predicted-foreground voxels than this: score the nonzero region


@dataclass(frozen=True)
class ChannelReference:
    """Training foreground intensities of one channel as bin edges and the mass in each bin."""

    edges: tuple[float, ...]  # inner edges; bins are (-inf, e0), [e0, e1), ..., [e_last, inf)
    mass: tuple[float, ...]

    @classmethod
    def from_stats(cls, s: dict) -> "ChannelReference":
        edges = [float(s["min"]), float(s["percentile_00_5"]), float(s["median"]), float(s["percentile_99_5"]),
                 float(s["max"])]
        # nudge equal edges apart (a constant channel) so that every bin has a width
        for i in range(1, len(edges)):
            edges[i] = max(edges[i], np.nextafter(edges[i - 1], np.inf))
        return cls(tuple(edges), (0.0, 0.005, 0.495, 0.495, 0.005, 0.0))


@dataclass(frozen=True)
class DriftReference:
    """What the training data looked like: per-channel intensity bins, spacing and shape ranges."""

    channels: tuple[ChannelReference, ...]
    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    spacing_median: tuple[float, ...]
    shape_min: tuple[float, ...]
    shape_max: tuple[float, ...]
    shape_median: tuple[float, ...]

    @classmethod
    def from_fingerprint(cls, fp: dict) -> "DriftReference":
        """From ``dataset_fingerprint.json`` (nnU-Net v2's schema)."""
        props = fp["foreground_intensity_properties_per_channel"]
        channels = tuple(ChannelReference.from_stats(props[k]) for k in sorted(props, key=int))
        sp = np.asarray(fp["spacings"], dtype=float)
        sh = np.asarray(fp["shapes_after_crop"], dtype=float)
        return cls(channels, tuple(sp.min(0)), tuple(sp.max(0)), tuple(np.median(sp, 0)),
                   tuple(sh.min(0)), tuple(sh.max(0)), tuple(np.median(sh, 0)))


@dataclass
class DriftReport:
    """Scores of one input: ``scores[check]``, and the intensity PSI per channel."""

    scores: dict[str, float]
    intensity_per_channel: list[float] = field(default_factory=list)
    mask: str = "foreground"  # which voxels the intensity check used: foreground | nonzero | all
    degenerate: str | None = None  # why the input has no distribution to compare (None: it has one)

    def drifted(self, thresholds: dict[str, float]) -> dict[str, bool]:
        return {k: bool(self.scores[k] > thresholds[k]) for k in CHECKS}

    def to_json(self) -> dict:
        return {"scores": {k: round(v, 6) for k, v in self.scores.items()},
                "intensity_psi_per_channel": [round(v, 6) for v in self.intensity_per_channel],
                "intensity_mask": self.mask, "degenerate": self.degenerate}



@dataclass(frozen=True)
class DriftSettings:
    """Rolling window size and the score above which an input counts as drifted, per check."""

    window: int = 20
    intensity: float = 0.25  # PSI: 0.1 moderate, 0.25 significant shift (the usual marks)
    spacing: float = 0.1  # 10 % beyond the training spacing range
    shape: float = 0.25  # 25 % beyond the training shape range (after cropping)

    def thresholds(self) -> dict[str, float]:
        return {"intensity": self.intensity, "spacing": self.spacing, "shape": self.shape}

def psi(values: np.ndarray, ref: ChannelReference) -> float:
    """Population stability index of ``values`` against the reference bins (0 = same distribution)."""
    counts = np.bincount(np.searchsorted(np.asarray(ref.edges), values, side="right"),
                         minlength=len(ref.mass)).astype(float)
    actual = np.maximum(counts / max(values.size, 1), _EPS)
    expected = np.maximum(np.asarray(ref.mass), _EPS)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _outside(value, lo, hi, median) -> float:
    """How far a value lies beyond [lo, hi], relative to the median (0 inside)."""
    beyond = np.maximum(np.maximum(np.asarray(lo) - value, np.asarray(value) - np.asarray(hi)), 0.0)
    return float(np.max(beyond / np.maximum(np.asarray(median), 1e-8)))


def drift_report(data: np.ndarray, spacing, cropped_shape, foreground: np.ndarray | None,
                 ref: DriftReference) -> DriftReport:
    """Scores of one input: ``data`` (C, z, y, x) raw intensities, ``spacing`` in array order,
    ``cropped_shape`` after cropping to nonzero (None: measured from ``data`` as the fingerprint
    does), ``foreground`` the predicted foreground mask."""
    if cropped_shape is None:
        cropped_shape = [hi - lo for lo, hi in bounding_box(np.any(data != 0, axis=0))]
    if data.shape[0] != len(ref.channels):
        raise ValueError(f"input has {data.shape[0]} channels, the reference {len(ref.channels)}")
    mask, used = foreground, "foreground"
    if mask is None or int(mask.sum()) < _MIN_FOREGROUND:
        mask, used = np.any(data != 0, axis=0), "nonzero"
    degenerate = None
    if not mask.any():
        mask, used = np.ones(data.shape[1:], bool), "all"
    if not np.any(data):
        degenerate = "all voxels are zero"
    per_channel = []
    for c, (channel, r) in enumerate(zip(data, ref.channels)):
        values = channel[mask]
        lo, hi = float(values.min()), float(values.max())
        if degenerate is None and lo == hi:
            degenerate = f"channel {c} is constant ({lo:g}) in the {used} region"
        per_channel.append(_finite(psi(values, r)))
    scores = {
        "intensity": max(per_channel),
        "spacing": _finite(_outside(np.asarray(spacing, float), ref.spacing_min, ref.spacing_max, ref.spacing_median)),
        "shape": _finite(_outside(np.asarray(cropped_shape, float), ref.shape_min, ref.shape_max, ref.shape_median)),
    }
    return DriftReport(scores, per_channel, used, degenerate)


_MAX_SCORE = 1e6


def _finite(value: float) -> float:
    """Scores are finite and capped: an absurd spacing must not put inf or NaN into a metric."""
    v = float(value)
    return _MAX_SCORE if np.isnan(v) or v > _MAX_SCORE else max(v, 0.0)
