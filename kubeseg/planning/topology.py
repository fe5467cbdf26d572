"""U-Net topology from spacing and patch size: how often to downsample each axis, and with which kernels.

The rule (nnU-Net's): keep downsampling the axes whose spacing is within a factor two of the
finest one, as long as the feature map stays at least ``min_edge`` voxels wide; an axis gets
3-wide convolution kernels once its spacing has come within a factor two of the finest. Coarse
axes of anisotropic data thus wait with pooling and 3-wide kernels until the others catch up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """``strides[0]`` is the stem (all ones); ``kernel_sizes[-1]`` is the bottleneck's."""

    pools_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]

    @property
    def divisor(self) -> tuple[int, ...]:
        """Every patch edge must be a multiple of this."""
        return tuple(2**p for p in self.pools_per_axis)

    @property
    def num_stages(self) -> int:
        return len(self.strides)


def round_up_to_multiple(shape: tuple[float, ...], divisor: tuple[int, ...]) -> tuple[int, ...]:
    """Each edge rounded up to a multiple of its divisor (edges may be fractional medians)."""
    return tuple(int(math.ceil(s / d) * d) for s, d in zip(shape, divisor))


def pool_and_conv_props(spacing, patch_size, min_edge: int = 4, max_pools: int = 999999) -> Topology:
    """Topology for ``patch_size`` at ``spacing``; the patch is rounded up to fit the pooling."""
    dim = len(spacing)
    spacing_now = [float(s) for s in spacing]
    size_now = [float(s) for s in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    while True:
        poolable = [a for a in range(dim) if size_now[a] >= 2 * min_edge]
        if not poolable:
            break
        finest = min(spacing_now[a] for a in poolable)
        poolable = [a for a in poolable if spacing_now[a] / finest < 2 and pools[a] < max_pools]
        if not poolable or (len(poolable) == 1 and size_now[poolable[0]] < 3 * min_edge):
            break
        finest_overall = min(spacing_now)
        kernel = [3 if k == 3 or spacing_now[a] / finest_overall < 2 else 1 for a, k in enumerate(kernel)]
        for a in poolable:
            pools[a] += 1
            spacing_now[a] *= 2
            size_now[a] = math.ceil(size_now[a] / 2)
        strides.append(tuple(2 if a in poolable else 1 for a in range(dim)))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)
    divisor = tuple(2**p for p in pools)
    return Topology(tuple(pools), tuple(strides), tuple(kernels), round_up_to_multiple(tuple(patch_size), divisor))
