"""The service's Prometheus metrics (names prefixed ``kubeseg_``; README lists them).

Created on first use, not at import: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker
after importing the service module, and prometheus-client must see it before a metric exists.
Gauges say how their values from several worker processes combine (``multiprocess_mode``).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Optional

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
VOXEL_BUCKETS = tuple(float(4 ** k) for k in range(6, 16))  # 4k … 1G voxels
VOLUME_BUCKETS = (0.1, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)


@dataclass
class ServiceMetrics:
    requests: object
    request_duration: object
    stage_duration: object
    input_voxels: object
    predicted_volume: object
    confidence: object
    drift_score: object
    drift_window_score: object
    drift_threshold: object
    drift_inputs: object
    model_info: object
    model_version: object
    model_swaps: object
    inflight: object
    gpu_memory: object
    qa_flags: object
    review_queued: object
    review_queue_length: object
    reviews: object
    auth_refusals: object
    signature_refusals: object


_lock = threading.Lock()
_metrics: Optional[ServiceMetrics] = None


def service_metrics() -> ServiceMetrics:
    """The metrics of this process (created once)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            _metrics = ServiceMetrics(
                requests=Counter("kubeseg_requests_total", "Segmentation requests by endpoint and HTTP status",
                                 ["endpoint", "status"]),
                request_duration=Histogram("kubeseg_request_duration_seconds", "Whole request time",
                                           ["endpoint"], buckets=LATENCY_BUCKETS),
                stage_duration=Histogram("kubeseg_stage_duration_seconds",
                                         "Time per stage: decode, preprocess, inference, postprocess, encode",
                                         ["stage"], buckets=LATENCY_BUCKETS),
                input_voxels=Histogram("kubeseg_input_voxels", "Voxels per input channel", buckets=VOXEL_BUCKETS),
                predicted_volume=Histogram("kubeseg_predicted_volume_ml", "Predicted volume per label (ml)",
                                           ["label"], buckets=VOLUME_BUCKETS),
                confidence=Histogram("kubeseg_prediction_confidence",
                                     "Mean top-class probability over the predicted foreground",
                                     buckets=CONFIDENCE_BUCKETS),
                drift_score=Gauge("kubeseg_drift_score", "Drift score of the latest input, per check",
                                  ["check"], multiprocess_mode="mostrecent"),
                drift_window_score=Gauge("kubeseg_drift_window_score",
                                         "Mean drift score over the rolling window of recent inputs, per check",
                                         ["check"], multiprocess_mode="mostrecent"),
                drift_threshold=Gauge("kubeseg_drift_threshold", "Drift score above which an input counts as drifted",
                                      ["check"], multiprocess_mode="max"),
                drift_inputs=Counter("kubeseg_drift_inputs_total", "Inputs per drift check and result (ok|drifted|degenerate: "
                                     "no distribution to compare, kept out of the window)",
                                     ["check", "result"]),
                model_info=Gauge("kubeseg_model_info", "1 for the model version being served (semver: the "
                                 "registry's semantic version, empty for a bundle path)",
                                 ["name", "version", "alias", "semver"], multiprocess_mode="livemostrecent"),
                model_version=Gauge("kubeseg_model_version", "Model version being served (0 for a bundle path)",
                                    multiprocess_mode="livemostrecent"),
                model_swaps=Counter("kubeseg_model_swaps_total", "Model loads after an alias moved (success|failed)",
                                    ["result"]),
                inflight=Gauge("kubeseg_inflight_requests", "Requests being processed",
                               multiprocess_mode="livesum"),
                gpu_memory=Gauge("kubeseg_gpu_memory_bytes", "GPU memory held by the service (allocated|reserved)",
                                 ["device", "kind"], multiprocess_mode="livesum"),
                qa_flags=Counter("kubeseg_qa_flags_total", "QA flags raised, by flag (kubeseg.clinical.qa.FLAGS)",
                                 ["flag"]),
                review_queued=Counter("kubeseg_review_queued_total",
                                      "Cases put on the review queue (QA-flagged or low confidence)"),
                review_queue_length=Gauge("kubeseg_review_queue_length", "Cases on the review queue waiting for a "
                                          "review (status pending)", multiprocess_mode="mostrecent"),
                reviews=Counter("kubeseg_reviews_total", "Reviews by outcome (approve|reject|correct) and the "
                                "reviewed prediction's model version", ["outcome", "model_version"]),
                auth_refusals=Counter("kubeseg_auth_refusals_total",
                                      "Requests refused for a missing or invalid credential (401) or scope (403)"),
                signature_refusals=Counter("kubeseg_model_signature_refusals_total",
                                           "Model versions refused: unsigned, signed by another key, or altered"),
            )
        return _metrics


class RollingWindow:
    """Mean of the last ``size`` scores per check (thread-safe)."""

    def __init__(self, size: int):
        self.size = size
        self._values: dict[str, deque] = {}
        self._lock = threading.Lock()

    def add(self, scores: dict[str, float]) -> dict[str, float]:
        """Record one input's scores; returns the window means after it. A non-finite score is
        not recorded (kubeseg.drift never gives one; a window mean must never become inf/NaN)."""
        with self._lock:
            for check, value in scores.items():
                v = float(value)
                if v == v and abs(v) != float("inf"):
                    self._values.setdefault(check, deque(maxlen=self.size)).append(min(v, 1e6))
            return self._means(scores)

    def means(self, checks) -> dict[str, float]:
        """The window means now, without recording anything (0 for a check with no input yet)."""
        with self._lock:
            return self._means(checks)

    def _means(self, checks) -> dict[str, float]:
        out = {}
        for check in checks:
            q = self._values.get(check)
            out[check] = sum(q) / len(q) if q else 0.0
        return out
