from kubeseg.planning.topology import pool_and_conv_props, round_up_to_multiple


def test_isotropic_patch_pools_every_axis_alike():
    t = pool_and_conv_props((1.0, 1.0, 1.0), (128, 128, 128))
    assert t.pools_per_axis == (5, 5, 5)
    assert t.strides[0] == (1, 1, 1) and all(s == (2, 2, 2) for s in t.strides[1:])
    assert all(k == (3, 3, 3) for k in t.kernel_sizes)
    assert t.num_stages == 6 and len(t.kernel_sizes) == 6
    assert t.patch_size == (128, 128, 128)


def test_anisotropic_axis_waits_for_pooling_and_wide_kernels():
    t = pool_and_conv_props((5.0, 1.0, 1.0), (20, 256, 256))
    # in-plane first, out-of-plane only once the in-plane spacing is within 2x of 5 mm
    assert t.strides[1] == (1, 2, 2) and t.strides[2] == (1, 2, 2)
    assert t.kernel_sizes[0] == (1, 3, 3)
    assert t.pools_per_axis[0] < t.pools_per_axis[1]
    assert (3, 3, 3) in t.kernel_sizes


def test_feature_maps_never_shrink_below_min_edge():
    t = pool_and_conv_props((1.0, 1.0), (40, 12), min_edge=4)
    for size, pools in zip((40, 12), t.pools_per_axis):
        assert size / 2**pools >= 3  # pooled only while at least 2 * min_edge wide
    assert t.pools_per_axis[1] == 1


def test_patch_is_rounded_up_to_the_pooling_divisor():
    t = pool_and_conv_props((1.0, 1.0, 1.0), (100, 90, 70))
    assert all(p % d == 0 for p, d in zip(t.patch_size, t.divisor))
    assert all(p >= q for p, q in zip(t.patch_size, (100, 90, 70)))
    assert round_up_to_multiple((48.5, 48.0), (8, 8)) == (56, 48)
