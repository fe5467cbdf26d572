"""Parity with nnunetv2 2.8.1 on a region-based dataset, a sparsely annotated (ignore-label) one, and a ResEnc model.

All three are synthesized from the CT generator (body ⊃ organ ⊃ lesion):

* ``regions``: ``labels`` become nested regions (body = [1, 2, 3], organ = [2, 3], lesion = [3]),
  ``regions_class_order`` [1, 2, 3]: three sigmoid outputs;
* ``sparse``: only every third slice is annotated; the rest of each label file holds the ignore
  label 4;
* ``resenc``: plain labels, the model planned by ``nnUNetPlannerResEncM`` (ResidualEncoderUNet).

nnunetv2 (in its own interpreter, one process for everything: tests/oracle/nnunet_models.py)
fingerprints and plans each (the small preset's budget and widths), preprocesses one case, and
writes a model folder with its own randomly initialised network in its checkpoint format; then
predicts a test case with it. kubeseg must plan the same, preprocess to the same arrays, and
predict the same label map (>= 99.9 % of voxels) and probabilities (within 2e-3) from nnunetv2's
model folder. The same process decides postprocessing (``determine_postprocessing``) on folders of
label maps (regions, ignore label, plain labels); kubeseg's decision must be the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.dataset import list_training_cases, load_dataset_json
from kubeseg.dataset_check import load_case
from kubeseg.fingerprint import extract_fingerprint
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import predict
from kubeseg.labels import label_scheme
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.planning.plans import configuration
from kubeseg.postprocessing import apply_postprocessing, decide_postprocessing
from kubeseg.preprocessing.preprocess import preprocess_arrays
from tests.oracle.nnunet_models import IGNORE, KINDS, nnunet_models

pytestmark = pytest.mark.integration

AGREEMENT = 0.999
PROB_BOUND = 2e-3
# kubeseg's planner settings equal to the oracle's (CPU-sized budget and widths, see nnunet_oracle.py)
SETTINGS = {"regions": ("small", {}), "sparse": ("small", {}),
            "resenc": ("resenc-m", {"gpu_memory_gb": 0.5, "base_features": 8, "max_features_3d": 64,
                                    "max_features_2d": 64})}


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    return nnunet_models(tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(KINDS))
def oracle(request, nnunet):
    return nnunet[0][request.param]


def test_plans_equal_nnunet(oracle):
    kind, raw, root, model, _ = oracle
    ref = json.loads((model / "plans.json").read_text())
    fingerprint = extract_fingerprint(raw, num_workers=1, progress=False)
    preset, overrides = SETTINGS[kind]
    ours = plan_experiment(load_dataset_json(raw), fingerprint,
                           planner_settings(preset, plans_name=ref["plans_name"], **overrides))
    assert sorted(ours["configurations"]) == sorted(ref["configurations"])
    for config, ref_config in ref["configurations"].items():
        for key in ("batch_size", "patch_size", "spacing", "architecture", "batch_dice", "normalization_schemes"):
            if key in ref_config and not (key == "patch_size" and config == "3d_fullres"):  # patch set by the test
                assert json.loads(json.dumps(ours["configurations"][config][key])) == ref_config[key], (kind, key)


def test_preprocessed_case_equals_nnunet(oracle):
    kind, raw, root, model, _ = oracle
    if kind == "resenc":
        pytest.skip("the ResEnc planners preprocess as the default one (tests/test_parity_coverage.py)")
    plans = json.loads((model / "plans.json").read_text())
    spec = load_dataset_json(raw)
    case = next(c for c in list_training_cases(raw, spec, []) if c.case_id == "synth_000")
    loaded = load_case(case, spec)
    ours = preprocess_arrays(loaded.data, loaded.seg, loaded.geometry, plans, configuration(plans, "3d_fullres"),
                             spec.scheme)
    ref_data = np.load(root / "nnunet_pre" / "3d_fullres" / "synth_000.npy")
    ref_seg = np.load(root / "nnunet_pre" / "3d_fullres" / "synth_000_seg.npy")
    assert ours.data.shape == ref_data.shape
    assert np.abs(ours.data - ref_data).max() < 1e-4  # same plans, same statistics: resampling alone
    assert (ours.seg == ref_seg).mean() >= 0.9999
    if kind == "sparse":
        assert (ref_seg == IGNORE).any() and (ours.seg == IGNORE).any()
        assert ours.properties["class_locations"]["annotated"], "no annotated voxels to sample from"
    else:
        assert "(2, 3)" in ours.properties["class_locations"]
    # the oversampler's locations: same classes (nnunetv2 names a one-label region "(3,)" and the
    # annotated voxels "(-1, 0, 1, 2, 3)") and as many voxels per class
    ref_counts = json.loads((root / "nnunet_pre" / "3d_fullres" / "synth_000.json").read_text())
    ref_counts = {("annotated" if k.startswith("(-1,") else k.strip("(,)") if k.endswith(",)") else k): n
                  for k, n in ref_counts["class_location_counts"].items()}
    assert {k: len(v) for k, v in ours.properties["class_locations"].items()} == ref_counts


def test_prediction_equals_nnunet(oracle):
    kind, raw, root, model, image = oracle
    out = root / "kubeseg_pred"
    predict(image, out, model, PredictSettings(use_mirroring=False, device="cpu", progress=False), folds=["0"],
            save_probabilities=True)
    case = image.name[: -len("_0000.nii.gz")]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nnunet_pred" / f"{case}.nii.gz")))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
    assert ours.shape == ref.shape
    agreement = float((ours == ref).mean())
    p_ref = np.load(root / "nnunet_pred" / f"{case}.npz")["probabilities"]
    p_ours = np.load(out / f"{case}.npz")["probabilities"]
    assert p_ours.shape == p_ref.shape
    heads = 3 if kind == "regions" else 4  # sigmoid per region / softmax per label (ignore excluded)
    if kind == "resenc":
        assert json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
            "network_class_name"].endswith("ResidualEncoderUNet")
    assert p_ref.shape[0] == heads
    max_diff = float(np.abs(p_ours - p_ref).max())
    print(f"{kind}: agreement {agreement:.6f}, max prob diff {max_diff:.2e}, labels {np.unique(ref).tolist()}")
    assert len(np.unique(ref)) > 1
    assert agreement >= AGREEMENT
    assert max_diff <= PROB_BOUND


def _values(labels_or_regions) -> list[int]:
    """nnU-Net's ``labels_or_regions`` (a label, a region, or a list of them) as the values of their union."""
    if isinstance(labels_or_regions, int):
        return [labels_or_regions]
    return [v for item in labels_or_regions for v in _values(item)]


def test_postprocessing_decision_equals_nnunet(nnunet):
    """kubeseg's decision (selection's, per region / on annotated voxels) equals nnunetv2's
    determine_postprocessing on the same label maps: the steps, every class's mean Dice before and after,
    and the postprocessed label maps."""
    _, scenarios = nnunet
    decided = {}
    for name, folder in scenarios.items():
        dataset_json = json.loads((folder / "dataset.json").read_text())
        scheme = label_scheme(dataset_json)
        cases = sorted(f.name for f in (folder / "ref").glob("*.nii.gz"))
        read = lambda f: sitk.GetArrayFromImage(sitk.ReadImage(str(f)))  # noqa: E731
        preds = [read(folder / "pred" / c) for c in cases]
        refs = [read(folder / "ref" / c) for c in cases]
        rule, report = decide_postprocessing(preds, refs, scheme.foreground_labels, scheme.classes,
                                             scheme.ignore_label)
        ref = json.loads((folder / "pred" / "postprocessing.json").read_text())
        assert ref["postprocessing_fns"] == rule.to_json()["postprocessing_fns"], name
        assert [_values(kw["labels_or_regions"]) for kw in ref["postprocessing_kwargs"]] == \
            [list(step) for step in rule.steps], name
        for ours, theirs in ((report["dice_before"], ref["input_folder"]["mean"]),
                             (report["dice_after"], ref["postprocessed"]["mean"])):
            theirs = {(k.strip("(,)") if k.endswith(",)") else k): v["Dice"] for k, v in theirs.items()}
            assert ours == pytest.approx(theirs, rel=1e-12, nan_ok=True), name
        for case, pred in zip(cases, preds):
            np.testing.assert_array_equal(apply_postprocessing(pred, rule),
                                          read(folder / "pred" / "postprocessed" / case), err_msg=name)
        decided[name] = rule.steps
    print("postprocessing decided:", decided)
    # the designed scenarios exercise what they are meant to (see tests/test_postprocessing_regions.py)
    assert decided["regions_designed"] == ((2, 3),)
    assert decided["ignore_on_ignored"] == () and decided["ignore_on_annotated"] == ((1, 2),)
