"""The one owner of nnU-Net's trained-model folder name: ``<Trainer>__<Plans>__<configuration>``.

nnU-Net v2 names a training output ``nnUNetTrainer__nnUNetPlans__3d_fullres``; kubeseg writes the
same names (so its folders and nnU-Net's move freely) and reads them back in selection, bundling,
cascades and inference. Everything that builds or takes such a name apart imports it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

TRAINER_NAME = "nnUNetTrainer"
DEFAULT_PLANS_NAME = "nnUNetPlans"
SEPARATOR = "__"


@dataclass(frozen=True)
class ModelFolderName:
    trainer: str
    plans: str
    configuration: str

    def __str__(self) -> str:
        return SEPARATOR.join((self.trainer, self.plans, self.configuration))

    def with_configuration(self, configuration: str) -> "ModelFolderName":
        """The sibling folder of another configuration (a cascade's first stage)."""
        return ModelFolderName(self.trainer, self.plans, configuration)


def model_folder_name(plans: Mapping, configuration: str, trainer: str = TRAINER_NAME) -> str:
    """``<Trainer>__<Plans>__<configuration>`` for ``plans`` (its ``plans_name``)."""
    return str(ModelFolderName(trainer, plans.get("plans_name", DEFAULT_PLANS_NAME), configuration))


def parse_model_folder_name(name: Union[str, Path]) -> Optional[ModelFolderName]:
    """The three parts of a folder name (or a path's last part); None when it is not such a name."""
    parts = Path(name).name.split(SEPARATOR)
    if len(parts) != 3 or not all(parts):
        return None
    return ModelFolderName(*parts)


def configuration_of(name: Union[str, Path]) -> Optional[str]:
    """The configuration a model folder's name states; None when the name has another form."""
    parsed = parse_model_folder_name(name)
    return parsed.configuration if parsed else None
