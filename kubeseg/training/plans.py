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

from kubeseg.planning.plans import configuration as resolve_configuration

PathLike = Union[str, Path]


@dataclass(frozen=True)
class LabelInfo:
    """Label facts from ``dataset.json``: which integer labels exist and how many outputs.

    Region-based training and the ignore label are not supported by this engine yet; both
    raise ``NotImplementedError`` here so the failure is early and explicit.
    """

    all_labels: tuple[int, ...]          # sorted, including background 0
    foreground_labels: tuple[int, ...]   # all_labels without 0
    names: dict[int, str]
    num_input_modalities: int

    @property
    def num_segmentation_heads(self) -> int:
        return len(self.all_labels)

    @classmethod
    def from_dataset_json(cls, dataset_json: dict) -> "LabelInfo":
        labels = dataset_json["labels"]
        names: dict[int, str] = {}
        for k, v in labels.items():
            if isinstance(v, (list, tuple)):
                raise NotImplementedError("region-based labels are not supported by kubeseg training yet")
            if k == "ignore":
                raise NotImplementedError("the ignore label is not supported by kubeseg training yet")
            names[int(v)] = k
        all_labels = tuple(sorted(names))
        if 0 not in all_labels:
            raise ValueError("dataset.json labels must contain background = 0")
        channels = dataset_json.get("channel_names", dataset_json.get("modality"))
        if channels is None:
            raise ValueError("dataset.json has neither channel_names nor modality")
        return cls(all_labels, tuple(i for i in all_labels if i != 0), names, len(channels))


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
