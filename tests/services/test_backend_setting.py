"""KUBESEG_BACKEND: the service's network runtime, auto by default (OpenVINO on a CPU, torch on a GPU)."""

import pytest
import torch

from kubeseg.inference.backends import resolve_backend
from services.settings import ServiceSettings, SettingsError


def test_backend_from_env_and_refused_when_unknown(monkeypatch):
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "liver")
    monkeypatch.setenv("KUBESEG_AUTH", "disabled")  # the backend setting is the point here
    monkeypatch.setenv("KUBESEG_MODEL_SIGNATURES", "disabled")
    monkeypatch.delenv("KUBESEG_MODEL_BUNDLE", raising=False)
    monkeypatch.delenv("KUBESEG_BACKEND", raising=False)
    assert ServiceSettings.from_env().backend == "auto"
    monkeypatch.setenv("KUBESEG_BACKEND", "openvino")
    assert ServiceSettings.from_env().backend == "openvino"
    monkeypatch.setenv("KUBESEG_BACKEND", "tensorrt")
    with pytest.raises(SettingsError, match="KUBESEG_BACKEND"):
        ServiceSettings.from_env()


def test_auto_is_openvino_on_a_cpu_and_torch_on_a_gpu():
    pytest.importorskip("openvino")
    assert resolve_backend("auto", torch.device("cpu")) == "openvino"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_backend("openvino", torch.device("cpu")) == "openvino"
