"""Parity with nnunetv2 2.8.1 for the plans variants: ResEnc planners, torch and no resampling.

One synthetic anisotropic CT dataset; nnunetv2 (the oracle, ``tests/oracle/nnunet_coverage.py``,
run in its own interpreter, one process for the whole file) plans it with ``nnUNetPlannerResEncM/L/XL`` (L also with a 1 GB
budget), ``nnUNetPlanner_torchres``, ``nnUNetPlannerResEncL_torchres_sepz`` and
``nnUNetPlannerResEncL_noResampling`` and preprocesses one case with the last three. kubeseg must

* plan exactly what the ResEnc planners plan (``--preset resenc-m|l|xl``, ``--gpu-memory-gb``);
* preprocess with nnunetv2's torch / no-resampling plans to nnunetv2's arrays (the plans carry the
  intensity statistics, so only resampling can differ; seen: identical);
* resample like each function nnunetv2 ships can be called from plans, with its keyword
  arguments, and refuse the ones nnunetv2 itself cannot call;
* build the ResidualEncoderUNet nnunetv2 builds from the same plans (same state_dict, same logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeseg.dataset import list_training_cases, load_dataset_json
from kubeseg.dataset_check import load_case
from kubeseg.errors import KubesegError
from kubeseg.fingerprint import extract_fingerprint
from kubeseg.network import build_network_from_plans
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.planning.plans import configuration
from kubeseg.preprocessing.preprocess import preprocess_arrays
from kubeseg.preprocessing.resampling_functions import check_configuration, resampler
from kubeseg.synth import SynthSettings, synthesize
from tests.oracle import run_oracle
from tests.oracle.compare import assert_same  # noqa: E402

pytestmark = pytest.mark.integration

ORACLE = str(Path(__file__).resolve().parent / "oracle" / "nnunet_coverage.py")
RESENC = {"resenc-m": "nnUNetPlannerResEncM", "resenc-l": "nnUNetPlannerResEncL",
          "resenc-xl": "nnUNetPlannerResEncXL"}
RESAMPLING_PLANNERS = ("nnUNetPlanner_torchres", "nnUNetPlannerResEncL_torchres_sepz",
                       "nnUNetPlannerResEncL_noResampling")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """Everything nnunetv2 computes for this file, in ONE oracle process (nnunetv2 imported once): the plans
    and preprocessed cases, the resampling calls, the ResEnc network and the losses."""
    root = tmp_path_factory.mktemp("coverage")
    raw = synthesize(root / "raw", SynthSettings(kind="ct", num_cases=6, shape=(40, 96, 96), seed=1))
    fingerprint = extract_fingerprint(raw, num_workers=1, progress=False)
    # nnU-Net's ResEnc-M rules with narrow stages, so that the network's forward pass is cheap
    net_plans = plan_experiment(load_dataset_json(raw), fingerprint,
                                planner_settings("resenc-m", base_features=4, max_features_3d=16, max_features_2d=16))
    (root / "net_plans.json").write_text(json.dumps(net_plans))
    _resampling_inputs(root / "resample")
    _loss_inputs(root / "loss")
    jobs = [["coverage", "plan", raw, root, "--planner", *RESENC.values(), "nnUNetPlannerResEncL:1",
             *RESAMPLING_PLANNERS, "--preprocess", *RESAMPLING_PLANNERS,
             "--configs", "3d_fullres", "2d", "3d_lowres", "--cases", "synth_000"],
            ["coverage", "resample", root / "resample" / "spec.json", root / "resample" / "in.npz",
             root / "resample" / "out.npz"],
            ["coverage", "network", root / "net_plans.json", raw / "dataset.json", "3d_fullres", root / "net.npz"],
            ["coverage", "loss", root / "loss" / "spec.json", root / "loss" / "in.npz", root / "loss" / "out.npz"]]
    (root / "jobs.json").write_text(json.dumps(jobs, default=str))
    run_oracle(ORACLE, "batch", str(root / "jobs.json"))
    return raw, root / "nnunet", fingerprint, root


@pytest.mark.parametrize("preset,gb", [("resenc-m", None), ("resenc-l", None), ("resenc-xl", None),
                                       ("resenc-l", 1.0)])
def test_resenc_plans_equal_nnunet(oracle, preset, gb):
    raw, ref_dir, fingerprint, _ = oracle
    tag = RESENC[preset] + (f"_{gb:g}" if gb else "")
    ref = json.loads((ref_dir / f"plans_{tag}.json").read_text())
    ours = plan_experiment(load_dataset_json(raw), fingerprint, planner_settings(preset, gpu_memory_gb=gb))
    assert ours["plans_name"] == ref["plans_name"]
    assert ref["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    # everything in the configurations, data identifiers and resampling entries included
    assert_same(ours["configurations"], ref["configurations"], tag)
    for key in ("transpose_forward", "transpose_backward", "original_median_shape_after_transp"):
        assert ours[key] == ref[key], key


def test_gpu_memory_override_changes_resenc_plans(oracle):
    """The 1 GB variant must differ from the 24 GB one, or the override test above proves nothing."""
    _, ref_dir, _, _ = oracle
    l24 = json.loads((ref_dir / "plans_nnUNetPlannerResEncL.json").read_text())["configurations"]
    l12 = json.loads((ref_dir / "plans_nnUNetPlannerResEncL_1.json").read_text())["configurations"]
    assert any(l24[c]["patch_size"] != l12[c]["patch_size"] or l24[c]["batch_size"] != l12[c]["batch_size"]
               for c in l24 if "patch_size" in l24[c])


@pytest.mark.parametrize("planner", RESAMPLING_PLANNERS)
def test_preprocessing_with_nnunet_resampling_plans(oracle, planner):
    raw, ref_dir, _, _ = oracle
    plans = json.loads((ref_dir / f"plans_{planner}.json").read_text())
    spec = load_dataset_json(raw)
    case = next(c for c in list_training_cases(raw, spec, []) if c.case_id == "synth_000")
    loaded = load_case(case, spec)
    compared = 0
    for config in ("3d_fullres", "2d", "3d_lowres"):
        if config not in plans["configurations"]:
            continue
        ours = preprocess_arrays(loaded.data, loaded.seg, loaded.geometry, plans, configuration(plans, config),
                                 spec.foreground_labels)
        ref_data = np.load(ref_dir / planner / config / "synth_000.npy")
        ref_seg = np.load(ref_dir / planner / config / "synth_000_seg.npy")
        assert ours.data.shape == ref_data.shape and ours.seg.shape == ref_seg.shape, (planner, config)
        assert np.abs(ours.data - ref_data).max() < 1e-5, (planner, config)
        assert (ours.seg == ref_seg).mean() >= 0.99999, (planner, config)
        compared += 1
    assert compared >= 2


def _resampling_cases():
    """(plans key, function, kwargs, array name, shape, current spacing, new spacing) per call."""
    t, d = "resample_torch_fornnunet", "resample_data_or_seg_to_shape"
    aniso, iso = [4.0, 1.0, 1.0], [1.5, 1.0, 1.2]
    calls = []
    for force in (None, True, False):
        for key, arr in (("resampling_fn_data", "img"), ("resampling_fn_seg", "seg")):
            is_seg = arr == "seg"
            calls.append((key, t, {"is_seg": is_seg, "force_separate_z": force, "memefficient_seg_resampling": False},
                          arr, [12, 30, 26], aniso, [2.0, 0.8, 0.9]))
            calls.append((key, d, {"is_seg": is_seg, "order": 1 if is_seg else 3, "order_z": 0,
                                   "force_separate_z": force}, arr, [12, 30, 26], aniso, [2.0, 0.8, 0.9]))
    calls += [
        ("resampling_fn_seg", t, {"is_seg": True, "memefficient_seg_resampling": True}, "seg", [9, 17, 31], iso, iso),
        ("resampling_fn_data", t, {"is_seg": False, "mode": "nearest-exact", "force_separate_z": True}, "img",
         [9, 17, 31], aniso, iso),
        ("resampling_fn_probabilities", t, {"is_seg": False, "force_separate_z": None}, "img", [5, 40, 44],
         [1.0, 1.0, 1.0], [5.0, 0.5, 0.5]),
        ("resampling_fn_data", d, {"is_seg": False, "order": 3, "order_z": 1, "force_separate_z": True}, "img",
         [12, 30, 26], aniso, iso),
        ("resampling_fn_data", "no_resampling_hack", {}, "img", [12, 30, 26], aniso, iso),
    ]
    return calls


def _resampling_arrays() -> dict:
    rng = np.random.RandomState(0)
    z, y, x = np.meshgrid(np.arange(7), np.arange(24), np.arange(20), indexing="ij")
    img = (np.sin(y / 3.0) + np.cos(x / 4.0) * z / 7 + 0.1 * rng.randn(7, 24, 20))[None].astype(np.float32)
    seg = ((y - 12) ** 2 + (x - 10) ** 2 < (4 + z) ** 2).astype(np.int8) + (y > 18)
    seg = np.where(x < 2, -1, seg)[None].astype(np.int8)
    return {"img": img, "seg": seg}


def _resampling_inputs(folder: Path) -> None:
    """The oracle's spec: every call of _resampling_cases, then resample_torch_simple (which nnunetv2 cannot call)."""
    folder.mkdir(parents=True)
    spec = [{"fn": fn, "kwargs": kw, "array": arr, "shape": shape, "current": cur, "new": new}
            for _, fn, kw, arr, shape, cur, new in _resampling_cases()]
    spec.append({"fn": "resample_torch_simple", "kwargs": {"is_seg": False}, "array": "img", "shape": [9, 9, 9],
                 "current": [1.0, 1.0, 1.0], "new": [1.0, 1.0, 1.0]})
    (folder / "spec.json").write_text(json.dumps(spec))
    np.savez(folder / "in.npz", **_resampling_arrays())


def test_resampling_functions_match_nnunet(oracle):
    root = oracle[3]
    calls = _resampling_cases()
    arrays = _resampling_arrays()
    with np.load(root / "resample" / "out.npz") as out:
        ref = dict(out)
    for i, (key, fn, kw, arr, shape, cur, new) in enumerate(calls):
        r = resampler({key: fn, f"{key}_kwargs": kw}, key)
        ours = r(arrays[arr], shape, cur, new)
        expected = ref[str(i)]
        assert ours.shape == expected.shape, (fn, kw)
        if arr == "seg":
            agreement = (ours == expected).mean()
            # torch: the same arithmetic; scipy vs skimage/batchgenerators: interpolation ties differ
            assert agreement >= (1.0 if fn.startswith("resample_torch") else 0.99), (fn, kw, agreement)
            assert ours.dtype == expected.dtype or not fn.startswith("resample_torch"), (fn, ours.dtype)
        else:
            diff = np.abs(ours.astype(np.float64) - expected).max()
            bound = 1e-5 if fn != "resample_data_or_seg_to_shape" else 0.05 * np.ptp(expected)
            assert diff <= bound, (fn, kw, diff)
    # nnunetv2 cannot call resample_torch_simple as a plans function; kubeseg refuses it
    assert f"error_{len(calls)}" in ref
    with pytest.raises(KubesegError, match="resampling_fn_data.*resample_torch_simple"):
        check_configuration({"resampling_fn_data": "resample_torch_simple"})


def test_resenc_network_equals_nnunet(oracle):
    """Same class, state_dict keys and shapes; nnunetv2's initialised weights give the same logits here."""
    raw, _, _, root = oracle
    spec = load_dataset_json(raw)
    plans = json.loads((root / "net_plans.json").read_text())  # ResEnc-M rules, narrow stages
    with np.load(root / "net.npz") as z:
        ref = dict(z)
    assert str(ref["cls"]) == "ResidualEncoderUNet"
    net = build_network_from_plans(plans, "3d_fullres", spec.raw, deep_supervision=False)
    state = net.state_dict()
    ref_state = {k[2:]: v for k, v in ref.items() if k.startswith("w:")}
    assert list(state) == list(ref_state)
    assert all(tuple(state[k].shape) == ref_state[k].shape for k in state)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in ref_state.items()}, strict=True)
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(ref["input"])).numpy()
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-5, atol=1e-5)


LOSS_CASES = [("ce", True, 3), ("ce", False, 3), ("bce", True, None), ("bce", False, 4), ("bce", True, 4)]


def _loss_arrays() -> dict:
    rng = np.random.RandomState(7)
    arrays = {}
    for i, (kind, batch_dice, ignore) in enumerate(LOSS_CASES):
        arrays[f"x_{i}"] = rng.randn(2, 3, 6, 12, 12).astype(np.float32)
        if kind == "ce":
            arrays[f"y_{i}"] = rng.randint(0, 4, (2, 1, 6, 12, 12)).astype(np.float32)
        else:
            arrays[f"y_{i}"] = (rng.rand(2, 3 + (ignore is not None), 6, 12, 12) > 0.6).astype(np.int16)
    return arrays


def _loss_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    np.savez(folder / "in.npz", **_loss_arrays())
    (folder / "spec.json").write_text(json.dumps([{"kind": kind, "batch_dice": batch_dice, "ignore_label": ignore}
                                                  for kind, batch_dice, ignore in LOSS_CASES]))


def test_region_and_ignore_losses_equal_nnunet(oracle):
    """Dice + CE with an ignore label, Dice + BCE for regions (with and without one), vs nnunetv2's losses."""
    from kubeseg.training.loss import build_loss

    arrays = _loss_arrays()
    with np.load(oracle[3] / "loss" / "out.npz") as out:
        ref = {k: float(v) for k, v in out.items()}
    for i, (kind, batch_dice, ignore) in enumerate(LOSS_CASES):
        fn = build_loss(batch_dice, None, regions=kind == "bce", ignore_label=ignore)
        ours = float(fn(torch.from_numpy(arrays[f"x_{i}"]), torch.from_numpy(arrays[f"y_{i}"])))
        assert ours == pytest.approx(ref[str(i)], rel=1e-5, abs=1e-6), (kind, batch_dice, ignore)
