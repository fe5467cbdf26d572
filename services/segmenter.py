"""One segmentation request, without the web: uploads in, segmentation file and summary out.

decode → preprocess → inference → postprocess (the engine's :func:`~kubeseg.inference.run.segment_case`)
→ encode, timed by stage; then the numbers a person and a dashboard want: volume per label,
confidence, drift scores against the training fingerprint. The BentoML service is a thin
shell around :func:`segment_request`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kubeseg.drift import DriftReport, drift_report
from kubeseg.errors import KubesegError
from kubeseg.imageio import write_image
from kubeseg.inference.quality import confidence, label_volumes_ml
from kubeseg.inference.run import segment_case
from kubeseg.input_budget import stages_of

from services.decode import BadInput, DecodedImage, Limits, decode
from services.model_source import ServedModel


@dataclass(frozen=True)
class RequestOptions:
    """Per-request choices: test-time mirroring (None: the service default) and a subset of folds."""

    tta: Optional[bool] = None
    folds: Optional[tuple[str, ...]] = None
    series: Optional[dict[str, str]] = None  # DICOM: channel → series (UID, description or modality)

    @classmethod
    def parse(cls, tta: Optional[bool], folds: str) -> "RequestOptions":
        names = tuple(f.strip() for f in (folds or "").split(",") if f.strip())
        return cls(tta, names or None)


@dataclass
class Outcome:
    """What one request produced."""

    segmentation_file: Path
    summary: dict
    timings: dict[str, float]
    voxels: int
    volumes_ml: dict[str, float]
    confidence: float
    drift: Optional[DriftReport]
    image: Optional[DecodedImage] = None  # the decoded input (its DICOM sources, for DICOM-SEG and reports)
    segmentation: Optional[np.ndarray] = None  # (z, y, x) label map on the input's grid
    probabilities: Optional[np.ndarray] = None  # (classes, z, y, x), for QA and saliency


def segment_request(model: ServedModel, uploads: Sequence[tuple[str, Path]], options: RequestOptions,
                    limits: Limits, work_dir: Path) -> Outcome:
    """Run one request in ``work_dir`` (the caller removes it). Raises :class:`BadInput` for 4xx."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    image: DecodedImage = decode(uploads, model.spec, limits, work_dir, stages_of(model.predictors), options.series)
    timings["decode"] = time.perf_counter() - started
    if options.folds is not None:
        unknown = [f for f in options.folds if f not in model.folds]
        if unknown:
            raise BadInput(HTTPStatus.BAD_REQUEST, f"folds {unknown} are not in model {model.name} version "
                                                   f"{model.version} (it has folds {', '.join(model.folds)})")
    with model.lock:
        try:
            result = segment_case(model.predictors, image.data, image.geometry, model.rule,
                                  folds=options.folds, mirror=options.tta)
        except KubesegError as e:
            raise BadInput(HTTPStatus.BAD_REQUEST, str(e)) from None
    timings.update(result.timings)
    started = time.perf_counter()
    target = work_dir / f"segmentation{image.ending}"
    write_image(result.segmentation, image.geometry, target)
    timings["encode"] = time.perf_counter() - started

    volumes = label_volumes_ml(result.segmentation, image.geometry.spacing, model.labels)
    conf = confidence(result.probabilities, result.segmentation)
    drift = None
    if model.drift_reference is not None:
        drift = drift_report(image.data, image.geometry.spacing, None, result.segmentation > 0,
                             model.drift_reference)
    summary = {
        "model": {"name": model.name, "version": model.version, "alias": model.alias, "semver": model.semver},
        "input": {"source": image.source, "shape": list(image.data.shape[1:]), "channels": int(image.data.shape[0]),
                  "spacing": list(image.geometry.spacing)},
        "volumes_ml": {k: round(v, 4) for k, v in volumes.items()},
        "confidence": round(conf, 6),
        "drift": drift.to_json() if drift is not None else None,
        "options": {"tta": options.tta, "folds": list(options.folds) if options.folds else model.folds},
        "timings_seconds": {k: round(v, 4) for k, v in timings.items()},
    }
    return Outcome(target, summary, timings, int(np.prod(image.data.shape[1:])), volumes, conf, drift,
                   image, result.segmentation, result.probabilities)
