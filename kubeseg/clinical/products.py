"""What a clinical caller gets besides the label map: QA flags, DICOM-SEG, FHIR report, saliency.

Shared by ``kubeseg predict`` (DICOM input), ``kubeseg pacs segment`` and the service, so that
the three answer the same. :class:`ModelCard` is what a model brings (labels, coded concepts,
training volume ranges); it is read from a bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from kubeseg.clinical.dicom_io import DicomStudyInput, patient_and_study
from kubeseg.clinical.label_codes import LabelCode, default_label_codes, load_label_codes
from kubeseg.clinical.qa import (VOLUME_RANGES_KEY, QAReport, QASettings, per_label_confidence, qa_flags,
                                 reference_metrics)
from kubeseg.jsonio import read_json
from kubeseg.labels import IGNORE_KEY

SELECTION = "selection.json"


@dataclass
class ModelCard:
    name: str
    version: str
    labels: dict[str, int]
    codes: dict[str, LabelCode] = field(default_factory=dict)
    volume_ranges: Optional[dict] = None
    # what a DICOM-SEG shows and a volume is reported for: the labels, or a region model's regions (lists)
    segments: dict[str, "int | list[int]"] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle: Optional[Path], labels: Mapping[str, int], name: str = "kubeseg",
                    version: str = "0") -> "ModelCard":
        fg = {k: int(v) for k, v in labels.items() if isinstance(v, int)}
        ranges = None
        if bundle is not None and (Path(bundle) / SELECTION).is_file():
            ranges = read_json(Path(bundle) / SELECTION).get(VOLUME_RANGES_KEY)
        segments = {k: v for k, v in labels.items() if k != IGNORE_KEY}
        codes = load_label_codes(bundle, segments) if bundle is not None else default_label_codes(segments)
        return cls(name, str(version), fg, codes, ranges, segments)


def assess(segmentation: np.ndarray, probabilities: np.ndarray, spacing: Sequence[float], card: ModelCard,
           volumes_ml: Mapping[str, float], confidence: float, drifted: Optional[Mapping[str, bool]] = None,
           drift_scores: Optional[Mapping[str, float]] = None, settings: QASettings = QASettings(),
           reference: Optional[np.ndarray] = None) -> QAReport:
    """The QA report of one prediction (``reference``: a label map on the same grid, optional)."""
    conf = per_label_confidence(probabilities, segmentation, card.labels)
    metrics = reference_metrics(segmentation, reference, spacing, card.labels) if reference is not None else None
    return qa_flags(volumes_ml, confidence, conf, drifted, drift_scores, card.volume_ranges, settings, metrics)


def source_series(study: DicomStudyInput) -> list[dict]:
    return [{"uid": v.series.uid, "modality": v.series.modality,
             "number": str(v.series.first.get("SeriesNumber", "") or "")} for v in study.volumes]


def identifiers(study: DicomStudyInput) -> dict:
    return patient_and_study(study.reference.series.first)
