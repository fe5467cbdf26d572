"""The cascade's extra input (kubeseg.cascade): the low-res stage's out-of-fold segmentations,
exported onto the full-res grid, checked per cascade fold, and consumed by cascade training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kubeseg.cascade import (MANIFEST, check_cascade_inputs, export_cascade_inputs, fold_cases,
                             out_of_fold_predictions)
from kubeseg.cli import main
from kubeseg.errors import KubesegError
from kubeseg.preprocessing.resampling import resample_image, resample_seg
from kubeseg.training.splits import generate_crossval_split
from tests.training.tiny_dataset import make_case, tiny_dataset_json, tiny_plans, write_case

N_CASES = 10
FULL, LOW = (24, 48, 48), (16, 24, 24)  # spacings [2, 1, 1] and [3, 2, 2]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _dataset(root: Path) -> tuple[Path, list[str]]:
    """PRE with 3d_fullres and 3d_lowres arrays of the same cases (lowres: resampled full-res)."""
    pre = root / "PRE"
    plans = tiny_plans()
    full_dir, low_dir = pre / "nnUNetPlans_3d_fullres", pre / "nnUNetPlans_3d_lowres"
    for d in (full_dir, low_dir):
        d.mkdir(parents=True)
    (pre / "plans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(tiny_dataset_json(N_CASES)))
    rng = np.random.RandomState(0)
    ids = []
    for i in range(N_CASES):
        img, seg = make_case(rng, FULL)
        key = f"case_{i:03d}"
        write_case(full_dir, key, img, seg, [2.0, 1.0, 1.0])
        write_case(low_dir, key, resample_image(img, LOW, [2, 1, 1], [3, 2, 2]),
                   resample_seg(seg, LOW, [2, 1, 1], [3, 2, 2]), [3.0, 2.0, 2.0])
        ids.append(key)
    return pre, ids


def _lowres_model(root: Path, pre: Path, ids: list[str], folds=range(5), probabilities: bool = True) -> Path:
    """A low-res training output whose validation predictions are the (low-res) reference."""
    model = root / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    model.mkdir()
    for f in ("plans.json", "dataset.json"):
        (model / f).write_text((pre / f).read_text())
    splits = generate_crossval_split(sorted(ids))
    for k in folds:
        val = model / f"fold_{k}" / "validation"
        val.mkdir(parents=True)
        for case in splits[k]["val"]:
            seg = np.clip(np.load(pre / "nnUNetPlans_3d_lowres" / f"{case}_seg.npy")[0], 0, None).astype(np.uint8)
            arrays = {"segmentation": seg}
            if probabilities:
                arrays["probabilities"] = np.stack([seg == 0, seg == 1]).astype(np.float32)
            np.savez_compressed(val / f"{case}.npz", **arrays)
    return model


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("probabilities", [True, False])
def test_export_puts_out_of_fold_predictions_on_the_full_res_grid(tmp_path, probabilities):
    pre, ids = _dataset(tmp_path)
    model = _lowres_model(tmp_path, pre, ids, probabilities=probabilities)
    res = export_cascade_inputs(model, pre, "3d_cascade_fullres")
    assert res.folder == model / "predicted_next_stage" / "3d_cascade_fullres"  # nnU-Net's place
    assert res.previous_stage == "3d_lowres" and sorted(res.source_fold) == ids
    splits = generate_crossval_split(sorted(ids))
    for case, fold in res.source_fold.items():
        # predicted by the one low-res fold that held the case out, never by one that trained on it
        assert case in splits[int(fold)]["val"] and case not in splits[int(fold)]["train"]
        seg = np.load(res.folder / f"{case}.npy")
        assert seg.shape == (1, *FULL) and seg.dtype == np.int8
        ref = np.load(pre / "nnUNetPlans_3d_fullres" / f"{case}_seg.npy")[0] == 1
        # the same anatomy on the other grid: overlapping, centred where the reference is
        assert _dice(seg[0] == 1, ref) > 0.75, case
        assert np.abs(np.argwhere(seg[0] == 1).mean(0) - np.argwhere(ref).mean(0)).max() < 1.0, case
    manifest = json.loads((res.folder / MANIFEST).read_text())
    assert manifest["source_fold"] == res.source_fold and manifest["data_identifier"] == "nnUNetPlans_3d_fullres"
    for fold in range(5):
        assert check_cascade_inputs(res.folder, pre, "3d_cascade_fullres", fold) == fold_cases(
            pre, "3d_cascade_fullres", fold) == sorted(ids)
    # exporting again replaces the folder (same inputs, same outputs), leaving nothing beside it
    before = {p.name: p.read_bytes() for p in res.folder.iterdir()}
    export_cascade_inputs(model, pre, "3d_cascade_fullres")
    assert {p.name: p.read_bytes() for p in res.folder.iterdir()} == before
    assert sorted(p.name for p in res.folder.parent.iterdir()) == ["3d_cascade_fullres"]


def test_missing_low_res_folds_are_named(tmp_path):
    pre, ids = _dataset(tmp_path)
    model = _lowres_model(tmp_path, pre, ids, folds=(0, 1, 2, 4))
    res = export_cascade_inputs(model, pre, "3d_cascade_fullres", tmp_path / "prev")
    assert sorted(set(res.source_fold.values())) == ["0", "1", "2", "4"]
    with pytest.raises(KubesegError, match=r"3d_cascade_fullres fold 0 needs .* 2 case\(s\).*fold\(s\) 3 "):
        check_cascade_inputs(tmp_path / "prev", pre, "3d_cascade_fullres", 0)
    with pytest.raises(KubesegError, match="does not exist"):
        check_cascade_inputs(tmp_path / "nowhere", pre, "3d_cascade_fullres", 0)


def test_refusals(tmp_path):
    pre, ids = _dataset(tmp_path)
    model = _lowres_model(tmp_path, pre, ids)
    with pytest.raises(KubesegError, match="not a cascade stage"):
        export_cascade_inputs(model, pre, "3d_fullres")
    # a case held out by two folds: its out-of-fold prediction is ambiguous
    case = next(iter(out_of_fold_predictions(model)))
    src = out_of_fold_predictions(model)[case][1]
    other = next(d for d in model.glob("fold_*") if d.name != src.parent.parent.name)
    (other / "validation" / src.name).write_bytes(src.read_bytes())
    with pytest.raises(KubesegError, match=f"case {case} was held out by folds"):
        export_cascade_inputs(model, pre, "3d_cascade_fullres")
    (other / "validation" / src.name).unlink()
    # the full-res arrays must exist: they define the target grid
    import shutil
    shutil.rmtree(pre / "nnUNetPlans_3d_fullres")
    with pytest.raises(KubesegError, match="preprocess '3d_cascade_fullres' first"):
        export_cascade_inputs(model, pre, "3d_cascade_fullres")
    assert not (model / "predicted_next_stage" / "3d_cascade_fullres").exists()


def test_trained_low_res_fold_to_cascade_training(tmp_path, capsys):
    """The real chain: a low-res fold trained by kubeseg (its validation npz as written), exported by
    the CLI verb, then cascade training reading the export (image + one-hot channel)."""
    from kubeseg.training import Schedule, TrainSettings, train_fold

    pre, ids = _dataset(tmp_path)
    quick = dict(device="cpu", schedule=Schedule(1, 2, 1, "smoke"), num_workers=0, progress_bar=False,
                 log_to_console=False, validation_mirroring=False)
    low = tmp_path / "M" / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    train_fold(pre, pre / "plans.json", "3d_lowres", 0, low, TrainSettings(**quick))
    assert main(["cascade-inputs", str(low), "--preprocessed-dir", str(pre), "-c", "3d_cascade_fullres"]) == 0
    prev = low / "predicted_next_stage" / "3d_cascade_fullres"
    assert str(prev) in capsys.readouterr().out
    held_out = generate_crossval_split(sorted(ids))[0]["val"]
    assert sorted(p.stem for p in prev.glob("*.npy")) == sorted(held_out)
    assert np.load(prev / f"{held_out[0]}.npy").shape == (1, *FULL)
    # fold 0 of the cascade also trains on cases only folds 1-4 held out: refused up front, by the CLI too
    assert main(["train", str(pre), "--plans", str(pre / "plans.json"), "-c", "3d_cascade_fullres", "-f", "0",
                 "-o", str(tmp_path / "C"), "--previous-stage", str(prev), "--device", "cpu",
                 "--schedule", "1x2x1", "-j", "0"]) == 2
    assert "fold(s) 1, 2, 3, 4" in capsys.readouterr().err
    assert not (tmp_path / "C").exists()

    # with every low-res fold's predictions the cascade trains on them (fabricated folds 1-4)
    (tmp_path / "all").mkdir()
    full = _lowres_model(tmp_path / "all", pre, ids)
    res = export_cascade_inputs(full, pre, "3d_cascade_fullres")
    fold_dir = train_fold(pre, pre / "plans.json", "3d_cascade_fullres", 0, tmp_path / "C",
                          TrainSettings(previous_stage_dir=res.folder, **quick))
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert ckpt["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 2  # image + label 1
    assert (fold_dir / "validation" / "summary.json").is_file()
