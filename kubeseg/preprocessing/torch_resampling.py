"""Resampling with torch's ``F.interpolate``: nnU-Net v2's ``resample_torch_fornnunet`` semantics.

nnU-Net's torch-resampling planners (``nnUNetPlanner_torchres``, ``nnUNetPlannerResEncL_torchres``
and ``..._torchres_sepz``) name ``resample_torch_fornnunet`` in their plans. A model trained on
such plans saw images interpolated by torch (linear, ``align_corners=False``, no antialiasing),
not by splines, so kubeseg must resample the same way to preprocess and to export for it.

Rules (read from nnunetv2 2.8.1, implemented here from scratch):

* images and probabilities: (tri/bi)linear interpolation in float32;
* label maps: each label's indicator (scaled by 1000) is interpolated and stored as float16;
  each voxel takes the label with the largest value (the first label on a tie). With
  ``memefficient_seg_resampling`` instead the labels, in ascending order, overwrite every voxel
  whose interpolated indicator exceeds one half (voxels no label claims stay 0);
* a separately treated coarse axis (``force_separate_z``, or automatic above the anisotropy
  threshold when it is ``None``) is interpolated in-plane slice by slice with ``mode``, then
  along the coarse axis with ``aniso_axis_mode`` (``nearest-exact`` by default). Without a
  separate axis, nnunetv2 interpolates linearly whatever ``mode`` says; so does kubeseg.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

INDICATOR_SCALE = 1000.0  # nnU-Net scales label indicators before storing them as float16
MODES = ("linear", "nearest", "nearest-exact", "area")


def _torch_mode(mode: str, spatial_dims: int) -> str:
    if mode == "linear":
        return {2: "bilinear", 3: "trilinear"}[spatial_dims]
    return mode


def _interpolate(volumes: torch.Tensor, shape, mode: str) -> torch.Tensor:
    """Interpolate ``(N, *spatial)`` float volumes to ``(N, *shape)``."""
    return F.interpolate(volumes[None], size=tuple(int(s) for s in shape),
                         mode=_torch_mode(mode, volumes.ndim - 1), antialias=False)[0]


def _labels(seg: torch.Tensor, shape, mode: str, memory_efficient: bool) -> torch.Tensor:
    """Label maps ``(N, *spatial)`` to ``(N, *shape)``; int8, or int16 for labels of 127 and up."""
    values = torch.unique(seg)
    dtype = torch.int8 if int(values.max()) < 127 else torch.int16
    shape = tuple(int(s) for s in shape)
    if memory_efficient:
        out = torch.zeros((seg.shape[0], *shape), dtype=dtype)
        for value in values:
            out[_interpolate((seg == value).float(), shape, mode) > 0.5] = value.to(dtype)
        return out
    scores = torch.empty((len(values), seg.shape[0], *shape), dtype=torch.float16)
    for i, value in enumerate(values):
        scores[i] = _interpolate((seg == value).float() * INDICATOR_SCALE, shape, mode)
    return values.to(dtype)[scores.argmax(0)]


def _simple(data: torch.Tensor, shape, is_seg: bool, mode: str, memory_efficient: bool) -> torch.Tensor:
    if tuple(data.shape[1:]) == tuple(int(s) for s in shape):
        return data
    if is_seg:
        return _labels(data, shape, mode, memory_efficient)
    return _interpolate(data.float(), shape, mode)


def resample_torch(data: np.ndarray, shape, axis: int | None, *, is_seg: bool, mode: str = "linear",
                   aniso_axis_mode: str = "nearest-exact", memory_efficient: bool = False) -> np.ndarray:
    """Resample ``data`` (C, *spatial) to ``shape``; ``axis`` is the separately treated coarse axis or None."""
    with torch.no_grad():
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        if axis is None:
            return _simple(tensor, shape, is_seg, "linear", memory_efficient).numpy()
        channels = tensor.shape[0]
        n_slices = tensor.shape[axis + 1]
        in_plane = [int(s) for a, s in enumerate(shape) if a != axis]
        # (C, ..., slices, ...) -> (C * slices, plane): each slice of each channel on its own
        slices = torch.movedim(tensor, axis + 1, 1).reshape(channels * n_slices, *tensor.shape[1:][:axis],
                                                            *tensor.shape[1:][axis + 1:])
        slices = _simple(slices, in_plane, is_seg, mode, memory_efficient)
        planes = torch.movedim(slices.reshape(channels, n_slices, *in_plane), 1, axis + 1)
        return _simple(planes.contiguous(), shape, is_seg, aniso_axis_mode, memory_efficient).numpy()
