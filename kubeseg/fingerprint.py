"""Dataset fingerprint: what the planner needs to know about a dataset, and nothing else.

Per case: spacing, shape before and after cropping to the nonzero region, and the intensities
of foreground voxels per channel. Per dataset: the foreground intensity statistics that CT
normalization clips and scales with.

Deliberate difference from nnU-Net v2: nnU-Net draws 10^8 / n_cases foreground voxels *with
replacement* from each case and takes statistics of the pooled draw. kubeseg computes the
statistics of the distribution that draw comes from (each case weighted equally) from the voxels
themselves, sub-sampled without replacement only when a case has more foreground voxels than
its share of the same 10^8 budget. Same target, no sampling noise, and far less work when the
foreground is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from kubeseg.dataset import DatasetSpec, RawCase
from kubeseg.dataset_check import load_case, require_valid_layout
from kubeseg.errors import DatasetError, Problem
from kubeseg.jsonio import read_json, write_json
from kubeseg.parallel import map_cases
from kubeseg.preprocessing.cropping import crop_to_nonzero

FOREGROUND_VOXEL_BUDGET = 10e7  # foreground intensities kept over the whole dataset (nnU-Net's number)
SAMPLING_SEED = 1234
PERCENTILES = (0.5, 50.0, 99.5)


@dataclass
class CaseFingerprint:
    """What one case contributes. ``samples`` are foreground intensities per channel (not saved)."""

    case_id: str
    spacing: list[float]
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    num_foreground_voxels: int
    intensity_stats: list[dict]
    samples: list[np.ndarray] = field(repr=False, default_factory=list)

    @property
    def relative_size_after_crop(self) -> float:
        return float(np.prod(self.shape_after_crop) / np.prod(self.shape_before_crop))

    def to_json(self) -> dict:
        return {
            "spacing": self.spacing,
            "shape_before_crop": self.shape_before_crop,
            "shape_after_crop": self.shape_after_crop,
            "num_foreground_voxels": self.num_foreground_voxels,
            "foreground_intensity_stats_per_channel": self.intensity_stats,
        }


def _stats(values: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """mean, std, median, min, max and the 0.5/99.5 percentiles, optionally weighted."""
    if values.size == 0:
        nan = float("nan")
        return dict(mean=nan, median=nan, std=nan, min=nan, max=nan, percentile_99_5=nan, percentile_00_5=nan)
    v = values.astype(np.float64)
    if weights is None:
        lo, med, hi = np.percentile(v, PERCENTILES)
        mean, std = v.mean(), v.std()
    else:
        order = np.argsort(v, kind="stable")
        v, w = v[order], weights[order] / weights.sum()
        mean = float(np.dot(w, v))
        std = float(np.sqrt(np.dot(w, (v - mean) ** 2)))
        lo, med, hi = np.interp(np.asarray(PERCENTILES) / 100, np.cumsum(w) - w / 2, v)
    return dict(mean=float(mean), median=float(med), std=float(std), min=float(v.min()), max=float(v.max()),
                percentile_99_5=float(hi), percentile_00_5=float(lo))


def fingerprint_case(case: RawCase, spec: DatasetSpec, max_samples: int) -> CaseFingerprint:
    """Read, check and crop one case; keep at most ``max_samples`` foreground intensities per channel."""
    loaded = load_case(case, spec)
    cropped, seg, _ = crop_to_nonzero(loaded.data, loaded.seg)
    foreground = seg[0] > 0
    n_fg = int(foreground.sum())
    rng = np.random.RandomState(SAMPLING_SEED)
    pick = rng.choice(n_fg, max_samples, replace=False) if n_fg > max_samples else None
    samples, stats = [], []
    for channel in cropped:
        values = channel[foreground]
        stats.append(_stats(values))
        samples.append(values if pick is None else values[pick])
    return CaseFingerprint(
        case_id=case.case_id,
        spacing=[float(s) for s in loaded.geometry.spacing],
        shape_before_crop=list(loaded.data.shape[1:]),
        shape_after_crop=list(cropped.shape[1:]),
        num_foreground_voxels=n_fg,
        intensity_stats=stats,
        samples=samples,
    )


def dataset_intensity_statistics(cases: list[CaseFingerprint], num_channels: int) -> dict[str, dict]:
    """Foreground statistics per channel, every case with foreground weighted equally."""
    out = {}
    for c in range(num_channels):
        parts = [cf.samples[c] for cf in cases if cf.samples[c].size]
        values = np.concatenate(parts)
        weights = np.concatenate([np.full(p.size, 1.0 / p.size) for p in parts])
        out[str(c)] = _stats(values, weights)
    return out


@dataclass
class Fingerprint:
    """The dataset fingerprint in nnU-Net v2's schema (``to_json``), plus per-case details (``cases``)."""

    spacings: list[list[float]]
    shapes_after_crop: list[list[int]]
    foreground_intensity_properties_per_channel: dict[str, dict]
    median_relative_size_after_cropping: float
    cases: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "spacings": self.spacings,
            "shapes_after_crop": self.shapes_after_crop,
            "foreground_intensity_properties_per_channel": self.foreground_intensity_properties_per_channel,
            "median_relative_size_after_cropping": self.median_relative_size_after_cropping,
        }

    @classmethod
    def from_json(cls, d: dict, cases: dict | None = None) -> "Fingerprint":
        return cls(d["spacings"], d["shapes_after_crop"], d["foreground_intensity_properties_per_channel"],
                   float(d["median_relative_size_after_cropping"]), cases or {})


def extract_fingerprint(raw_dir: str | Path, num_workers: int | None = None, progress: bool = True) -> Fingerprint:
    """Fingerprint a raw dataset; refuses (DatasetError) a dataset that fails the checks."""
    spec, cases = require_valid_layout(raw_dir)
    budget = int(FOREGROUND_VOXEL_BUDGET // len(cases))
    results, problems = map_cases(partial(fingerprint_case, spec=spec, max_samples=budget), cases,
                                  [c.case_id for c in cases], num_workers,
                                  desc="Fingerprinting" if progress else "")
    if problems:
        raise DatasetError(problems, str(raw_dir))
    if not any(r.num_foreground_voxels for r in results):
        raise DatasetError([Problem(None, None, "no case has any foreground voxel: all labels are background")],
                           str(raw_dir))
    return Fingerprint(
        spacings=[r.spacing for r in results],
        shapes_after_crop=[r.shape_after_crop for r in results],
        foreground_intensity_properties_per_channel=dataset_intensity_statistics(results, spec.num_channels),
        median_relative_size_after_cropping=float(np.median([r.relative_size_after_crop for r in results])),
        cases={r.case_id: r.to_json() for r in results},
    )


def cases_path(path: str | Path) -> Path:
    """Where the per-case details of a fingerprint file live (kubeseg's own addition, its own file)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".json") + ".cases.json")


def write_fingerprint(fp: Fingerprint, path: str | Path) -> Path:
    write_json(fp.cases, cases_path(path))
    return write_json(fp.to_json(), path)


def read_fingerprint(path: str | Path) -> Fingerprint:
    extra = cases_path(path)
    return Fingerprint.from_json(read_json(path), read_json(extra) if extra.is_file() else None)
