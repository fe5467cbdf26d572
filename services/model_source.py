"""The model being served, and how it follows the registry.

A :class:`ServedModel` is everything one request needs (predictors, postprocessing rule, label
names, the drift reference), loaded from a bundle folder. :class:`ModelHolder` keeps the current
one: it loads the first in the background (``/readyz`` says 503 until then), then looks up the
alias every ``registry_poll_seconds``; when the alias points to another version it downloads
and verifies that bundle, builds it completely, and swaps it in with one assignment. A request
takes the current model once, at its start, and finishes on it even if a swap happens meanwhile.
A version that fails to load is logged and counted; the old one keeps serving.

With ``KUBESEG_MODEL_SIGNATURES=required`` (the default of ``from_env``) a version whose manifest
signature does not verify with ``KUBESEG_MODEL_PUBLIC_KEY`` is refused before anything is
loaded (:mod:`kubeseg.signing`): counted (``kubeseg_model_signature_refusals_total``), audited,
remembered (not downloaded again) — and the old version keeps serving.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from kubeseg.dataset import DatasetSpec
from kubeseg.drift import DriftReference
from kubeseg.inference.predictor import PredictSettings, Predictor
from kubeseg.inference.run import build_predictors, dataset_spec, resolve_model
from kubeseg.jsonio import read_json
from kubeseg.postprocessing import PostprocessingRule

from services.settings import ServiceSettings

log = logging.getLogger("kubeseg.service")


@dataclass
class ServedModel:
    """One loaded model version. ``lock`` serialises inference (the network's fold weights are swapped per call)."""

    name: str
    version: str
    alias: str
    bundle: Path
    predictors: list[Predictor]
    rule: PostprocessingRule
    spec: DatasetSpec
    labels: dict[str, int | list[int]]  # dataset.json labels: a list is a region (volume per region)
    folds: list[str]
    drift_reference: Optional[DriftReference]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    semver: str = ""  # the registry's kubeseg.semver ("" for a bundle path or an older version)

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "alias": self.alias, "semver": self.semver,
                "configurations": [p.model.configuration for p in self.predictors], "folds": self.folds}


def load_served_model(bundle: Path, settings: ServiceSettings, name: str, version: str, alias: str) -> ServedModel:
    """Build every predictor of a bundle (weights on the device), ready for requests."""
    choice = resolve_model(bundle)
    predict_settings = PredictSettings(use_mirroring=settings.use_mirroring, step=settings.step,
                                       device=settings.device, backend=settings.backend, progress=False)
    predictors = build_predictors(choice, predict_settings)
    dataset_json = predictors[0].model.dataset_json
    spec = dataset_spec(dataset_json)
    fingerprint = bundle / "dataset_fingerprint.json"
    reference = DriftReference.from_fingerprint(read_json(fingerprint)) if fingerprint.is_file() else None
    if reference is None:
        log.warning("%s has no dataset_fingerprint.json: drift scores are not computed", bundle)
    folds = sorted(set.intersection(*(set(p.model.folds) for p in predictors)), key=str)
    return ServedModel(name, version, alias, bundle, predictors, choice.postprocessing, spec,
                       {str(k): ([int(x) for x in v] if isinstance(v, list) else int(v))
                        for k, v in dataset_json["labels"].items()}, folds, reference)


class ModelHolder:
    """The current :class:`ServedModel`, loaded and swapped in the background."""

    def __init__(self, settings: ServiceSettings, on_swap: Callable[[Optional[ServedModel], ServedModel], None],
                 on_failure: Callable[[str], None], on_refused: Callable[[str, str], None] = lambda v, r: None):
        self.settings = settings
        self._current: Optional[ServedModel] = None
        self._on_swap = on_swap
        self._on_failure = on_failure
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self.refused: dict[str, str] = {}  # version -> why its signature was refused
        self._on_refused = on_refused

    @property
    def current(self) -> Optional[ServedModel]:
        return self._current

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kubeseg-model-holder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- loading ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the service keeps serving what it has
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("model refresh failed: %s", self.last_error)
                if self._current is not None:
                    self._on_failure(self.last_error)
            poll = self.settings.registry_poll_seconds
            if self._current is not None and (poll <= 0 or self.settings.model_bundle is not None):
                return  # a fixed bundle, or polling switched off: nothing more to follow
            self._stop.wait(poll if self._current is not None and poll > 0 else 5.0)

    def refresh(self) -> bool:
        """Load the model the settings point to if it is not the one serving; True on a swap."""
        s = self.settings
        if s.model_bundle is not None:
            if self._current is not None:
                return False
            if "0" in self.refused:
                return False
            if s.signing.required:
                from kubeseg import audit
                from kubeseg.signing import SignatureError, verify_bundle

                try:
                    verify_bundle(s.model_bundle, s.signing.public_key)
                except SignatureError as e:
                    audit.record("signature_refused", model=str(s.model_bundle), version="0", reason=e.reason,
                                 detail=str(e))
                    self._refuse("0", e)
                    raise
            model = load_served_model(s.model_bundle, s, s.model_bundle.name, "0", "")
            return self._swap(model)
        from kubeseg.registry import get_version, load_version
        from kubeseg.signing import SignatureError

        version = get_version(s.model_name, s.model_alias, s.tracking_uri)
        if self._current is not None and self._current.version == version.version:
            return False
        if version.version in self.refused:
            self.last_error = f"version {version.version} refused: {self.refused[version.version]}"
            return False  # counted and audited once; the alias must move to a signed version
        started = time.perf_counter()
        log.info("loading %s version %s (alias %s)", s.model_name, version.version, s.model_alias)
        try:
            bundle = load_version(s.model_name, version.version, s.cache_dir / "incoming", s.tracking_uri,
                                  public_key=s.signing.public_key if s.signing.required else None)
        except SignatureError as e:
            self._refuse(version.version, e)
            raise
        final = s.cache_dir / bundle.name
        if final.exists():  # versions never change: a verified folder already there is the same bundle
            shutil.rmtree(bundle)
        else:
            bundle.rename(final)
        model = load_served_model(final, s, s.model_name, version.version, s.model_alias)
        model.semver = version.tags.get("kubeseg.semver", "")
        log.info("%s version %s ready in %.1f s", s.model_name, version.version, time.perf_counter() - started)
        return self._swap(model)

    def _refuse(self, version: str, e) -> None:
        self.refused[version] = f"{e.reason}: {e}"
        log.error("REFUSED model %s version %s: %s%s", self.settings.model_name or self.settings.model_bundle,
                  version, e, "; still serving version " + self._current.version if self._current else "")
        self._on_refused(version, e.reason)

    def _swap(self, model: ServedModel) -> bool:
        old, self._current = self._current, model
        self.last_error = None
        self._on_swap(old, model)
        return True
