import numpy as np
import pytest

from kubeseg.preprocessing.cropping import OUTSIDE_LABEL, bounding_box, crop_to_nonzero
from kubeseg.preprocessing.normalization import normalize


def test_crop_keeps_the_nonzero_box_and_marks_the_outside():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:8, 3:9, 4:10] = 1.0
    data[1, 7, 8, 12] = 3.0  # the second channel widens the box
    data[0, 4, 5, 6] = 0.0  # an enclosed hole is filled, not cut out
    seg = np.zeros((1, 10, 12, 14), np.int8)
    seg[0, 3, 4, 5] = 2
    cropped, out_seg, box = crop_to_nonzero(data, seg)
    assert box == [[2, 8], [3, 9], [4, 13]]
    assert cropped.shape == (2, 6, 6, 9)
    assert out_seg[0, 1, 1, 1] == 2  # labels survive
    assert out_seg[0, 2, 2, 2] == 0  # the filled hole is inside
    assert out_seg[0, 0, 0, 8] == OUTSIDE_LABEL  # zero in every channel: outside
    assert seg[0, 3, 4, 5] == 2 and seg.min() == 0  # the input is not modified


def test_empty_image_keeps_its_whole_box():
    assert bounding_box(np.zeros((3, 4), bool)) == [[0, 3], [0, 4]]


PROPS = {"0": dict(mean=100.0, std=50.0, percentile_00_5=-200.0, percentile_99_5=400.0)}


def test_ct_normalization_clips_to_the_dataset_percentiles_and_scales():
    data = np.array([[[[-1000.0, 100.0, 150.0, 3000.0]]]], np.float32)
    out = normalize(data.copy(), np.zeros((1, 1, 1, 4), np.int8), ["CTNormalization"], [False], PROPS)
    assert np.allclose(out.ravel(), [(-200 - 100) / 50, 0.0, 1.0, (400 - 100) / 50])


def test_masked_zscore_normalizes_inside_and_leaves_the_outside_at_zero():
    rng = np.random.default_rng(0)
    data = np.zeros((1, 10, 10, 10), np.float32)
    data[0, 2:8, 2:8, 2:8] = rng.normal(500, 30, (6, 6, 6))
    seg = np.full((1, 10, 10, 10), -1, np.int8)
    seg[0, 2:8, 2:8, 2:8] = 0
    out = normalize(data.copy(), seg, ["ZScoreNormalization"], [True], {})
    inside = out[0, 2:8, 2:8, 2:8]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert np.all(out[seg < 0] == 0)
    unmasked = normalize(data.copy(), seg, ["ZScoreNormalization"], [False], {})
    assert abs(unmasked.mean()) < 1e-4 and unmasked[0, 0, 0, 0] != 0


def test_unknown_scheme_and_channel_mismatch_are_clear_errors():
    data = np.zeros((1, 2, 2, 2), np.float32)
    seg = np.zeros((1, 2, 2, 2), np.int8)
    with pytest.raises(ValueError, match="unknown normalization scheme"):
        normalize(data, seg, ["Fancy"], [False], {})
    with pytest.raises(ValueError, match="2 normalization scheme"):
        normalize(data, seg, ["ZScoreNormalization"] * 2, [False] * 2, {})
