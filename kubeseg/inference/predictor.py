"""Predict one image with one trained configuration (all its folds, and its cascade stage).

Per case: the training preprocessing (:func:`~kubeseg.preprocessing.preprocess.preprocess_arrays`,
the one code path) → for a cascade stage, the previous stage's segmentation as one-hot input
channels → sliding window per fold → folds combined → back to the input's grid
(:mod:`kubeseg.inference.export`).

Folds are averaged as probabilities by default (``fold_average="probabilities"``); nnU-Net v2
averages their logits (``"logits"``). With one fold the two are the same.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from kubeseg.device import cpu_threads
from kubeseg.imageio import Geometry
from kubeseg.inference.export import log_probabilities_to_original, probabilities_to_segmentation
from kubeseg.inference.regions import accumulate_region_logits, region_log_odds
from kubeseg.inference.model import TrainedModel
from kubeseg.inference.sliding_window import SlidingWindowSettings, predict_logits, tile_slicers, padding_for
from kubeseg.preprocessing.preprocess import preprocess_arrays

log = logging.getLogger(__name__)

FOLD_AVERAGES = ("probabilities", "logits")


@dataclass(frozen=True)
class PredictSettings:
    """How to predict. ``device``: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.

    ``batch_size`` counts network inputs per forward call, mirrored copies included; None: 8 on a
    GPU; on the CPU, as many as the runner computes at once (OpenVINO: one per stream, i.e. per
    thread; otherwise 1: one runner over all threads gains nothing from batching, and a batch of
    eight mirrored copies holds eight times the activations: more memory, more page faults).
    ``backend``: ``torch``, ``onnxruntime``, ``openvino`` or ``auto`` (the fastest installed on
    this device, :func:`kubeseg.inference.backends.resolve_backend`).
    ``results_on_device`` keeps the accumulators on the GPU (falls back to CPU memory on OOM).
    ``accumulator``: ``float16`` as nnU-Net v2 (same output), ``float32`` exact at image borders
    (see :mod:`kubeseg.inference.sliding_window`). ``autocast``: the CUDA autocast dtype,
    ``float16`` (nnU-Net's) or ``bfloat16``.
    """

    use_mirroring: bool = True
    step: float = 0.5
    device: str = "auto"
    batch_size: Optional[int] = None
    fold_average: str = "probabilities"
    results_on_device: bool = True
    accumulator: str = "float16"
    progress: bool = True
    num_threads: Optional[int] = None
    backend: str = "torch"
    autocast: str = "float16"

    def __post_init__(self) -> None:
        from kubeseg.inference.backends import BACKENDS
        if self.backend not in (*BACKENDS, "auto"):
            raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {self.backend!r}")
        if self.fold_average not in FOLD_AVERAGES:
            raise ValueError(f"fold_average must be one of {FOLD_AVERAGES}, got {self.fold_average!r}")

    def torch_device(self) -> torch.device:
        from kubeseg.device import resolve_device

        return resolve_device(self.device)


def one_hot(seg: np.ndarray, labels) -> np.ndarray:
    """``(len(labels), *seg.shape)`` float32 indicator of each label (the cascade's extra channels)."""
    return np.stack([seg == lab for lab in labels]).astype(np.float32)


class Predictor:
    """One configuration's folds, ready to predict cases. ``previous`` is the cascade's first stage."""

    def __init__(self, model: TrainedModel, settings: PredictSettings = PredictSettings(),
                 previous: Optional["Predictor"] = None):
        if model.previous_stage is not None and previous is None:
            from kubeseg.errors import KubesegError
            raise KubesegError(f"{model.configuration} is a cascade stage: it needs the model of "
                               f"{model.previous_stage!r} as previous stage")
        self.model = model
        self.settings = settings
        self.previous = previous
        self.device = settings.torch_device()
        self.config = model.config
        self.patch_size = tuple(int(p) for p in self.config["patch_size"])
        self.labels = model.labels
        threads = cpu_threads(settings.num_threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.network = model.build_network(self.device)
        self._loaded_fold = 0
        self._runners = None
        from kubeseg.inference.backends import resolve_backend
        self.backend = resolve_backend(settings.backend, self.device)
        if self.backend != "torch":
            from kubeseg.inference.backends import FoldNetworks
            from kubeseg.training.plans import num_input_channels
            self._runners = FoldNetworks(self.backend, model.folder, model.folds, model.fold_weights,
                                         model.build_network(torch.device("cpu")),
                                         num_input_channels(model.view, model.labels), self.patch_size,
                                         self.device, threads).runners
            self.network = self._runners[0]
        batch_size = settings.batch_size or (8 if self.device.type == "cuda" else
                                             int(getattr(self.network, "parallel_inputs", 1)))
        mirror = model.mirror_axes if settings.use_mirroring else None
        self.window = SlidingWindowSettings(step=settings.step, mirror_axes=mirror, batch_size=batch_size,
                                            results_on_device=settings.results_on_device,
                                            accumulator=settings.accumulator, autocast=settings.autocast)

    # -- on the preprocessed grid -----------------------------------------------------------------
    def _use_fold(self, i: int) -> None:
        if self._runners is not None:
            self.network = self._runners[i]
        elif i != self._loaded_fold:
            self.network.load_state_dict(self.model.fold_weights[i])
            self._loaded_fold = i

    def _num_tiles(self, spatial) -> int:
        padded = [s + lo + hi for s, (lo, hi) in zip(spatial, padding_for(spatial, self.patch_size))]
        return len(tile_slicers(padded, self.patch_size, self.settings.step))

    def fold_indices(self, folds: Optional[Sequence[str]] = None) -> list[int]:
        """Indices of the named folds (all folds when ``folds`` is None); unknown names are refused."""
        if folds is None:
            return list(range(len(self.model.fold_weights)))
        names = [str(f) for f in folds]
        unknown = [f for f in names if f not in self.model.folds]
        if unknown or not names:
            from kubeseg.errors import KubesegError
            raise KubesegError(f"folds {unknown or names} are not in model {self.model.configuration} "
                               f"(it has folds {', '.join(self.model.folds)})")
        return [self.model.folds.index(f) for f in dict.fromkeys(names)]

    @torch.inference_mode()
    def log_probabilities(self, data: np.ndarray, desc: str = "", folds: Optional[Sequence[str]] = None,
                          mirror: Optional[bool] = None, keep_on_device: bool = False) -> torch.Tensor:
        """Log-probabilities ``(classes, *spatial)`` of a preprocessed case, the folds combined.

        ``folds`` names a subset of the model's folds; ``mirror`` overrides the settings' test-time
        mirroring for this call. ``keep_on_device``: on a GPU (torch backend, accumulation on the
        device) the result stays there, so that resampling back runs there too; else on the CPU.
        """
        indices = self.fold_indices(folds)
        n_folds = len(indices)
        n_classes = self.labels.num_segmentation_heads
        window = self.window
        if mirror is not None:
            window = replace(window, mirror_axes=self.model.mirror_axes if mirror else None)
        bar = tqdm(total=self._num_tiles(data.shape[1:]) * n_folds, desc=desc or self.model.configuration,
                   unit="tile", disable=not self.settings.progress, leave=False, dynamic_ncols=True)
        combined = None
        on_device = keep_on_device and self.device.type == "cuda" and self.backend == "torch" \
            and self.settings.results_on_device
        try:
            for i in indices:
                self._use_fold(i)
                logits = predict_logits(self.network, data, self.patch_size, n_classes, self.device, window,
                                        on_tiles=bar.update, keep_on_device=on_device)
                if self.labels.has_regions:  # sigmoid outputs: kubeseg.inference.regions
                    combined = accumulate_region_logits(combined, logits, self.settings.fold_average)
                elif self.settings.fold_average == "logits":  # nnU-Net: summed in the accumulator's dtype
                    combined = logits if combined is None else combined.add_(logits)
                else:
                    lp = torch.log_softmax(logits.float(), 0)
                    combined = lp if combined is None else torch.logaddexp(combined, lp, out=combined)
        finally:
            bar.close()
        if self.labels.has_regions:
            return region_log_odds(combined, n_folds, self.settings.fold_average)
        if self.settings.fold_average == "logits":
            return torch.log_softmax((combined / n_folds if n_folds > 1 else combined).float(), 0)
        return combined - math.log(n_folds) if n_folds > 1 else combined

    # -- on the input's grid ----------------------------------------------------------------------
    def probabilities(self, data: np.ndarray, geometry: Geometry, previous_segmentation: Optional[np.ndarray] = None,
                      case_id: str = "", folds: Optional[Sequence[str]] = None, mirror: Optional[bool] = None,
                      timings: Optional[dict[str, float]] = None) -> np.ndarray:
        """Probabilities ``(classes, z, y, x)`` on the grid of ``data`` (``(C, z, y, x)``, raw intensities).

        ``timings``, when given, accumulates seconds per stage: ``preprocess``, ``inference`` and
        ``postprocess`` (back to the input's grid).
        """
        started = time.perf_counter()
        clock = _StageClock(timings)
        seg = None
        if self.previous is not None:
            if previous_segmentation is None:
                prev_probs = self.previous.probabilities(data, geometry, case_id=case_id, folds=folds, mirror=mirror,
                                                         timings=timings)
                with clock("postprocess"):
                    previous_segmentation = probabilities_to_segmentation(prev_probs, self.labels)
            seg = previous_segmentation.astype(np.int16)[None]  # -1 marks the outside of the nonzero mask
        with clock("preprocess"):
            pre = preprocess_arrays(data, seg, geometry, self.model.plans, self.config, [])
            net_input = pre.data
            if self.previous is not None:
                net_input = np.concatenate([net_input, one_hot(pre.seg[0], self.labels.foreground_labels)])
        with clock("inference"):
            log_probs = self.log_probabilities(net_input, desc=f"{case_id} {self.model.configuration}".strip(),
                                               folds=folds, mirror=mirror, keep_on_device=True)
        with clock("postprocess"):
            probs = log_probabilities_to_original(log_probs, pre.properties, self.model.plans, self.config,
                                                  sigmoid=self.labels.has_regions)
        log.info("%s: %s predicted in %.1f s (grid %s, folds %s, mirroring %s)", case_id or "case",
                 self.model.configuration, time.perf_counter() - started, "x".join(map(str, net_input.shape[1:])),
                 ",".join(folds or self.model.folds), self.window.mirror_axes if mirror is None else mirror)
        return probs


class _StageClock:
    """Adds the wall time of ``with clock("stage"):`` blocks to a dict (or does nothing without one)."""

    def __init__(self, timings: Optional[dict[str, float]]):
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
