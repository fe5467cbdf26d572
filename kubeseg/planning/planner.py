"""The experiment planner: nnU-Net v2's default rules, as plain functions over a fingerprint.

Plans are written in nnU-Net v2's ``plans.json`` schema so that nnU-Net (and anything that reads
its plans) accepts them. Every number that fixes the outcome is a field of
:class:`PlannerSettings`; the defaults are nnU-Net's, and the ``small`` preset shrinks the memory
budget and the network width so that a 2-core CPU can train the result in minutes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kubeseg import __version__
from kubeseg.anisotropy import ANISOTROPY_THRESHOLD
from kubeseg.dataset import DatasetSpec
from kubeseg.fingerprint import Fingerprint
from kubeseg.planning.normalization_choice import normalization_schemes
from kubeseg.planning.topology import Topology, pool_and_conv_props
from kubeseg.planning.vram import feature_map_size

log = logging.getLogger(__name__)

# nnU-Net's reference: a 3D U-Net whose feature maps total this many voxels (batch 2) or a 2D one
# with this many (batch 12) is what fits the reference GPU memory. Arbitrary but calibrated.
REFERENCE_FEATURE_MAP_3D = 560_000_000
REFERENCE_FEATURE_MAP_2D = 85_000_000
REFERENCE_GPU_MEMORY_GB = 8
REFERENCE_BATCH_3D = 2
REFERENCE_BATCH_2D = 12
CONVS_PER_STAGE = 2
LOWRES_SPACING_STEP = 1.03
NETWORK_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnU-Net's residual encoder U-Net: residual blocks per encoder stage, one conv per decoder stage
RESENC_BLOCKS_ENCODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
RESENC_BLOCKS_DECODER = (1,) * 12
SHARED_DATA_PLANS = "nnUNetPlans"  # the ResEnc planners reuse the default planner's 2d / 3d_fullres data


@dataclass(frozen=True)
class PlannerSettings:
    """The knobs of the planner. Defaults are nnU-Net v2's ``ExperimentPlanner``."""

    gpu_memory_gb: float = 8.0
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    plans_name: str = "nnUNetPlans"
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    lowres_threshold: float = 0.25  # plan 3d_lowres when the full-res patch covers less than this of the median image
    max_dataset_fraction: float = 0.05  # one batch may cover at most this fraction of the dataset's voxels
    min_batch_size: int = 2
    min_feature_map_edge: int = 4
    target_spacing: tuple[float, ...] | None = None  # overrides the 3d_fullres spacing (numpy axis order)
    network: str = "plain"  # "plain" (PlainConvUNet) or "resenc" (ResidualEncoderUNet)
    # feature-map voxels that fit reference_gpu_memory_gb (3D at batch 2, 2D at batch 12)
    reference_feature_map_3d: int = REFERENCE_FEATURE_MAP_3D
    reference_feature_map_2d: int = REFERENCE_FEATURE_MAP_2D
    reference_gpu_memory_gb: float = REFERENCE_GPU_MEMORY_GB
    # the default planner shrinks the patch until the minimum batch (2) fits; the ResEnc planners
    # until one reference batch (2 in 3D, 12 in 2D) would
    shrink_to_min_batch: bool = True


def _resenc(gb: float, ref_3d: int, ref_2d: int, name: str) -> PlannerSettings:
    return PlannerSettings(gpu_memory_gb=gb, reference_gpu_memory_gb=gb, reference_feature_map_3d=ref_3d,
                           reference_feature_map_2d=ref_2d, plans_name=name, network="resenc",
                           max_dataset_fraction=1.0, shrink_to_min_batch=False)


PRESETS: dict[str, PlannerSettings] = {
    "default": PlannerSettings(),
    # A 2-core CPU trains an iteration of this in about a second on the synthetic datasets.
    "small": PlannerSettings(gpu_memory_gb=0.5, base_features=8, max_features_3d=64, max_features_2d=64,
                             plans_name="kubesegSmallPlans"),
    # nnU-Net v2's nnUNetPlannerResEncM / L / XL (about 8-11, 24 and 40 GB of GPU memory)
    "resenc-m": _resenc(8, 680_000_000, 135_000_000, "nnUNetResEncUNetMPlans"),
    "resenc-l": _resenc(24, 2_100_000_000, 380_000_000, "nnUNetResEncUNetLPlans"),
    "resenc-xl": _resenc(40, 3_600_000_000, 560_000_000, "nnUNetResEncUNetXLPlans"),
}


def planner_settings(preset: str = "default", **overrides: Any) -> PlannerSettings:
    """A preset with some fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown planner preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def fullres_target_spacing(fp: Fingerprint, s: PlannerSettings) -> np.ndarray:
    """Median spacing; for strongly anisotropic data with few slices, the 10th percentile out of plane.

    Resampling such data to the median out-of-plane spacing would interpolate too few slices
    into too many; the finer percentile keeps more of the real slices.
    """
    if s.target_spacing is not None:
        return np.array(s.target_spacing, dtype=float)
    spacings = np.vstack(fp.spacings)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(np.vstack(fp.shapes_after_crop), 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > s.anisotropy_threshold * max(target[a] for a in others)
    aniso_voxels = target_size[worst] * s.anisotropy_threshold < min(target_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        out_of_plane = np.percentile(spacings[:, worst], 10)
        finest_other = max(target[a] for a in others)
        if out_of_plane < finest_other:  # never finer than the in-plane axes
            out_of_plane = max(finest_other, out_of_plane) + 1e-5
        target[worst] = out_of_plane
    return target


def transpose_for(target_spacing: np.ndarray) -> tuple[list[int], list[int]]:
    """Move the coarsest axis first, so that 2D slices are taken across it."""
    coarsest = int(np.argmax(target_spacing))
    forward = [coarsest] + [a for a in range(3) if a != coarsest]
    backward = [forward.index(a) for a in range(3)]
    return forward, backward


def new_shape(old_shape, old_spacing, new_spacing) -> np.ndarray:
    """Voxel counts after resampling from ``old_spacing`` to ``new_spacing``."""
    return np.array([int(round(o / n * s)) for o, n, s in zip(old_spacing, new_spacing, old_shape)])


def _features(num_stages: int, s: PlannerSettings, dim: int) -> tuple[int, ...]:
    cap = s.max_features_2d if dim == 2 else s.max_features_3d
    return tuple(min(cap, s.base_features * 2**i) for i in range(num_stages))


def architecture(topology: Topology, s: PlannerSettings) -> dict:
    """The ``architecture`` entry of a configuration, in nnU-Net v2's schema."""
    dim = len(topology.patch_size)
    n = topology.num_stages
    if s.network == "resenc":
        name, blocks = RESENC_CLASS, {"n_blocks_per_stage": list(RESENC_BLOCKS_ENCODER[:n]),
                                      "n_conv_per_stage_decoder": list(RESENC_BLOCKS_DECODER[:n - 1])}
    else:
        name, blocks = NETWORK_CLASS, {"n_conv_per_stage": [CONVS_PER_STAGE] * n,
                                       "n_conv_per_stage_decoder": [CONVS_PER_STAGE] * (n - 1)}
    return {
        "network_class_name": name,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(_features(n, s, dim)),
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [list(k) for k in topology.kernel_sizes],
            "strides": [list(st) for st in topology.strides],
            **blocks,
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _resampling_entries() -> dict:
    fn = "resample_data_or_seg_to_shape"
    kw = lambda is_seg, order: {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}  # noqa: E731
    return {
        "resampling_fn_data": fn,
        "resampling_fn_seg": fn,
        "resampling_fn_data_kwargs": kw(False, 3),
        "resampling_fn_seg_kwargs": kw(True, 1),
        "resampling_fn_probabilities": fn,
        "resampling_fn_probabilities_kwargs": kw(False, 1),
    }


def plan_configuration(spacing, median_shape, data_identifier: str, n_voxels_dataset: float,
                       spec: DatasetSpec, fp: Fingerprint, s: PlannerSettings, cache: dict) -> dict:
    """Patch size, topology and batch size for one configuration at ``spacing``.

    Start from a patch with the data's aspect ratio in mm, clipped to the median image, and shrink
    its relatively largest axis until the estimated feature-map memory fits the budget; spare
    memory goes into the batch size, capped at ``max_dataset_fraction`` of the dataset.
    """
    spacing = np.asarray(spacing, dtype=float)
    dim = len(spacing)
    median_shape = np.asarray(median_shape)[:dim]
    inverse = 1 / spacing
    edge = 256**3 if dim == 3 else 2048**2
    initial = [round(i) for i in inverse * (edge / np.prod(inverse)) ** (1 / dim)]
    initial = [min(i, m) for i, m in zip(initial, median_shape)]
    topo = pool_and_conv_props(spacing, initial, s.min_feature_map_edge)

    def estimate(t: Topology) -> int:
        key = (t.patch_size, t.strides)
        if key not in cache:
            cache[key] = feature_map_size(architecture(t, s), t.patch_size, spec.num_channels, len(spec.labels))
        return cache[key]

    reference = (s.reference_feature_map_2d if dim == 2 else s.reference_feature_map_3d) * \
        (s.gpu_memory_gb / s.reference_gpu_memory_gb)
    ref_batch = REFERENCE_BATCH_2D if dim == 2 else REFERENCE_BATCH_3D
    scale = 2 / ref_batch if s.shrink_to_min_batch else 1
    est = estimate(topo)
    while est * scale > reference:
        axis = int(np.argsort([p / m for p, m in zip(topo.patch_size, median_shape)])[-1])
        # Shrink by the divisor of the shrunken patch, not the current one, so that no valid size is skipped.
        trial = list(topo.patch_size)
        trial[axis] -= topo.divisor[axis]
        step = pool_and_conv_props(spacing, trial, s.min_feature_map_edge).divisor[axis]
        patch = list(topo.patch_size)
        patch[axis] -= step
        topo = pool_and_conv_props(spacing, patch, s.min_feature_map_edge)
        est = estimate(topo)

    batch = round(reference / est * ref_batch)
    batch_cap = round(n_voxels_dataset * s.max_dataset_fraction / np.prod(topo.patch_size, dtype=np.float64))
    batch = max(min(batch, batch_cap), s.min_batch_size)
    schemes, use_mask = normalization_schemes(spec.channel_names, fp.median_relative_size_after_cropping)
    return {
        "data_identifier": data_identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch),
        "patch_size": [int(p) for p in topo.patch_size],
        "median_image_size_in_voxels": [float(m) for m in median_shape],
        "spacing": [float(x) for x in spacing],
        "normalization_schemes": schemes,
        "use_mask_for_norm": use_mask,
        **_resampling_entries(),
        "architecture": architecture(topo, s),
    }


def data_identifier(s: PlannerSettings, configuration_name: str) -> str:
    """``<plans>_<configuration>``; the ResEnc planners share the default planner's 2d and 3d_fullres data
    (same spacing and preprocessing), as nnU-Net does."""
    shared = s.network == "resenc" and configuration_name in ("2d", "3d_fullres")
    return f"{SHARED_DATA_PLANS if shared else s.plans_name}_{configuration_name}"


def plan_experiment(spec: DatasetSpec, fp: Fingerprint, s: PlannerSettings = PlannerSettings(),
                    dataset_name: str = "") -> dict:
    """All configurations for a dataset, as an nnU-Net v2 ``plans.json`` dict."""
    cache: dict = {}
    fullres_spacing = fullres_target_spacing(fp, s)
    forward, backward = transpose_for(fullres_spacing)
    spacing_t = fullres_spacing[forward]
    shapes = [new_shape(sh, sp, fullres_spacing) for sp, sh in zip(fp.spacings, fp.shapes_after_crop)]
    median_t = np.median(shapes, 0)[forward]
    n_voxels = float(np.prod(median_t, dtype=np.float64) * spec.num_training)
    ident = lambda c: data_identifier(s, c)  # noqa: E731

    configurations: dict[str, dict] = {}
    fullres = lowres = None
    if median_t[0] != 1:
        fullres = plan_configuration(spacing_t, median_t, ident("3d_fullres"), n_voxels, spec, fp, s, cache)
        lowres = _plan_lowres(fullres, median_t, spec, fp, s, cache, ident("3d_lowres"))
        fullres["batch_dice"] = lowres is not None
    plan_2d = plan_configuration(spacing_t[1:], median_t[1:], ident("2d"), n_voxels, spec, fp, s, cache)
    plan_2d["batch_dice"] = True
    configurations["2d"] = plan_2d
    if lowres is not None:
        configurations["3d_lowres"] = {**lowres, "next_stage": "3d_cascade_fullres"}
    if fullres is not None:
        configurations["3d_fullres"] = fullres
        if lowres is not None:
            configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

    return {
        "dataset_name": dataset_name or spec.name,
        "plans_name": s.plans_name,
        "original_median_spacing_after_transp": [float(x) for x in np.median(fp.spacings, 0)[forward]],
        "original_median_shape_after_transp": [int(round(x)) for x in np.median(fp.shapes_after_crop, 0)[forward]],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": forward,
        "transpose_backward": backward,
        "configurations": configurations,
        "experiment_planner_used": f"kubeseg {__version__} (nnU-Net v2 ExperimentPlanner rules)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": fp.foreground_intensity_properties_per_channel,
    }


def _plan_lowres(fullres: dict, median_t: np.ndarray, spec: DatasetSpec, fp: Fingerprint,
                 s: PlannerSettings, cache: dict, data_identifier: str) -> dict | None:
    """A coarser configuration when the full-res patch sees too little of the median image.

    The spacing grows 3% at a time, the anisotropic axes first until they are within a factor two
    of the others, until the patch covers ``lowres_threshold`` of the (shrunken) median image.
    Dropped when it would shrink the image by less than half.
    """
    fullres_spacing = np.array(fullres["spacing"])
    median_voxels = np.prod(median_t, dtype=np.float64)
    patch_voxels = np.prod(fullres["patch_size"], dtype=np.float64)
    spacing = fullres_spacing.copy()
    lowres = None
    while patch_voxels / median_voxels < s.lowres_threshold:
        coarsest = spacing.max()
        lagging = coarsest / spacing > 2
        if lagging.any():
            spacing[lagging] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        scaled = fullres_spacing / spacing * median_t
        median_voxels = np.prod(scaled, dtype=np.float64)
        lowres = plan_configuration(spacing, tuple(round(x) for x in scaled), data_identifier,
                                    float(median_voxels * spec.num_training), spec, fp, s, cache)
        patch_voxels = np.prod(lowres["patch_size"], dtype=np.int64)
        log.debug("3d_lowres candidate: spacing %s patch %s", spacing, lowres["patch_size"])
    if lowres is not None and np.prod(median_t, dtype=np.float64) / median_voxels < 2:
        log.info("no 3d_lowres: it would shrink the median image by less than half")
        return None
    if lowres is not None:
        lowres["batch_dice"] = False
    return lowres
