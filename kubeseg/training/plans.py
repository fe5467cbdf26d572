"""Read the parts of nnU-Net v2 ``plans.json`` / ``dataset.json`` that training needs.

nnU-Net plans store several configurations (``2d``, ``3d_fullres``, ``3d_lowres``,
``3d_cascade_fullres``); a configuration may name a parent with ``inherits_from`` and then
only overrides some keys (a shallow dict update, parent first).  This module resolves that
and exposes a small typed view, so the rest of the engine does not poke at raw dicts.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from kubeseg.labels import IGNORE_KEY, LabelScheme, label_scheme
from kubeseg.planning.plans import configuration as resolve_configuration

PathLike = Union[str, Path]


@dataclass(frozen=True)
class LabelInfo:
    """Label facts from ``dataset.json`` that training and inference need (rules: :mod:`kubeseg.labels`).

    Plain labels: one softmax output per label. Regions: one sigmoid output per foreground
    region, ``regions_class_order`` to paint the label map. ``ignore_label``: not annotated.
    """

    all_labels: tuple[int, ...]          # sorted, including background 0, without the ignore label
    foreground_labels: tuple[int, ...]   # all_labels without 0
    names: dict[int, str]
    num_input_modalities: int
    scheme: LabelScheme = None  # type: ignore[assignment]

    @property
    def has_regions(self) -> bool:
        return self.scheme.has_regions

    @property
    def regions(self):
        return self.scheme.regions

    @property
    def ignore_label(self):
        return self.scheme.ignore_label

    @property
    def num_segmentation_heads(self) -> int:
        return self.scheme.num_segmentation_heads

    @property
    def output_labels(self) -> tuple[int, ...]:
        """Values of the predicted label map."""
        return self.scheme.output_labels

    @classmethod
    def from_dataset_json(cls, dataset_json: dict) -> "LabelInfo":
        scheme = label_scheme(dataset_json)
        names = {vs[0]: k for k, vs in scheme.names.items() if len(vs) == 1 and k != IGNORE_KEY}
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if channels is None:
            raise ValueError("dataset.json has neither channel_names nor modality")
        return cls(scheme.all_labels, scheme.foreground_labels, names, len(channels), scheme)


@dataclass(frozen=True)
class ConfigurationView:
    """Typed view on one resolved plans configuration (only what training needs)."""

    name: str
    data_identifier: str
    batch_size: int
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    batch_dice: bool
    network_class_name: str
    arch_kwargs: dict
    kw_requires_import: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    previous_stage: Optional[str]
    next_stages: tuple[str, ...]
    raw: dict

    @property
    def pool_op_kernel_sizes(self) -> list[list[int]]:
        return self.arch_kwargs["strides"]

    @property
    def is_cascaded(self) -> bool:
        return self.previous_stage is not None

    @classmethod
    def from_plans(cls, plans: dict, name: str) -> "ConfigurationView":
        cfg = resolve_configuration(plans, name)
        if "architecture" not in cfg:
            raise ValueError("plans use the pre-2.3 format without 'architecture'; re-plan the dataset")
        arch = cfg["architecture"]
        nxt = cfg.get("next_stage")
        if isinstance(nxt, str):
            nxt = [nxt]
        return cls(
            name=name,
            data_identifier=cfg["data_identifier"],
            batch_size=int(cfg["batch_size"]),
            patch_size=tuple(int(i) for i in cfg["patch_size"]),
            spacing=tuple(float(i) for i in cfg["spacing"]),
            batch_dice=bool(cfg.get("batch_dice", False)),
            network_class_name=arch["network_class_name"],
            arch_kwargs=deepcopy(arch["arch_kwargs"]),
            kw_requires_import=tuple(arch.get("_kw_requires_import", ())),
            use_mask_for_norm=tuple(bool(i) for i in cfg.get("use_mask_for_norm", ()) or ()),
            previous_stage=cfg.get("previous_stage"),
            next_stages=tuple(nxt or ()),
            raw=cfg,
        )


def num_input_channels(config: ConfigurationView, labels: LabelInfo) -> int:
    """Image channels, plus one one-hot channel per foreground label for cascade stages."""
    n = labels.num_input_modalities
    if config.is_cascaded:
        n += len(labels.foreground_labels)
    return n


def deep_supervision_scales(pool_op_kernel_sizes: Sequence[Sequence[int]]) -> list[list[float]]:
    """Relative resolution of each deep-supervision output, highest first.

    The network emits one output per decoder stage; the lowest-resolution stage (the
    bottleneck) has none, hence the dropped last entry.
    """
    import numpy as np

    cum = np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0)
    return [list(map(float, 1.0 / row)) for row in cum][:-1]
