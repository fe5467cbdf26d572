"""Augmentation pipeline shapes and the background worker pool."""
import multiprocessing

import numpy as np
import pytest
import torch

from kubeseg.training.augmentation import (configure_augmentation, get_training_transforms,
                                           get_validation_transforms, running_augmenter)
from kubeseg.training.data import PatchLoader, PreprocessedDataset
from kubeseg.training.plans import deep_supervision_scales


def _batch(patch, b=2, c=1, seg_channels=1, seed=0):
    rng = np.random.RandomState(seed)
    data = rng.normal(size=(b, c, *patch)).astype(np.float32)
    seg = (rng.uniform(size=(b, seg_channels, *patch)) > 0.7).astype(np.int16)
    seg[:, :, :2] = -1
    return {"data": data, "seg": seg}


@pytest.mark.parametrize("patch,strides", [
    ((16, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2]]),
    ((8, 64, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2]]),   # anisotropic -> dummy 2D
    ((48, 40), [[1, 1], [2, 2], [2, 2]]),
])
def test_training_transform_shapes(patch, strides):
    np.random.seed(0)
    aug = configure_augmentation(patch)
    assert aug.do_dummy_2d == (patch == (8, 64, 48))
    scales = deep_supervision_scales(strides)
    t = get_training_transforms(aug, scales)
    for i in range(5):  # several draws so rotations / scalings / mirroring all occur
        out = t(**_batch(aug.initial_patch_size, seed=i))
        assert isinstance(out["data"], torch.Tensor) and out["data"].shape == (2, 1, *patch)
        expected = [tuple(int(round(p * s)) for p, s in zip(patch, sc)) for sc in scales]
        assert [tuple(x.shape[2:]) for x in out["target"]] == expected
        assert float(out["target"][0].min()) >= 0
        assert torch.isfinite(out["data"]).all()


def test_no_deep_supervision_gives_single_target():
    aug = configure_augmentation((16, 32, 32))
    out = get_training_transforms(aug, None)(**_batch(aug.initial_patch_size))
    assert isinstance(out["target"], torch.Tensor) and out["target"].shape == (2, 1, 16, 32, 32)


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
            for _ in range(3):
                b = next(gen)
                assert b["data"].shape == (2, 1, 16, 32, 32)
            assert len(multiprocessing.active_children()) >= before + 2
            raise RuntimeError("boom")
    assert len(multiprocessing.active_children()) == before
