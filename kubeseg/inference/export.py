"""From the network's grid back to the input image: resample, un-crop, un-transpose.

The predictor hands over *log*-probabilities on the preprocessed grid. They are resampled to
the cropped original shape with the plans' ``resampling_fn_probabilities`` and its kwargs (by
default linear in-plane, nearest along a separately treated coarse axis), turned into probabilities with a
softmax, and put back into the uncropped, untransposed array; outside the crop box the
probability of background is 1.

Region models (sigmoid outputs, :mod:`kubeseg.labels`) hand over per-region *log-odds* instead;
they are resampled the same way and turned into probabilities with a sigmoid, outside the crop
box 0 (no region), and into a label map by painting the regions in ``regions_class_order``.

Why log-probabilities: a softmax ignores a per-voxel constant, and ``log_softmax(z)`` is ``z``
minus such a constant, so for a single model this is exactly nnU-Net v2's "resample the logits,
then softmax"; for several folds it resamples their averaged probabilities (in log space).
"""

from __future__ import annotations

import numpy as np
import torch

from kubeseg.labels import LabelScheme
from kubeseg.preprocessing.resampling import resample_probabilities_torch, torch_resampling_supported
from kubeseg.preprocessing.resampling_functions import DEFAULT_FUNCTION, probabilities_resampler


def preprocessed_spacing(properties: dict, plans: dict, config: dict) -> tuple[list[float], list[float]]:
    """(spacing of the network's grid, original spacing), both in the transposed axis order."""
    forward = plans["transpose_forward"]
    original = [float(properties["spacing"][a]) for a in forward]
    spacing = [float(s) for s in config["spacing"]]
    grid = spacing if len(spacing) == len(original) else [original[0], *spacing]
    return grid, original


def log_probabilities_to_original(log_probs: torch.Tensor | np.ndarray, properties: dict, plans: dict,
                                  config: dict, sigmoid: bool = False) -> np.ndarray:
    """Probabilities ``(C, z, y, x)`` (float32) on the input image's grid; ``sigmoid``: region log-odds in.

    The plans' probabilities resampler decides how
    (:mod:`kubeseg.preprocessing.resampling_functions`); nnU-Net's default function with linear
    orders (its defaults for probabilities) runs as one torch interpolation over all classes, on
    the tensor's device; anything else goes through the dispatcher. Softmax/sigmoid run in place.
    """
    log_probs = torch.as_tensor(log_probs)
    grid, original = preprocessed_spacing(properties, plans, config)
    target = [int(s) for s in properties["shape_after_cropping_and_before_resampling"]]
    r = probabilities_resampler(config)
    order, order_z = int(r.kwargs.get("order", 1)), int(r.kwargs.get("order_z", 0))
    if r.name == DEFAULT_FUNCTION and torch_resampling_supported(order, order_z):
        axis = r.axis_for(grid, original)
        try:
            probs = resample_probabilities_torch(log_probs, target, grid, original, order, order_z, axis)
        except torch.cuda.OutOfMemoryError:  # the input grid did not fit next to the logits: do it on the CPU
            log_probs = log_probs.cpu()
            torch.cuda.empty_cache()
            probs = resample_probabilities_torch(log_probs, target, grid, original, order, order_z, axis)
        if probs.data_ptr() == log_probs.data_ptr():  # nothing resampled: do not overwrite the caller's tensor
            probs = probs.clone()
    else:
        probs = torch.from_numpy(np.ascontiguousarray(
            r(log_probs.float().cpu().numpy(), target, grid, original), dtype=np.float32))
    if sigmoid:
        probs = probs.sigmoid_().cpu().numpy()
    else:
        probs = probs.sub_(probs.amax(0, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(0, keepdim=True)).cpu().numpy()
    full = np.zeros((probs.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    if not sigmoid:
        full[0] = 1
    box = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    full[(slice(None), *box)] = probs
    del probs
    backward = plans["transpose_backward"]
    return np.ascontiguousarray(full.transpose([0, *[b + 1 for b in backward]]))


def probabilities_to_segmentation(probabilities: np.ndarray, all_labels) -> np.ndarray:
    """The most probable label per voxel (uint8, or uint16 for more than 255 labels).

    ``all_labels``: the label values, or a label scheme (``LabelScheme`` / ``LabelInfo``), which also
    handles regions (painted in ``regions_class_order`` where their probability exceeds 0.5).
    """
    scheme = getattr(all_labels, "scheme", all_labels)
    if isinstance(scheme, LabelScheme):
        return scheme.to_segmentation(probabilities)
    labels = np.asarray(all_labels, dtype=np.uint8 if max(all_labels) < 255 else np.uint16)
    return labels[np.argmax(probabilities, axis=0)]
