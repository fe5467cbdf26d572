import numpy as np
import pytest

from kubeseg.preprocessing.resampling import compute_new_shape, resample_image, resample_seg, separate_axis


def smooth_volume(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2).astype(np.float32)[None]


def test_new_shape_keeps_the_physical_extent():
    assert compute_new_shape((40, 100, 100), (5.0, 0.8, 0.8), (2.5, 1.6, 1.6)) == (80, 50, 50)


@pytest.mark.parametrize("current,new,expected", [
    ((5.0, 0.8, 0.8), (5.0, 1.0, 1.0), 0),       # anisotropic data: its coarse axis
    ((1.0, 1.0, 1.0), (1.0, 1.0, 4.0), 2),       # isotropic data, anisotropic target
    ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), None),    # neither
    ((0.24, 1.25, 1.25), (0.24, 1.25, 1.25), None),  # two equally coarse axes
])
def test_separate_axis(current, new, expected):
    assert separate_axis(current, new) == expected


def test_same_shape_is_returned_unchanged():
    v = smooth_volume((8, 16, 16))
    assert resample_image(v, (8, 16, 16), (1, 1, 1), (1, 1, 1)) is v or np.array_equal(
        resample_image(v, (8, 16, 16), (1, 1, 1), (1, 1, 1)), v)


@pytest.mark.parametrize("current,new", [((1, 1, 1), (0.7, 0.7, 0.7)), ((4, 0.8, 0.8), (2.5, 0.6, 0.6))])
def test_images_keep_their_range_and_a_constant_stays_constant(current, new):
    v = smooth_volume((10, 20, 24))
    shape = compute_new_shape(v.shape[1:], current, new)
    out = resample_image(v, shape, current, new)
    assert out.shape == (1, *shape) and out.dtype == np.float32
    assert out.min() >= v.min() - 1e-6 and out.max() <= v.max() + 1e-6
    const = np.full_like(v, 7.5)
    assert np.allclose(resample_image(const, shape, current, new), 7.5)


def test_separate_axis_resampling_is_nearest_neighbour_across_slices():
    v = smooth_volume((6, 16, 16))
    out = resample_image(v, (12, 16, 16), (4, 1, 1), (2, 1, 1))
    # every output slice is a copy of an input slice: no interpolation across the 4 mm gap
    for z in range(12):
        assert any(np.allclose(out[0, z], v[0, k]) for k in range(6))


@pytest.mark.parametrize("current,new", [((1, 1, 1), (0.6, 1.3, 0.9)), ((4, 0.8, 0.8), (3, 1.1, 1.1))])
def test_labels_are_never_invented(current, new):
    rng = np.random.default_rng(3)
    seg = rng.choice(np.array([-1, 0, 2, 5], dtype=np.int8), size=(1, 9, 15, 13))
    shape = compute_new_shape(seg.shape[1:], current, new)
    out = resample_seg(seg, shape, current, new)
    assert out.shape == (1, *shape) and out.dtype == seg.dtype
    assert set(np.unique(out)) <= {-1, 0, 2, 5}


def test_upsampling_a_label_blob_keeps_its_volume():
    seg = np.zeros((1, 20, 20, 20), dtype=np.int8)
    seg[0, 5:15, 6:14, 4:16] = 1
    out = resample_seg(seg, (40, 40, 40), (1, 1, 1), (0.5, 0.5, 0.5))
    assert abs((out == 1).sum() / 8 - (seg == 1).sum()) / (seg == 1).sum() < 0.05
