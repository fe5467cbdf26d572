"""The one owner of the model-folder name, the device rule and the anisotropy threshold."""

import pytest

from kubeseg.anisotropy import ANISOTROPY_THRESHOLD
from kubeseg.device import resolve_device
from kubeseg.errors import KubesegError
from kubeseg.model_folder import ModelFolderName, configuration_of, model_folder_name, parse_model_folder_name


def test_build_and_parse_round_trip(tmp_path):
    name = model_folder_name({"plans_name": "kubesegSmallPlans"}, "3d_lowres")
    assert name == "nnUNetTrainer__kubesegSmallPlans__3d_lowres"
    assert model_folder_name({}, "2d") == "nnUNetTrainer__nnUNetPlans__2d"
    parsed = parse_model_folder_name(tmp_path / name)
    assert parsed == ModelFolderName("nnUNetTrainer", "kubesegSmallPlans", "3d_lowres")
    assert str(parsed.with_configuration("3d_cascade_fullres")) == "nnUNetTrainer__kubesegSmallPlans__3d_cascade_fullres"
    for other in ("model", "a__b", "a__b__c__d", "a____c"):
        assert parse_model_folder_name(other) is None and configuration_of(other) is None


def test_device_and_threshold():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(KubesegError, match="invalid device"):
        resolve_device("tpu-ish")
    from kubeseg.planning.planner import PlannerSettings
    from kubeseg.preprocessing import resampling
    from kubeseg.training import augmentation

    assert PlannerSettings().anisotropy_threshold == resampling.ANISOTROPY_THRESHOLD == \
        augmentation.ANISO_THRESHOLD == ANISOTROPY_THRESHOLD == 3.0
