"""The kubeseg segmentation service: ``bentoml serve services.service:Segmentation``.

Endpoints: ``POST /segment`` (image files in, the segmentation file out, in the input's format
and geometry, or a DICOM-SEG for DICOM input), ``POST /segment_summary`` (the same work, a JSON
summary out), ``POST /segment_report`` (a FHIR Bundle out; :mod:`services.clinical`), and BentoML's
``/livez``, ``/readyz`` (503 until a model is loaded) and ``/metrics``; the review queue
(``GET /review/queue``, ``/review/cases/...``) and ``POST /feedback`` (:mod:`services.review_api`), and
the review page at ``/review/ui/`` (:mod:`services.review_page`).
Settings come from ``KUBESEG_*`` environment variables (:mod:`services.settings`); README lists
them and the metrics.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Optional, Union

import bentoml
from bentoml.exceptions import BentoMLException

from services.auth import AuthMiddleware, warn_if_disabled
from services import review_page
from services.clinical import Clinical, ClinicalSettings, parse_series, read_reference, wants_dicom_seg, zip_files
from services.decode import BadInput, Limits
from services.metrics import STAGES, RollingWindow, service_metrics
from services.model_source import ModelHolder, ServedModel
from services.review_api import FeedbackSettings, ReviewRoutes
from services.segmenter import Outcome, RequestOptions, segment_request
from services.settings import ServiceSettings, describe

log = logging.getLogger("kubeseg.service")
# BentoML's logging setup leaves other loggers at WARNING: kubeseg's request log (kubeseg.auth),
# audit trail (kubeseg.audit) and model swaps (kubeseg.service) are INFO
logging.getLogger("kubeseg").setLevel(logging.INFO)
SETTINGS = ServiceSettings.from_env()  # at import: a bad setting stops `bentoml serve` with its name
CLINICAL = ClinicalSettings.from_env()  # QA thresholds and the review queue (services.clinical)
FEEDBACK = FeedbackSettings.from_env()  # where reviewed cases go (services.review_api)
_TMP_PREFIX = re.compile(r"^tmp[A-Za-z0-9_]{8}")


class RequestBodyLimit:
    """ASGI middleware: refuse a request whose body exceeds the limit with 413, before reading it."""

    def __init__(self, app, max_bytes: int, paths: tuple[str, ...]):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await self._refuse(scope, send, seen)

    async def _refuse(self, scope, send, size: int):
        import json

        endpoint = scope["path"].strip("/")
        service_metrics().requests.labels(endpoint, "413").inc()
        body = json.dumps({"error": f"request body of {size} bytes exceeds the limit of {self.max_bytes} "
                                    "(KUBESEG_MAX_REQUEST_BYTES)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


_holder: Optional[ModelHolder] = None  # this worker's model holder, for /readyz


class ReadyWithVersion:
    """ASGI middleware: ``GET /readyz`` answers which model version serves (JSON), 503 until one does.

    BentoML's own ``/readyz`` only says yes or no; a person rolling out a promotion wants the version
    (and its semver, ``model.semver``).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/readyz":
            return await self.app(scope, receive, send)
        import json

        current = _holder.current if _holder is not None else None
        if current is None:
            status, body = 503, {"ready": False,
                                 "reason": (_holder.last_error if _holder else None) or "model is loading"}
        else:
            status, body = 200, {"ready": True, "model": current.describe()}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


Folds = Optional[Union[str, int, list[Union[int, str]]]]  # "0,2", 0 or [0, 2]: form fields arrive as JSON
Series = Optional[Union[str, dict[str, str]]]  # DICOM channel mapping: "0=T2,1=ADC" or {"0": "T2", ...}
References = list[Path]  # an optional file: BentoML 1.4 infers no schema for Optional[Path], so a list of 0 or 1


def _fold_text(folds: Folds) -> str:
    if folds is None:
        return ""
    return ",".join(str(f) for f in folds) if isinstance(folds, list) else str(folds)


def _upload_name(path: Path) -> str:
    """The client's file name (BentoML stores uploads as ``tmpXXXXXXXX<name>``)."""
    return _TMP_PREFIX.sub("", path.name) or path.name


@bentoml.service(
    name="kubeseg",
    traffic={"timeout": 900, "max_concurrency": SETTINGS.max_concurrency},
    workers=1,
)
class Segmentation:
    """nnU-Net-style segmentation of 3D scans, with metrics and drift scores."""

    def __init__(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.settings = SETTINGS
        self.metrics = service_metrics()
        self.window = RollingWindow(SETTINGS.drift.window)
        for check, value in SETTINGS.drift.thresholds().items():
            self.metrics.drift_threshold.labels(check).set(value)
        self.limits = Limits.of(SETTINGS)
        self._work_root = Path(tempfile.mkdtemp(prefix="kubeseg-requests-"))
        self.holder = ModelHolder(SETTINGS, self._swapped, self._swap_failed, self._refused)
        self.clinical = Clinical(CLINICAL, self.metrics)
        global _holder
        _holder = self.holder
        log.info("kubeseg service settings: %s", describe(SETTINGS))
        warn_if_disabled(SETTINGS.auth)
        if not SETTINGS.signing.required:
            log.warning("!!! MODEL SIGNATURES ARE NOT CHECKED (KUBESEG_MODEL_SIGNATURES=disabled): any version the "
                        "alias points to is served. Development only. !!!")
        self.holder.start()

    # -- model lifecycle ------------------------------------------------------------------------------
    def _swapped(self, old: Optional[ServedModel], new: ServedModel) -> None:
        if old is not None:
            self.metrics.model_info.labels(old.name, old.version, old.alias, old.semver).set(0)
            self.metrics.model_swaps.labels("success").inc()
        self.metrics.model_info.labels(new.name, new.version, new.alias, new.semver).set(1)
        self.metrics.model_version.set(float(new.version) if new.version.isdigit() else 0.0)
        log.info("serving %s", new.describe())

    def _swap_failed(self, error: str) -> None:
        self.metrics.model_swaps.labels("failed").inc()

    def _refused(self, version: str, reason: str) -> None:
        self.metrics.signature_refusals.inc()

    def __is_ready__(self) -> bool:
        return self.holder.current is not None

    # -- requests -------------------------------------------------------------------------------------
    def _run(self, endpoint: str, images: list[Path], tta: Optional[bool], folds: "Folds",
             ctx: bentoml.Context, series=None, references: Optional[list[Path]] = None, then=None):
        started = time.perf_counter()
        status = "500"
        self.metrics.inflight.inc()
        work = Path(tempfile.mkdtemp(dir=self._work_root))
        ctx.response.background.add_task(shutil.rmtree, work, True)
        try:
            model = self.holder.current
            if model is None:
                status = "503"
                raise BentoMLException(f"no model loaded yet ({self.holder.last_error or 'loading'})",
                                       error_code=HTTPStatus.SERVICE_UNAVAILABLE)
            uploads = [(_upload_name(p), p) for p in images or []]
            options = RequestOptions.parse(tta, _fold_text(folds))
            if series is not None:
                options = RequestOptions(options.tta, options.folds, parse_series(series))
            if references and len(references) > 1:
                raise BadInput(HTTPStatus.BAD_REQUEST, f"send one reference segmentation, not {len(references)}")
            ref = read_reference(references[0], _upload_name(references[0]), work) if references else None
            outcome = segment_request(model, uploads, options, self.limits, work)
            self._record(outcome)
            self.clinical.assess(outcome, model, self.settings.drift.thresholds(), ref, endpoint)
            answer = then(outcome, model, work) if then is not None else outcome
            status = "200"
            return answer
        except BadInput as e:
            status = str(int(e.status))
            log.info("%s refused (%s): %s", endpoint, status, e.message)
            raise BentoMLException(e.message, error_code=e.status) from None
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - started)
            if status == "500":
                log.exception("%s failed", endpoint)

    def _record(self, outcome: Outcome) -> None:
        m = self.metrics
        for stage in STAGES:
            if stage in outcome.timings:
                m.stage_duration.labels(stage).observe(outcome.timings[stage])
        m.input_voxels.observe(outcome.voxels)
        for label, volume in outcome.volumes_ml.items():
            m.predicted_volume.labels(label).observe(volume)
        m.confidence.observe(outcome.confidence)
        if outcome.drift is not None and outcome.drift.degenerate:  # counted apart, kept out of the window
            for check in outcome.drift.scores:
                m.drift_inputs.labels(check, "degenerate").inc()
            outcome.summary["drift"]["window_scores"] = {
                k: round(v, 6) for k, v in self.window.means(outcome.drift.scores).items()}
        elif outcome.drift is not None:
            window = self.window.add(outcome.drift.scores)
            thresholds = self.settings.drift.thresholds()
            drifted = outcome.drift.drifted(thresholds)
            for check, score in outcome.drift.scores.items():
                m.drift_score.labels(check).set(min(score, 1e6))
                m.drift_window_score.labels(check).set(window[check])
                m.drift_inputs.labels(check, "drifted" if drifted[check] else "ok").inc()
            outcome.summary["drift"]["window_scores"] = {k: round(v, 6) for k, v in window.items()}
            outcome.summary["drift"]["thresholds"] = thresholds
        self._gpu_memory()

    def _gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                self.metrics.gpu_memory.labels(str(i), "allocated").set(torch.cuda.memory_allocated(i))
                self.metrics.gpu_memory.labels(str(i), "reserved").set(torch.cuda.memory_reserved(i))

    @bentoml.api(route="/segment")
    def segment(self, images: list[Path], tta: Optional[bool] = None, folds: Folds = None,
                output: Optional[str] = None, saliency: Optional[bool] = None, series: Series = None,
                ctx: bentoml.Context = None) -> Path:
        """Segment one scan: one image file per channel (NIfTI, NRRD, MHA), or DICOM (a zip of the
        series, or the files; one series per channel). Returns the label map in the input's format
        and geometry (NIfTI for DICOM); for DICOM input a DICOM-SEG with ``output=dicom-seg`` or
        ``Accept: application/dicom``. Options: ``tta`` (test-time mirroring, default on), ``folds``
        (e.g. ``"0,2"``; default all), ``series`` (DICOM channel mapping, ``"0=T2,1=ADC"`` or JSON),
        ``saliency`` (a zip: segmentation, Grad-CAM++ NIfTI and PNG, summary.json)."""
        accept = ctx.request.headers.get("accept") if ctx is not None and ctx.request is not None else None

        def answer(outcome, model, work) -> Path:
            seg = outcome.segmentation_file
            dicom_in = outcome.image is not None and outcome.image.dicom is not None
            if wants_dicom_seg(output, accept) and (dicom_in or output or "*/*" not in (accept or "")):
                seg = self.clinical.dicom_seg(outcome, model, work)
            if not saliency:
                return seg
            made = self.clinical.saliency(outcome, model, work)
            return zip_files([seg, *(made[:2] if made else [])], outcome.summary, work / "segmentation.zip")

        return self._run("segment", images, tta, folds, ctx, series, then=answer)

    @bentoml.api(route="/segment_summary")
    def segment_summary(self, images: list[Path], tta: Optional[bool] = None, folds: Folds = None,
                        series: Series = None, reference: References = [],  # noqa: B006 (BentoML copies it)
                        ctx: bentoml.Context = None) -> dict[str, Any]:
        """The same work as ``/segment``; answers with volume per label (ml), confidence, drift
        scores, QA flags, the model's name and version, and the seconds spent per stage.
        ``reference``: a reference label map (adds Dice/HD95 per label and their QA flags)."""
        return self._run("segment_summary", images, tta, folds, ctx, series, reference).summary

    @bentoml.api(route="/segment_report")
    def segment_report(self, images: list[Path], tta: Optional[bool] = None, folds: Folds = None,
                       series: Series = None, reference: References = [],  # noqa: B006
                       saliency: Optional[bool] = None,
                       ctx: bentoml.Context = None) -> dict[str, Any]:
        """The same work as ``/segment``; answers with a FHIR R4(B) Bundle: DiagnosticReport (patient
        and study from the DICOM header), volume Observations (mL), confidence and QA flags, the
        DICOM-SEG (DICOM input) and, with ``saliency``, the Grad-CAM++ NIfTI and PNG as attachments."""
        return self._run("segment_report", images, tta, folds, ctx, series, reference,
                         then=lambda outcome, model, work: self.clinical.report(outcome, model, work, bool(saliency)))

    @bentoml.api(route="/model")
    def model(self) -> dict[str, Any]:
        """The model version being served and the service's settings."""
        current = self.holder.current
        return {"model": current.describe() if current else None, "last_error": self.holder.last_error,
                "settings": describe(self.settings)}


def _count_refusal() -> None:
    service_metrics().auth_refusals.inc()


# first added = outermost: a request is authenticated (deny by default, services/auth.py) before anything else
Segmentation.add_asgi_middleware(AuthMiddleware, settings=SETTINGS.auth, on_refusal=_count_refusal)
Segmentation.add_asgi_middleware(ReadyWithVersion)
# the review page (static files, /review/ui/; services/review_page.py)
review_page.mount(Segmentation)
Segmentation.add_asgi_middleware(RequestBodyLimit, max_bytes=SETTINGS.max_request_bytes,
                                  paths=("/segment", "/segment_summary", "/segment_report"))
# the review queue and POST /feedback (inside the authentication; other paths pass through)
Segmentation.add_asgi_middleware(ReviewRoutes, clinical=CLINICAL, settings=FEEDBACK)
