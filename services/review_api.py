"""The review API: the queue of cases to review, their files, and the reviewers' feedback.

Routes (the contract in README, "Review feedback"), behind the service's authentication
(:mod:`services.auth`; the caller's identity is recorded as "who"):

* ``GET /review/queue?limit=N[&status=pending]`` — queued cases, pending first, then QA-flagged, then
  lowest confidence;
* ``GET /review/cases/{id}`` — one case's JSON; ``…/image/{channel}``, ``…/segmentation``,
  ``…/saliency`` — its NIfTI files (``application/gzip``);
* ``POST /feedback`` (multipart form: ``case_id``, ``decision`` approve|reject|correct, ``reason``,
  ``segmentation``) — approved and corrected cases are stored as labelled cases in the feedback store
  (:mod:`kubeseg.feedback_store`; ``KUBESEG_FEEDBACK_STORE``, a folder or ``s3://bucket/prefix``),
  every review is logged there, and counted (``kubeseg_reviews_total{outcome,model_version}``).

:class:`ReviewRoutes` is an ASGI middleware that answers exactly these paths and passes every
other path on (the review page under ``/review/ui/`` is another app's). Hostile input: the body is
bounded (``KUBESEG_FEEDBACK_MAX_BYTES``, 64 MiB) before it is read; a corrected label map must be a
NIfTI file on the case's grid holding only the model's label values, judged from its header first;
nothing is half-written (case files first, then the log record; on failure the files are removed).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kubeseg.feedback_store import (DECISIONS, STATUS, CorrectionError, FeedbackConflict, FeedbackStore, RefreshRule,
                                    changed_labels, check_correction, dataset_case_id)

log = logging.getLogger("kubeseg.review")

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CASE = re.compile(r"^/review/cases/(?P<id>[^/]+)"
                   r"(?:/(?P<what>image|segmentation|saliency)(?:/(?P<channel>[^/]+))?)?/?$")
MAX_REASON = 2000
PUBLIC = ("id", "queued_at", "confidence", "qa_flags", "model", "volumes_ml", "status", "reasons", "review")


@dataclass(frozen=True)
class FeedbackSettings:
    """Where reviewed cases go and how much a feedback request may send. Environment:
    ``KUBESEG_FEEDBACK_STORE`` (a folder or ``s3://bucket/prefix``; default ``<tmp>/kubeseg-feedback``),
    ``KUBESEG_FEEDBACK_MAX_BYTES`` (64 MiB), and :class:`kubeseg.feedback_store.RefreshRule`'s."""

    store: str = str(Path(tempfile.gettempdir()) / "kubeseg-feedback")
    max_bytes: int = 64 * 2 ** 20
    rule: RefreshRule = field(default_factory=RefreshRule)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "FeedbackSettings":
        raw = env.get("KUBESEG_FEEDBACK_MAX_BYTES") or str(cls.max_bytes)
        if not raw.isdigit() or int(raw) < 1024:
            raise ValueError(f"KUBESEG_FEEDBACK_MAX_BYTES={raw!r} must be an integer of at least 1024")
        return cls(env.get("KUBESEG_FEEDBACK_STORE") or cls.store, int(raw), RefreshRule.from_env(env))


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), message


class _TooLarge(Exception):
    pass


def _public(item: dict) -> dict:
    out = {k: item.get(k) for k in PUBLIC if k in item}
    out.setdefault("status", "pending")
    out["qa_flags"] = item.get("qa_flags") or []
    return out


class ReviewApi:
    """The routes' work, on a queue folder and a feedback store (no ASGI here: testable directly)."""

    def __init__(self, queue, store: FeedbackStore, metrics=None):
        self.queue, self.store, self.metrics = queue, store, metrics
        self._lock = threading.Lock()  # one review at a time in this worker

    # -- reading ---------------------------------------------------------------------------------------
    def listing(self, limit: int = 100, status: Optional[str] = None) -> dict:
        from services.review_queue import STATUSES, review_order

        if status is not None and status not in STATUSES:
            raise Refusal(400, f"status {status!r} is not one of {', '.join(STATUSES)}")
        items = [i for i in self.queue.items() if status is None or i.get("status", "pending") == status]
        return {"items": [_public(i) for i in sorted(items, key=review_order)[:limit]]}

    def case(self, case_id: str) -> dict:
        item = self._item(case_id)
        return {**_public(item), "labels": item.get("labels", {}), "qa": item.get("qa"), "drift": item.get("drift"),
                "channels": int(item.get("channels") or 0), "saliency": "saliency.nii.gz" in item.get("files", []),
                "input": item.get("input"), "dicom": item.get("dicom")}

    def file(self, case_id: str, what: str, channel: Optional[str]) -> Path:
        item = self._item(case_id)
        if what == "image":
            if channel is None or not channel.isdigit() or int(channel) >= int(item.get("channels") or 0):
                raise Refusal(404, f"case {case_id} has no input channel {channel!r} "
                                   f"(it has {item.get('channels') or 0})")
            name = f"image_{int(channel):04d}.nii.gz"
        elif channel is not None:
            raise Refusal(404, "not found")
        else:
            name = f"{what}.nii.gz"
        path = self.queue.file(case_id, name)
        if path is None:
            raise Refusal(404, f"case {case_id} has no {what}" + (" (none was computed)" if what == "saliency" else ""))
        return path

    def _item(self, case_id: str) -> dict:
        item = self.queue.get(case_id) if _ID.match(case_id or "") else None
        if item is None:
            raise Refusal(404, f"no case {case_id[:80]!r} on the review queue")
        return item

    # -- feedback --------------------------------------------------------------------------------------
    def feedback(self, case_id: str, decision: str, reason: str, upload: Optional[tuple[str, Path]],
                 who: str) -> dict:
        if decision not in DECISIONS:
            raise Refusal(400, f"decision {decision[:40]!r} is not one of {', '.join(DECISIONS)}")
        if decision == "reject" and not reason.strip():
            raise Refusal(400, "a rejection needs a reason (form field 'reason')")
        if len(reason) > MAX_REASON:
            raise Refusal(400, f"reason is longer than {MAX_REASON} characters")
        if decision == "correct" and upload is None:
            raise Refusal(400, "decision=correct needs the corrected label map (form file 'segmentation', NIfTI)")
        if decision != "correct" and upload is not None:
            raise Refusal(400, f"a segmentation file is taken with decision=correct only, not {decision}")
        with self._lock:
            item = self._item(case_id)
            if item.get("status", "pending") != "pending" or self.store.reviewed(case_id) is not None:
                raise Refusal(409, f"case {case_id} was already reviewed ({item.get('status')})")
            with tempfile.TemporaryDirectory(prefix="kubeseg-feedback-") as tmp:
                try:
                    return self._record(item, decision, reason.strip(), upload, who, Path(tmp))
                except (Refusal, CorrectionError):
                    raise
                except Exception as e:  # noqa: BLE001 - the store (a volume, S3) failed: nothing was recorded
                    log.exception("feedback on %s: the store %s failed", case_id, self.store.describe())
                    raise Refusal(503, f"the feedback store {self.store.describe()} failed "
                                       f"({type(e).__name__}); nothing was recorded, try again") from None

    def _record(self, item: dict, decision: str, reason: str, upload, who: str, work: Path) -> dict:
        case_id = item["id"]
        model = item.get("model") or {}
        record = {"case_id": case_id, "decision": decision, "reason": reason or None, "by": who,
                  "model": model, "model_version": model.get("version"), "confidence": item.get("confidence"),
                  "qa_flags": item.get("qa_flags") or [], "stored_as": None}
        stored = None
        if decision in ("approve", "correct"):
            channels = int(item.get("channels") or 0)
            images = [self.queue.file(case_id, f"image_{c:04d}.nii.gz") for c in range(channels)]
            predicted = self.queue.file(case_id, "segmentation.nii.gz")
            if not channels or predicted is None or any(p is None for p in images):
                raise Refusal(409, f"case {case_id} has no stored images to learn from (queued without files)")
            label = predicted
            if decision == "correct":
                label, record["changed_labels"] = self._corrected(upload, predicted, item, work)
            stored = dataset_case_id(case_id)
            try:
                self.store.ensure_dataset(item.get("channel_names") or {}, item.get("dataset_labels") or {})
            except FeedbackConflict as e:
                raise Refusal(409, str(e)) from None
            self.store.store_case(stored, images, label)
            record["stored_as"] = stored
        try:
            saved = self.store.append(record)
        except FeedbackConflict as e:
            raise Refusal(409, str(e)) from None
        except BaseException:
            if stored is not None and self.store.reviewed(case_id) is None:
                self.store.remove_case(stored, int(item.get("channels") or 0))
            raise
        self.queue.set_status(case_id, STATUS[decision],
                              review={"by": who, "at": saved["at"], "decision": decision, "stored_as": stored})
        if self.metrics is not None:
            self.metrics.reviews.labels(decision, str(model.get("version"))).inc()
            self.metrics.review_queue_length.set(self.queue.pending())
        log.info("review of %s by %s: %s%s", case_id, who, decision, f" -> {stored}" if stored else "")
        return {"case_id": case_id, "decision": decision, "by": who, "at": saved["at"],
                "model_version": model.get("version"), "stored_as": stored}

    def _corrected(self, upload: tuple[str, Path], predicted: Path, item: dict, work: Path) -> tuple[Path, dict]:
        import numpy as np
        import SimpleITK as sitk

        from kubeseg.image_guard import UnsafeImageError, check_gzip_nifti_expansion, check_image_file
        from services.decode import sniff

        name, path = upload
        kind = sniff(path)
        if kind not in ("nifti", "nifti_gz"):
            raise Refusal(415, f"segmentation {name}: not a NIfTI file (.nii or .nii.gz); got "
                               f"{'a corrupt gzip stream' if kind == 'gzip_corrupt' else kind}")
        placed = work / ("upload.nii.gz" if kind == "nifti_gz" else "upload.nii")
        os.replace(path, placed)
        try:
            check_image_file(placed, name)
            if kind == "nifti_gz":
                check_gzip_nifti_expansion(placed, name)
        except UnsafeImageError as e:
            raise Refusal(413 if "inflates" in e.problem else 422, f"segmentation {e}") from None
        try:
            labels = check_correction(placed, f"segmentation {name}", predicted, item.get("label_values") or [0])
        except CorrectionError as e:
            raise Refusal(400 if e.kind == "format" else 422, str(e)) from None
        reference = sitk.ReadImage(str(predicted))
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(reference)
        target = work / "label.nii.gz"
        sitk.WriteImage(image, str(target), useCompression=True)
        names = {v: int(k) for k, v in (item.get("labels") or {}).items()}
        return target, changed_labels(sitk.GetArrayFromImage(reference).astype(np.int64), labels, names)


# -- ASGI -------------------------------------------------------------------------------------------------
def _is_review_path(path: str) -> bool:
    return path in ("/feedback", "/feedback/", "/review/queue", "/review/queue/") or bool(_CASE.match(path))


class ReviewRoutes:
    """ASGI middleware: answers the review routes (module doc) and passes every other path on."""

    def __init__(self, app, clinical=None, settings: Optional[FeedbackSettings] = None, metrics=None):
        self.app = app
        self._clinical, self._settings, self._metrics = clinical, settings, metrics
        self._api: Optional[ReviewApi] = None
        self._init = threading.Lock()

    def api(self) -> ReviewApi:
        with self._init:
            if self._api is None:  # built in the worker, after BentoML set up its metrics folder
                from services.clinical import ClinicalSettings
                from services.metrics import service_metrics

                clinical = self._clinical or ClinicalSettings.from_env()
                settings = self._settings or FeedbackSettings.from_env()
                self._api = ReviewApi(clinical.queue(), FeedbackStore(settings.store, settings.rule),
                                      self._metrics or service_metrics())
                self._max_bytes = settings.max_bytes
            return self._api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _is_review_path(scope.get("path", "")):
            return await self.app(scope, receive, send)
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse

        path, method = scope["path"].rstrip("/") or "/", scope.get("method", "GET")
        who = (scope.get("state") or {}).get("caller") or "anonymous"
        try:
            api = await run_in_threadpool(self.api)
            if path == "/feedback":
                if method != "POST":
                    raise Refusal(405, "POST a multipart form to /feedback")
                response = JSONResponse(await self._feedback(scope, receive, api, who))
            else:
                if method not in ("GET", "HEAD"):
                    raise Refusal(405, f"{path} answers GET only")
                request = Request(scope)
                if path == "/review/queue":
                    raw = request.query_params.get("limit", "100")
                    if not raw.isdigit() or not 1 <= int(raw) <= 10000:
                        raise Refusal(400, f"limit={raw[:20]!r}: an integer from 1 to 10000")
                    response = JSONResponse(await run_in_threadpool(api.listing, int(raw),
                                                                    request.query_params.get("status")))
                else:
                    m = _CASE.match(scope["path"])
                    if m["what"] is None:
                        response = JSONResponse(await run_in_threadpool(api.case, m["id"]))
                    else:
                        file = await run_in_threadpool(api.file, m["id"], m["what"], m["channel"])
                        label = f"image_{m['channel']}" if m["what"] == "image" else m["what"]
                        response = FileResponse(file, media_type="application/gzip",
                                                filename=f"{m['id']}_{label}.nii.gz")
        except Refusal as e:
            response = JSONResponse({"error": e.message}, status_code=e.status)
        except Exception:  # noqa: BLE001 - logged; the caller gets a 500 without internals
            log.exception("%s %s failed", method, path)
            response = JSONResponse({"error": "internal error (logged)"}, status_code=500)
        await response(scope, receive, send)

    async def _feedback(self, scope, receive, api: ReviewApi, who: str) -> dict:
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request

        limit = self._max_bytes
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refusal(413, f"request body of {int(length)} bytes exceeds the limit of {limit} "
                               "(KUBESEG_FEEDBACK_MAX_BYTES)")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge()
            return message

        request = Request(scope, counted)
        try:
            form = await request.form(max_files=1, max_fields=10, max_part_size=64 * 1024)
        except _TooLarge:
            raise Refusal(413, f"request body exceeds the limit of {limit} bytes (KUBESEG_FEEDBACK_MAX_BYTES)") \
                from None
        except Exception as e:  # noqa: BLE001 - python-multipart / Starlette parse errors
            raise Refusal(400, f"not a valid form ({getattr(e, 'message', None) or e})") from None
        try:
            fields = {}
            for key in ("case_id", "decision", "reason"):
                value = form.get(key)
                if value is not None and not isinstance(value, str):
                    raise Refusal(400, f"form field {key!r} must be text, not a file")
                fields[key] = value or ""
            if not fields["case_id"]:
                raise Refusal(400, "form field 'case_id' is missing")
            if not fields["decision"]:
                raise Refusal(400, "form field 'decision' is missing (approve, reject or correct)")
            upload = form.get("segmentation")
            if upload is not None and isinstance(upload, str):
                raise Refusal(400, "form field 'segmentation' must be a file (NIfTI)")
            with tempfile.TemporaryDirectory(prefix="kubeseg-upload-") as tmp:
                saved = None
                if upload is not None:
                    saved = (Path(upload.filename or "segmentation").name[:120], Path(tmp) / "segmentation")
                    await run_in_threadpool(_spool, upload.file, saved[1])
                return await run_in_threadpool(api.feedback, fields["case_id"], fields["decision"],
                                               fields["reason"], saved, who)
        finally:
            await form.close()


def _spool(src, target: Path) -> None:
    src.seek(0)
    with open(target, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)


def describe(settings: FeedbackSettings) -> dict:
    return {"store": settings.store, "max_bytes": settings.max_bytes,
            "batch_size": settings.rule.batch_size, "min_corrected_fraction": settings.rule.min_corrected_fraction}

