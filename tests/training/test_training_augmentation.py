"""Augmentation pipeline (batchgeneratorsv2): shapes, dtypes, deep-supervision targets, that it
really augments, and the background worker pool."""
import multiprocessing

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from kubeseg.training.augmentation import (configure_augmentation, get_training_transforms,
                                           get_validation_transforms, running_augmenter)
from kubeseg.training.data import PatchLoader, PreprocessedDataset
from kubeseg.training.plans import deep_supervision_scales


def _batch(patch, b=2, c=1, seg_channels=1, seed=0):
    rng = np.random.RandomState(seed)
    data = rng.normal(size=(b, c, *patch)).astype(np.float32)
    seg = (rng.uniform(size=(b, seg_channels, *patch)) > 0.7).astype(np.int16)
    seg[:, :, :2] = -1
    return {"data": data, "seg": seg, "keys": [f"k{i}" for i in range(b)]}


def _blob_batch(patch, b=2):
    """A smooth image whose label is its bright ellipsoid, so augmented outputs can be checked
    for consistency between image and target."""
    grids = np.meshgrid(*[np.linspace(-1, 1, p) for p in patch], indexing="ij")
    inside = sum((g / 0.45) ** 2 for g in grids) < 1
    data = np.broadcast_to((inside * 2.0 + 0.1 * grids[-1]).astype(np.float32), (b, 1, *patch)).copy()
    seg = np.broadcast_to(inside.astype(np.int16), (b, 1, *patch)).copy()
    return {"data": data, "seg": seg, "keys": list(range(b))}


@pytest.mark.parametrize("patch,strides", [
    ((16, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    ((8, 64, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2]]),   # anisotropic -> dummy 2D
    ((48, 40), [[1, 1], [2, 2], [2, 2]]),
])
def test_training_transform_shapes_dtypes_and_ds_targets(patch, strides):
    np.random.seed(0)
    torch.manual_seed(0)
    aug = configure_augmentation(patch)
    assert aug.do_dummy_2d == (patch == (8, 64, 48))
    scales = deep_supervision_scales(strides)
    t = get_training_transforms(aug, scales)
    if aug.do_dummy_2d:  # the spatial transform runs on slices stacked as channels
        first = t.pipeline.transforms
        assert isinstance(first[0], Convert3DTo2DTransform) and first[1].patch_size == patch[1:]
    for i in range(8):  # several draws so rotations / scalings / mirroring all occur
        out = t(**_batch(aug.initial_patch_size, seed=i))
        assert isinstance(out["data"], torch.Tensor) and out["data"].dtype == torch.float32
        assert out["data"].shape == (2, 1, *patch)
        expected = [(2, 1, *(int(round(p * s)) for p, s in zip(patch, sc))) for sc in scales]
        assert [tuple(x.shape) for x in out["target"]] == expected
        assert all(x.dtype == torch.int16 for x in out["target"])
        assert set(torch.unique(out["target"][0]).tolist()) <= {0, 1}  # -1 removed, no interpolated labels
        assert torch.isfinite(out["data"]).all()
        assert out["keys"] == ["k0", "k1"]


def test_deep_supervision_targets_are_nearest_downsampled_full_resolution_target():
    aug = configure_augmentation((16, 32, 32))
    scales = deep_supervision_scales([[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    out = get_validation_transforms(scales)(**_batch((16, 32, 32)))
    full, half = out["target"]
    ref = torch.nn.functional.interpolate(full.float(), size=(8, 16, 16), mode="nearest-exact").to(torch.int16)
    assert torch.equal(half, ref)
    assert aug.mirror_axes == (0, 1, 2)


def test_training_pipeline_changes_the_data_consistently():
    """Over many draws, the images differ from the plain centre crop (spatial and intensity
    augmentation happen), with nnU-Net's frequencies; the target moves with the image."""
    patch = (16, 32, 32)
    aug = configure_augmentation(patch)
    t = get_training_transforms(aug, None)
    src = _blob_batch(aug.initial_patch_size, b=1)
    lb = [(i - p) // 2 for i, p in zip(aug.initial_patch_size, patch)]
    crop = tuple(slice(a, a + p) for a, p in zip(lb, patch))
    plain_img = torch.from_numpy(src["data"][0, 0][crop])
    plain_seg = torch.from_numpy(src["seg"][0, 0][crop])
    torch.manual_seed(1)
    np.random.seed(1)
    n, img_changed, seg_changed, agree = 60, 0, 0, []
    for _ in range(n):
        out = t(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in src.items()})
        img, seg = out["data"][0, 0], out["target"][0, 0]
        assert out["data"].shape == (1, 1, *patch) and out["target"].dtype == torch.int16
        img_changed += not torch.allclose(img, plain_img, atol=1e-5)
        seg_changed += not torch.equal(seg, plain_seg)
        # bright voxels of the (possibly rotated, scaled, mirrored) image carry the label
        if seg.sum() > 50:
            agree.append(float((img[seg == 1].mean() > img[seg == 0].mean() + 0.5)))
    # P(no transform at all) is about 0.8*0.8*0.9*...*0.5^3: a handful of 60 samples at most
    assert img_changed >= 0.8 * n, img_changed
    # segmentation changes only through rotation/scaling (p ~0.36) or mirroring of this
    # symmetric-in-label blob (no change): some but not all samples
    assert 0 < seg_changed < n, seg_changed
    assert np.mean(agree) == 1.0


def test_pipeline_uses_nnunet_probabilities():
    aug = configure_augmentation((16, 32, 32))
    t = get_training_transforms(aug, None)
    spatial = [x for x in t.pipeline.transforms if isinstance(x, SpatialTransform)][0]
    assert (spatial.p_rotation, spatial.p_scaling, spatial.scaling) == (0.2, 0.2, (0.7, 1.4))
    assert spatial.p_elastic_deform == 0 and spatial.padding_value_seg == -1
    assert np.allclose(spatial.rotation, (-np.pi / 6, np.pi / 6))
    probs = [(type(x.transform).__name__, x.apply_probability) for x in t.pipeline.transforms
             if isinstance(x, RandomTransform)]
    assert probs == [("GaussianNoiseTransform", 0.1), ("GaussianBlurTransform", 0.2),
                     ("MultiplicativeBrightnessTransform", 0.15), ("ContrastTransform", 0.15),
                     ("SimulateLowResolutionTransform", 0.25), ("GammaTransform", 0.1), ("GammaTransform", 0.3)]
    gammas = [x.transform for x in t.pipeline.transforms
              if isinstance(x, RandomTransform) and type(x.transform).__name__ == "GammaTransform"]
    assert [g.p_invert_image for g in gammas] == [1, 0] and all(g.p_retain_stats == 1 for g in gammas)
    dummy = get_training_transforms(configure_augmentation((8, 64, 48)), None)
    lowres = [x.transform for x in dummy.pipeline.transforms if isinstance(x, RandomTransform)
              and type(x.transform).__name__ == "SimulateLowResolutionTransform"][0]
    assert lowres.ignore_axes == (0,)


def test_mask_for_norm_sets_outside_to_zero():
    aug = configure_augmentation((16, 32, 32))
    batch = _batch((16, 32, 32))
    batch["data"] += 5.0
    out = get_validation_transforms(None)(**{k: v for k, v in batch.items()})
    assert (out["data"][:, :, :2] != 0).all()  # validation does not mask
    # training with use_mask_for_norm: wherever the seg was -1 (here: the first two slices,
    # unless moved by rotation/scaling/mirroring) the image is 0
    torch.manual_seed(0)
    np.random.seed(0)
    t = get_training_transforms(aug, None, use_mask_for_norm=[True])
    b = _batch(aug.initial_patch_size)
    b["seg"][:] = -1
    out = t(**b)
    assert (out["data"] == 0).all() and (out["target"] == 0).all()


def test_no_deep_supervision_gives_single_target():
    aug = configure_augmentation((16, 32, 32))
    out = get_training_transforms(aug, None)(**_batch(aug.initial_patch_size))
    assert isinstance(out["target"], torch.Tensor) and out["target"].shape == (2, 1, 16, 32, 32)
    assert out["target"].dtype == torch.int16


def test_cascade_moves_previous_segmentation_to_one_hot_input():
    aug = configure_augmentation((16, 32, 32))
    batch = _batch(aug.initial_patch_size, seg_channels=2)
    out = get_training_transforms(aug, None, is_cascaded=True, foreground_labels=[1])(**batch)
    assert out["data"].shape == (2, 2, 16, 32, 32) and out["target"].shape == (2, 1, 16, 32, 32)
    val = get_validation_transforms(None, is_cascaded=True, foreground_labels=[1, 2])(
        **_batch((16, 32, 32), seg_channels=2))
    assert val["data"].shape == (2, 3, 16, 32, 32)
    assert set(np.unique(val["data"][:, 1:].numpy())) <= {0.0, 1.0}


def test_worker_pool_yields_batches_and_shuts_down(tiny_pre):
    ds = PreprocessedDataset(tiny_pre / "nnUNetPlans_3d_fullres")
    aug = configure_augmentation((16, 32, 32))
    dl = PatchLoader(ds, 2, aug.initial_patch_size, aug.patch_size)
    t = get_training_transforms(aug, deep_supervision_scales([[1, 1, 1], [2, 2, 2], [2, 2, 2]]))
    before = len(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="boom"):
        with running_augmenter(dl, t, 2, seeds=[1, 2]) as gen:
            # prefetch: the workers run before the first batch is asked for
            assert len(multiprocessing.active_children()) >= before + 2
            for _ in range(3):
                b = next(gen)
                assert b["data"].shape == (2, 1, 16, 32, 32) and b["data"].dtype == torch.float32
                assert [tuple(x.shape) for x in b["target"]] == [(2, 1, 16, 32, 32), (2, 1, 8, 16, 16)]
                assert b["target"][0].dtype == torch.int16
            raise RuntimeError("boom")
    assert len(multiprocessing.active_children()) == before
