"""``kubeseg predict`` for DICOM input, and the core of ``kubeseg pacs segment``.

A folder of DICOM files (one or several series, mapped to the model's channels) is segmented;
written into the output folder:

* ``segmentation.nii.gz`` — the label map in the series' geometry;
* ``segmentation.seg.dcm`` — the DICOM-SEG referencing the source series;
* ``summary.json`` — volumes, confidence, drift, QA flags;
* ``report.fhir.json`` — the FHIR R4(B) Bundle;
* with ``saliency``: ``saliency.nii.gz`` and ``saliency.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from kubeseg.clinical.dicom_io import DicomLimits, DicomStudyInput, read_dicom_input
from kubeseg.clinical.dicom_seg import write_segmentation
from kubeseg.clinical.fhir_report import ReportAttachment, ReportInput, build_report
from kubeseg.clinical.products import ModelCard, assess, identifiers, source_series
from kubeseg.clinical.qa import QASettings, most_uncertain_label
from kubeseg.errors import KubesegError
from kubeseg.imageio import write_image
from kubeseg.inference.predictor import PredictSettings, Predictor
from kubeseg.inference.quality import confidence, label_volumes_ml
from kubeseg.inference.run import build_predictors, dataset_spec, resolve_model, segment_case
from kubeseg.jsonio import read_json, write_json
from kubeseg.postprocessing import PostprocessingRule

log = logging.getLogger(__name__)


def is_dicom_folder(path: str | Path, probe: int = 16) -> bool:
    """A folder whose first files (any depth) carry the DICOM preamble ``DICM`` at byte 128."""
    path = Path(path)
    if not path.is_dir():
        return False
    for i, f in enumerate(p for p in sorted(path.rglob("*")) if p.is_file()):
        if i >= probe:
            break
        with open(f, "rb") as fh:
            if fh.read(132)[128:132] == b"DICM":
                return True
    return False


@dataclass
class DicomOutputs:
    folder: Path
    segmentation: Path
    dicom_seg: Path
    summary: Path
    report: Path
    saliency: list[Path] = field(default_factory=list)
    summary_json: dict = field(default_factory=dict)
    seg_series_uid: str = ""


class DicomSegmenter:
    """A loaded model that segments DICOM studies into the clinical outputs."""

    def __init__(self, model_dir: str | Path, settings: PredictSettings = PredictSettings(),
                 configurations: Optional[Sequence[str]] = None, folds: Optional[Sequence[str]] = None,
                 postprocess: bool = True, name: Optional[str] = None, version: str = "0",
                 qa: QASettings = QASettings(), drift_thresholds: Optional[Mapping[str, float]] = None):
        from kubeseg.drift import DriftReference

        model_dir = Path(model_dir)
        choice = resolve_model(model_dir, configurations, folds)
        self.predictors: list[Predictor] = build_predictors(choice, settings)
        self.rule = choice.postprocessing if postprocess else PostprocessingRule()
        dataset_json = self.predictors[0].model.dataset_json
        self.spec = dataset_spec(dataset_json)
        self.card = ModelCard.from_bundle(model_dir, self.spec.labels, name or model_dir.name, version)
        self.qa = qa
        fp = model_dir / "dataset_fingerprint.json"
        self.drift_reference = DriftReference.from_fingerprint(read_json(fp)) if fp.is_file() else None
        self.drift_thresholds = dict(drift_thresholds) if drift_thresholds else None

    def read(self, folder: Path, mapping: Optional[Mapping[str, str]] = None,
             limits: DicomLimits = DicomLimits()) -> DicomStudyInput:
        """The study, read (headers first), and refused when the grid it implies after resampling
        is over the bound (:mod:`kubeseg.input_budget`), before any preprocessing."""
        from kubeseg.input_budget import check_resampled_grid, stages_of

        study = read_dicom_input(folder, self.spec.channel_names, limits, mapping)
        check_resampled_grid(f"{folder} (DICOM)", study.data.shape[-3:], study.geometry.spacing,
                             stages_of(self.predictors))
        return study

    def run(self, folder: Path, out_dir: Path, mapping: Optional[Mapping[str, str]] = None,
            saliency: bool = False, reference: Optional[np.ndarray] = None,
            limits: DicomLimits = DicomLimits()) -> DicomOutputs:
        study = self.read(folder, mapping, limits)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = segment_case(self.predictors, study.data, study.geometry, self.rule)
        seg = result.segmentation
        seg_path = out_dir / "segmentation.nii.gz"
        write_image(seg, study.geometry, seg_path)
        dicom_seg = write_segmentation(seg, study.reference, self.card.segments, self.card.codes,
                                       out_dir / "segmentation.seg.dcm", model_name=self.card.name,
                                       model_version=self.card.version)
        volumes = label_volumes_ml(seg, study.geometry.spacing, self.card.segments)
        conf = confidence(result.probabilities, seg)
        drifted = scores = drift_json = None
        if self.drift_reference is not None and self.drift_thresholds:
            from kubeseg.drift import drift_report

            drift = drift_report(study.data, study.geometry.spacing, None, seg > 0, self.drift_reference)
            drifted, scores, drift_json = drift.drifted(self.drift_thresholds), drift.scores, drift.to_json()
        qa = assess(seg, result.probabilities, study.geometry.spacing, self.card, volumes, conf, drifted, scores,
                    self.qa, reference)
        outputs = DicomOutputs(out_dir, seg_path, dicom_seg, out_dir / "summary.json", out_dir / "report.fhir.json")
        attachments = [ReportAttachment("application/dicom", "DICOM-SEG", dicom_seg.read_bytes())]
        sal_json = None
        if saliency:
            sal = self.saliency(study, seg, qa.per_label_confidence)
            if sal is not None:
                from kubeseg.clinical.saliency import write_saliency

                nii, png = out_dir / "saliency.nii.gz", out_dir / "saliency.png"
                write_saliency(sal, study.data[0], study.geometry, nii, png)
                outputs.saliency = [nii, png]
                attachments += [ReportAttachment("image/png", f"Grad-CAM++ of {sal.label}", png.read_bytes())]
                sal_json = {"label": sal.label, "peak_slice": sal.peak_slice, "seconds": round(sal.seconds, 3)}
        import pydicom

        seg_ds = pydicom.dcmread(dicom_seg, stop_before_pixels=True)
        outputs.seg_series_uid = str(seg_ds.SeriesInstanceUID)
        ids = identifiers(study)
        summary = {
            "model": {"name": self.card.name, "version": self.card.version},
            "input": {"series": source_series(study), "shape": list(seg.shape),
                      "spacing": list(study.geometry.spacing), **ids},
            "volumes_ml": {k: round(v, 4) for k, v in volumes.items()},
            "confidence": round(conf, 6), "drift": drift_json, "qa": qa.to_json(), "saliency": sal_json,
            "dicom_seg": {"series_instance_uid": outputs.seg_series_uid,
                          "sop_instance_uid": str(seg_ds.SOPInstanceUID)},
        }
        write_json(summary, outputs.summary)
        bundle = build_report(ReportInput(ids, summary["model"], volumes, conf, summary["qa"], self.card.codes,
                                          outputs.seg_series_uid, str(seg_ds.SOPInstanceUID), source_series(study),
                                          attachments))
        from kubeseg.atomic import atomic_path

        with atomic_path(outputs.report) as tmp:
            tmp.write_text(bundle.model_dump_json(exclude_none=True), encoding="utf-8")
        outputs.summary_json = summary
        return outputs

    def saliency(self, study: DicomStudyInput, seg: np.ndarray, label_confidence: Mapping[str, float]):
        from kubeseg.clinical.saliency import saliency_map

        label = most_uncertain_label(label_confidence)
        if label is None:
            return None
        return saliency_map(self.predictors[0], study.data, study.geometry, seg, label, self.card.labels[label])


def parse_mapping(items: Optional[Sequence[str]]) -> Optional[dict[str, str]]:
    """``["0=T2 axial", "ADC=ADC map"]`` → ``{"0": "T2 axial", "ADC": "ADC map"}``."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise KubesegError(f"series mapping {item!r} is not CHANNEL=SERIES (channel index or name; series UID, "
                             "description or modality)")
        out[key.strip()] = value.strip()
    return out
