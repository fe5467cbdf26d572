"""nnU-Net's default data augmentation, built from batchgeneratorsv2 transforms, and the
background worker pools that run it.

Every sample of a batch goes through the pipeline on its own, as torch tensors on the CPU
(batchgeneratorsv2's model), and the results are collated into the batch the network gets.
The pipeline, with nnU-Net 2.8's probabilities (per sample unless stated):

1. spatial (:class:`SpatialTransform`): rotation (p 0.2; +-30 deg about every axis in 3D,
   +-180 deg in-plane for dummy 2D, +-15 or +-180 deg in 2D depending on patch aspect),
   isotropic scaling 0.7-1.4 (p 0.2), no elastic deformation, linear interpolation of the
   image and of per-label indicators for the segmentation, centre crop from the enlarged
   initial patch to the final patch; the segmentation is padded with -1;
2. Gaussian noise (variance 0-0.1, p 0.1); Gaussian blur (sigma 0.5-1 per axis and channel,
   p 0.2, per channel 0.5); multiplicative brightness 0.75-1.25 (p 0.15); contrast
   0.75-1.25, value range kept (p 0.15); simulated low resolution (zoom 0.5-1, p 0.25, per
   channel 0.5); gamma 0.7-1.5 on the inverted image (p 0.1) and on the image (p 0.3),
   mean and standard deviation retained;
3. mirroring along every allowed axis with p 0.5 each;
4. channels normalised inside the nonzero mask are set to 0 outside it; -1 -> 0 in the
   segmentation; cascade: the previous stage's segmentation becomes one-hot input channels
   (training: random dilation/erosion/opening/closing, p 0.4, and removal of a small
   connected component, p 0.2, each per label 0.5); deep-supervision targets by
   nearest-neighbour downsampling.

Images stay float32 and segmentations int16 from the loader to the loss.

"Dummy 2D" augmentation is used for 3D patches that are strongly anisotropic
(``max(patch) / patch[0] > 3``): the spatial transform then runs slice-wise in 2D (the
slices are stacked as channels) and low-resolution simulation leaves the first axis alone.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.remove_connected_components import \
    RemoveRandomConnectedComponentFromOneHotEncodingTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

log = logging.getLogger(__name__)

from kubeseg.anisotropy import ANISOTROPY_THRESHOLD as ANISO_THRESHOLD  # noqa: E402 - the one owner
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
# pipelines
# ----------------------------------------------------------------------------------------
class BatchAugmentation:
    """Run a per-sample batchgeneratorsv2 pipeline over a loader batch and collate.

    Called like a batchgenerators transform, ``t(**batch)`` with ``batch = {'data': (b, c,
    *s) float32, 'seg': (b, k, *s) int, 'keys': ...}`` (numpy arrays or tensors); returns
    ``{'data': float32 tensor, 'target': int16 tensor or list of them (one per deep-
    supervision output), 'keys': ...}``. Samples are modified in place: hand it a batch the
    caller no longer needs.
    """

    def __init__(self, transforms: Sequence[BasicTransform]):
        self.pipeline = ComposeTransforms(list(transforms))

    def __call__(self, **batch) -> dict:
        data = torch.as_tensor(batch["data"])
        seg = torch.as_tensor(batch["seg"])
        if data.dtype != torch.float32:
            data = data.float()
        if seg.dtype != torch.int16:
            seg = seg.to(torch.int16)
        out_data, out_target = None, None
        with torch.no_grad():
            for j in range(data.shape[0]):
                sample = self.pipeline(image=data[j], segmentation=seg[j])
                image, target = sample["image"], sample["segmentation"]
                if out_data is None:
                    out_data = torch.empty((data.shape[0], *image.shape), dtype=torch.float32)
                    out_target = ([torch.empty((data.shape[0], *t.shape), dtype=t.dtype) for t in target]
                                  if isinstance(target, list)
                                  else torch.empty((data.shape[0], *target.shape), dtype=target.dtype))
                out_data[j] = image
                if isinstance(target, list):
                    for o, t in zip(out_target, target):
                        o[j] = t
                else:
                    out_target[j] = target
        return {"data": out_data, "target": out_target, "keys": batch.get("keys")}

    def __repr__(self) -> str:
        return f"BatchAugmentation({self.pipeline.transforms})"


def _sometimes(p: float, transform: BasicTransform) -> RandomTransform:
    """Apply ``transform`` to a sample with probability ``p``."""
    return RandomTransform(transform, apply_probability=p)


def _spatial(params: AugmentationParams) -> list:
    """Rotation + scaling + centre crop (slice-wise for dummy 2D)."""
    # the one rotation range that applies: about every axis in 3D (they are equal), in-plane
    # for 2D and dummy 2D (batchgeneratorsv2 rotates 2D samples by the last angle it draws)
    spatial = SpatialTransform(
        params.patch_size[1:] if params.do_dummy_2d else params.patch_size,
        patch_center_dist_from_border=0, random_crop=False,
        p_elastic_deform=0,
        p_rotation=0.2, rotation=tuple(params.rotation_x),
        p_scaling=0.2, scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False, border_mode_seg="constant", padding_value_seg=-1)
    if params.do_dummy_2d:
        return [Convert3DTo2DTransform(), spatial, Convert2DTo3DTransform()]
    return [spatial]


def _intensity(params: AugmentationParams) -> list:
    """Noise, blur, brightness, contrast, low resolution, gamma (inverted and not)."""
    return [
        _sometimes(0.1, GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True)),
        _sometimes(0.2, GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=True)),
        _sometimes(0.15, MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                           synchronize_channels=False, p_per_channel=1)),
        _sometimes(0.15, ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                           synchronize_channels=False, p_per_channel=1)),
        _sometimes(0.25, SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                        synchronize_axes=True,
                                                        ignore_axes=(0,) if params.do_dummy_2d else None,
                                                        allowed_channels=None, p_per_channel=0.5)),
        _sometimes(0.1, GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1)),
        _sometimes(0.3, GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1)),
    ]


def _targets(deep_supervision_scales, is_cascaded, foreground_labels, training: bool,
             regions=None, ignore_label=None) -> list:
    """Label clean-up, cascade inputs, region channels, deep-supervision targets (training and validation).

    Regions: the label map becomes one binary channel per region (plus, with an ignore label, a
    last channel marking the ignored voxels), as nnU-Net's ConvertSegmentationToRegionsTransform.
    """
    t: list = [RemoveLabelTransform(-1, 0)]
    if is_cascaded:
        if not foreground_labels:
            raise ValueError("cascade augmentation needs foreground_labels")
        t.append(MoveSegAsOneHotToDataTransform(source_channel_idx=1, all_labels=list(foreground_labels),
                                                remove_channel_from_source=True))
        if training:
            onehot = list(range(-len(foreground_labels), 0))
            t.append(_sometimes(0.4, ApplyRandomBinaryOperatorTransform(channel_idx=onehot, strel_size=(1, 8),
                                                                        p_per_label=0.5)))
            t.append(_sometimes(0.2, RemoveRandomConnectedComponentFromOneHotEncodingTransform(
                channel_idx=onehot, fill_with_other_class_p=0, dont_do_if_covers_more_than_x_percent=0.15,
                p_per_label=0.5)))
    if regions is not None:
        targets = [list(r) for r in regions] + ([ignore_label] if ignore_label is not None else [])
        t.append(ConvertSegmentationToRegionsTransform(regions=targets, channel_in_seg=0))
    if deep_supervision_scales is not None:
        t.append(DownsampleSegForDSTransform(ds_scales=[list(s) for s in deep_supervision_scales]))
    return t


def get_training_transforms(params: AugmentationParams,
                            deep_supervision_scales: Optional[Sequence[Sequence[float]]],
                            use_mask_for_norm: Optional[Sequence[bool]] = None,
                            is_cascaded: bool = False,
                            foreground_labels: Optional[Sequence[int]] = None,
                            regions=None, ignore_label: Optional[int] = None) -> BatchAugmentation:
    """nnU-Net's training augmentation (see module docstring)."""
    t = _spatial(params) + _intensity(params)
    if params.mirror_axes:
        t.append(MirrorTransform(allowed_axes=tuple(params.mirror_axes)))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        t.append(MaskImageTransform(apply_to_channels=[i for i, m in enumerate(use_mask_for_norm) if m],
                                    channel_idx_in_seg=0, set_outside_to=0))
    t += _targets(deep_supervision_scales, is_cascaded, foreground_labels, training=True, regions=regions,
                  ignore_label=ignore_label)
    return BatchAugmentation(t)


def get_validation_transforms(deep_supervision_scales: Optional[Sequence[Sequence[float]]],
                              is_cascaded: bool = False,
                              foreground_labels: Optional[Sequence[int]] = None,
                              regions=None, ignore_label: Optional[int] = None) -> BatchAugmentation:
    """Validation batches: no augmentation, only label clean-up, DS targets and tensors."""
    return BatchAugmentation(_targets(deep_supervision_scales, is_cascaded, foreground_labels, training=False,
                                      regions=regions, ignore_label=ignore_label))


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
                   deterministic: bool = False, prefetch: bool = True) -> Augmenter:
    """Wrap ``loader`` + ``transform`` in background workers (0 = run in this process).

    ``deterministic=False`` uses batchgenerators' NonDetMultiThreadedAugmenter (what nnU-Net
    uses: batches come from whichever worker is ready); ``True`` the round-robin
    MultiThreadedAugmenter, which gives a reproducible batch order for fixed seeds.
    ``num_cached``: batches kept ready (default nnU-Net's for training, ``max(6, workers // 2)``).
    ``prefetch``: start the workers now, so that they fill their queues while the caller
    sets up (otherwise they start at the first ``next()``).
    """
    if num_workers <= 0:
        return SingleThreadedAugmenter(loader, transform)
    if seeds is not None:
        seeds = list(seeds)
    if deterministic:
        aug = MultiThreadedAugmenter(loader, transform, num_workers, num_cached_per_queue=num_cached or 2,
                                     seeds=seeds, pin_memory=pin_memory, wait_time=0.002)
    else:
        aug = NonDetMultiThreadedAugmenter(loader, transform, num_workers,
                                           num_cached=num_cached or max(6, num_workers // 2), seeds=seeds,
                                           pin_memory=pin_memory, wait_time=0.002)
    if prefetch:
        aug._start()  # what the first next() would do, without taking a batch
    return aug


def worker_processes(aug: Optional[Augmenter]) -> list:
    """The ``multiprocessing.Process`` objects of an augmenter's workers (none in-process)."""
    return list(getattr(aug, "_processes", None) or [])


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
