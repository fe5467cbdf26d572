"""Selection by CV Dice (configurations and pairs), postprocessing decision, the bundle, and
prediction from the bundle and through the CLI verbs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kubeseg.bundle import make_bundle
from kubeseg.cli import main as cli
from kubeseg.errors import KubesegError
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import predict
from kubeseg.selection import SelectSettings, select_model

from tests.inference.helpers import build_trained_dataset, noisy_validation


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    d = build_trained_dataset(root, "ct", ("3d_fullres", "2d"))
    cases = sorted(p.name[:-len("_seg.npy")] for p in (d["pre"] / d["plans"]["configurations"]["2d"]
                                                        ["data_identifier"]).glob("*_seg.npy"))
    labels = [0, 1, 2, 3]
    # 3d_fullres: good, with a spurious island; 2d: worse
    noisy_validation(d["models"]["3d_fullres"], d["pre"], d["plans"]["configurations"]["3d_fullres"]
                     ["data_identifier"], cases, labels, quality=0.8, seed=0, island=True)
    noisy_validation(d["models"]["2d"], d["pre"], d["plans"]["configurations"]["2d"]["data_identifier"],
                     cases, labels, quality=0.45, seed=1, island=False)
    return d, root


def test_select_scores_configurations_and_pairs(trained):
    d, root = trained
    sel = select_model([d["models"]["3d_fullres"], d["models"]["2d"]], d["pre"], root / "selection",
                       SelectSettings(progress=False))
    names = [c["name"] for c in sel["candidates"]]
    assert names == ["3d_fullres", "2d", "3d_fullres + 2d"]
    scores = {c["name"]: c["foreground_dice"] for c in sel["candidates"]}
    assert scores["3d_fullres"] > scores["2d"]
    best = max(scores, key=scores.get)
    assert [m["configuration"] for m in sel["members"]] == best.split(" + ")
    assert set(sel["expected_dice"]) == {"1", "2", "3"}
    pp = json.loads((root / "selection" / "postprocessing.json").read_text())
    assert pp["postprocessing_fns"]  # the island is removed by the rule
    assert sel["expected_foreground_dice_after_postprocessing"] > sel["expected_foreground_dice"]


def test_bundle_holds_what_prediction_needs_and_predicts(trained, tmp_path):
    d, root = trained
    if not (root / "selection" / "selection.json").is_file():
        test_select_scores_configurations_and_pairs(trained)
    bundle = make_bundle(root / "selection", tmp_path / "bundle")
    sel = json.loads((bundle / "selection.json").read_text())
    for m in sel["members"]:
        folder = bundle / m["folder"]
        assert {p.name for p in folder.iterdir()} == {"plans.json", "dataset.json", "dataset_fingerprint.json",
                                                      "fold_0"}
        assert [p.name for p in (folder / "fold_0").iterdir()] == ["checkpoint_final.pth"]
        ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
        assert "optimizer_state" not in ckpt and ckpt["init_args"]["configuration"] == m["configuration"]
    for f in ("plans.json", "dataset.json", "dataset_fingerprint.json", "postprocessing.json", "selection.json"):
        assert (bundle / f).is_file()
    image = sorted((d["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    fast = PredictSettings(device="cpu", progress=False)
    from_bundle = predict(image.parent, tmp_path / "a", bundle, fast, postprocess=False)[0]
    members = [d["models"][m["configuration"]] for m in sel["members"]]
    if len(members) == 1:
        direct = predict(image.parent, tmp_path / "b", members[0], fast)[0]
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(from_bundle))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(direct))))
    with pytest.raises(KubesegError, match="not empty"):
        make_bundle(root / "selection", bundle)


def test_cli_verbs(trained, tmp_path, capsys):
    d, root = trained
    models = [str(d["models"]["3d_fullres"]), str(d["models"]["2d"])]
    assert cli(["select", *models, "--preprocessed-dir", str(d["pre"]), "-o", str(tmp_path / "s"),
                "--no-ensembles"]) == 0
    assert cli(["bundle", str(tmp_path / "s"), "-o", str(tmp_path / "b")]) == 0
    image = sorted((d["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    assert cli(["predict", "-i", str(image), "-o", str(tmp_path / "p"), "-m", str(tmp_path / "b"),
                "--disable-tta", "--save-probabilities", "--device", "cpu"]) == 0
    assert (tmp_path / "p" / "synth_003.nii.gz").is_file() and (tmp_path / "p" / "synth_003.npz").is_file()
    # nnU-Net's results folder layout with -c
    assert cli(["predict", "-i", str(image), "-o", str(tmp_path / "q"), "-m", str(d["models"]["2d"].parent),
                "-c", "2d", "--disable-tta"]) == 0
    assert cli(["predict", "-i", str(image), "-o", str(tmp_path / "r"), "-m", str(tmp_path / "nothing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
