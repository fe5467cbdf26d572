import numpy as np
import pytest

from kubeseg.dataset import DatasetSpec
from kubeseg.fingerprint import Fingerprint
from kubeseg.planning.normalization_choice import normalization_schemes
from kubeseg.planning.planner import (fullres_target_spacing, plan_experiment, planner_settings, PlannerSettings,
                                      transpose_for)

STATS = {"0": dict(mean=0.0, median=0.0, std=1.0, min=-1.0, max=1.0, percentile_99_5=1.0, percentile_00_5=-1.0)}


def spec(channels=None, n=10):
    return DatasetSpec(channels or {0: "CT"}, {"background": 0, "organ": 1, "tumor": 2}, n, ".nii.gz", "t")


def fingerprint(spacings, shapes, rel=1.0):
    return Fingerprint([list(s) for s in spacings], [list(s) for s in shapes], STATS, rel)


def test_target_spacing_is_median_for_ordinary_data():
    fp = fingerprint([(1, 1, 1), (2, 1, 1), (3, 1, 1)], [(100, 100, 100)] * 3)
    assert list(fullres_target_spacing(fp, PlannerSettings())) == [2, 1, 1]


def test_anisotropic_data_with_few_slices_takes_the_10th_percentile_out_of_plane():
    spacings = [(z, 0.8, 0.8) for z in (2.5, 4, 5, 5, 5, 6, 6)]
    fp = fingerprint(spacings, [(40, 512, 512)] * 7)
    target = fullres_target_spacing(fp, PlannerSettings())
    assert target[0] == pytest.approx(np.percentile([s[0] for s in spacings], 10))
    assert target[0] < 5  # finer than the median


def test_transpose_moves_the_coarsest_axis_first():
    forward, backward = transpose_for(np.array([0.8, 0.8, 5.0]))
    assert forward == [2, 0, 1]
    assert [forward[b] for b in backward] == [0, 1, 2]


def test_large_images_get_a_lowres_configuration_and_the_cascade():
    fp = fingerprint([(1, 1, 1)] * 10, [(320, 320, 320)] * 10)
    plans = plan_experiment(spec(), fp, PlannerSettings())
    configs = plans["configurations"]
    assert {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"} <= set(configs)
    assert configs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    assert configs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert all(lo > hi for lo, hi in zip(configs["3d_lowres"]["spacing"], configs["3d_fullres"]["spacing"]))
    assert configs["3d_fullres"]["batch_dice"] is True and configs["3d_lowres"]["batch_dice"] is False


def test_small_images_get_no_lowres_and_patches_cover_them():
    fp = fingerprint([(1, 1, 1)] * 10, [(60, 70, 80)] * 10)
    configs = plan_experiment(spec(), fp, PlannerSettings())["configurations"]
    assert "3d_lowres" not in configs and "3d_cascade_fullres" not in configs
    full = configs["3d_fullres"]
    assert all(p >= m for p, m in zip(full["patch_size"], (60, 70, 80)))
    assert full["batch_dice"] is False


def test_memory_budget_and_width_scale_the_plans():
    fp = fingerprint([(1, 1, 1)] * 50, [(256, 256, 256)] * 50)
    small = plan_experiment(spec(n=50), fp, planner_settings("small"))["configurations"]["3d_fullres"]
    big = plan_experiment(spec(n=50), fp, PlannerSettings(gpu_memory_gb=24))["configurations"]["3d_fullres"]
    default = plan_experiment(spec(n=50), fp, PlannerSettings())["configurations"]["3d_fullres"]
    assert np.prod(small["patch_size"]) < np.prod(default["patch_size"]) <= np.prod(big["patch_size"])
    assert small["architecture"]["arch_kwargs"]["features_per_stage"][0] == 8
    assert max(default["architecture"]["arch_kwargs"]["features_per_stage"]) == 320


def test_batch_size_never_covers_more_than_5_percent_of_a_tiny_dataset_but_stays_at_least_2():
    fp = fingerprint([(1, 1, 1)] * 2, [(40, 40, 40)] * 2)
    configs = plan_experiment(spec(n=2), fp, PlannerSettings())["configurations"]
    assert configs["3d_fullres"]["batch_size"] == 2
    patch_2d = np.prod(configs["2d"]["patch_size"])
    assert configs["2d"]["batch_size"] == round(0.05 * 2 * 40**3 / patch_2d)  # the cap, not the memory budget


def test_normalization_follows_channel_names_and_cropping():
    schemes, mask = normalization_schemes({0: "CT", 1: "T2", 2: "noNorm"}, 0.5)
    assert schemes == ["CTNormalization", "ZScoreNormalization", "NoNormalization"]
    assert mask == [False, True, False]
    assert normalization_schemes({0: "T1"}, 0.9)[1] == [False]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown planner preset"):
        planner_settings("huge")
