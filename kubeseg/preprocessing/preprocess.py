"""Preprocessing of a dataset for one configuration: the arrays that training reads.

Per case: transpose (coarsest axis first) → crop to nonzero → normalize → resample to the
configuration's spacing → sample foreground locations for the oversampling sampler. Normalizing
before resampling keeps the nonzero mask aligned with the image.

Output layout (nnU-Net v2's preprocessed folder, with .npy + .json instead of blosc2 + pickle)::

    OUT/dataset.json  plans.json  dataset_fingerprint.json  gt_segmentations/<case><ending>
    OUT/<data_identifier>/<case>.npy       float32 (C, *spatial)
    OUT/<data_identifier>/<case>_seg.npy   int8/int16 (1, *spatial), -1 outside the nonzero mask
    OUT/<data_identifier>/<case>.json      properties (geometry, crop box, class locations)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from kubeseg.atomic import default_mode
from kubeseg.dataset import DatasetSpec, RawCase
from kubeseg.dataset_check import LoadedCase, load_case, require_valid_layout
from kubeseg.errors import DatasetError, KubesegError
from kubeseg.imageio import Geometry
from kubeseg.jsonio import to_jsonable, write_json
from kubeseg.labels import ANNOTATED_KEY, LabelScheme
from kubeseg.parallel import map_cases
from kubeseg.planning.plans import configuration as resolve_configuration
from kubeseg.preprocessing.cropping import crop_to_nonzero
from kubeseg.preprocessing.normalization import normalize
from kubeseg.preprocessing.resampling import compute_new_shape
from kubeseg.preprocessing.resampling_functions import data_resampler, seg_resampler

log = logging.getLogger(__name__)

LOCATIONS_PER_CLASS = 10_000  # foreground voxels remembered per class for the oversampler
MIN_LOCATION_COVERAGE = 0.01  # ... but at least this fraction of the class's voxels
LOCATION_SEED = 1234


@dataclass
class PreprocessedCase:
    data: np.ndarray
    seg: np.ndarray
    properties: dict


def target_spacing(config: dict, original_spacing: list[float]) -> list[float]:
    """The configuration's spacing; 2D configurations keep the slice spacing as it is."""
    spacing = list(config["spacing"])
    return [original_spacing[0], *spacing] if len(spacing) < len(original_spacing) else spacing


def sample_class_locations(seg: np.ndarray, labels: "list[int] | LabelScheme") -> dict[str, list[list[int]]]:
    """Up to ``LOCATIONS_PER_CLASS`` voxel coordinates ``[0, z, y, x]`` per foreground label or region.

    Keys: the label (``"2"``) or the region (``"(2, 3)"``); with an ignore label also
    ``"annotated"`` (every voxel that is not the ignore label, -1 included), from which nnU-Net
    draws the patches that are not forced to contain foreground.
    """
    # nnU-Net draws with RandomState.choice(..., replace=False), which shuffles all of a class's voxels
    # (millions for a body label) to keep a few thousand; a Generator draws the same number, uniformly
    # without replacement, in time proportional to the draw (other voxels than nnU-Net's, same law)
    rng = np.random.default_rng(LOCATION_SEED)
    flat = seg.ravel()
    if isinstance(labels, LabelScheme):
        classes = dict(zip(labels.class_keys, labels.classes))
        if labels.has_ignore_label:
            classes[ANNOTATED_KEY] = (-1, *labels.all_labels)
    else:
        classes = {str(v): (v,) for v in labels}
    out: dict[str, list[list[int]]] = {}
    for key, values in classes.items():
        where = np.flatnonzero(np.isin(flat, values) if len(values) > 1 else flat == values[0])
        if where.size == 0:
            out[key] = []
            continue
        n = max(min(LOCATIONS_PER_CLASS, where.size), int(np.ceil(where.size * MIN_LOCATION_COVERAGE)))
        picked = where[rng.choice(where.size, n, replace=False)]
        out[key] = np.stack(np.unravel_index(picked, seg.shape), axis=1).tolist()
    return out


def preprocess_arrays(data: np.ndarray, seg: np.ndarray | None, geometry: Geometry, plans: dict, config: dict,
                      foreground_labels: list[int]) -> PreprocessedCase:
    """The core transform, on arrays: shared by dataset preprocessing and by prediction."""
    forward = plans["transpose_forward"]
    data = data.astype(np.float32).transpose([0, *[a + 1 for a in forward]])
    if seg is not None:
        seg = seg.transpose([0, *[a + 1 for a in forward]])
    spacing = [geometry.spacing[a] for a in forward]
    properties: dict = {
        "spacing": list(geometry.spacing),
        "sitk_stuff": geometry.to_json(),
        "shape_before_cropping": list(data.shape[1:]),
    }
    data, seg, box = crop_to_nonzero(data, seg)
    properties["bbox_used_for_cropping"] = box
    properties["shape_after_cropping_and_before_resampling"] = list(data.shape[1:])

    new_spacing = target_spacing(config, spacing)
    shape = compute_new_shape(data.shape[1:], spacing, new_spacing)
    data = normalize(data, seg, config["normalization_schemes"], config["use_mask_for_norm"],
                     plans["foreground_intensity_properties_per_channel"])
    # the plans' resampling functions and arguments (nnU-Net's default, torch, or none)
    data = data_resampler(config)(data, shape, spacing, new_spacing)
    seg = seg_resampler(config)(seg, shape, spacing, new_spacing)
    if foreground_labels:
        properties["class_locations"] = sample_class_locations(seg, foreground_labels)
    seg = seg.astype(np.int16 if seg.max() > 127 else np.int8)
    return PreprocessedCase(data, seg, properties)


def _save(case_id: str, result: PreprocessedCase, folder: Path) -> None:
    """Into the staging folder, which is private to this run: no per-file atomicity needed.

    The properties are written as write_json(indent=None) writes them, but the class locations
    (tens of thousands of coordinates, already plain ints) skip the recursive conversion and go
    through json's C encoder in one call: that conversion and json.dump's Python-level encoder
    took as long as resampling the case."""
    np.save(folder / f"{case_id}.npy", result.data)
    np.save(folder / f"{case_id}_seg.npy", result.seg)
    locations = result.properties.get("class_locations")
    plain = {k: (locations if k == "class_locations" else to_jsonable(v)) for k, v in result.properties.items()}
    (folder / f"{case_id}.json").write_text(json.dumps(plain) + "\n")


def _preprocess_case(case: RawCase, spec: DatasetSpec, plans: dict, config: dict, folder: Path) -> None:
    loaded: LoadedCase = load_case(case, spec)
    result = preprocess_arrays(loaded.data, loaded.seg, loaded.geometry, plans, config, spec.scheme)
    _save(case.case_id, result, folder)


def preprocess_dataset(raw_dir: str | Path, plans: dict, configuration: str, out_dir: str | Path,
                       fingerprint_path: str | Path | None = None, num_workers: int | None = None,
                       progress: bool = True) -> Path:
    """Preprocess every training case for ``configuration`` into ``out_dir``; returns the case folder.

    All-or-nothing: cases are written to a hidden temporary folder that replaces
    ``out_dir/<data_identifier>`` only when every case succeeded.
    """
    spec, cases = require_valid_layout(raw_dir)
    config = resolve_configuration(plans, configuration)
    n_channels = len(config["normalization_schemes"])
    if n_channels != spec.num_channels:
        raise KubesegError(f"the plans expect {n_channels} channel(s) but dataset.json names {spec.num_channels}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / config["data_identifier"]
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out_dir))
    try:
        _, problems = map_cases(
            partial(_preprocess_case, spec=spec, plans=plans, config=config, folder=staging),
            cases, [c.case_id for c in cases], num_workers,
            desc=f"Preprocessing {configuration}" if progress else "")
        if problems:
            raise DatasetError(problems, str(raw_dir))
        _write_dataset_files(raw_dir, spec, cases, plans, fingerprint_path, out_dir)
        if final.exists():
            shutil.rmtree(final)
        os.chmod(staging, default_mode(directory=True))  # mkdtemp's 0700 would lock out other users
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("preprocessed %d cases for %s into %s", len(cases), configuration, final)
    return final


def _write_dataset_files(raw_dir, spec: DatasetSpec, cases: list[RawCase], plans: dict,
                         fingerprint_path, out_dir: Path) -> None:
    """The dataset-level files beside the arrays, as nnU-Net's preprocessed folder has them."""
    write_json(spec.raw, out_dir / "dataset.json")
    write_json(plans, out_dir / "plans.json")
    if fingerprint_path is not None:
        shutil.copyfile(fingerprint_path, out_dir / "dataset_fingerprint.json")
    gt = out_dir / "gt_segmentations"
    gt.mkdir(exist_ok=True)
    for case in cases:
        target = gt / case.label.name
        if not target.exists() or target.stat().st_size != case.label.stat().st_size:
            tmp = gt / f".{case.label.name}.tmp"
            shutil.copyfile(case.label, tmp)
            tmp.rename(target)
