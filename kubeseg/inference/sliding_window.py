"""Sliding-window prediction of one preprocessed case, nnU-Net v2's way, with batched tiles.

Semantics kept identical to nnU-Net v2 (so that predictions agree voxel for voxel):

* tiles of the configuration's patch size; start positions per axis evenly spaced so that
  neighbours overlap by at least ``1 - step`` of the patch (``step`` 0.5 by default);
* each tile's logits are weighted by a Gaussian centred on the tile (sigma = patch / 8, zeros
  replaced by the smallest positive value) and the sum is divided by the summed weights;
* test-time mirroring averages the logits of the tile and of every combination of flips over
  the allowed axes (8 passes for three axes);
* an image smaller than the patch is zero-padded (centred) and the padding cut off again;
* a 2D patch on a 3D image predicts slice by slice along the first axis.

The accumulators are float16 by default, as nnU-Net v2's (half the device memory, and the
same numbers: at the image border, where only the faint edge of a tile's Gaussian reaches, the
weighted sums fall into float16's subnormal range and lose precision; nnU-Net's output carries
that, and so does ours). ``accumulator="float32"`` is exact there instead.

Difference, for speed, not for the result: several tiles (and all their mirrored copies) go
through the network in one batch; tiles are still added in nnU-Net's order. Accumulation stays
on the device; if the device runs out of memory the case is redone with the accumulators in
CPU memory.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

log = logging.getLogger(__name__)

ACCUMULATORS = {"float16": torch.float16, "float32": torch.float32}
NNUNET_GAUSSIAN_SCALE = 10.0  # nnU-Net scales its float16 map to a maximum of 10


@dataclass(frozen=True)
class SlidingWindowSettings:
    """How tiles are laid out and combined.

    ``batch_size`` is the most network inputs per forward call; a tile's mirrored copies
    count too (8 per tile for 3D mirroring), so 8 with mirroring means one tile per call.
    """

    step: float = 0.5
    use_gaussian: bool = True
    mirror_axes: Optional[tuple[int, ...]] = None
    batch_size: int = 8
    results_on_device: bool = True
    accumulator: str = "float16"
    autocast: str = "float16"  # the CUDA autocast dtype: float16 (nnU-Net's) or bfloat16

    def __post_init__(self) -> None:
        if self.autocast not in ("float16", "bfloat16"):
            raise ValueError(f"autocast must be float16 or bfloat16, got {self.autocast!r}")
        if self.accumulator not in ACCUMULATORS:
            raise ValueError(f"accumulator must be one of {sorted(ACCUMULATORS)}, got {self.accumulator!r}")
        if not 0 < self.step <= 1:
            raise ValueError(f"step must be in (0, 1], got {self.step}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@lru_cache(maxsize=8)
def gaussian_importance_map(patch_size: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian weights for one tile: 1 at the centre voxel, sigma = ``patch * sigma_scale``."""
    impulse = np.zeros(patch_size)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(impulse, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()  # a zero weight would divide by zero at the image border
    return g.astype(np.float32)


def tile_weights(patch_size: tuple[int, ...], dtype: torch.dtype, use_gaussian: bool = True) -> torch.Tensor:
    """The per-tile weights in the accumulator's dtype.

    float16: nnU-Net's map exactly (maximum 10, cast to float16, zeros replaced by the smallest
    nonzero value), so that sums round as nnU-Net's do. float32: the map above.
    """
    if not use_gaussian:
        return torch.ones(patch_size, dtype=dtype)
    if dtype == torch.float32:
        return torch.from_numpy(gaussian_importance_map(patch_size))
    impulse = np.zeros(patch_size)
    impulse[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(impulse, [p / 8 for p in patch_size], 0, mode="constant", cval=0)
    g /= g.max() / NNUNET_GAUSSIAN_SCALE
    g16 = torch.from_numpy(g).to(dtype)
    g16[g16 == 0] = g16[g16 != 0].min()
    return g16


def sliding_window_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """Tile start positions per axis: as few as keep the stride at most ``step * patch``, evenly spread."""
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image axis of {size} voxels is smaller than the patch ({patch}); pad it first")
        n = int(np.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(n)])
    return steps


def tile_slicers(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple]:
    """Index tuples (channel axis first) of every tile; a 2D patch on a 3D image adds the slice index."""
    if len(patch_size) == len(image_size) - 1:
        steps = sliding_window_steps(image_size[1:], patch_size, step)
        return [(slice(None), d, *[slice(s, s + p) for s, p in zip(start, patch_size)])
                for d in range(image_size[0]) for start in itertools.product(*steps)]
    if len(patch_size) != len(image_size):
        raise ValueError(f"patch {tuple(patch_size)} does not fit an image of {len(image_size)} axes")
    steps = sliding_window_steps(image_size, patch_size, step)
    return [(slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)])
            for start in itertools.product(*steps)]


def padding_for(image_size: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial axis so that every axis holds at least one patch."""
    offset = len(image_size) - len(patch_size)
    pads = [(0, 0)] * offset
    for size, patch in zip(image_size[offset:], patch_size):
        missing = max(0, patch - size)
        pads.append((missing // 2, missing - missing // 2))
    return pads


def mirror_combinations(mirror_axes: Optional[Sequence[int]], spatial_offset: int = 2) -> list[tuple[int, ...]]:
    """Flip-axis tuples of the test-time mirroring, the identity ``()`` first."""
    combos: list[tuple[int, ...]] = [()]
    if mirror_axes:
        axes = [a + spatial_offset for a in mirror_axes]
        combos += [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    return combos


def _mirrored_forward(network: torch.nn.Module, x: torch.Tensor, combos: list[tuple[int, ...]],
                      batch_size: int) -> torch.Tensor:
    """Mean over ``combos`` of flip(network(flip(x))), with as many inputs per call as allowed."""
    per_call = max(1, batch_size // x.shape[0])
    total = None
    for i in range(0, len(combos), per_call):
        group = combos[i:i + per_call]
        inputs = torch.cat([torch.flip(x, c) if c else x for c in group]) if len(group) > 1 else \
            (torch.flip(x, group[0]) if group[0] else x)
        out = network(inputs)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = out.float()
        for j, c in enumerate(group):
            part = out[j * x.shape[0]:(j + 1) * x.shape[0]]
            if total is None:  # the first (unflipped) output becomes the sum: no copy
                total = torch.flip(part, c) if c else part
            else:  # flip and add in one pass, no flipped temporary
                total.add_(torch.flip(part, c) if c else part)
    return total.div_(len(combos)) if len(combos) > 1 else total


def _run(network, data: torch.Tensor, patch_size, num_classes: int, device: torch.device, results_device,
         settings: SlidingWindowSettings, slicers: list, on_tiles: Optional[Callable[[int], None]]) -> torch.Tensor:
    data = data.to(results_device)
    dtype = ACCUMULATORS[settings.accumulator]
    logits = torch.zeros((num_classes, *data.shape[1:]), dtype=dtype, device=results_device)
    weight_sum = torch.zeros(data.shape[1:], dtype=dtype, device=results_device)
    weights = tile_weights(tuple(int(p) for p in patch_size), dtype, settings.use_gaussian).to(results_device)
    combos = mirror_combinations(settings.mirror_axes)
    tiles_per_call = max(1, settings.batch_size // len(combos))
    autocast = torch.autocast(device.type, dtype=getattr(torch, settings.autocast)) if device.type == "cuda" \
        else _null()
    with autocast:
        for i in range(0, len(slicers), tiles_per_call):
            group = slicers[i:i + tiles_per_call]
            x = torch.stack([data[s] for s in group]).to(device, non_blocking=True)
            pred = _mirrored_forward(network, x, combos, settings.batch_size).to(results_device)
            for s, p in zip(group, pred):
                logits[s].add_(p.mul_(weights))
                weight_sum[s[1:]].add_(weights)
            if on_tiles is not None:
                on_tiles(len(group))
    return logits.div_(weight_sum)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.inference_mode()
def predict_logits(network: torch.nn.Module, data: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                   num_classes: int, device: torch.device = torch.device("cpu"),
                   settings: SlidingWindowSettings = SlidingWindowSettings(),
                   on_tiles: Optional[Callable[[int], None]] = None, keep_on_device: bool = False) -> torch.Tensor:
    """Logits ``(num_classes, *spatial)`` (accumulator dtype, on the CPU) of one preprocessed case ``(C, *spatial)``.

    ``keep_on_device``: return them where they were accumulated (the GPU, unless it ran out of
    memory), so that softmax and resampling run there too.

    The network must be in eval mode with deep supervision off and already on ``device``.
    ``on_tiles(n)`` is called after every forward call with the number of tiles done (progress).
    """
    if isinstance(data, np.ndarray):  # memory-mapped training arrays are read-only: torch wants its own copy
        data = np.array(data, dtype=np.float32, copy=not data.flags.writeable or None, order="C")
    data = torch.as_tensor(data, dtype=torch.float32)
    spatial = tuple(data.shape[1:])
    pads = padding_for(spatial, patch_size)
    if any(p != (0, 0) for p in pads):
        flat = [v for pair in reversed(pads) for v in pair]
        data = torch.nn.functional.pad(data, flat, mode="constant", value=0)
    slicers = tile_slicers(tuple(data.shape[1:]), patch_size, settings.step)
    use_device = settings.results_on_device and device.type != "cpu"
    try:
        logits = _run(network, data, patch_size, num_classes, device, device if use_device else torch.device("cpu"),
                      settings, slicers, on_tiles)
    except torch.cuda.OutOfMemoryError:
        if not use_device:
            raise
        log.warning("out of GPU memory with the case (%s voxels) on the device; redoing it with the "
                    "accumulators in CPU memory", "x".join(map(str, spatial)))
        torch.cuda.empty_cache()
        logits = _run(network, data, patch_size, num_classes, device, torch.device("cpu"), settings, slicers,
                      on_tiles)
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial))
    logits = logits[(slice(None), *crop)]
    return logits if keep_on_device else logits.cpu()
