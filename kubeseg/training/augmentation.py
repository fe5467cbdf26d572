"""nnU-Net's default data augmentation, built from batchgenerators transforms, and the
background worker pools that run it.

The pipeline (probabilities per sample unless stated) is the one nnU-Net v2 ran on
batchgenerators before v2.5; nnU-Net 2.8 runs the same transforms through the torch-based
batchgeneratorsv2, which costs about a third of the CPU per batch (benchmarks/train.py):

1. spatial: rotation (p 0.2; +-30 deg per axis in 3D, +-180 deg in-plane for dummy 2D,
   +-15 or +-180 deg in 2D depending on patch aspect), isotropic scaling 0.7-1.4 (p 0.2),
   no elastic deformation, cubic data / linear seg interpolation, centre crop from the
   enlarged initial patch to the final patch; padded segmentation is -1;
2. Gaussian noise (variance 0-0.1, p 0.1); Gaussian blur (sigma 0.5-1, p 0.2, per channel
   0.5); multiplicative brightness 0.75-1.25 (p 0.15); contrast 0.75-1.25 (p 0.15);
   simulated low resolution (zoom 0.5-1, p 0.25, per channel 0.5); gamma 0.7-1.5 on the
   inverted image (p 0.1) and on the image (p 0.3), statistics retained;
3. mirroring along every allowed axis with p 0.5 each;
4. optional masking of channels normalised inside the nonzero mask; -1 -> 0 in the seg;
   cascade: previous-stage seg to one-hot input channels (+ random morphology and removal
   of connected components in training); deep-supervision targets; numpy -> torch.

"Dummy 2D" augmentation is used for 3D patches that are strongly anisotropic
(``max(patch) / patch[0] > 3``): the spatial transform then runs slice-wise in 2D.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from batchgenerators.augmentations.utils import resize_segmentation, rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor, RemoveLabelTransform, RenameTransform
from scipy import ndimage

log = logging.getLogger(__name__)

ANISO_THRESHOLD = 3.0
_DEG = np.pi / 180.0


# ----------------------------------------------------------------------------------------
# parameters derived from the patch size
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentationParams:
    """What nnU-Net derives from the patch size before building the pipeline."""

    patch_size: tuple[int, ...]
    rotation_x: tuple[float, float]
    rotation_y: tuple[float, float]
    rotation_z: tuple[float, float]
    do_dummy_2d: bool
    initial_patch_size: tuple[int, ...]
    mirror_axes: tuple[int, ...]


def get_patch_size(final_patch_size: Sequence[int], rot_x, rot_y, rot_z,
                   scale_range: Sequence[float]) -> np.ndarray:
    """Size of the patch to sample so that after rotation and down-scaling the final patch
    is still covered: the bounding box of the patch corner rotated by the largest angle
    (capped at 90 deg) about each axis, divided by the smallest scale."""
    def mx(r):
        r = max(np.abs(r)) if isinstance(r, (tuple, list)) else r
        return min(90 * _DEG, r)

    rot_x, rot_y, rot_z = mx(rot_x), mx(rot_y), mx(rot_z)
    coords = np.array(final_patch_size, dtype=float)
    final = np.copy(coords)
    if len(coords) == 3:
        final = np.max(np.vstack((np.abs(rotate_coords_3d(coords, rot_x, 0, 0)), final)), 0)
        final = np.max(np.vstack((np.abs(rotate_coords_3d(coords, 0, rot_y, 0)), final)), 0)
        final = np.max(np.vstack((np.abs(rotate_coords_3d(coords, 0, 0, rot_z)), final)), 0)
    elif len(coords) == 2:
        final = np.max(np.vstack((np.abs(rotate_coords_2d(coords, rot_x)), final)), 0)
    final /= min(scale_range)
    return final.astype(int)


def configure_augmentation(patch_size: Sequence[int]) -> AugmentationParams:
    """Rotation ranges, dummy-2D flag, initial (enlarged) patch size and mirror axes."""
    patch_size = tuple(int(i) for i in patch_size)
    dim = len(patch_size)
    zero = (0.0, 0.0)
    if dim == 2:
        do_dummy_2d = False
        r = 15 * _DEG if max(patch_size) / min(patch_size) > 1.5 else 180 * _DEG
        rx, ry, rz = (-r, r), zero, zero
        mirror_axes = (0, 1)
    elif dim == 3:
        do_dummy_2d = (max(patch_size) / patch_size[0]) > ANISO_THRESHOLD
        if do_dummy_2d:
            rx, ry, rz = (-180 * _DEG, 180 * _DEG), zero, zero
        else:
            r = (-30 * _DEG, 30 * _DEG)
            rx, ry, rz = r, r, r
        mirror_axes = (0, 1, 2)
    else:
        raise ValueError(f"patch size must be 2D or 3D, got {patch_size}")
    initial = get_patch_size(patch_size, rx, ry, rz, (0.85, 1.25))
    if do_dummy_2d:
        initial[0] = patch_size[0]
    return AugmentationParams(patch_size, rx, ry, rz, do_dummy_2d, tuple(int(i) for i in initial), mirror_axes)


# ----------------------------------------------------------------------------------------
# small transforms batchgenerators does not ship
# ----------------------------------------------------------------------------------------
class Convert3DTo2DTransform(AbstractTransform):
    """(b, c, x, y, z) -> (b, c*x, y, z) so a 2D spatial transform treats slices alike."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")):
        self.keys = tuple(keys)

    def __call__(self, **d):
        for k in self.keys:
            shp = d[k].shape
            d[f"_orig_shape_{k}"] = shp
            d[k] = d[k].reshape((shp[0], shp[1] * shp[2], shp[3], shp[4]))
        return d


class Convert2DTo3DTransform(AbstractTransform):
    """Inverse of :class:`Convert3DTo2DTransform` (the in-plane size may have changed)."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")):
        self.keys = tuple(keys)

    def __call__(self, **d):
        for k in self.keys:
            shp = d.pop(f"_orig_shape_{k}")
            cur = d[k].shape
            d[k] = d[k].reshape((shp[0], shp[1], shp[2], cur[-2], cur[-1]))
        return d


class MaskImageTransform(AbstractTransform):
    """Set channels normalised within the nonzero mask to 0 where the seg is < 0."""

    def __init__(self, channels: Sequence[int], seg_channel: int = 0, set_outside_to: float = 0):
        self.channels = list(channels)
        self.seg_channel = seg_channel
        self.set_outside_to = set_outside_to

    def __call__(self, **d):
        outside = d["seg"][:, self.seg_channel] < 0
        for c in self.channels:
            d["data"][:, c][outside] = self.set_outside_to
        return d


class MoveSegAsOneHotToDataTransform(AbstractTransform):
    """Cascade: seg channel ``channel`` (previous stage) -> one-hot channels appended to data."""

    def __init__(self, channel: int, labels: Sequence[int]):
        self.channel = channel
        self.labels = tuple(labels)

    def __call__(self, **d):
        seg = d["seg"]
        prev = seg[:, self.channel]
        onehot = np.stack([(prev == lab) for lab in self.labels], 1).astype(d["data"].dtype)
        d["data"] = np.concatenate((d["data"], onehot), 1)
        keep = [i for i in range(seg.shape[1]) if i != self.channel]
        d["seg"] = seg[:, keep]
        return d


class RandomBinaryOperatorTransform(AbstractTransform):
    """Cascade training: randomly dilate/erode/open/close the one-hot previous-stage
    channels (ball of radius 1-8), so the network does not trust them blindly."""

    def __init__(self, channel_idx: Sequence[int], p_per_sample: float = 0.4,
                 strel_size: tuple[int, int] = (1, 8), p_per_label: float = 1.0):
        self.channel_idx = list(channel_idx)
        self.p_per_sample = p_per_sample
        self.strel_size = strel_size
        self.p_per_label = p_per_label

    def __call__(self, **d):
        data = d["data"]
        ops = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_closing, ndimage.binary_opening)
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for c in np.random.permutation(self.channel_idx):
                if np.random.uniform() >= self.p_per_label:
                    continue
                op = ops[np.random.choice(len(ops))]
                r = np.random.uniform(*self.strel_size)
                n = data.ndim - 2
                grid = np.indices((2 * int(r) + 1,) * n) - int(r)
                strel = (grid ** 2).sum(0) <= r ** 2
                workon = data[b, c].astype(bool)
                res = op(workon, strel)
                data[b, c] = res.astype(data.dtype)
                others = [i for i in self.channel_idx if i != c]
                if others:  # keep one-hot exclusive: growing label removes others there
                    was_added = res & ~workon
                    for o in others:
                        data[b, o][was_added] = 0
        return d


class RemoveRandomConnectedComponentTransform(AbstractTransform):
    """Cascade training: delete one random small connected component (< 15 % of the
    patch) from a one-hot previous-stage channel."""

    def __init__(self, channel_idx: Sequence[int], p_per_sample: float = 0.2,
                 dont_do_if_covers_more_than_x_percent: float = 0.15, p_per_label: float = 1.0):
        self.channel_idx = list(channel_idx)
        self.p_per_sample = p_per_sample
        self.max_fraction = dont_do_if_covers_more_than_x_percent
        self.p_per_label = p_per_label

    def __call__(self, **d):
        data = d["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for c in self.channel_idx:
                if np.random.uniform() >= self.p_per_label:
                    continue
                lab, n = ndimage.label(data[b, c] > 0)
                if n == 0:
                    continue
                sizes = np.bincount(lab.ravel())[1:]
                small = [i + 1 for i, s in enumerate(sizes) if s < self.max_fraction * lab.size]
                if small:
                    data[b, c][lab == small[np.random.choice(len(small))]] = 0
        return d


class DownsampleSegForDSTransform(AbstractTransform):
    """Replace ``d[key]`` (b, c, *s) by a list of nearest-neighbour downsampled copies, one
    per deep-supervision output (``scales[i]`` = relative size per axis)."""

    def __init__(self, scales: Sequence[Sequence[float]], key: str = "target", order: int = 0):
        self.scales = [list(s) for s in scales]
        self.key = key
        self.order = order

    def __call__(self, **d):
        seg = d[self.key]
        out = []
        for s in self.scales:
            if all(i == 1 for i in s):
                out.append(seg)
                continue
            new_shape = [int(round(n * f)) for n, f in zip(seg.shape[2:], s)]
            res = np.zeros((*seg.shape[:2], *new_shape), dtype=seg.dtype)
            for b in range(seg.shape[0]):
                for c in range(seg.shape[1]):
                    res[b, c] = resize_segmentation(seg[b, c], new_shape, self.order)
            out.append(res)
        d[self.key] = out
        return d


# ----------------------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------------------
def _tail(deep_supervision_scales, is_cascaded, foreground_labels, training: bool) -> list:
    t: list = [RemoveLabelTransform(-1, 0)]
    if is_cascaded:
        if not foreground_labels:
            raise ValueError("cascade augmentation needs foreground_labels")
        t.append(MoveSegAsOneHotToDataTransform(1, foreground_labels))
        if training:
            idx = list(range(-len(foreground_labels), 0))
            t.append(RandomBinaryOperatorTransform(idx, p_per_sample=0.4, strel_size=(1, 8), p_per_label=1))
            t.append(RemoveRandomConnectedComponentTransform(idx, p_per_sample=0.2,
                                                             dont_do_if_covers_more_than_x_percent=0.15))
    t.append(RenameTransform("seg", "target", True))
    if deep_supervision_scales is not None:
        t.append(DownsampleSegForDSTransform(deep_supervision_scales, "target", 0))
    t.append(NumpyToTensor(["data", "target"], "float"))
    return t


def get_training_transforms(params: AugmentationParams,
                            deep_supervision_scales: Optional[Sequence[Sequence[float]]],
                            use_mask_for_norm: Optional[Sequence[bool]] = None,
                            is_cascaded: bool = False,
                            foreground_labels: Optional[Sequence[int]] = None,
                            order_data: int = 3, order_seg: int = 1) -> Compose:
    """nnU-Net's training augmentation (see module docstring)."""
    t: list = []
    if params.do_dummy_2d:
        ignore_axes = (0,)
        t.append(Convert3DTo2DTransform())
        spatial_patch = params.patch_size[1:]
    else:
        ignore_axes = None
        spatial_patch = params.patch_size
    t.append(SpatialTransform(
        spatial_patch, patch_center_dist_from_border=None,
        do_elastic_deform=False, alpha=(0, 0), sigma=(0, 0),
        do_rotation=True, angle_x=params.rotation_x, angle_y=params.rotation_y, angle_z=params.rotation_z,
        p_rot_per_axis=1, do_scale=True, scale=(0.7, 1.4),
        border_mode_data="constant", border_cval_data=0, order_data=order_data,
        border_mode_seg="constant", border_cval_seg=-1, order_seg=order_seg,
        random_crop=False, p_el_per_sample=0, p_scale_per_sample=0.2, p_rot_per_sample=0.2,
        independent_scale_for_each_axis=False))
    if params.do_dummy_2d:
        t.append(Convert2DTo3DTransform())
    t.append(GaussianNoiseTransform(p_per_sample=0.1))
    t.append(GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2,
                                   p_per_channel=0.5))
    t.append(BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15))
    t.append(ContrastAugmentationTransform(p_per_sample=0.15))
    t.append(SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5,
                                            order_downsample=0, order_upsample=3, p_per_sample=0.25,
                                            ignore_axes=ignore_axes))
    t.append(GammaTransform((0.7, 1.5), True, True, retain_stats=True, p_per_sample=0.1))
    t.append(GammaTransform((0.7, 1.5), False, True, retain_stats=True, p_per_sample=0.3))
    if params.mirror_axes:
        t.append(MirrorTransform(params.mirror_axes))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform([i for i, m in enumerate(use_mask_for_norm) if m], 0, 0))
    t.extend(_tail(deep_supervision_scales, is_cascaded, foreground_labels, training=True))
    return Compose(t)


def get_validation_transforms(deep_supervision_scales: Optional[Sequence[Sequence[float]]],
                              is_cascaded: bool = False,
                              foreground_labels: Optional[Sequence[int]] = None) -> Compose:
    """Validation batches: no augmentation, only label clean-up, DS targets and tensors."""
    return Compose(_tail(deep_supervision_scales, is_cascaded, foreground_labels, training=False))


# ----------------------------------------------------------------------------------------
# background workers
# ----------------------------------------------------------------------------------------
def default_num_workers() -> int:
    """nnU-Net-like default: 12 augmentation workers, but no more than there are CPUs
    (``KUBESEG_N_PROC_DA`` or nnU-Net's ``nnUNet_n_proc_DA`` override)."""
    for var in ("KUBESEG_N_PROC_DA", "nnUNet_n_proc_DA"):
        if var in os.environ:
            return int(os.environ[var])
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        n_cpu = os.cpu_count() or 1
    return min(12, n_cpu)


Augmenter = Union[SingleThreadedAugmenter, MultiThreadedAugmenter, NonDetMultiThreadedAugmenter]


def make_augmenter(loader, transform, num_workers: int, *, num_cached: Optional[int] = None,
                   seeds: Optional[Sequence[int]] = None, pin_memory: bool = False,
                   deterministic: bool = False) -> Augmenter:
    """Wrap ``loader`` + ``transform`` in background workers (0 = run in this process).

    ``deterministic=False`` uses batchgenerators' NonDetMultiThreadedAugmenter (what nnU-Net
    uses: batches come from whichever worker is ready); ``True`` the round-robin
    MultiThreadedAugmenter, which gives a reproducible batch order for fixed seeds.
    """
    if num_workers <= 0:
        return SingleThreadedAugmenter(loader, transform)
    if seeds is not None:
        seeds = list(seeds)
    if deterministic:
        return MultiThreadedAugmenter(loader, transform, num_workers, num_cached_per_queue=num_cached or 2,
                                      seeds=seeds, pin_memory=pin_memory, wait_time=0.002)
    return NonDetMultiThreadedAugmenter(loader, transform, num_workers,
                                        num_cached=num_cached or max(6, num_workers // 2), seeds=seeds,
                                        pin_memory=pin_memory, wait_time=0.002)


def shutdown_augmenter(aug: Optional[Augmenter]) -> None:
    """Stop an augmenter's worker processes (no-op for the single-process one)."""
    if aug is None:
        return
    finish = getattr(aug, "_finish", None)
    if finish is not None:
        try:
            finish()
        except Exception:  # pragma: no cover - best effort on teardown
            log.exception("error while shutting down augmentation workers")


@contextlib.contextmanager
def running_augmenter(loader, transform, num_workers: int, **kwargs) -> Iterator[Augmenter]:
    """Context manager: workers are shut down when the block exits, also on errors."""
    aug = make_augmenter(loader, transform, num_workers, **kwargs)
    try:
        yield aug
    finally:
        shutdown_augmenter(aug)
