"""The cascade wave end to end through kfp.local: a synthetic CT large enough that the small preset
plans 3d_lowres, only 3d_cascade_fullres asked for. The low-res stage trains on all five folds
(first wave), its out-of-fold segmentations go onto the full-res grid, the cascade fold trains on
them (second wave), selection and the bundle carry the cascade with its first stage, the version
is registered, and ``kubeseg predict`` segments a test case with the bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("kfp")
pytest.importorskip("mlflow")

from kubeseg.cli import main  # noqa: E402
from kubeseg.planning.plans import configuration as resolve  # noqa: E402
from kubeseg.training.splits import generate_crossval_split  # noqa: E402
from pipelines.run import run_local  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "tiny-cascade"
# the parity tests' "ct_large": the smallest of their datasets for which the small preset plans 3d_lowres
SHAPE, CASES, SEED = (64, 192, 192), 5, 3


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    from kubeseg.synth import SynthSettings, synthesize

    root = tmp_path_factory.mktemp("cascade")
    raw = synthesize(root / "raw" / "Dataset003_SynthCTLarge",
                     SynthSettings(kind="ct", num_cases=CASES, num_test_cases=1, shape=SHAPE, seed=SEED,
                                   dataset_name="Dataset003_SynthCTLarge"))
    args = {"dataset_uri": str(raw), "configurations": ["3d_cascade_fullres"], "folds": [0], "schedule": "1x2x1",
            "planner_preset": "small", "device": "cpu", "num_workers": 0, "torch_threads": 1,
            "validation_tta": False, "mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "kubeseg-cascade",
            "model_name": NAME}
    result = run_local(args, root / "pipeline_root", parallelism=2)
    return {"root": root, "raw": raw, "result": result, "run_dir": Path(result["run_dir"])}


def test_two_waves(cascade_run):
    run_dir = cascade_run["run_dir"]
    assert "`3d_cascade_fullres` folds 0" in (run_dir / "plan" / "summary").read_text()
    # first wave: the low-res stage on all five folds; second wave: the requested cascade fold
    models = Path(cascade_run["result"]["selection"]) / "models"
    low, casc = sorted(models.glob("*__3d_lowres")), sorted(models.glob("*__3d_cascade_fullres"))
    assert len(low) == 1 and len(casc) == 1
    assert sorted(p.name for p in low[0].glob("fold_*")) == [f"fold_{k}" for k in range(5)]
    assert sorted(p.name for p in casc[0].glob("fold_*")) == ["fold_0"]

    # one preprocessed artifact per group: the low-res folds read only low-res arrays, the cascade group
    # (preprocessing what a 3d_fullres group would) only full-res arrays
    # (a task's folder is named after its component: preprocess-2, train-2 in the cascade's sub-pipeline)
    groups = {}
    for done in run_dir.glob("**/preprocess*/executor_output.json"):
        arrays = {p.parent.name for p in (done.parent / "preprocessed").glob("*/*.npy")}
        trained = {m.name.split("__")[-1] for m in done.parent.parent.glob("**/train*/model/*__*__*")}
        groups[tuple(sorted(trained))] = sorted(arrays)
    plans = json.loads((run_dir / "plan" / "plans").read_text())
    ident = lambda c: resolve(plans, c)["data_identifier"]  # noqa: E731
    assert groups == {("3d_lowres",): [ident("3d_lowres")], ("3d_cascade_fullres",): [ident("3d_fullres")]}, groups

    # the cascade input: every case's low-res segmentation, from the fold that held it out, on the full-res grid
    (ci,) = [d.parent for d in run_dir.glob("**/cascade-inputs/executor_output.json")]
    prev = ci / "previous_stage" / "3d_cascade_fullres"
    manifest = json.loads((prev / "cascade_inputs.json").read_text())
    ids = sorted(manifest["source_fold"])
    assert len(ids) == CASES
    splits = generate_crossval_split(ids)
    assert all(case in splits[int(fold)]["val"] for case, fold in manifest["source_fold"].items())
    (pre,) = ci.parent.glob("preprocess*/preprocessed")  # the cascade group's own artifact
    for case in ids:
        full = np.load(pre / manifest["data_identifier"] / f"{case}.npy", mmap_mode="r")
        seg = np.load(prev / f"{case}.npy")
        assert seg.shape == (1, *full.shape[1:])
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}

    # the cascade network reads image + one channel per foreground label (3)
    import torch
    ckpt = torch.load(casc[0] / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert ckpt["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1 + 3


def test_selection_bundle_registry_predict(cascade_run, tmp_path):
    result = cascade_run["result"]
    sel = json.loads((Path(result["selection"]) / "selection.json").read_text())
    # only the requested configuration is a candidate; its first stage is trained for it, not selected
    assert [c["name"] for c in sel["candidates"]] == ["3d_cascade_fullres"]
    assert [m["configuration"] for m in sel["members"]] == ["3d_cascade_fullres"]
    bundle = Path(result["bundle"])
    bsel = json.loads((bundle / "selection.json").read_text())
    assert [p["configuration"] for p in bsel["previous_stages"]] == ["3d_lowres"]
    assert result["version"] == "1"

    from kubeseg.registry import get_version
    v = get_version(NAME, "challenger", f"sqlite:///{cascade_run['root'] / 'mlflow.db'}")
    assert v.version == "1" and v.tags["configurations"] == "3d_cascade_fullres"

    import SimpleITK as sitk
    case = sorted((cascade_run["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    assert main(["predict", "-i", str(case), "-o", str(tmp_path / "out"), "-m", str(bundle), "--disable-tta",
                 "--step", "1", "--device", "cpu"]) == 0  # low-res stage, then the cascade on its segmentation
    out = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert len(out) == 1
    img, seg = sitk.ReadImage(str(case)), sitk.ReadImage(str(out[0]))
    assert seg.GetSize() == img.GetSize() and np.allclose(seg.GetSpacing(), img.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= {0, 1, 2, 3}
