"""The service's and the trigger's settings: environment variables (``KUBESEG_*``), then defaults.

One typed object per concern (DESIGN.md). ``bentoml serve`` takes no custom flags, so the
environment is how a Deployment, a test or a person configures the service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from kubeseg.drift import DriftSettings  # noqa: F401 - the engine owns the thresholds
from kubeseg.input_budget import DEFAULT_MAX_RESAMPLED_VOXELS
from services.review_page import SHELL_PATHS as REVIEW_PAGE_FILES


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


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


_paths.__name__ = "comma-separated list"

SEGMENT_SCOPE = "kubeseg:segment"
ADMIN_SCOPE = "kubeseg:admin"


@dataclass(frozen=True)
class AuthSettings:
    """Who may call the service (services/auth.py). Deny by default: every path not in
    ``open_paths`` needs a credential; ``admin_paths`` need ``admin_scope``, the rest ``segment_scope``.

    Credentials: OIDC/JWT bearer tokens verified against a JWKS (``jwks_url`` or ``jwks_file``; the
    token's ``iss`` and ``aud`` must match ``issuer``/``audience``), and static API keys whose
    SHA-256 hashes are listed in ``api_keys_file`` (a mounted Secret) or ``api_keys`` (env).
    ``enabled=False`` (``KUBESEG_AUTH=disabled``) is for development only and logs a warning.
    """

    enabled: bool = True
    jwks_url: Optional[str] = None
    jwks_file: Optional[Path] = None
    issuer: Optional[str] = None
    audience: Optional[str] = None
    api_keys_file: Optional[Path] = None
    api_keys: Optional[str] = None  # "<key id> <sha256 hex> [scope,scope]" lines, ";"-separated in env
    # health and metrics; and the review page's static files (code, no data: services/review_page.py)
    open_paths: tuple[str, ...] = ("/livez", "/readyz", "/healthz", "/metrics") + REVIEW_PAGE_FILES
    admin_paths: tuple[str, ...] = ("/model",)
    segment_scope: str = SEGMENT_SCOPE
    admin_scope: str = ADMIN_SCOPE
    jwks_cache_seconds: float = 300.0
    leeway_seconds: int = 30

    @classmethod
    def from_env(cls) -> "AuthSettings":
        d = cls()
        mode = _env("KUBESEG_AUTH", "enabled", str).lower()
        if mode not in ("enabled", "disabled"):
            raise SettingsError(f"KUBESEG_AUTH must be enabled or disabled, not {mode!r}")
        jwks_file = _env("KUBESEG_OIDC_JWKS_FILE", None, str)
        keys_file = _env("KUBESEG_API_KEYS_FILE", None, str)
        s = cls(
            enabled=mode == "enabled",
            jwks_url=_env("KUBESEG_OIDC_JWKS_URL", None, str),
            jwks_file=Path(jwks_file) if jwks_file else None,
            issuer=_env("KUBESEG_OIDC_ISSUER", None, str),
            audience=_env("KUBESEG_OIDC_AUDIENCE", None, str),
            api_keys_file=Path(keys_file) if keys_file else None,
            api_keys=_env("KUBESEG_API_KEYS", None, str),
            open_paths=_env("KUBESEG_AUTH_OPEN_PATHS", d.open_paths, _paths),
            admin_paths=_env("KUBESEG_AUTH_ADMIN_PATHS", d.admin_paths, _paths),
            segment_scope=_env("KUBESEG_AUTH_SEGMENT_SCOPE", d.segment_scope, str),
            admin_scope=_env("KUBESEG_AUTH_ADMIN_SCOPE", d.admin_scope, str),
            jwks_cache_seconds=_env("KUBESEG_OIDC_JWKS_CACHE_SECONDS", d.jwks_cache_seconds, float),
            leeway_seconds=_env("KUBESEG_OIDC_LEEWAY_SECONDS", d.leeway_seconds, int),
        )
        s.validate()
        return s

    @property
    def oidc(self) -> bool:
        return bool(self.jwks_url or self.jwks_file)

    def validate(self) -> None:
        if not self.enabled:
            return
        if not self.oidc and not (self.api_keys_file or self.api_keys):
            raise SettingsError("authentication is on (KUBESEG_AUTH=enabled) but no credential source is set: set "
                                "KUBESEG_OIDC_JWKS_URL/KUBESEG_OIDC_JWKS_FILE and/or KUBESEG_API_KEYS_FILE/"
                                "KUBESEG_API_KEYS, or KUBESEG_AUTH=disabled for development")
        if self.jwks_url and self.jwks_file:
            raise SettingsError("set only one of KUBESEG_OIDC_JWKS_URL and KUBESEG_OIDC_JWKS_FILE")
        if self.oidc and not (self.issuer and self.audience):
            raise SettingsError("OIDC tokens need KUBESEG_OIDC_ISSUER and KUBESEG_OIDC_AUDIENCE")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise SettingsError(f"KUBESEG_API_KEYS_FILE={self.api_keys_file} is not a file")
        for p in self.open_paths + self.admin_paths:
            if not p.startswith("/"):
                raise SettingsError(f"auth paths start with '/': {p!r}")


@dataclass(frozen=True)
class SigningSettings:
    """Which models may be served: only bundles whose manifest signature verifies with
    ``public_key`` (PEM file, KUBESEG_MODEL_PUBLIC_KEY; kubeseg/signing.py). Off only explicitly
    (KUBESEG_MODEL_SIGNATURES=disabled, development) — then a warning is logged at start."""

    required: bool = True
    public_key: Optional[Path] = None

    @classmethod
    def from_env(cls) -> "SigningSettings":
        mode = _env("KUBESEG_MODEL_SIGNATURES", "required", str).lower()
        if mode not in ("required", "disabled"):
            raise SettingsError(f"KUBESEG_MODEL_SIGNATURES must be required or disabled, not {mode!r}")
        key = _env("KUBESEG_MODEL_PUBLIC_KEY", None, str)
        s = cls(required=mode == "required", public_key=Path(key) if key else None)
        if s.required and (s.public_key is None or not s.public_key.is_file()):
            raise SettingsError("model signatures are required (KUBESEG_MODEL_SIGNATURES=required): set "
                                "KUBESEG_MODEL_PUBLIC_KEY to the registration key's public PEM file "
                                f"(got {key!r}), or KUBESEG_MODEL_SIGNATURES=disabled for development")
        return s


@dataclass(frozen=True)
class ServiceSettings:
    """Where the model comes from and how much work the service accepts."""

    model_name: Optional[str] = None  # registered model name (MLflow); with model_alias
    model_alias: str = "champion"
    model_bundle: Optional[Path] = None  # a bundle folder instead of the registry
    tracking_uri: Optional[str] = None  # MLflow; None: MLFLOW_TRACKING_URI or MLflow's default
    device: str = "auto"
    # what runs the network; auto: OpenVINO on a CPU (the fastest backend that keeps parity in
    # benchmarks/predict.py; the rule: kubeseg.inference.backends.resolve_backend), torch on a GPU
    backend: str = "auto"
    max_concurrency: int = 4  # requests inside the service at once; more get HTTP 429
    max_request_bytes: int = 512 * 1024 * 1024
    max_voxels: int = 512 * 512 * 1024  # per channel; larger images get HTTP 413
    min_size: int = 2  # voxels per axis below which an image is refused
    # the grid any configuration resamples an input to (from its header; kubeseg.input_budget says why)
    max_resampled_voxels: int = DEFAULT_MAX_RESAMPLED_VOXELS
    max_expanded_bytes: int = 4 * 512 * 1024 * 1024  # a zip upload may expand to this much (in /tmp)
    registry_poll_seconds: float = 30.0  # how often the alias is looked up; 0 = never
    cache_dir: Path = Path(os.environ.get("TMPDIR", "/tmp")) / "kubeseg-models"
    use_mirroring: bool = True  # default of the per-request ``tta`` option
    step: float = 0.5
    drift: DriftSettings = field(default_factory=DriftSettings)
    auth: AuthSettings = field(default_factory=lambda: AuthSettings(enabled=False))
    signing: SigningSettings = field(default_factory=lambda: SigningSettings(required=False))

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
            max_resampled_voxels=_env("KUBESEG_MAX_RESAMPLED_VOXELS", d.max_resampled_voxels, int),
            # default: 4x the request limit (services.decode.ZIP_EXPANSION_LIMIT); README sizes /tmp for it
            max_expanded_bytes=_env("KUBESEG_MAX_EXPANDED_BYTES",
                                    4 * _env("KUBESEG_MAX_REQUEST_BYTES", d.max_request_bytes, int), int),
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
        s.validate()  # the model source first: the most basic mistake is named first
        from dataclasses import replace

        return replace(s, auth=AuthSettings.from_env(), signing=SigningSettings.from_env())

    def validate(self) -> None:
        if self.model_bundle is None and not self.model_name:
            raise SettingsError("set KUBESEG_MODEL_BUNDLE (a bundle folder) or KUBESEG_MODEL_NAME (a registered model)")
        if self.model_bundle is not None and self.model_name:
            raise SettingsError("set only one of KUBESEG_MODEL_BUNDLE and KUBESEG_MODEL_NAME")
        if self.backend not in ("auto", "torch", "onnxruntime", "openvino"):
            raise SettingsError(f"KUBESEG_BACKEND={self.backend!r}: choose auto, torch, onnxruntime or openvino")
        for f in ("max_concurrency", "max_request_bytes", "max_voxels", "min_size", "max_resampled_voxels",
                  "max_expanded_bytes"):
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
    # who may post alerts: Alertmanager's webhook http_config (bearer token, or basic auth), from a Secret
    auth_enabled: bool = True
    token_file: Optional[Path] = None  # the bearer token Alertmanager sends (same Secret, mounted on both)
    basic_user: Optional[str] = None
    basic_password_file: Optional[Path] = None
    max_body_bytes: int = 256 * 1024  # Alertmanager's notifications are a few KB; max_alerts bounds them too
    max_alerts: int = 100
    # de-duplication key: these labels of each actionable alert (never the payload's groupKey)
    dedup_labels: tuple[str, ...] = ("alertname", "namespace", "job", "model")
    max_run_seconds: float = 24 * 3600.0  # a run older than this no longer counts as in flight
    # the retraining runs' promotion: required = a version that passes the gate waits for a person
    # (`kubeseg models approve`); auto = the champion moves at once (development)
    promotion_approval: str = "auto"
    # automatic rollback: firing alerts with <alert_label>=<rollback_value> on the champion's version
    # roll `champion` back when it became champion by a promotion or approval less than
    # rollback_window_seconds ago; outside the window, or for a version no longer champion, nothing
    # is done (written to the audit log). Never starts a retraining run.
    rollback_enabled: bool = True
    rollback_value: str = "rollback"
    rollback_window_seconds: float = 3600.0

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
            auth_enabled=_trigger_auth(),
            token_file=_optional_path("KUBESEG_TRIGGER_TOKEN_FILE"),
            basic_user=_env("KUBESEG_TRIGGER_BASIC_USER", None, str),
            basic_password_file=_optional_path("KUBESEG_TRIGGER_BASIC_PASSWORD_FILE"),
            max_body_bytes=_env("KUBESEG_TRIGGER_MAX_BODY_BYTES", d.max_body_bytes, int),
            max_alerts=_env("KUBESEG_TRIGGER_MAX_ALERTS", d.max_alerts, int),
            dedup_labels=_env("KUBESEG_TRIGGER_DEDUP_LABELS", d.dedup_labels, _paths),
            max_run_seconds=_env("KUBESEG_TRIGGER_MAX_RUN_SECONDS", d.max_run_seconds, float),
            promotion_approval=_env("KUBESEG_PROMOTION_APPROVAL", d.promotion_approval, str).lower(),
            rollback_enabled=_env("KUBESEG_ROLLBACK", True, _enabled),
            rollback_window_seconds=_env("KUBESEG_ROLLBACK_WINDOW_SECONDS", d.rollback_window_seconds, float),
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
        if self.auth_enabled:
            if not self.token_file and not (self.basic_user and self.basic_password_file):
                raise SettingsError("the trigger's webhook authentication is on (KUBESEG_TRIGGER_AUTH=enabled) but "
                                    "has no credential: set KUBESEG_TRIGGER_TOKEN_FILE, or KUBESEG_TRIGGER_BASIC_USER "
                                    "and KUBESEG_TRIGGER_BASIC_PASSWORD_FILE, or KUBESEG_TRIGGER_AUTH=disabled for "
                                    "development")
            for name, f in (("KUBESEG_TRIGGER_TOKEN_FILE", self.token_file),
                            ("KUBESEG_TRIGGER_BASIC_PASSWORD_FILE", self.basic_password_file)):
                if f is not None and (not f.is_file() or not f.read_text().strip()):
                    raise SettingsError(f"{name}={f} is not a file holding a secret")
        if self.promotion_approval not in ("auto", "required"):
            raise SettingsError(f"KUBESEG_PROMOTION_APPROVAL must be auto or required, not {self.promotion_approval!r}")
        if self.rollback_window_seconds < 0:
            raise SettingsError("KUBESEG_ROLLBACK_WINDOW_SECONDS must not be negative")
        if self.rollback_value == self.alert_value:
            raise SettingsError("the rollback and retrain alert values must differ")
        if "alertname" not in self.dedup_labels:
            raise SettingsError("KUBESEG_TRIGGER_DEDUP_LABELS must include alertname")
        if self.max_body_bytes < 1024 or self.max_alerts < 1:
            raise SettingsError("KUBESEG_TRIGGER_MAX_BODY_BYTES must be at least 1024 and KUBESEG_TRIGGER_MAX_ALERTS "
                                "at least 1")


def _optional_path(name: str) -> Optional[Path]:
    raw = _env(name, None, str)
    return Path(raw) if raw else None


def _enabled(raw: str) -> bool:
    if raw.lower() in ("enabled", "true", "1", "on"):
        return True
    if raw.lower() in ("disabled", "false", "0", "off"):
        return False
    raise ValueError(raw)


_enabled.__name__ = "enabled|disabled"


def _trigger_auth() -> bool:
    mode = _env("KUBESEG_TRIGGER_AUTH", "enabled", str).lower()
    if mode not in ("enabled", "disabled"):
        raise SettingsError(f"KUBESEG_TRIGGER_AUTH must be enabled or disabled, not {mode!r}")
    return mode == "enabled"


def tmp_bytes_needed(s: ServiceSettings) -> int:
    """The most one pod's requests can write under /tmp at once, the chart's emptyDir sizeLimit
    must be at least this (README, "Bounded work per request"). Per request: the upload twice
    (the multipart spool and BentoML's saved file), the zip expansion budget, a DICOM series
    converted to NIfTI (at most ``max_voxels`` float32) and the segmentation (one byte a voxel);
    times ``max_concurrency``, plus 1 GiB for BentoML's home and metrics files."""
    per_request = 2 * s.max_request_bytes + s.max_expanded_bytes + 5 * s.max_voxels
    return s.max_concurrency * per_request + 2 ** 30


def describe(settings) -> dict:
    """Settings as plain JSON (for logs and /readyz), paths as strings."""
    out = {}
    for f in fields(settings):
        v = getattr(settings, f.name)
        if f.name == "api_keys" and v:
            out[f.name] = "(set)"
            continue
        out[f.name] = describe(v) if hasattr(v, "__dataclass_fields__") else (str(v) if isinstance(v, Path) else v)
    return out
