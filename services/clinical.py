"""The service's clinical side: QA flags for every prediction, review queue, DICOM-SEG, FHIR, saliency.

:class:`Clinical` is called by the service after :func:`services.segmenter.segment_request`; the
logic lives in :mod:`kubeseg.clinical` (engine), this module only holds settings, the per-model
card cache, the review queue and HTTP errors. Settings (environment):

* ``KUBESEG_QA_MIN_CONFIDENCE``, ``KUBESEG_QA_MIN_DICE``, ``KUBESEG_QA_MAX_HD95_MM``,
  ``KUBESEG_QA_VOLUME_MARGIN`` — :class:`kubeseg.clinical.qa.QASettings`;
* ``KUBESEG_REVIEW_QUEUE_DIR`` (default ``<tmp>/kubeseg-review-queue``), ``KUBESEG_REVIEW_QUEUE_MAX``
  (10000 entries).
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
from services.review_queue import ReviewQueue

if TYPE_CHECKING:  # type names only: importing them pulls the registry client
    from services.model_source import ServedModel
    from services.segmenter import Outcome

DICOM_MEDIA_TYPE = "application/dicom"
OUTPUTS = ("nifti", "dicom-seg")


@dataclass(frozen=True)
class ClinicalSettings:
    qa: QASettings
    review_queue_dir: Path
    review_queue_max: int = 10000

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ClinicalSettings":
        folder = env.get("KUBESEG_REVIEW_QUEUE_DIR") or str(Path(tempfile.gettempdir()) / "kubeseg-review-queue")
        raw = env.get("KUBESEG_REVIEW_QUEUE_MAX") or "10000"
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"KUBESEG_REVIEW_QUEUE_MAX={raw!r} must be a positive integer")
        return cls(QASettings.from_env(env), Path(folder), int(raw))


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
        self.queue = ReviewQueue(settings.review_queue_dir, settings.review_queue_max)
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
        if qa.flagged:
            entry = {"endpoint": endpoint, "model": outcome.summary.get("model"),
                     "input": outcome.summary.get("input"), "volumes_ml": outcome.summary.get("volumes_ml"),
                     "confidence": outcome.summary.get("confidence"), "qa": outcome.summary["qa"]}
            if outcome.image is not None and outcome.image.dicom is not None:
                entry["dicom"] = identifiers(outcome.image.dicom)
            outcome.summary["qa"]["review_id"] = self.queue.put(entry)
            self.metrics.review_queued.inc()
        return qa

    # -- on request -----------------------------------------------------------------------------------
    def dicom_seg(self, outcome: Outcome, model: ServedModel, work: Path) -> Path:
        if outcome.image is None or outcome.image.dicom is None:
            raise BadInput(HTTPStatus.NOT_ACCEPTABLE, "a DICOM-SEG answer needs DICOM input (a zip of the series, "
                                                      "or the DICOM files); this input was "
                                                      f"{outcome.image.source if outcome.image else 'not DICOM'}")
        card = self.card(model)
        return write_segmentation(outcome.segmentation, outcome.image.dicom.reference, card.segments, card.codes,
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


def _json_safe(x):
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
