"""Cost of the Grad-CAM++ saliency map against the prediction it explains (README, clinical section).

    python benchmarks/saliency.py BUNDLE IMAGE [--repeats 3]

Prints the median seconds of one prediction (sliding window, no mirroring, one thread) and of one
saliency map (preprocess, one patch forward + backward, resampling back) of the most uncertain label.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from kubeseg.clinical.qa import most_uncertain_label, per_label_confidence
from kubeseg.clinical.saliency import saliency_map
from kubeseg.imageio import read_image
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import build_predictors, resolve_model, segment_case


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("image")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    choice = resolve_model(a.bundle)
    predictors = build_predictors(choice, PredictSettings(device="cpu", use_mirroring=False, progress=False))
    data, geometry = read_image([Path(a.image)])
    labels = {k: v for k, v in predictors[0].model.dataset_json["labels"].items()}
    predict_s, saliency_s = [], []
    for _ in range(a.repeats):
        t = time.perf_counter()
        result = segment_case(predictors, data, geometry, choice.postprocessing)
        predict_s.append(time.perf_counter() - t)
        label = most_uncertain_label(per_label_confidence(result.probabilities, result.segmentation, labels))
        t = time.perf_counter()
        saliency_map(predictors[0], data, geometry, result.segmentation, label, labels[label])
        saliency_s.append(time.perf_counter() - t)
    print(f"image {tuple(data.shape[1:])}, patch {predictors[0].patch_size}, 1 thread, CPU")
    print(f"prediction (no mirroring): median {statistics.median(predict_s):.2f} s")
    print(f"saliency ({label}):        median {statistics.median(saliency_s):.2f} s")


if __name__ == "__main__":
    main()
