"""Tiny trained-model folders for the inference tests, made without training.

A synthetic raw dataset is planned (small preset, patch overridden to a few tiles) and
preprocessed by kubeseg; each configuration gets kubeseg's training layout with seeded random
weights, and ``validation/<case>.npz`` out-of-fold probabilities made from the reference labels
(noisy, with a spurious island) so that selection and postprocessing have something to decide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kubeseg.dataset import load_dataset_json
from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
from kubeseg.jsonio import write_json
from kubeseg.network import build_network_from_plans
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.preprocessing.preprocess import preprocess_dataset
from kubeseg.synth import SynthSettings, synthesize
from kubeseg.training.checkpoint import make_checkpoint

PATCHES = {"3d_fullres": [16, 32, 32], "2d": [32, 32]}


def make_raw(root: Path, kind: str = "ct", cases: int = 3, tests: int = 1, shape=(16, 32, 32),
             oblique: bool = True) -> Path:
    return synthesize(root / f"raw_{kind}", SynthSettings(kind=kind, num_cases=cases, shape=shape,
                                                          num_test_cases=tests, seed=3, oblique=oblique))


def make_plans(raw: Path, out: Path, cascade: bool = False) -> tuple[dict, Path]:
    fp = extract_fingerprint(raw, 1, progress=False)
    fp_path = write_fingerprint(fp, out.parent / f"fingerprint_{raw.name}.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small"), dataset_name=raw.name)
    for c, patch in PATCHES.items():
        if c in plans["configurations"]:
            plans["configurations"][c]["patch_size"] = patch
    if cascade:
        full = plans["configurations"]["3d_fullres"]
        plans["configurations"]["3d_lowres"] = {
            "inherits_from": "3d_fullres", "data_identifier": f"{plans['plans_name']}_3d_lowres",
            "spacing": [s * 1.6 for s in full["spacing"]], "next_stage": "3d_cascade_fullres"}
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres",
                                                         "previous_stage": "3d_lowres"}
    write_json(plans, out / "plans.json")
    return plans, fp_path


def make_model_folder(plans: dict, dataset_json: dict, configuration: str, out: Path, folds=("0",),
                      seed: int = 0, fingerprint: Path | None = None) -> Path:
    """kubeseg training output layout with seeded random weights (no validation)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(plans, out / "plans.json")
    write_json(dataset_json, out / "dataset.json")
    if fingerprint is not None:
        (out / "dataset_fingerprint.json").write_bytes(Path(fingerprint).read_bytes())
    for fold in folds:
        torch.manual_seed(seed + 17 * int(fold))
        net = build_network_from_plans(plans, configuration, dataset_json, deep_supervision=True, initialize=True)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.InstanceNorm2d)) and m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
        dim = len(plans["configurations"].get(configuration, {}).get("patch_size", [0, 0, 0])) or 3
        ckpt = make_checkpoint(net.state_dict(), {}, None, {"mean_fg_dice": [0.5]}, 0.5, 1,
                               {"plans": plans, "configuration": configuration, "fold": int(fold),
                                "dataset_json": dataset_json, "device": "cpu"}, tuple(range(dim)))
        (out / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(ckpt, out / f"fold_{fold}" / "checkpoint_final.pth")
    return out


def noisy_validation(model_dir: Path, pre_dir: Path, data_identifier: str, cases: list[str], labels: list[int],
                     quality: float, seed: int, island: bool = True) -> None:
    """Out-of-fold probabilities on the network grid: the reference one-hot, blurred by noise of
    strength ``1 - quality``, plus (``island``) a spurious blob of label 1 far from the object."""
    rng = np.random.RandomState(seed)
    folder = model_dir / "fold_0" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        seg = np.load(pre_dir / data_identifier / f"{case}_seg.npy")[0].astype(np.int16)
        seg[seg < 0] = 0
        onehot = np.stack([seg == lab for lab in labels]).astype(np.float32)
        noise = rng.uniform(0, 1, onehot.shape).astype(np.float32)
        scores = quality * onehot + (1 - quality) * noise
        if island:
            sl = tuple(slice(0, max(1, s // 6)) for s in seg.shape)
            scores[(1, *sl)] += 2.0
        probs = np.exp(4 * scores)
        probs /= probs.sum(0, keepdims=True)
        np.savez_compressed(folder / f"{case}.npz", probabilities=probs.astype(np.float32),
                            segmentation=probs.argmax(0).astype(np.uint8))
    (folder / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": None}}))


def build_trained_dataset(root: Path, kind: str = "ct", configurations=("3d_fullres", "2d"),
                          cascade: bool = False) -> dict:
    """Raw + plans + preprocessed arrays + one model folder per configuration; returns the paths."""
    raw = make_raw(root, kind)
    pre = root / f"pre_{kind}"
    plans, fp_path = make_plans(raw, pre, cascade)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    models = {}
    for i, c in enumerate(configurations):
        if c != "3d_cascade_fullres":
            preprocess_dataset(raw, plans, c, pre, fp_path, 1, progress=False)
        name = f"nnUNetTrainer__{plans['plans_name']}__{c}"
        models[c] = make_model_folder(plans, dataset_json, c, root / f"results_{kind}" / name, seed=i,
                                      fingerprint=fp_path)
    return {"raw": raw, "pre": pre, "plans": plans, "dataset_json": dataset_json, "models": models,
            "fingerprint": fp_path}
