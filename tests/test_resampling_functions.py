"""The plans' resampling functions and preprocessor: honoured (kwargs included) or refused by plans key.

Parity of each function with nnunetv2 is in ``tests/test_parity_coverage.py``; these are the fast
rules: which names and arguments are refused and how, and that the arguments change the result.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kubeseg.errors import KubesegError
from kubeseg.import_nnunet import import_nnunet
from kubeseg.planning.plans import configuration
from kubeseg.preprocessing.resampling import resample_image
from kubeseg.preprocessing.resampling_functions import check_configuration, resampler, separate_axis

from tests.inference.helpers import make_model_folder, make_plans, make_raw

D, S, P = "resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"


@pytest.mark.parametrize("config,key,words", [
    ({D: "resample_torch_simple"}, D, ["resample_torch_simple", "nnunetv2 2.8.1 cannot run"]),
    ({S: "resample_data_or_seg_to_spacing"}, S, ["not the target shape"]),
    ({P: "my_resampler"}, P, ["unknown resampling function 'my_resampler'"]),
    ({S: "resample_data_or_seg_to_shape", f"{S}_kwargs": {"is_seg": False}}, f"{S}_kwargs", ["is_seg=False"]),
    ({D: "resample_torch_fornnunet", f"{D}_kwargs": {"is_seg": False, "antialias": True}}, f"{D}_kwargs",
     ["does not take antialias"]),
    ({D: "resample_torch_fornnunet", f"{D}_kwargs": {"is_seg": False, "mode": "bicubic"}}, f"{D}_kwargs",
     ["mode 'bicubic'"]),
    ({S: "resample_data_or_seg_to_shape", f"{S}_kwargs": {"is_seg": True, "order_z": 1}}, f"{S}_kwargs",
     ["order_z"]),
    ({D: "resample_data_or_seg_to_shape", f"{D}_kwargs": {"is_seg": False, "force_separate_z": "yes"}},
     f"{D}_kwargs", ["force_separate_z"]),
    ({"preprocessor_name": "MyPreprocessor"}, "preprocessor_name", ["MyPreprocessor", "DefaultPreprocessor"]),
])
def test_refused_with_the_plans_key(config, key, words):
    with pytest.raises(KubesegError) as e:
        check_configuration(config, "configuration '3d_fullres': ")
    message = str(e.value)
    assert f"plans key '{key}'" in message and "configuration '3d_fullres'" in message
    for w in words:
        assert w in message


def test_force_separate_z_is_honoured():
    aniso, iso = [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]
    assert separate_axis(None, aniso, iso) == 0
    assert separate_axis(False, aniso, iso) is None
    assert separate_axis(True, iso, [1.0, 1.0, 2.0]) is None  # forced on, but no single coarse axis
    assert separate_axis(True, [1.0, 1.0, 2.0], iso) == 2  # forced on below the anisotropy threshold
    rng = np.random.RandomState(0)
    img = rng.rand(1, 6, 12, 12).astype(np.float32)
    kw = {"is_seg": False, "order": 3, "order_z": 0}
    auto = resampler({D: "resample_data_or_seg_to_shape", f"{D}_kwargs": {**kw, "force_separate_z": None}}, D)
    off = resampler({D: "resample_data_or_seg_to_shape", f"{D}_kwargs": {**kw, "force_separate_z": False}}, D)
    a, b = auto(img, (18, 12, 12), aniso, [1.33, 1, 1]), off(img, (18, 12, 12), aniso, [1.33, 1, 1])
    np.testing.assert_array_equal(a, resample_image(img, (18, 12, 12), aniso, [1.33, 1, 1]))
    assert np.abs(a - b).max() > 0.05  # nearest between slices vs a cubic spline through them
    # the default function's own default is "never separate" (nnunetv2's signature), the torch one's "auto"
    bare = resampler({D: "resample_data_or_seg_to_shape", f"{D}_kwargs": {"is_seg": False}}, D)
    np.testing.assert_array_equal(bare(img, (18, 12, 12), aniso, [1.33, 1, 1]), b)


def test_torch_and_no_resampling():
    seg = np.zeros((1, 6, 12, 12), dtype=np.int8)
    seg[0, 2:4, 3:9, 3:9] = 2
    seg[0, :, :2] = -1
    torch_seg = resampler({S: "resample_torch_fornnunet", f"{S}_kwargs": {"is_seg": True}}, S)
    out = torch_seg(seg, (12, 24, 24), [2.0, 1, 1], [1.0, 0.5, 0.5])
    assert out.shape == (1, 12, 24, 24) and out.dtype == np.int8 and set(np.unique(out)) == {-1, 0, 2}
    same = resampler({D: "no_resampling_hack", f"{D}_kwargs": {}}, D)
    assert same(seg, (12, 24, 24), [2.0, 1, 1], [1.0, 0.5, 0.5]) is seg


def test_configuration_and_import_refuse_unreproducible_plans(tmp_path):
    raw = make_raw(tmp_path, "ct", cases=2, tests=0)
    plans, fp = make_plans(raw, tmp_path / "plans")
    plans["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_torch_simple"
    with pytest.raises(KubesegError, match="configuration '3d_fullres': plans key 'resampling_fn_data'"):
        configuration(plans, "3d_fullres")
    ds = json.loads((raw / "dataset.json").read_text())
    plans["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_data_or_seg_to_shape"
    model = make_model_folder(plans, ds, "3d_fullres", tmp_path / "res" / "nnUNetTrainer__P__3d_fullres",
                              folds=("0",), fingerprint=fp)
    bad = json.loads((model / "plans.json").read_text())
    bad["configurations"]["3d_fullres"]["preprocessor_name"] = "MyPreprocessor"
    (model / "plans.json").write_text(json.dumps(bad))
    with pytest.raises(KubesegError, match="plans.json: configuration '3d_fullres': plans key 'preprocessor_name'"):
        import_nnunet(model.parent, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
