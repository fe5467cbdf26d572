"""Importing nnU-Net v2 models: a good zip becomes a bundle that predicts; a path-traversal
entry, pickled code in a checkpoint, and missing or inconsistent files are refused by name,
and nothing is written."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeseg.errors import KubesegError
from kubeseg.import_nnunet import import_nnunet
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import predict

from tests.inference.helpers import make_model_folder, make_plans, make_raw


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def nnunet_results(tmp_path_factory):
    """``Dataset042_X/nnUNetTrainer__P__3d_fullres`` with nnU-Net-style checkpoints (numpy scalars,
    torch.device), postprocessing.pkl and nnU-Net's postprocessing.json beside it."""
    root = tmp_path_factory.mktemp("imp")
    raw = make_raw(root, "ct", cases=2, tests=1)
    plans, fp = make_plans(raw, root / "plans")
    ds = json.loads((raw / "dataset.json").read_text())
    model = make_model_folder(plans, ds, "3d_fullres", root / "results" / "Dataset042_X" /
                              f"nnUNetTrainer__{plans['plans_name']}__3d_fullres", folds=("0", "1"), fingerprint=fp)
    for fold in ("0", "1"):
        path = model / f"fold_{fold}" / "checkpoint_final.pth"
        ckpt = torch.load(path, weights_only=True)
        ckpt["logging"] = {"mean_fg_dice": [np.float64(0.7)]}
        ckpt["init_args"]["device"] = torch.device("cpu")
        torch.save(ckpt, path)
    (model / "postprocessing.pkl").write_bytes(b"\x80\x04K\x01.")  # never read
    (model / "postprocessing.json").write_text(json.dumps({
        "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"],
        "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]}]}))
    return root, raw, model


def _zip(folder: Path, target: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, str(Path("Dataset042_X") / folder.name / f.relative_to(folder)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return target


def test_zip_import_predicts(nnunet_results, tmp_path):
    root, raw, model = nnunet_results
    bundle = import_nnunet(_zip(model, tmp_path / "m.zip"), tmp_path / "bundle")
    sel = json.loads((bundle / "selection.json").read_text())
    assert sel["members"] == [{"configuration": "3d_fullres", "folder": model.name, "folds": ["0", "1"]}]
    assert json.loads((bundle / "postprocessing.json").read_text())["postprocessing_kwargs"] == \
        [{"labels_or_regions": [1, 2, 3]}]
    assert not (bundle / model.name / "postprocessing.pkl").exists()
    out = predict(raw / "imagesTs", tmp_path / "pred", bundle, PredictSettings(device="cpu", progress=False,
                                                                               use_mirroring=False))
    assert len(out) == 1 and out[0].is_file()
    # a results folder imports too
    assert import_nnunet(root / "results", tmp_path / "bundle2").is_dir()


@pytest.mark.parametrize("entry", ["../escape.txt", "/abs/escape.txt", "Dataset042_X/../../escape.txt"])
def test_path_traversal_is_refused(nnunet_results, tmp_path, entry):
    _, _, model = nnunet_results
    work = tmp_path / "work"
    work.mkdir()
    bad = _zip(model, work / "bad.zip", {entry: b"x"})
    with pytest.raises(KubesegError, match="refusing zip entry"):
        import_nnunet(bad, work / "bundle")
    assert sorted(p.name for p in work.iterdir()) == ["bad.zip"]
    assert not (tmp_path / "escape.txt").exists()


def test_symlink_entry_is_refused(nnunet_results, tmp_path):
    _, _, model = nnunet_results
    bad = _zip(model, tmp_path / "bad.zip")
    with zipfile.ZipFile(bad, "a") as zf:
        info = zipfile.ZipInfo("Dataset042_X/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(KubesegError, match="symbolic links"):
        import_nnunet(bad, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_pickled_code_in_checkpoint_is_refused(nnunet_results, tmp_path):
    _, _, model = nnunet_results
    marker = tmp_path / "pwned"
    evil_model = tmp_path / "src" / model.name
    evil_model.mkdir(parents=True)
    for f in ("plans.json", "dataset.json"):
        (evil_model / f).write_bytes((model / f).read_bytes())
    (evil_model / "fold_0").mkdir()
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    ckpt["init_args"]["hook"] = _Evil(str(marker))
    torch.save(ckpt, evil_model / "fold_0" / "checkpoint_final.pth")
    z = _zip(evil_model, tmp_path / "evil.zip")
    with pytest.raises(KubesegError, match=r"checkpoint_final\.pth cannot be loaded safely"):
        import_nnunet(z, tmp_path / "bundle")
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()


def test_missing_and_inconsistent_files_are_named(nnunet_results, tmp_path):
    _, _, model = nnunet_results
    broken = tmp_path / "results" / model.name
    broken.mkdir(parents=True)
    (broken / "plans.json").write_bytes((model / "plans.json").read_bytes())
    (broken / "fold_0").mkdir()
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes((model / "fold_0" / "checkpoint_final.pth").read_bytes())
    with pytest.raises(KubesegError, match="dataset.json is missing"):
        import_nnunet(tmp_path / "results", tmp_path / "b1")
    ds = json.loads((model / "dataset.json").read_text())
    ds["labels"]["extra"] = 4  # 5 outputs, but the weights have 4
    (broken / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(KubesegError, match="does not fit the network"):
        import_nnunet(tmp_path / "results", tmp_path / "b2")
    (broken / "fold_1").mkdir()
    with pytest.raises(KubesegError, match=r"fold_1/checkpoint_final\.pth"):
        import_nnunet(tmp_path / "results", tmp_path / "b3")
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "b3"))
