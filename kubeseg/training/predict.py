"""A small sliding-window predictor on preprocessed arrays (for the end-of-training
validation).  The inference module will replace it; keep the signature.

Like nnU-Net: tiles of the training patch size, step 0.5 of the patch, Gaussian
importance weighting (sigma = patch/8), optional test-time mirroring over the allowed
axes, images smaller than the patch are padded and the padding cropped off again.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


@lru_cache(maxsize=4)
def gaussian_importance_map(tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    g = gaussian_filter(tmp, [i * sigma_scale for i in tile_size], 0, mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def sliding_window_steps(image_size: Sequence[int], tile_size: Sequence[int], step: float) -> list[list[int]]:
    """Tile start positions per axis: evenly spaced, at most ``step * tile`` apart."""
    steps = []
    for im, tile in zip(image_size, tile_size):
        n = int(np.ceil((im - tile) / (tile * step))) + 1
        max_start = im - tile
        width = max_start / (n - 1) if n > 1 else 0
        steps.append([int(np.round(width * i)) for i in range(n)])
    return steps


def _forward(network, x: torch.Tensor, mirror_axes: Optional[Sequence[int]]) -> torch.Tensor:
    pred = network(x)
    if mirror_axes:
        axes = [a + 2 for a in mirror_axes]
        combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for c in combos:
            pred += torch.flip(network(torch.flip(x, c)), c)
        pred /= len(combos) + 1
    return pred


@torch.inference_mode()
def predict_sliding_window(network: torch.nn.Module, data: np.ndarray, patch_size: Sequence[int],
                           num_classes: int, device: torch.device = torch.device("cpu"),
                           step: float = 0.5, mirror_axes: Optional[Sequence[int]] = None,
                           use_gaussian: bool = True) -> torch.Tensor:
    """Logits ``(num_classes, *spatial)`` (float32, CPU) for one preprocessed case.

    ``data`` is ``(C, *spatial)``; a 2D ``patch_size`` predicts a 3D array slice by slice.
    The network must return a single tensor (deep supervision off) and be in eval mode.
    """
    data_t = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    if len(patch_size) == 2 and data_t.ndim == 4:
        return torch.stack([predict_sliding_window(network, data[:, s], patch_size, num_classes, device, step,
                                                   mirror_axes, use_gaussian) for s in range(data.shape[1])], 1)
    spatial = data_t.shape[1:]
    padded_shape = [max(s, p) for s, p in zip(spatial, patch_size)]
    pad_lo = [(ps - s) // 2 for ps, s in zip(padded_shape, spatial)]
    if list(padded_shape) != list(spatial):
        pad = []
        for lo, ps, s in reversed(list(zip(pad_lo, padded_shape, spatial))):
            pad += [lo, ps - s - lo]
        data_t = torch.nn.functional.pad(data_t, pad, mode="constant", value=0)
    weights = torch.from_numpy(gaussian_importance_map(tuple(patch_size))) if use_gaussian \
        else torch.ones(tuple(patch_size))
    weights = weights.to(device)
    logits = torch.zeros((num_classes, *padded_shape), dtype=torch.float32, device=device)
    counts = torch.zeros(tuple(padded_shape), dtype=torch.float32, device=device)
    for start in itertools.product(*sliding_window_steps(padded_shape, patch_size, step)):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
        x = data_t[(slice(None),) + sl][None].to(device)
        pred = _forward(network, x, mirror_axes)[0].float()
        logits[(slice(None),) + sl] += pred * weights
        counts[sl] += weights
    logits /= counts
    crop = tuple(slice(lo, lo + s) for lo, s in zip(pad_lo, spatial))
    return logits[(slice(None),) + crop].cpu()
