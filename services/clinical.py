"""The service's clinical side: QA flags for every prediction, review queue, DICOM-SEG, FHIR, saliency.

:class:`Clinical` is called by the service after :func:`services.segmenter.segment_request`; the
logic lives in :mod:`kubeseg.clinical` (engine), this module only holds settings, the per-model
card cache, the review queue and HTTP errors. Settings (environment):

* ``KUBESEG_QA_MIN_CONFIDENCE``, ``KUBESEG_QA_MIN_DICE``, ``KUBESEG_QA_MAX_HD95_MM``,
  ``KUBESEG_QA_VOLUME_MARGIN`` — :class:`kubeseg.clinical.qa.QASettings`;
* ``KUBESEG_REVIEW_QUEUE_DIR`` (default ``<tmp>/kubeseg-review-queue``), ``KUBESEG_REVIEW_QUEUE_MAX``
  (1000 cases), ``KUBESEG_REVIEW_QUEUE_MAX_BYTES`` (1 GiB of case files), and the active-learning rule
  (:class:`services.review_queue.QueueRule`): a QA-flagged or low-confidence case is queued with its
  input channels, predicted label map (NIfTI, the input's geometry; for DICOM input the NIfTI made from
  the series) and summary, for ``/review`` (:mod:`services.review_api`).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np

from kubeseg.clinical.dicom_seg import write_segmentation
from kubeseg.clinical.fhir_report import ReportAttachment, ReportInput, build_report
from kubeseg.clinical.products import ModelCard, assess, identifiers, source_series
from kubeseg.clinical.qa import QAReport, QASettings, most_uncertain_label

from services.decode import _ENDING, BadInput, sniff
from services.review_queue import QueueRule, ReviewQueue

if TYPE_CHECKING:  # type names only: importing them pulls the registry client
    from services.model_source import ServedModel
    from services.segmenter import Outcome

DICOM_MEDIA_TYPE = "application/dicom"
OUTPUTS = ("nifti", "dicom-seg")


@dataclass(frozen=True)
class ClinicalSettings:
    qa: QASettings
    review_queue_dir: Path
    review_queue_max: int = 1000
    review_queue_max_bytes: int = 2 ** 30  # under /tmp by default: a deployment points the folder at a volume
    review_rule: QueueRule = QueueRule()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ClinicalSettings":
        folder = env.get("KUBESEG_REVIEW_QUEUE_DIR") or str(Path(tempfile.gettempdir()) / "kubeseg-review-queue")
        bounds = []
        for name, default in (("KUBESEG_REVIEW_QUEUE_MAX", cls.review_queue_max),
                              ("KUBESEG_REVIEW_QUEUE_MAX_BYTES", cls.review_queue_max_bytes)):
            raw = env.get(name) or str(default)
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{name}={raw!r} must be a positive integer")
            bounds.append(int(raw))
        return cls(QASettings.from_env(env), Path(folder), bounds[0], bounds[1], QueueRule.from_env(env))

    def queue(self) -> ReviewQueue:
        return ReviewQueue(self.review_queue_dir, self.review_queue_max, self.review_queue_max_bytes)


def wants_dicom_seg(output: Optional[str], accept: Optional[str]) -> bool:
    """``output=dicom-seg``, or an Accept header naming application/dicom (and not preferring NIfTI)."""
    if output:
        if output not in OUTPUTS:
            raise BadInput(HTTPStatus.BAD_REQUEST, f"output {output!r} is not one of {', '.join(OUTPUTS)}")
        return output == "dicom-seg"
    return bool(accept) and DICOM_MEDIA_TYPE in accept.lower()


def parse_series(series) -> Optional[dict[str, str]]:
    """The ``series`` option: a JSON object (channel → series) or ``"0=T2,1=ADC"``."""
    if series is None or series == "" or series == {}:
        return None
    if isinstance(series, str):
        text = series.strip()
        if text.startswith("{"):
            try:
                series = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadInput(HTTPStatus.BAD_REQUEST, f"series: not valid JSON ({e.msg})") from None
        else:
            pairs = [p.partition("=") for p in text.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise BadInput(HTTPStatus.BAD_REQUEST, "series: write CHANNEL=SERIES pairs separated by commas")
            series = {k.strip(): v.strip() for k, _, v in pairs}
    if not isinstance(series, dict) or not all(isinstance(v, str) for v in series.values()):
        raise BadInput(HTTPStatus.BAD_REQUEST, "series: an object of channel → series UID, description or modality")
    return {str(k): v for k, v in series.items()}


class Clinical:
    def __init__(self, settings: ClinicalSettings, metrics):
        self.settings = settings
        self.metrics = metrics
        self.queue = settings.queue()
        metrics.review_queue_length.set(self.queue.pending())  # the series exists before any review
        self._cards: dict[tuple, ModelCard] = {}
        self._lock = threading.Lock()

    def card(self, model: ServedModel) -> ModelCard:
        key = (str(model.bundle), model.name, model.version)
        with self._lock:
            if key not in self._cards:
                self._cards = {key: ModelCard.from_bundle(model.bundle, model.labels, model.name, model.version)}
            return self._cards[key]

    # -- every prediction -----------------------------------------------------------------------------
    def assess(self, outcome: Outcome, model: ServedModel, drift_thresholds: Mapping[str, float],
               reference: Optional[np.ndarray] = None, endpoint: str = "") -> QAReport:
        """QA flags into the summary, the Prometheus counter, and the review queue when flagged."""
        drifted = outcome.drift.drifted(dict(drift_thresholds)) if outcome.drift is not None else None
        scores = outcome.drift.scores if outcome.drift is not None else None
        spacing = outcome.image.geometry.spacing
        try:
            qa = assess(outcome.segmentation, outcome.probabilities, spacing, self.card(model), outcome.volumes_ml,
                        outcome.confidence, drifted, scores, self.settings.qa, reference)
        except ValueError as e:  # a reference on another grid
            raise BadInput(HTTPStatus.UNPROCESSABLE_ENTITY, f"reference: {e}") from None
        outcome.summary["qa"] = _json_safe(qa.to_json())
        for f in qa.flags:
            self.metrics.qa_flags.labels(f.flag).inc()
        reasons = self.settings.review_rule.reasons(
            outcome.confidence, qa.flagged, self.queue.observe(outcome.confidence, self.settings.review_rule.window))
        if reasons:
            outcome.summary["qa"]["review_id"] = self.enqueue(outcome, model, endpoint, reasons)
            self.metrics.review_queued.inc()
            self.metrics.review_queue_length.set(self.queue.pending())
        return qa

    def enqueue(self, outcome: Outcome, model: ServedModel, endpoint: str, reasons: list[str]) -> str:
        """Put a case on the review queue with its input channels, predicted label map (NIfTI, the
        input's geometry) and summary; returns its id."""
        from kubeseg.imageio import write_image

        summary = _json_safe(outcome.summary)
        qa = summary.get("qa") or {}
        entry = {"endpoint": endpoint, "reasons": reasons, "model": _model_of(summary, model),
                 "input": summary.get("input"), "volumes_ml": summary.get("volumes_ml"),
                 "confidence": summary.get("confidence"), "qa": qa, "drift": summary.get("drift"),
                 "qa_flags": [f["flag"] + (f":{f['label']}" if f.get("label") else "") for f in qa.get("flags", [])],
                 "labels": {str(v): k for k, v in model.labels.items() if not isinstance(v, list)},
                 "dataset_labels": dict(model.spec.raw.get("labels") or model.labels),
                 "label_values": [int(v) for v in model.spec.label_values],
                 "channel_names": {str(k): v for k, v in model.spec.channel_names.items()}, "channels": 0}
        if outcome.image is not None and outcome.image.dicom is not None:
            entry["dicom"] = identifiers(outcome.image.dicom)
        files: dict[str, Path] = {}
        with tempfile.TemporaryDirectory(prefix=".tmp-stage.", dir=_mkdir(self.queue.cases)) as tmp:
            if outcome.image is not None and outcome.segmentation is not None:
                for c, channel in enumerate(outcome.image.data):
                    files[f"image_{c:04d}.nii.gz"] = Path(tmp) / f"image_{c:04d}.nii.gz"
                    write_image(_compact(channel), outcome.image.geometry, files[f"image_{c:04d}.nii.gz"])
                files["segmentation.nii.gz"] = Path(tmp) / "segmentation.nii.gz"
                write_image(outcome.segmentation.astype(np.uint8 if outcome.segmentation.max(initial=0) < 256
                                                        else np.int16), outcome.image.geometry,
                            files["segmentation.nii.gz"])
                entry["channels"] = int(outcome.image.data.shape[0])
            files["summary.json"] = Path(tmp) / "summary.json"
            files["summary.json"].write_text(json.dumps(summary, indent=1))
            return self.queue.put(entry, files)

    # -- on request -----------------------------------------------------------------------------------
    def dicom_seg(self, outcome: Outcome, model: ServedModel, work: Path) -> Path:
        if outcome.image is None or outcome.image.dicom is None:
            raise BadInput(HTTPStatus.NOT_ACCEPTABLE, "a DICOM-SEG answer needs DICOM input (a zip of the series, "
                                                      "or the DICOM files); this input was "
                                                      f"{outcome.image.source if outcome.image else 'not DICOM'}")
        card = self.card(model)
        return write_segmentation(outcome.segmentation, outcome.image.dicom.reference, card.labels, card.codes,
                                  work / "segmentation.seg.dcm", model_name=model.name, model_version=model.version)

    def saliency(self, outcome: Outcome, model: ServedModel, work: Path) -> Optional[tuple[Path, Path, dict]]:
        from kubeseg.clinical.saliency import saliency_map, write_saliency

        conf = outcome.summary.get("qa", {}).get("per_label_confidence", {})
        label = most_uncertain_label(conf)
        if label is None:
            outcome.summary["saliency"] = None
            return None
        with model.lock:
            sal = saliency_map(model.predictors[0], outcome.image.data, outcome.image.geometry, outcome.segmentation,
                               label, self.card(model).labels[label])
        nii, png = work / "saliency.nii.gz", work / "saliency.png"
        write_saliency(sal, outcome.image.data[0], outcome.image.geometry, nii, png)
        review_id = outcome.summary.get("qa", {}).get("review_id")
        if review_id:  # a queued case keeps its saliency map for the reviewer
            self.queue.attach(review_id, "saliency.nii.gz", nii)
        info = {"label": label, "peak_slice": sal.peak_slice, "seconds": round(sal.seconds, 3)}
        outcome.summary["saliency"] = info
        return nii, png, info

    def report(self, outcome: Outcome, model: ServedModel, work: Path, with_saliency: bool) -> dict:
        """The FHIR Bundle (JSON) of a request; DICOM input adds the DICOM-SEG and the study identifiers."""
        card = self.card(model)
        attachments, seg_uids, ids, series = [], (None, None), {}, []
        dicom = outcome.image.dicom if outcome.image is not None else None
        if dicom is not None:
            import pydicom

            seg = self.dicom_seg(outcome, model, work)
            ds = pydicom.dcmread(seg, stop_before_pixels=True)
            seg_uids = (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            attachments.append(ReportAttachment(DICOM_MEDIA_TYPE, "DICOM-SEG", seg.read_bytes()))
            ids, series = identifiers(dicom), source_series(dicom)
        else:
            attachments.append(ReportAttachment("application/gzip", "Segmentation (NIfTI)",
                                                outcome.segmentation_file.read_bytes()))
        if with_saliency:
            made = self.saliency(outcome, model, work)
            if made is not None:
                attachments.append(ReportAttachment("application/gzip", f"Grad-CAM++ of {made[2]['label']} (NIfTI)",
                                                    made[0].read_bytes()))
                attachments.append(ReportAttachment("image/png", f"Grad-CAM++ of {made[2]['label']}, peak slice",
                                                    made[1].read_bytes()))
        bundle = build_report(ReportInput(ids, {"name": model.name, "version": model.version}, outcome.volumes_ml,
                                          outcome.confidence, outcome.summary["qa"], card.codes, seg_uids[0],
                                          seg_uids[1], series, attachments))
        return json.loads(bundle.model_dump_json(exclude_none=True))


def read_reference(path: Optional[Path], name: str, work: Path) -> Optional[np.ndarray]:
    """An uploaded reference label map (NIfTI/NRRD/MHA) as (z, y, x) integers, or None."""
    if path is None:
        return None
    from kubeseg.imageio import read_label

    kind = sniff(path)
    if kind not in _ENDING:
        raise BadInput(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"reference {name}: not a NIfTI, NRRD or MHA label map")
    target = work / f"reference{_ENDING[kind]}"
    target.symlink_to(path.resolve())
    try:
        return read_label(target)[0][0]
    except RuntimeError as e:
        raise BadInput(HTTPStatus.BAD_REQUEST, f"reference {name}: cannot be read ({str(e).splitlines()[-1]})") from None


def zip_files(files: list[Path], summary: dict, target: Path) -> Path:
    """The answer of ``/segment`` with ``saliency``: segmentation, saliency NIfTI + PNG, summary.json."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.name)
        zf.writestr("summary.json", json.dumps(_json_safe(summary), indent=1))
    target.write_bytes(buf.getvalue())
    return target


def _model_of(summary: dict, model: ServedModel) -> dict:
    """``{"name", "version"[, "semver"]}`` of the model that made the prediction."""
    m = dict(summary.get("model") or {"name": model.name, "version": model.version})
    semver = m.get("semver") or getattr(model, "semver", None)
    out = {"name": m.get("name"), "version": m.get("version")}
    if semver:
        out["semver"] = semver
    return out


def _compact(channel: np.ndarray) -> np.ndarray:
    """int16 when every voxel is an integer in its range (CT, most MR): half the bytes of float32."""
    if channel.size and np.all(np.isfinite(channel)) and -32768 <= channel.min() and channel.max() <= 32767 \
            and np.array_equal(np.rint(channel), channel):
        return channel.astype(np.int16)
    return channel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_safe(x):
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
