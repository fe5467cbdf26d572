"""kubeseg.labels: what dataset.json's labels mean (plain, regions, ignore), and volumes per region."""
from __future__ import annotations

import numpy as np
import pytest

from kubeseg.inference.quality import label_volumes_ml
from kubeseg.labels import label_scheme, parse_labels

BRATS = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
         "regions_class_order": [1, 2, 3]}


def test_regions():
    s = label_scheme(BRATS)
    assert s.has_regions and s.regions == ((1, 2, 3), (2, 3), (3,))
    assert s.num_segmentation_heads == 3 and s.all_labels == (0, 1, 2, 3) and s.output_labels == (0, 1, 2, 3)
    assert s.class_keys == ("(1, 2, 3)", "(2, 3)", "3")
    probs = np.zeros((3, 4))
    probs[0, 1:] = 0.9   # whole tumor at voxels 1-3
    probs[1, 2:] = 0.6   # core at 2-3
    probs[2, 3] = 0.51   # enhancing at 3
    np.testing.assert_array_equal(s.to_segmentation(probs), [0, 1, 2, 3])  # later regions paint over earlier


def test_ignore_label():
    s = label_scheme({"labels": {"background": 0, "organ": 1, "ignore": 2}})
    assert not s.has_regions and s.ignore_label == 2 and s.all_labels == (0, 1) and s.num_segmentation_heads == 2
    assert s.file_values == (0, 1, 2)
    np.testing.assert_array_equal(s.annotated(np.array([0, 1, 2])), [True, True, False])


@pytest.mark.parametrize("labels,order,words", [
    ({"background": 0, "a": [1, 2], "b": [2]}, None, "regions_class_order"),
    ({"background": 0, "a": [1, 2], "b": [2]}, [1], "2 foreground regions"),
    ({"background": 0, "a": 1, "ignore": 5}, None, "highest"),
    ({"background": 0, "a": 1, "ignore": [2]}, None, "not a region"),
    ({"a": 1}, None, "background"),
    ({"background": 0, "a": 2}, None, "consecutive"),
    ({"background": 0, "a": "x"}, None, "integer"),
])
def test_refused(labels, order, words):
    scheme, problems = parse_labels(labels, order)
    assert scheme is None and any(words in p for p in problems), problems


def test_volumes_per_region_without_ignore():
    seg = np.array([0, 1, 2, 2, 3])
    vol = label_volumes_ml(seg, (10.0, 10.0, 10.0), BRATS["labels"])  # 1 ml per voxel
    assert vol == {"whole tumor": 4.0, "tumor core": 3.0, "enhancing tumor": 1.0}
    assert label_volumes_ml(seg, (10.0, 10.0, 10.0), {"background": 0, "a": 1, "ignore": 4}) == {"a": 1.0}
