"""Patch sampling: foreground oversampling, padding, 2D slices, DS target shapes."""
import json

import numpy as np
import pytest

from kubeseg.training.augmentation import configure_augmentation, get_validation_transforms
from kubeseg.training.data import PatchLoader, PreprocessedDataset, crop_and_pad, force_foreground
from kubeseg.training.plans import deep_supervision_scales

from tests.oracle import run_oracle
from tiny_dataset import tiny_arch_kwargs


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 5, 7, 12])
def test_forced_items_follow_nnunet_rule(batch_size):
    forced = [force_foreground(j, batch_size, 0.33) for j in range(batch_size)]
    # nnU-Net: the last batch_size - round(batch_size * 0.67) items are forced
    n_random = round(batch_size * (1 - 0.33))
    assert forced == [False] * n_random + [True] * (batch_size - n_random)
    assert sum(forced) == pytest.approx(batch_size / 3, abs=0.67)


def test_forced_patches_contain_foreground_and_fraction(tiny_pre):
    ds = PreprocessedDataset(tiny_pre / "nnUNetPlans_3d_fullres")
    np.random.seed(0)
    # small patches, so that random ones often miss the organ
    dl = PatchLoader(ds, 3, (6, 10, 10), (6, 10, 10), 0.33)
    has_fg = np.zeros(3)
    n = 60
    for _ in range(n):
        b = dl.generate_train_batch()
        assert b["data"].shape == (3, 1, 6, 10, 10) and b["seg"].shape == (3, 1, 6, 10, 10)
        has_fg += (b["seg"] == 1).reshape(3, -1).any(1)
    assert has_fg[2] == n  # the forced (last) third always has foreground
    assert has_fg[:2].mean() < 0.8 * n  # the random ones do not always
    assert has_fg.sum() / (3 * n) >= 1 / 3


def test_initial_patch_is_padded_with_minus_one(tiny_pre):
    ds = PreprocessedDataset(tiny_pre / "nnUNetPlans_3d_fullres")
    aug = configure_augmentation((16, 32, 32))
    dl = PatchLoader(ds, 2, aug.initial_patch_size, aug.patch_size, 0.33)
    # data shape (24, 48, 48), initial patch (35, 51, 42): the z range must hang over the border
    lbs, ubs = dl.get_bbox((24, 48, 48), False, None)
    assert lbs[0] <= 0 and ubs[0] - lbs[0] == 35
    b = dl.generate_train_batch()
    assert b["data"].shape == (2, 1, *aug.initial_patch_size)
    assert (b["seg"] == -1).any()  # padding (and the outside-of-body label)
    arr = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    out = crop_and_pad(arr, [-1, 2], [3, 6], -1)
    assert out.shape == (2, 4, 4) and (out[:, 0] == -1).all() and (out[:, :, 2:] == -1).all()
    np.testing.assert_array_equal(out[:, 1:, :2], arr[:, :3, 2:])


@pytest.mark.integration
def test_initial_patch_size_matches_nnunet(tmp_path):
    patches = [(16, 32, 32), (64, 128, 128), (20, 192, 160)]
    augs = [configure_augmentation(p) for p in patches]
    jobs = [{"patch": list(p), "rot_x": list(a.rotation_x), "rot_y": list(a.rotation_y),
             "rot_z": list(a.rotation_z)} for p, a in zip(patches, augs)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    run_oracle("-m", "tests.oracle.nnunet_calls", "patch-size", str(tmp_path / "jobs.json"), str(tmp_path / "out.json"))
    for patch, aug, ref in zip(patches, augs, json.loads((tmp_path / "out.json").read_text())):
        if aug.do_dummy_2d:
            ref[0] = patch[0]
        assert aug.initial_patch_size == tuple(int(i) for i in ref)
    assert configure_augmentation((20, 192, 160)).do_dummy_2d
    assert not configure_augmentation((64, 128, 128)).do_dummy_2d
    two_d = configure_augmentation((48, 48))
    assert two_d.mirror_axes == (0, 1) and abs(two_d.rotation_x[1] - np.pi) < 1e-9


def test_2d_sampling_and_deep_supervision_targets(tiny_pre):
    ds = PreprocessedDataset(tiny_pre / "nnUNetPlans_3d_fullres")
    dl = PatchLoader(ds, 4, (32, 40), (32, 40), 0.5)
    b = dl.generate_train_batch()
    assert b["data"].shape == (4, 1, 32, 40)
    assert all((b["seg"][j] == 1).any() for j in (2, 3))

    strides = tiny_arch_kwargs(3)["strides"]
    scales = deep_supervision_scales(strides)
    assert scales == [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    dl3 = PatchLoader(ds, 2, (16, 32, 32), (16, 32, 32), 0.33)
    out = get_validation_transforms(scales)(**dl3.generate_train_batch())
    assert [tuple(t.shape) for t in out["target"]] == [(2, 1, 16, 32, 32), (2, 1, 8, 16, 16)]
    assert float(out["target"][0].min()) >= 0  # -1 removed
    anis = deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    assert anis == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]]
