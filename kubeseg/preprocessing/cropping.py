"""Cropping to the nonzero region of an image.

Scans often carry a large zero border (skull-stripped MRI, padded CT); cropping it away shrinks
the data, and the mask of what was cropped tells z-score normalization where to look.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

# Written into the label map where a voxel lies outside the nonzero mask (nnU-Net's convention).
OUTSIDE_LABEL = -1


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, with enclosed holes filled."""
    return binary_fill_holes(np.any(data != 0, axis=0))


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """``[[lo, hi), ...]`` per axis of the True voxels; the whole array if there are none."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return box


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop ``data`` (C, ...) and ``seg`` (1, ...) to the nonzero box.

    Returns the cropped data, a label map in which background outside the nonzero mask is
    ``OUTSIDE_LABEL`` (a fresh int8 map of 0/-1 when ``seg`` is None), and the box.
    """
    mask = nonzero_mask(data)
    box = bounding_box(mask)
    region = tuple(slice(lo, hi) for lo, hi in box)
    data = data[(slice(None), *region)]
    inside = mask[region][None]
    if seg is None:
        seg = np.where(inside, np.int8(0), np.int8(OUTSIDE_LABEL))
    else:
        seg = seg[(slice(None), *region)].copy()
        seg[(seg == 0) & ~inside] = OUTSIDE_LABEL
    return data, seg, box
