"""Volumes in ml and the confidence score of a prediction."""
import numpy as np
import pytest

from kubeseg.inference.quality import confidence, label_volumes_ml


def test_volumes_use_the_voxel_spacing():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[:2] = 1  # 200 voxels
    seg[5, 5, 5] = 2
    v = label_volumes_ml(seg, (2.0, 1.0, 0.5), {"background": 0, "liver": 1, "tumor": 2, "absent": 3})
    assert v == {"liver": pytest.approx(0.2), "tumor": pytest.approx(0.001), "absent": 0.0}


def test_confidence_is_taken_over_the_predicted_foreground():
    probs = np.zeros((2, 4, 4, 4), np.float32)
    probs[0] = 1.0  # certain background everywhere ...
    probs[:, 0, 0, :2] = [[0.4], [0.6]]  # ... but unsure where it says foreground
    seg = probs.argmax(0)
    assert confidence(probs, seg) == pytest.approx(0.6)
    assert confidence(probs[:, 1:], seg[1:]) == pytest.approx(1.0)  # no foreground: the whole image
