"""Service settings from the environment, the rolling drift window, and the model holder's failure path."""

import pytest

from services.metrics import RollingWindow
from services.model_source import ModelHolder
from services.settings import ServiceSettings, SettingsError


def test_service_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBESEG_AUTH", "disabled")
    monkeypatch.setenv("KUBESEG_MODEL_SIGNATURES", "disabled")
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "liver")
    monkeypatch.setenv("KUBESEG_MAX_VOXELS", "1000")
    monkeypatch.setenv("KUBESEG_TTA", "off")
    monkeypatch.setenv("KUBESEG_DRIFT_THRESHOLD_INTENSITY", "0.4")
    s = ServiceSettings.from_env()
    assert (s.model_name, s.model_alias, s.max_voxels, s.use_mirroring) == ("liver", "champion", 1000, False)
    assert s.drift.thresholds() == {"intensity": 0.4, "spacing": 0.1, "shape": 0.25}
    monkeypatch.setenv("KUBESEG_MODEL_BUNDLE", str(tmp_path))
    with pytest.raises(SettingsError, match="only one of"):
        ServiceSettings.from_env()
    monkeypatch.delenv("KUBESEG_MODEL_BUNDLE")
    monkeypatch.setenv("KUBESEG_MAX_CONCURRENCY", "many")
    with pytest.raises(SettingsError, match="KUBESEG_MAX_CONCURRENCY"):
        ServiceSettings.from_env()
    monkeypatch.setenv("KUBESEG_MAX_CONCURRENCY", "0")
    with pytest.raises(SettingsError, match="KUBESEG_MAX_CONCURRENCY must be at least 1"):
        ServiceSettings.from_env()


def test_auth_and_signatures_are_on_unless_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "liver")
    for var in ("KUBESEG_AUTH", "KUBESEG_MODEL_SIGNATURES", "KUBESEG_API_KEYS", "KUBESEG_API_KEYS_FILE",
                "KUBESEG_OIDC_JWKS_URL", "KUBESEG_OIDC_JWKS_FILE", "KUBESEG_MODEL_PUBLIC_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SettingsError, match="no credential source"):
        ServiceSettings.from_env()
    monkeypatch.setenv("KUBESEG_API_KEYS", "ops " + "a" * 64)
    with pytest.raises(SettingsError, match="KUBESEG_MODEL_PUBLIC_KEY"):
        ServiceSettings.from_env()
    key = tmp_path / "pub.pem"
    key.write_text("x")
    monkeypatch.setenv("KUBESEG_MODEL_PUBLIC_KEY", str(key))
    s = ServiceSettings.from_env()
    assert s.auth.enabled and s.signing.required and s.signing.public_key == key


def test_no_model_source_is_refused(monkeypatch):
    for var in ("KUBESEG_MODEL_NAME", "KUBESEG_MODEL_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SettingsError, match="KUBESEG_MODEL_BUNDLE .* or KUBESEG_MODEL_NAME"):
        ServiceSettings.from_env()


def test_rolling_window_means_the_last_inputs():
    w = RollingWindow(3)
    assert w.add({"intensity": 0.3})["intensity"] == pytest.approx(0.3)
    w.add({"intensity": 0.6})
    w.add({"intensity": 0.9})
    assert w.add({"intensity": 1.2})["intensity"] == pytest.approx(0.9)  # 0.6, 0.9, 1.2
    assert w.add({"intensity": float("inf")})["intensity"] < float("inf")


def test_a_model_that_cannot_load_is_reported_and_nothing_serves(tmp_path):
    swaps, failures = [], []
    holder = ModelHolder(ServiceSettings(model_bundle=tmp_path / "missing", device="cpu"),
                         lambda old, new: swaps.append(new), failures.append)
    with pytest.raises(Exception, match="missing"):
        holder.refresh()
    assert holder.current is None and swaps == []
