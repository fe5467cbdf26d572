"""A trained-model folder, read for prediction.

The layout is nnU-Net v2's (and kubeseg's training output is the same)::

    MODEL/plans.json  dataset.json  [dataset_fingerprint.json]
    MODEL/fold_<N>/checkpoint_final.pth  (one per fold; fold_all for a model trained on everything)

The configuration comes from the checkpoints (``init_args['configuration']``), or from the
folder name ``<Trainer>__<Plans>__<configuration>`` when the checkpoint does not say.
Checkpoints are read with :func:`~kubeseg.inference.safe_load.load_checkpoint_safe`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from kubeseg.errors import KubesegError
from kubeseg.inference.safe_load import load_checkpoint_safe
from kubeseg.jsonio import read_json
from kubeseg.model_folder import configuration_of
from kubeseg.network import build_network, set_deep_supervision
from kubeseg.planning.plans import configuration as resolve_configuration
from kubeseg.training.plans import ConfigurationView, LabelInfo, num_input_channels

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_final.pth"


@dataclass
class TrainedModel:
    """One configuration's folds: what the predictor needs, already loaded."""

    folder: Path
    plans: dict
    dataset_json: dict
    configuration: str
    folds: list[str]
    fold_weights: list[dict] = field(repr=False)
    mirror_axes: Optional[tuple[int, ...]]
    trainer_name: str = "nnUNetTrainer"

    @property
    def config(self) -> dict:
        """The resolved plans configuration (``inherits_from`` applied)."""
        return resolve_configuration(self.plans, self.configuration)

    @property
    def view(self) -> ConfigurationView:
        return ConfigurationView.from_plans(self.plans, self.configuration)

    @property
    def labels(self) -> LabelInfo:
        return LabelInfo.from_dataset_json(self.dataset_json)

    @property
    def previous_stage(self) -> Optional[str]:
        return self.config.get("previous_stage")

    def build_network(self, device: torch.device) -> torch.nn.Module:
        """The network (deep supervision off, eval mode) with the first fold's weights, on ``device``."""
        view, labels = self.view, self.labels
        net = build_network(view.network_class_name, view.arch_kwargs, view.kw_requires_import,
                            num_input_channels(view, labels), labels.num_segmentation_heads,
                            deep_supervision=False, initialize=False)
        set_deep_supervision(net, False)
        net.load_state_dict(self.fold_weights[0])
        return net.to(device).eval()


def available_folds(folder: Path, checkpoint_name: str = CHECKPOINT_NAME) -> list[str]:
    """Folds with a finished checkpoint, numbered folds first (``fold_all`` only if alone, as nnU-Net)."""
    found = [p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{checkpoint_name}")]
    numbered = sorted((f for f in found if f.isdigit()), key=int)
    return numbered or [f for f in found if f == "all"]


def _configuration_from_name(folder: Path) -> Optional[str]:
    return configuration_of(folder)


def _read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise KubesegError(f"model folder {path.parent} has no {path.name} ({what})")
    try:
        return read_json(path)
    except ValueError as e:
        raise KubesegError(f"{path} is not valid JSON: {e}") from None


def load_trained_model(folder: str | Path, folds: Optional[Sequence[str | int]] = None,
                       checkpoint_name: str = CHECKPOINT_NAME) -> TrainedModel:
    """Read plans, dataset.json and the checkpoints of ``folds`` (default: every finished fold)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KubesegError(f"model folder {folder} does not exist")
    plans = _read_json_file(folder / "plans.json", "the plans the model was trained with")
    dataset_json = _read_json_file(folder / "dataset.json", "labels and channels")
    chosen = [str(f) for f in folds] if folds else available_folds(folder, checkpoint_name)
    if not chosen:
        raise KubesegError(f"model folder {folder} has no fold_*/{checkpoint_name}")
    weights, configuration, mirror_axes, trainer = [], None, None, "nnUNetTrainer"
    for i, fold in enumerate(chosen):
        ckpt = load_checkpoint_safe(folder / f"fold_{fold}" / checkpoint_name)
        weights.append(dict(ckpt["network_weights"]))
        conf = (ckpt.get("init_args") or {}).get("configuration")
        if i == 0:
            configuration = conf or _configuration_from_name(folder)
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = None if axes is None else tuple(int(a) for a in axes)
            trainer = str(ckpt.get("trainer_name", trainer))
        elif conf is not None and conf != configuration:
            raise KubesegError(f"fold {fold} in {folder} was trained for configuration {conf!r}, "
                               f"fold {chosen[0]} for {configuration!r}")
    if configuration is None:
        raise KubesegError(f"cannot tell the configuration of {folder}: the checkpoint does not name it and "
                           "the folder is not called <Trainer>__<Plans>__<configuration>")
    if configuration not in plans["configurations"]:
        raise KubesegError(f"{folder}: configuration {configuration!r} is not in its plans.json")
    # as nnU-Net: a checkpoint that names no mirroring axes is predicted without mirroring
    model = TrainedModel(folder, plans, dataset_json, configuration, chosen, weights, mirror_axes, trainer)
    log.info("loaded %s (%s), folds %s, mirror axes %s", folder.name, configuration, ",".join(chosen),
             model.mirror_axes)
    return model
