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


# -- the torch paths (logits of the predictor, label maps of preprocessing) against scipy ----------

@pytest.mark.parametrize("shape,target,current,new", [
    ((3, 20, 33, 41), (20, 50, 61), (3, 0.7, 0.7), (3, 1.0, 1.0)),   # in-plane only
    ((3, 20, 33, 41), (57, 50, 61), (5.0, 0.7, 0.8), (1, 1, 1)),     # coarse axis separate, nearest along it
    ((2, 20, 33, 41), (13, 27, 30), (1, 1, 1), (1.5, 1.2, 1.3)),     # isotropic, downsampling
    ((2, 30, 33, 11), (31, 44, 29), (1, 1, 4.0), (1, 1, 1)),         # coarse axis last
])
def test_torch_probability_resampling_matches_scipy(shape, target, current, new):
    import torch
    from kubeseg.preprocessing.resampling import resample_image, resample_probabilities_torch
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for order, order_z in ((1, 0), (1, 1), (0, 0)):
        ref = resample_image(data, target, current, new, order, order_z)
        ours = resample_probabilities_torch(torch.from_numpy(data), target, current, new, order, order_z).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < (1e-4 if order else 1e-12)  # float32 weights vs scipy's float64


def test_torch_label_resampling_matches_the_scipy_loop(monkeypatch):
    from scipy import ndimage
    from kubeseg.preprocessing import resampling
    rng = np.random.default_rng(1)
    blocks = rng.integers(-1, 4, size=(6, 8, 8))
    for shape, target, current, new in (((40, 63, 71), (33, 57, 60), (1, 1, 1), (1.2, 1.1, 1.2)),
                                        ((20, 33, 41), (57, 50, 61), (5.0, 0.7, 0.8), (1, 1, 1))):
        seg = ndimage.zoom(blocks, [a / b for a, b in zip(shape, blocks.shape)], order=0).astype(np.int16)[None]
        ours = resampling.resample_seg(seg, target, current, new)
        with monkeypatch.context() as m:  # order 1 through the per-label scipy loop
            m.setattr(resampling, "_resample_labels_torch", None)
            m.setattr(resampling, "_resample_labels", _scipy_loop(resampling))
            ref = resampling.resample_seg(seg, target, current, new)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert set(np.unique(ours)) <= set(np.unique(seg))
        assert (ours == ref).mean() >= 0.99999


def _scipy_loop(resampling):
    def loop(labels, shape, order, keep_axis=None):
        values = np.unique(labels)
        nearest = resampling._zoom(labels, shape, 0, keep_axis)
        best = np.full(shape, -np.inf, dtype=np.float32)
        winner = np.zeros(shape, dtype=labels.dtype)
        nearest_score = np.full(shape, -np.inf, dtype=np.float32)
        for value in values:
            score = resampling._zoom((labels == value).astype(np.float32), shape, order, keep_axis)
            better = score > best
            winner[better] = value
            best[better] = score[better]
            nearest_score[nearest == value] = score[nearest == value]
        winner[nearest_score == best] = nearest[nearest_score == best]
        return winner
    return loop


@pytest.mark.parametrize("shape,target,keep_axis", [
    ((12, 30, 26), (17, 21, 40), None),   # 3D spline zoom, up and down
    ((6, 31, 24), (6, 45, 19), 0),        # in-plane, slice by slice across axis 0
    ((9, 1, 14), (5, 1, 20), 1),          # a one-voxel axis
])
def test_separable_spline_zoom_matches_scipy(shape, target, keep_axis):
    """The matrix-product spline zoom gives scipy's zoom (prefilter, edge mode, grid) up to float32 rounding."""
    from scipy import ndimage

    from kubeseg.preprocessing.resampling import _zoom

    volume = smooth_volume(shape, seed=3)[0] * 1000  # CT-like magnitudes
    ours = _zoom(volume, target, 3, keep_axis)
    if keep_axis is None:
        ref = ndimage.zoom(volume, [n / o for n, o in zip(target, shape)], order=3, mode="nearest", grid_mode=True)
    else:
        ref = np.stack([ndimage.zoom(s, [n / o for a, (n, o) in enumerate(zip(target, shape)) if a != keep_axis],
                                     order=3, mode="nearest", grid_mode=True)
                        for s in np.moveaxis(volume, keep_axis, 0)], axis=keep_axis)
    assert ours.shape == ref.shape and ours.dtype == volume.dtype
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()
