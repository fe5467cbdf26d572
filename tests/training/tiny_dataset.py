"""Helpers for the training tests: a tiny nnU-Net-style preprocessed dataset on disk."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_arch_kwargs(dim: int = 3, features=(4, 8, 16), strides=None) -> dict:
    n = len(features)
    if strides is None:
        strides = [[1] * dim] + [[2] * dim] * (n - 1)
    conv = "torch.nn.modules.conv.Conv3d" if dim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = ("torch.nn.modules.instancenorm.InstanceNorm3d" if dim == 3
            else "torch.nn.modules.instancenorm.InstanceNorm2d")
    return {
        "n_stages": n,
        "features_per_stage": list(features),
        "conv_op": conv,
        "kernel_sizes": [[3] * dim] * n,
        "strides": strides,
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
        "conv_bias": True,
        "norm_op": norm,
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def tiny_plans(patch=(16, 32, 32), batch_size=2) -> dict:
    """nnU-Net v2 plans schema with a tiny 3d_fullres and 2d, plus lowres/cascade entries."""
    arch3 = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "arch_kwargs": tiny_arch_kwargs(3),
             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    arch2 = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "arch_kwargs": tiny_arch_kwargs(2, (4, 8, 16)),
             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    common = {"normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "batch_dice": True}
    return {
        "dataset_name": "Dataset999_Tiny",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0],
        "original_median_shape_after_transp": [24, 48, 48],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": {**common, "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                   "batch_size": 4, "patch_size": [48, 48], "median_image_size_in_voxels": [48, 48],
                   "spacing": [1.0, 1.0], "architecture": arch2, "batch_dice": True},
            "3d_fullres": {**common, "data_identifier": "nnUNetPlans_3d_fullres",
                           "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
                           "patch_size": list(patch), "median_image_size_in_voxels": [24, 48, 48],
                           "spacing": [2.0, 1.0, 1.0], "architecture": arch3, "batch_dice": False},
            "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                          "spacing": [3.0, 2.0, 2.0], "next_stage": "3d_cascade_fullres"},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }


def tiny_dataset_json(n_cases: int) -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
            "numTraining": n_cases, "file_ending": ".nii.gz"}


def make_case(rng: np.random.RandomState, shape=(24, 48, 48)):
    """Noise inside a cylinder 'body' (seg -1 outside) with a bright ellipsoid 'organ'."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2) < (0.47 * shape[1]) ** 2
    c = [rng.randint(7, shape[0] - 7), rng.randint(14, shape[1] - 14), rng.randint(14, shape[2] - 14)]
    r = [rng.uniform(3, 5), rng.uniform(5, 9), rng.uniform(5, 9)]
    organ = (((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2) < 1
    organ &= body
    img = rng.normal(0, 1, shape).astype(np.float32) + 2.5 * organ
    img[~body] = 0
    seg = organ.astype(np.int8)
    seg[~body] = -1
    return img[None].astype(np.float32), seg[None]


def write_case(folder: Path, key: str, img: np.ndarray, seg: np.ndarray, spacing):
    np.save(folder / f"{key}.npy", img)
    np.save(folder / f"{key}_seg.npy", seg)
    locs = {}
    for lab in [1]:
        idx = np.argwhere(seg == lab)
        if len(idx) > 50:
            idx = idx[np.random.RandomState(0).choice(len(idx), 50, replace=False)]
        locs[str(lab)] = idx.tolist()
    props = {"spacing": list(spacing), "shape_before_cropping": list(img.shape[1:]),
             "bbox_used_for_cropping": [[0, s] for s in img.shape[1:]],
             "shape_after_cropping_and_before_resampling": list(img.shape[1:]),
             "class_locations": locs, "sitk_stuff": {"spacing": list(spacing)[::-1],
                                                     "origin": [0.0, 0.0, 0.0],
                                                     "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]}}
    with open(folder / f"{key}.json", "w") as f:
        json.dump(props, f)


def make_tiny_preprocessed(root: Path, n_cases: int = 10, seed: int = 0, shape=(24, 48, 48),
                           configurations=("3d_fullres",)) -> Path:
    """Write ``root/PRE`` like kubeseg's preprocessing: plans, dataset.json, arrays, props."""
    pre = Path(root) / "PRE"
    pre.mkdir(parents=True, exist_ok=True)
    plans = tiny_plans()
    ds = tiny_dataset_json(n_cases)
    (pre / "plans.json").write_text(json.dumps(plans, indent=2))
    (pre / "dataset.json").write_text(json.dumps(ds, indent=2))
    (pre / "gt_segmentations").mkdir(exist_ok=True)
    rng = np.random.RandomState(seed)
    cases = [make_case(rng, shape) for _ in range(n_cases)]
    for cfg in configurations:
        folder = pre / plans["configurations"][cfg].get("data_identifier", "nnUNetPlans_3d_fullres")
        folder.mkdir(exist_ok=True)
        for i, (img, seg) in enumerate(cases):
            write_case(folder, f"case_{i:03d}", img, seg, [2.0, 1.0, 1.0])
    return pre

