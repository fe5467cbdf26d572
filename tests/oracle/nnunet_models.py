"""nnunetv2's models, predictions and postprocessing decisions for the region / sparse / ResEnc parity tests
and the region service test, built by ONE oracle process per pytest session (nnunetv2 imported once).

:func:`nnunet_models` synthesizes each kind's dataset (see tests/test_parity_regions.py), has nnunetv2
(``tests/oracle/nnunet_coverage.py batch``) make a randomly initialised, nnunetv2-checkpointed model
for each, preprocess a case, predict a test case with every model, and decide postprocessing on
folders of label maps. The result lives under the session's base temporary folder, so a second test
module reuses it instead of starting the oracle again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kubeseg.synth import SynthSettings, synthesize
from tests.oracle import run_oracle

ORACLE = Path(__file__).resolve().parent / "nnunet_coverage.py"
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

def _write_labels(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(folder / f"{name}.nii.gz"))


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1


def _random_pair(rng, shape=(12, 24, 24), ignore=None) -> tuple[np.ndarray, np.ndarray]:
    """Body ⊃ organ, one or two lesions; the prediction off by a voxel with 0-3 spurious islands of any label."""
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    ref = np.zeros(shape, np.uint8)
    ref[_ellipsoid(shape, centre, np.array(shape) * 0.4)] = 1
    ref[_ellipsoid(shape, centre + rng.uniform(-2, 2, 3), np.array(shape) * 0.2)] = 2
    for _ in range(rng.randint(1, 3)):
        ref[_ellipsoid(shape, centre + rng.uniform(-4, 4, 3), (1.5, 2.5, 2.5))] = 3
    pred = np.roll(ref, rng.randint(-1, 2), axis=rng.randint(3))
    for _ in range(rng.randint(0, 4)):
        z, y, x = rng.randint(0, shape[0] - 2), rng.randint(0, shape[1] - 3), rng.randint(0, shape[2] - 3)
        pred[z:z + 2, y:y + 3, x:x + 3] = rng.randint(1, 4)
    if ignore is not None:
        ref[np.arange(shape[0]) % 3 != 0] = ignore  # every third slice annotated
    return pred, ref


def _postprocessing_scenarios(top: Path) -> dict[str, Path]:
    """Folders of predicted and reference label maps (+ dataset.json) on which both decide postprocessing:
    the designed cases of tests/test_postprocessing_regions.py and random ones (regions with an ignore
    label, plain labels)."""
    regions = {"background": 0, "body": [1, 2, 3], "organ": [2, 3], "lesion": [3]}
    plain = {"background": 0, "body": 1, "organ": 2, "lesion": 3}
    rng = np.random.RandomState(4)  # random cases where a foreground and a per-class step are both taken
    pairs = {"regions_designed": (regions, []), "ignore_on_ignored": (None, []), "ignore_on_annotated": (None, []),
             "regions_ignore_random": ({**regions, "ignore": IGNORE}, [_random_pair(rng, ignore=IGNORE)
                                                                       for _ in range(4)]),
             "labels_random": (plain, [_random_pair(rng) for _ in range(4)])}
    for shift in (0, 1):  # a lesion-valued blob in the body, away from the organ: a second organ-region component
        ref = np.zeros((12, 24, 24), np.uint8)
        ref[1:11, 2:22, 2:22], ref[3:9, 4:12, 4:12], ref[5:7, 6:9, 6:9] = 1, 2, 3
        ref = np.roll(ref, shift, axis=2)
        pred = ref.copy()
        pred[4:6, 16:18, 15 + shift:17 + shift] = 3
        pairs["regions_designed"][1].append((pred, ref))
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 4:12, 4:12], ref[3:6, 6:10, 6:10] = 1, 2
    pred = ref.copy()
    ref[1::2] = 3
    for name, z in (("ignore_on_ignored", 9), ("ignore_on_annotated", 8)):  # an island on an (un)annotated slice
        island = pred.copy()
        island[z, 0:2, 0:2] = 1
        pairs[name] = ({"background": 0, "organ": 1, "core": 2, "ignore": 3}, [(island, ref)])
    out = {}
    for name, (labels, cases) in pairs.items():
        folder = top / name
        for i, (pred, ref) in enumerate(cases):
            _write_labels(folder / "pred", f"case_{i}", pred)
            _write_labels(folder / "ref", f"case_{i}", ref)
        dataset_json = {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                        "numTraining": len(cases)}
        if any(isinstance(v, list) for v in labels.values()):
            dataset_json["regions_class_order"] = [1, 2, 3]
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
        out[name] = folder
    return out


def _model_dir(work: Path) -> Path:
    """Where the oracle's make-model writes the 3d_fullres model (plans name fixed by nnunet_oracle.py)."""
    return work / "nnunet" / "results" / "Dataset987_Oracle" / "nnUNetTrainer__nnUNetSmallPlans__3d_fullres"


def nnunet_models(tmp_path_factory) -> tuple[dict, dict]:
    """``({kind: (kind, raw, root, model_dir, test_image)}, {scenario: folder})``, built once per session."""
    top = tmp_path_factory.getbasetemp() / "nnunet_models"
    if (top / "built.json").is_file():
        return _load(top)
    shutil.rmtree(top, ignore_errors=True)  # an earlier, unfinished build
    top.mkdir()
    jobs, predict_jobs, made = [], [], {}
    for kind in sorted(KINDS):
        root = top / kind
        raw = synthesize(root / "raw", SynthSettings(kind="ct", num_cases=4, shape=(20, 40, 40), num_test_cases=1,
                                                     seed=5))
        KINDS[kind](raw)
        model = _model_dir(root / "work")
        image = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))[0]
        jobs.append(["model", "make-model", raw, root / "work", "--configs", "3d_fullres", "--folds", "0",
                     "--patch-3d", "16", "32", "32",
                     "--planner", "nnUNetPlannerResEncM" if kind == "resenc" else "ExperimentPlanner"])
        predict_jobs.append({"model_dir": str(model), "out": str(root / "nnunet_pred"), "images": [str(image)],
                             "folds": ["0"], "tta": False})
        if kind != "resenc":  # preprocessing does not depend on the network
            jobs.append(["coverage", "preprocess", raw, model / "plans.json", root / "nnunet_pre",
                         "--configs", "3d_fullres", "--cases", "synth_000"])
        made[kind] = (kind, raw, root, model, image)
    (top / "predict.json").write_text(json.dumps(predict_jobs))
    jobs.append(["model", "predict", top / "predict.json", "--threads", "1"])
    scenarios = _postprocessing_scenarios(top / "postprocessing")
    (top / "postprocessing.json").write_text(json.dumps(
        [{"predictions": str(d / "pred"), "references": str(d / "ref"), "dataset_json": str(d / "dataset.json")}
         for d in scenarios.values()]))
    jobs.append(["coverage", "postprocess", top / "postprocessing.json"])
    (top / "jobs.json").write_text(json.dumps(jobs, default=str))
    run_oracle(str(ORACLE), "batch", str(top / "jobs.json"))
    for kind, (_, _, root, model, _) in made.items():
        assert json.loads((root / "work" / "nnunet" / "models.json").read_text())["3d_fullres"] == str(model)
    (top / "built.json").write_text(json.dumps({"made": made, "scenarios": scenarios}, default=str))
    return _load(top)


def _load(top: Path) -> tuple[dict, dict]:
    built = json.loads((top / "built.json").read_text())
    made = {k: (v[0], *(Path(x) for x in v[1:])) for k, v in built["made"].items()}
    return made, {k: Path(v) for k, v in built["scenarios"].items()}


