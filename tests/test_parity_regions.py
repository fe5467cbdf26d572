"""Parity with nnunetv2 2.8.1 on a region-based dataset, a sparsely annotated (ignore-label) one, and a ResEnc model.

All three are synthesized from the CT generator (body ⊃ organ ⊃ lesion):

* ``regions``: ``labels`` become nested regions (body = [1, 2, 3], organ = [2, 3], lesion = [3]),
  ``regions_class_order`` [1, 2, 3]: three sigmoid outputs;
* ``sparse``: only every third slice is annotated; the rest of each label file holds the ignore
  label 4;
* ``resenc``: plain labels, the model planned by ``nnUNetPlannerResEncM`` (ResidualEncoderUNet).

nnunetv2 (in its own interpreter) fingerprints and plans each (the small preset's budget and
widths), preprocesses one case, and writes a model folder with its own randomly initialised
network in its checkpoint format; then predicts a test case with it. kubeseg must plan the same,
preprocess to the same arrays, and predict the same label map (>= 99.9 % of voxels) and
probabilities (within 2e-3) from nnunetv2's model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.dataset import list_training_cases, load_dataset_json
from kubeseg.dataset_check import load_case
from kubeseg.fingerprint import extract_fingerprint
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import predict
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.planning.plans import configuration
from kubeseg.preprocessing.preprocess import preprocess_arrays
from kubeseg.synth import SynthSettings, synthesize
from tests.oracle import run_oracle

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
COVERAGE = str(HERE / "oracle" / "nnunet_coverage.py")
MODEL_ORACLE = str(HERE / "inference" / "nnunet_oracle.py")
AGREEMENT = 0.999
PROB_BOUND = 2e-3
IGNORE = 4


def _to_regions(raw: Path) -> None:
    d = json.loads((raw / "dataset.json").read_text())
    d["labels"] = {"background": 0, "body": [1, 2, 3], "organ": [2, 3], "lesion": [3]}
    d["regions_class_order"] = [1, 2, 3]
    (raw / "dataset.json").write_text(json.dumps(d, indent=1))


def _to_sparse(raw: Path) -> None:
    d = json.loads((raw / "dataset.json").read_text())
    d["labels"]["ignore"] = IGNORE
    (raw / "dataset.json").write_text(json.dumps(d, indent=1))
    for f in sorted((raw / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(f))
        seg = sitk.GetArrayFromImage(image)
        seg[np.arange(seg.shape[0]) % 3 != 0] = IGNORE  # every third slice annotated
        out = sitk.GetImageFromArray(seg)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(f))


KINDS = {"regions": _to_regions, "sparse": _to_sparse, "resenc": lambda raw: None}
# kubeseg's planner settings equal to the oracle's (CPU-sized budget and widths, see nnunet_oracle.py)
SETTINGS = {"regions": ("small", {}), "sparse": ("small", {}),
            "resenc": ("resenc-m", {"gpu_memory_gb": 0.5, "base_features": 8, "max_features_3d": 64,
                                    "max_features_2d": 64})}


@pytest.fixture(scope="module", params=sorted(KINDS))
def oracle(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    raw = synthesize(root / "raw", SynthSettings(kind="ct", num_cases=4, shape=(20, 40, 40), num_test_cases=1,
                                                 seed=5))
    KINDS[kind](raw)
    run_oracle(MODEL_ORACLE, "make-model", str(raw), str(root / "work"), "--configs", "3d_fullres",
               "--folds", "0", "--patch-3d", "16", "32", "32",
               "--planner", "nnUNetPlannerResEncM" if kind == "resenc" else "ExperimentPlanner")
    models = json.loads((root / "work" / "nnunet" / "models.json").read_text())
    model = Path(models["3d_fullres"])
    image = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]
    jobs = [{"model_dir": str(model), "out": str(root / "nnunet_pred"), "images": [str(image)], "folds": ["0"],
             "tta": False}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    run_oracle(MODEL_ORACLE, "predict", str(root / "jobs.json"), "--threads", "1")
    if kind != "resenc":  # preprocessing does not depend on the network
        run_oracle(COVERAGE, "preprocess", str(raw), str(model / "plans.json"), str(root / "nnunet_pre"),
                   "--configs", "3d_fullres", "--cases", "synth_000")
    return kind, raw, root, model, image


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
