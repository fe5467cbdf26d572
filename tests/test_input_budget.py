"""The resampled-grid bound (kubeseg.input_budget): computed from headers per configuration, the
cascade's first stage included, and refused with the file's name before any voxel is read."""
from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.input_budget import (DEFAULT_MAX_RESAMPLED_VOXELS, GridStage, InputRefused, check_file_grid,
                                  check_resampled_grid, resampled_grid, stages_of)
from kubeseg.preprocessing.resampling import compute_new_shape

from tests.services.bad_inputs import raw_nifti

FULL = GridStage("3d_fullres", (0, 1, 2), (1.0, 0.8, 0.8), 1, 3)
LOW = GridStage("3d_lowres", (0, 1, 2), (2.5, 2.0, 2.0), 1, 3)


def test_grid_matches_preprocessing_rounding_and_transpose():
    shape, spacing = (37, 101, 99), (2.7, 0.93, 0.93)
    assert resampled_grid(shape, spacing, FULL).shape == compute_new_shape(shape, spacing, FULL.spacing)
    # transpose (2, 0, 1): the stage's spacing belongs to the transposed axes
    t = GridStage("3d_fullres", (2, 0, 1), (0.5, 1.0, 2.0), 2, 3)
    grid = resampled_grid(shape, spacing, t)
    assert grid.shape == compute_new_shape([99, 37, 101], [0.93, 2.7, 0.93], [0.5, 1.0, 2.0])
    assert grid.voxels == math.prod(grid.shape)
    assert grid.bytes_estimate == grid.voxels * (2 * 4 + 3 * 8)
    # 2D configurations keep the slice axis as it is
    two_d = GridStage("2d", (0, 1, 2), (0.5, 0.5), 1, 3)
    assert resampled_grid(shape, spacing, two_d).shape[0] == 37


def test_the_issue_repro_is_refused_naming_the_file_and_configuration():
    with pytest.raises(InputRefused) as e:
        check_resampled_grid("giant.nii.gz", (16, 16, 16), (400.0, 400.0, 400.0), [FULL])
    assert e.value.too_large and "giant.nii.gz" in str(e.value) and "3d_fullres" in str(e.value)
    assert "6400x8000x8000" in str(e.value) and str(DEFAULT_MAX_RESAMPLED_VOXELS) in str(e.value)


def test_the_cascade_first_stage_counts_too():
    # fine on 3d_fullres's grid, too big on a finer first stage: the first stage refuses it
    fine_low = GridStage("3d_lowres", (0, 1, 2), (0.1, 0.1, 0.1), 1, 3)
    shape, spacing = (100, 100, 100), (1.0, 0.8, 0.8)
    assert check_resampled_grid("a.nii", shape, spacing, [FULL], 10 ** 7)
    with pytest.raises(InputRefused, match="3d_lowres"):
        check_resampled_grid("a.nii", shape, spacing, [FULL, fine_low], 10 ** 7)


@pytest.mark.parametrize("spacing, too_large, message", [
    ((0.0, 1.0, 1.0), False, "not positive"),
    ((-1.0, 1.0, 1.0), False, "not positive"),
    ((float("nan"), 1.0, 1.0), False, "not positive"),
    ((float("inf"), 1.0, 1.0), False, "not positive"),
    ((1e300, 1e300, 1e300), True, "unbounded"),
    ((1e-9, 1.0, 1.0), False, "no voxels along an axis"),
])
def test_unusable_spacings(spacing, too_large, message):
    with pytest.raises(InputRefused, match=message) as e:
        check_resampled_grid("odd.nrrd", (16, 16, 16), spacing, [FULL, LOW])
    assert e.value.too_large is too_large and "odd.nrrd" in str(e.value)


def test_limit_is_inclusive_and_settable():
    grid = resampled_grid((20, 50, 50), (1.0, 0.8, 0.8), FULL)
    assert check_resampled_grid("a", (20, 50, 50), (1.0, 0.8, 0.8), [FULL], grid.voxels)
    with pytest.raises(InputRefused):
        check_resampled_grid("a", (20, 50, 50), (1.0, 0.8, 0.8), [FULL], grid.voxels - 1)


def test_file_check_reads_only_the_header(tmp_path):
    """The repro: 16^3 at 400 mm, refused in well under a second without allocating the grid."""
    f = tmp_path / "giant.nii.gz"
    f.write_bytes(raw_nifti(pixdim=(400.0, 400.0, 400.0)))
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(InputRefused, match="giant.nii.gz"):
        check_file_grid(f, [FULL, LOW])
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 2.0 and peak < 16 * 2 ** 20, (elapsed, peak)
    ok = tmp_path / "ok.nii.gz"
    ok.write_bytes(raw_nifti(pixdim=(1.0, 0.8, 0.8)))
    assert [g.configuration for g in check_file_grid(ok, [FULL, LOW])] == ["3d_fullres", "3d_lowres"]


def test_stages_of_follows_the_cascade():
    """Every configuration a predictor list runs, the previous stage once, with its channel count."""
    plans = {"transpose_forward": [0, 1, 2], "configurations": {
        "3d_fullres": {"spacing": [1.0, 1.0, 1.0]},
        "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [2.0, 2.0, 2.0]},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}
    labels = SimpleNamespace(foreground_labels=[1, 2], num_segmentation_heads=3)

    def predictor(config, previous=None, folder="m"):
        model = SimpleNamespace(plans=plans, configuration=config, folder=Path(folder),
                                dataset_json={"channel_names": {"0": "CT"}})
        return SimpleNamespace(model=model, previous=previous, labels=labels)

    low = predictor("3d_lowres", folder="low")
    stages = stages_of([predictor("3d_cascade_fullres", low, "cascade"), predictor("3d_fullres", folder="full")])
    by_name = {s.configuration: s for s in stages}
    assert set(by_name) == {"3d_cascade_fullres", "3d_lowres", "3d_fullres"}
    assert by_name["3d_lowres"].spacing == (2.0, 2.0, 2.0)
    assert by_name["3d_cascade_fullres"].channels == 3 and by_name["3d_lowres"].channels == 1


def test_dicom_like_sizes_from_itk_order(tmp_path):
    """check_file_grid reads any ITK format's header: an NRRD at 300 mm."""
    image = sitk.Image(16, 16, 16, sitk.sitkInt16)
    image.SetSpacing((300.0, 300.0, 300.0))
    f = tmp_path / "big.nrrd"
    sitk.WriteImage(image, str(f))
    with pytest.raises(InputRefused, match="big.nrrd"):
        check_file_grid(f, [FULL])
    assert np.isfinite(resampled_grid((16, 16, 16), (300.0,) * 3, FULL).voxels)
