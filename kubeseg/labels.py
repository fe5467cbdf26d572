"""What ``dataset.json``'s ``labels`` mean: plain labels, regions, and the ignore label (nnU-Net v2 rules).

* **Plain labels**: ``{"background": 0, "organ": 1, ...}``, consecutive integers; softmax outputs,
  one per label, background included.
* **Regions** (BraTS-style): a label whose value is a list of integers, e.g.
  ``{"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]}``: a voxel
  belongs to a region when its label file value is one of the list. Regions may overlap; the
  network has one sigmoid output per foreground region (no background output), trained with
  Dice + binary cross-entropy. ``regions_class_order`` (one integer per foreground region, in
  the order of ``labels``) turns the outputs into a label map: each region, in turn, paints its
  value where its probability exceeds 0.5, so later regions win.
* **Ignore label**: ``"ignore": N`` with N one above every other label: voxels with value N are
  not annotated; they count in neither loss nor evaluation.

One owner of these rules: the dataset check, preprocessing, training, inference, selection and
the service all ask this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

IGNORE_KEY = "ignore"
ANNOTATED_KEY = "annotated"  # class_locations entry: voxels that are not the ignore label (sampling)
REGION_THRESHOLD = 0.5


def region_key(region: Sequence[int]) -> str:
    """The ``class_locations`` key of a region (a plain label keeps its own number)."""
    return str(region[0]) if len(region) == 1 else "(" + ", ".join(str(v) for v in region) + ")"


@dataclass(frozen=True)
class LabelScheme:
    """Validated label semantics of a dataset. ``regions`` is None for plain labels."""

    names: dict[str, tuple[int, ...]]           # label name -> its values (one for plain labels)
    all_labels: tuple[int, ...]                 # every annotated value, background included, ignore excluded
    regions: Optional[tuple[tuple[int, ...], ...]] = None  # foreground regions, in labels order
    regions_class_order: Optional[tuple[int, ...]] = None
    ignore_label: Optional[int] = None

    @property
    def has_regions(self) -> bool:
        return self.regions is not None

    @property
    def has_ignore_label(self) -> bool:
        return self.ignore_label is not None

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        return tuple(v for v in self.all_labels if v != 0)

    @property
    def num_segmentation_heads(self) -> int:
        return len(self.regions) if self.regions is not None else len(self.all_labels)

    @property
    def file_values(self) -> tuple[int, ...]:
        """Values a label file may hold."""
        return self.all_labels + ((self.ignore_label,) if self.ignore_label is not None else ())

    @property
    def output_labels(self) -> tuple[int, ...]:
        """Values the predicted label map can hold, background included."""
        if self.regions_class_order is not None:
            return (0, *sorted(set(self.regions_class_order) - {0}))
        return self.all_labels

    @property
    def classes(self) -> tuple[tuple[int, ...], ...]:
        """What is scored and sampled: the foreground regions, or each foreground label on its own."""
        return self.regions if self.regions is not None else tuple((v,) for v in self.foreground_labels)

    @property
    def class_keys(self) -> tuple[str, ...]:
        return tuple(region_key(c) for c in self.classes)

    def class_names(self) -> dict[str, str]:
        """class key -> label name (for reports and volumes)."""
        by_values = {tuple(v): k for k, v in self.names.items() if k != IGNORE_KEY}
        return {region_key(c): by_values.get(tuple(c), region_key(c)) for c in self.classes}

    def mask(self, seg: np.ndarray, cls: Sequence[int]) -> np.ndarray:
        """Voxels of ``seg`` in class/region ``cls``."""
        return np.isin(seg, cls) if len(cls) > 1 else seg == cls[0]

    def annotated(self, seg: np.ndarray) -> Optional[np.ndarray]:
        """Voxels that are annotated (not the ignore label); None without an ignore label."""
        return None if self.ignore_label is None else seg != self.ignore_label

    def to_segmentation(self, probabilities: np.ndarray) -> np.ndarray:
        """Label map from probabilities ``(heads, *spatial)``: argmax, or regions painted in order."""
        if self.regions_class_order is None:
            labels = np.asarray(self.all_labels, dtype=np.uint8 if max(self.all_labels) < 255 else np.uint16)
            return labels[np.argmax(probabilities, axis=0)]
        dtype = np.uint8 if max(self.regions_class_order) < 255 else np.uint16
        seg = np.zeros(probabilities.shape[1:], dtype=dtype)
        for i, value in enumerate(self.regions_class_order):
            seg[probabilities[i] > REGION_THRESHOLD] = value
        return seg


def parse_labels(labels: Mapping, regions_class_order=None) -> tuple[Optional[LabelScheme], list[str]]:
    """The scheme of ``dataset.json``'s ``labels`` (+ ``regions_class_order``), or the problems with it."""
    problems: list[str] = []
    if not isinstance(labels, Mapping) or not labels:
        return None, ["'labels' is missing or empty (expected e.g. {\"background\": 0, \"organ\": 1})"]
    names: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            problems.append(f"label '{name}' must be an integer or a list of integers (a region), got {value!r}")
            continue
        if any(v < 0 for v in values):
            problems.append(f"label '{name}' has negative values {value!r}")
            continue
        names[str(name)] = tuple(int(v) for v in values)
    if problems:
        return None, problems
    if names.get("background") != (0,):
        problems.append("labels must declare \"background\": 0")
    ignore = names.get(IGNORE_KEY)
    if IGNORE_KEY in labels and isinstance(labels[IGNORE_KEY], (list, tuple)):
        problems.append("the 'ignore' label must be an integer, not a region")
        ignore = None
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for k, v in labels.items() if k != IGNORE_KEY)
    all_labels = tuple(sorted({v for k, vs in names.items() if k != IGNORE_KEY for v in vs}))
    if ignore is not None and ignore[0] != max(all_labels, default=0) + 1:
        problems.append(f"the 'ignore' label must be the highest value, one above the others "
                        f"({max(all_labels, default=0) + 1}), got {ignore[0]}")
    regions = order = None
    if has_regions:
        regions = tuple(vs for k, vs in names.items() if k != IGNORE_KEY and set(vs) != {0})
        if regions_class_order is None:
            problems.append("region-based labels need 'regions_class_order' (one label value per region)")
        elif not isinstance(regions_class_order, (list, tuple)) or \
                any(isinstance(v, bool) or not isinstance(v, int) for v in regions_class_order):
            problems.append(f"'regions_class_order' must be a list of integers, got {regions_class_order!r}")
        elif len(regions_class_order) != len(regions):
            problems.append(f"'regions_class_order' has {len(regions_class_order)} entries but there are "
                            f"{len(regions)} foreground regions")
        else:
            order = tuple(int(v) for v in regions_class_order)
    else:
        values = sorted(v for k, vs in names.items() if k != IGNORE_KEY for v in vs)
        if values != list(range(len(values))):
            problems.append(f"label values must be consecutive integers starting at 0 (background), got {values}")
    if problems:
        return None, problems
    return LabelScheme(names, all_labels, regions, order, ignore[0] if ignore else None), []


def label_scheme(dataset_json: Mapping) -> LabelScheme:
    """The scheme of a ``dataset.json`` dict; ``ValueError`` listing the problems."""
    scheme, problems = parse_labels(dataset_json.get("labels"), dataset_json.get("regions_class_order"))
    if scheme is None:
        raise ValueError("dataset.json labels: " + "; ".join(problems))
    return scheme
