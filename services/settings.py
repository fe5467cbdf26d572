"""The service's and the trigger's settings: environment variables (``KUBESEG_*``), then defaults.

One typed object per concern (DESIGN.md). ``bentoml serve`` takes no custom flags, so the
environment is how a Deployment, a test or a person configures the service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _env(name: str, default, cast):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {cast.__name__}") from None
    return value


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_bool.__name__ = "boolean"


@dataclass(frozen=True)
class DriftSettings:
    """Rolling window size and the score above which an input counts as drifted, per check."""

    window: int = 20
    intensity: float = 0.25  # PSI: 0.1 moderate, 0.25 significant shift (the usual marks)
    spacing: float = 0.1  # 10 % beyond the training spacing range
    shape: float = 0.25  # 25 % beyond the training shape range (after cropping)

    def thresholds(self) -> dict[str, float]:
        return {"intensity": self.intensity, "spacing": self.spacing, "shape": self.shape}


@dataclass(frozen=True)
class ServiceSettings:
    """Where the model comes from and how much work the service accepts."""

    model_name: Optional[str] = None  # registered model name (MLflow); with model_alias
    model_alias: str = "champion"
    model_bundle: Optional[Path] = None  # a bundle folder instead of the registry
    tracking_uri: Optional[str] = None  # MLflow; None: MLFLOW_TRACKING_URI or MLflow's default
    device: str = "auto"
    # what runs the network; auto: ONNX Runtime on a CPU (the fastest backend that keeps parity in
    # benchmarks/predict.py; kubeseg.inference.backends.resolve_backend), torch on a GPU
    backend: str = "auto"
    max_concurrency: int = 4  # requests inside the service at once; more get HTTP 429
    max_request_bytes: int = 512 * 1024 * 1024
    max_voxels: int = 512 * 512 * 1024  # per channel; larger images get HTTP 413
    min_size: int = 2  # voxels per axis below which an image is refused
    registry_poll_seconds: float = 30.0  # how often the alias is looked up; 0 = never
    cache_dir: Path = Path(os.environ.get("TMPDIR", "/tmp")) / "kubeseg-models"
    use_mirroring: bool = True  # default of the per-request ``tta`` option
    step: float = 0.5
    drift: DriftSettings = field(default_factory=DriftSettings)

    @classmethod
    def from_env(cls) -> "ServiceSettings":
        d = cls()
        bundle = _env("KUBESEG_MODEL_BUNDLE", None, str)
        s = cls(
            model_name=_env("KUBESEG_MODEL_NAME", None, str),
            model_alias=_env("KUBESEG_MODEL_ALIAS", d.model_alias, str),
            model_bundle=Path(bundle) if bundle else None,
            tracking_uri=_env("MLFLOW_TRACKING_URI", None, str),
            device=_env("KUBESEG_DEVICE", d.device, str),
            backend=_env("KUBESEG_BACKEND", d.backend, str),
            max_concurrency=_env("KUBESEG_MAX_CONCURRENCY", d.max_concurrency, int),
            max_request_bytes=_env("KUBESEG_MAX_REQUEST_BYTES", d.max_request_bytes, int),
            max_voxels=_env("KUBESEG_MAX_VOXELS", d.max_voxels, int),
            min_size=_env("KUBESEG_MIN_SIZE", d.min_size, int),
            registry_poll_seconds=_env("KUBESEG_REGISTRY_POLL_SECONDS", d.registry_poll_seconds, float),
            cache_dir=Path(_env("KUBESEG_CACHE_DIR", str(d.cache_dir), str)),
            use_mirroring=_env("KUBESEG_TTA", d.use_mirroring, _bool),
            step=_env("KUBESEG_STEP", d.step, float),
            drift=DriftSettings(
                window=_env("KUBESEG_DRIFT_WINDOW", DriftSettings.window, int),
                intensity=_env("KUBESEG_DRIFT_THRESHOLD_INTENSITY", DriftSettings.intensity, float),
                spacing=_env("KUBESEG_DRIFT_THRESHOLD_SPACING", DriftSettings.spacing, float),
                shape=_env("KUBESEG_DRIFT_THRESHOLD_SHAPE", DriftSettings.shape, float),
            ),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.model_bundle is None and not self.model_name:
            raise SettingsError("set KUBESEG_MODEL_BUNDLE (a bundle folder) or KUBESEG_MODEL_NAME (a registered model)")
        if self.model_bundle is not None and self.model_name:
            raise SettingsError("set only one of KUBESEG_MODEL_BUNDLE and KUBESEG_MODEL_NAME")
        if self.backend not in ("auto", "torch", "onnxruntime", "openvino"):
            raise SettingsError(f"KUBESEG_BACKEND={self.backend!r}: choose auto, torch, onnxruntime or openvino")
        for f in ("max_concurrency", "max_request_bytes", "max_voxels", "min_size"):
            if getattr(self, f) < 1:
                raise SettingsError(f"KUBESEG_{f.upper()} must be at least 1")
        if self.drift.window < 1:
            raise SettingsError("KUBESEG_DRIFT_WINDOW must be at least 1")


@dataclass(frozen=True)
class TriggerSettings:
    """The retraining trigger: how it starts runs, how often, and where it writes its audit log."""

    mode: str = "local"  # local: kfp.local on this machine; cluster: kfp.Client(host)
    kfp_host: Optional[str] = None
    cooldown_seconds: float = 6 * 3600.0  # one run per alert group per cool-down
    audit_log: Path = Path("retraining-audit.jsonl")
    dataset: Optional[str] = None  # the raw training dataset the retraining starts from
    new_cases: Optional[str] = None  # where new labelled cases are collected
    model_name: Optional[str] = None
    tracking_uri: Optional[str] = None
    retrain_mode: str = "finetune"  # or "retrain"
    schedule: str = "default"
    work_dir: Path = Path("retraining-runs")
    alert_label: str = "kubeseg_action"  # alerts with <alert_label>=retrain start runs
    alert_value: str = "retrain"

    @classmethod
    def from_env(cls) -> "TriggerSettings":
        d = cls()
        host = _env("KUBESEG_KFP_HOST", None, str)
        s = cls(
            mode=_env("KUBESEG_TRIGGER_MODE", "cluster" if host else d.mode, str),
            kfp_host=host,
            cooldown_seconds=_env("KUBESEG_TRIGGER_COOLDOWN_SECONDS", d.cooldown_seconds, float),
            audit_log=Path(_env("KUBESEG_TRIGGER_AUDIT_LOG", str(d.audit_log), str)),
            dataset=_env("KUBESEG_RETRAIN_DATASET", None, str),
            new_cases=_env("KUBESEG_RETRAIN_NEW_CASES", None, str),
            model_name=_env("KUBESEG_MODEL_NAME", None, str),
            tracking_uri=_env("MLFLOW_TRACKING_URI", None, str),
            retrain_mode=_env("KUBESEG_RETRAIN_MODE", d.retrain_mode, str),
            schedule=_env("KUBESEG_RETRAIN_SCHEDULE", d.schedule, str),
            work_dir=Path(_env("KUBESEG_RETRAIN_WORK_DIR", str(d.work_dir), str)),
        )
        s.validate()
        return s

    def validate(self) -> None:
        if self.mode not in ("local", "cluster"):
            raise SettingsError(f"KUBESEG_TRIGGER_MODE must be local or cluster, not {self.mode!r}")
        if self.mode == "cluster" and not self.kfp_host:
            raise SettingsError("KUBESEG_TRIGGER_MODE=cluster needs KUBESEG_KFP_HOST")
        if self.retrain_mode not in ("finetune", "retrain"):
            raise SettingsError(f"KUBESEG_RETRAIN_MODE must be finetune or retrain, not {self.retrain_mode!r}")
        for name, value in (("KUBESEG_RETRAIN_DATASET", self.dataset), ("KUBESEG_MODEL_NAME", self.model_name)):
            if not value:
                raise SettingsError(f"the trigger needs {name}")
        if self.cooldown_seconds < 0:
            raise SettingsError("KUBESEG_TRIGGER_COOLDOWN_SECONDS must not be negative")


def describe(settings) -> dict:
    """Settings as plain JSON (for logs and /readyz), paths as strings."""
    out = {}
    for f in fields(settings):
        v = getattr(settings, f.name)
        out[f.name] = describe(v) if hasattr(v, "__dataclass_fields__") else (str(v) if isinstance(v, Path) else v)
    return out
