"""Drift scores against a fingerprint: near 0 for data like the training data, large for shifted data."""
import numpy as np
import pytest

from kubeseg.drift import DriftReference, drift_report, psi
from kubeseg.fingerprint import _stats


def fingerprint(values: np.ndarray) -> dict:
    return {"foreground_intensity_properties_per_channel": {"0": _stats(values)},
            "spacings": [[3.0, 0.8, 0.8], [3.5, 0.9, 0.9], [4.0, 1.0, 1.0]],
            "shapes_after_crop": [[40, 120, 120], [50, 140, 140], [60, 160, 160]],
            "median_relative_size_after_cropping": 1.0}


@pytest.fixture(scope="module")
def ref():
    rng = np.random.default_rng(0)
    return DriftReference.from_fingerprint(fingerprint(rng.normal(40, 30, 200_000)))


def _case(rng, scale=1.0, offset=0.0):
    data = rng.normal(40, 30, (1, 20, 30, 30)) * scale + offset
    return data.astype(np.float32), np.ones(data.shape[1:], bool)


def test_same_distribution_scores_low_and_shifts_score_high(ref):
    rng = np.random.default_rng(1)
    data, mask = _case(rng)
    same = drift_report(data, [3.5, 0.9, 0.9], [50, 140, 140], mask, ref)
    assert same.scores == {"intensity": pytest.approx(0, abs=0.02), "spacing": 0.0, "shape": 0.0}
    data, mask = _case(rng, offset=120)
    shifted = drift_report(data, [3.5, 0.9, 0.9], [50, 140, 140], mask, ref)
    assert shifted.scores["intensity"] > 1.0
    data, mask = _case(rng, scale=2.5)
    scaled = drift_report(data, [3.5, 0.9, 0.9], [50, 140, 140], mask, ref)
    assert scaled.scores["intensity"] > 0.25


def test_spacing_and_shape_outside_the_training_range(ref):
    data, mask = _case(np.random.default_rng(2))
    r = drift_report(data, [5.25, 0.9, 0.9], [50, 300, 140], mask, ref)
    assert r.scores["spacing"] == pytest.approx((5.25 - 4.0) / 3.5)  # beyond the max, relative to the median
    assert r.scores["shape"] == pytest.approx((300 - 160) / 140)
    assert drift_report(data, [3.0, 0.8, 1.0], [40, 160, 120], mask, ref).scores["spacing"] == 0.0


def test_small_foreground_falls_back_to_the_nonzero_region(ref):
    data, _ = _case(np.random.default_rng(3))
    tiny = np.zeros(data.shape[1:], bool)
    tiny[0, 0, :5] = True
    r = drift_report(data, [3.5, 0.9, 0.9], [50, 140, 140], tiny, ref)
    assert r.mask == "nonzero" and r.scores["intensity"] < 0.05


def test_psi_counts_values_beyond_the_training_range(ref):
    assert psi(np.full(1000, 1e6), ref.channels[0]) > 5
    with pytest.raises(ValueError, match="channels"):
        drift_report(np.zeros((2, 4, 4, 4), np.float32), [1, 1, 1], [4, 4, 4], None, ref)


@pytest.mark.parametrize("data, why", [
    (np.zeros((1, 20, 30, 30), np.float32), "all voxels are zero"),
    (np.full((1, 20, 30, 30), 7.0, np.float32), "constant"),
    (np.full((1, 20, 30, 30), -3e38, np.float32), "constant"),
])
def test_degenerate_inputs_score_finite_and_say_why(ref, data, why):
    """An all-zero or constant image has no distribution to compare: finite scores, flagged."""
    for mask in (None, np.zeros(data.shape[1:], bool), np.ones(data.shape[1:], bool)):
        r = drift_report(data, [3.5, 0.9, 0.9], None, mask, ref)
        assert all(np.isfinite(v) for v in r.scores.values()), r.scores
        assert all(np.isfinite(v) for v in r.intensity_per_channel)
        assert r.degenerate and why in r.degenerate
        assert r.to_json()["degenerate"] == r.degenerate


def test_extreme_but_real_distributions_are_not_degenerate(ref):
    rng = np.random.default_rng(4)
    data = (rng.normal(0, 1, (1, 20, 30, 30)) * 1e37).astype(np.float32)
    r = drift_report(data, [1e6, 1e-6, 0.9], None, None, ref)
    assert r.degenerate is None
    assert all(np.isfinite(v) for v in r.scores.values()) and r.scores["intensity"] > 1.0
    assert r.scores["spacing"] <= 1e6


def test_rolling_window_ignores_degenerate_and_non_finite_scores():
    from services.metrics import RollingWindow

    w = RollingWindow(3)
    assert w.means(["intensity"]) == {"intensity": 0.0}
    w.add({"intensity": 0.1})
    assert w.add({"intensity": float("inf")}) == {"intensity": pytest.approx(0.1)}
    assert w.add({"intensity": float("nan")}) == {"intensity": pytest.approx(0.1)}
    w.add({"intensity": 0.3})
    assert w.means(["intensity"]) == {"intensity": pytest.approx(0.2)}
