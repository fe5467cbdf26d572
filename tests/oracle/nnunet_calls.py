"""Small nnunetv2 reference computations for the unit-level parity tests, run in the oracle's
own interpreter (``tests.oracle.run_oracle``): one action per call, inputs and outputs as files.

    loss IN.pt OUT.pt --batch-dice 0|1 --ds-levels N   Dice+CE (and its deep-supervision wrapper)
    splits N OUT.json                                  generate_crossval_split of N sorted keys
    patch-size IN.json OUT.json                        get_patch_size for [patch, rot_x, rot_y, rot_z]
    network IN.json OUT.pt --seed S                    network from plans: weights, logits of a given input
    predict-logits MODEL_DIR DATA.npy OUT.pt           nnUNetPredictor loads a model folder, sliding window

This file imports only nnunetv2 and what nnunetv2 brings; kubeseg is never imported here, and
the project's own tests never import nnunetv2.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile


def _quiet_import_env() -> None:
    # nnunetv2 warns at import when its folder variables are unset; give it scratch folders.
    scratch = tempfile.mkdtemp(prefix="nnunet-oracle-")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(var, scratch)


def loss(a) -> None:
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    data = torch.load(a.inp, weights_only=True)
    ref = DC_and_CE_loss({"batch_dice": bool(a.batch_dice), "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                         weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    out = {"plain": ref(data["outputs"][0], data["targets"][0])}
    if "weights" in data:
        out["deep_supervision"] = DeepSupervisionWrapper(ref, data["weights"].tolist())(data["outputs"], data["targets"])
    torch.save(out, a.out)


def splits(a) -> None:
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    keys = sorted(f"case_{i:04d}" for i in range(a.n))
    ref = generate_crossval_split(keys, seed=12345, n_splits=5)
    with open(a.out, "w") as f:
        json.dump([{"train": [str(k) for k in s["train"]], "val": [str(k) for k in s["val"]]} for s in ref], f)


def patch_size(a) -> None:
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

    with open(a.inp) as f:
        jobs = json.load(f)
    out = [[int(i) for i in get_patch_size(j["patch"], j["rot_x"], j["rot_y"], j["rot_z"], (0.85, 1.25))]
           for j in jobs]
    with open(a.out, "w") as f:
        json.dump(out, f)


def network(a) -> None:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(a.inp) as f:
        job = json.load(f)
    pm = PlansManager(copy.deepcopy(job["plans"]))
    cm = pm.get_configuration(job["configuration"])
    n_in = determine_num_input_channels(pm, cm, job["dataset_json"])
    n_out = pm.get_label_manager(job["dataset_json"]).num_segmentation_heads
    torch.manual_seed(a.seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                 allow_init=True, deep_supervision=job["deep_supervision"])
    torch.manual_seed(a.seed + 1)
    x = torch.randn(job["batch"], n_in, *cm.patch_size)
    net.eval()
    with torch.no_grad():
        y = net(x)
    torch.save({"state_dict": net.state_dict(), "keys": list(net.state_dict()), "n_in": n_in, "n_out": n_out,
                "x": x, "logits": list(y) if isinstance(y, (list, tuple)) else [y]}, a.out)


def predict_logits(a) -> None:
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(1)
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False, device=torch.device("cpu"),
                        perform_everything_on_device=False, allow_tqdm=False)
    p.initialize_from_trained_model_folder(a.model_dir, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    data = np.load(a.data)
    torch.save({"logits": p.predict_sliding_window_return_logits(torch.from_numpy(data)).float()}, a.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("loss")
    p.add_argument("inp"), p.add_argument("out")
    p.add_argument("--batch-dice", type=int, required=True)
    p.set_defaults(fn=loss)
    p = sub.add_parser("splits")
    p.add_argument("n", type=int), p.add_argument("out")
    p.set_defaults(fn=splits)
    p = sub.add_parser("patch-size")
    p.add_argument("inp"), p.add_argument("out")
    p.set_defaults(fn=patch_size)
    p = sub.add_parser("network")
    p.add_argument("inp"), p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=network)
    p = sub.add_parser("predict-logits")
    p.add_argument("model_dir"), p.add_argument("data"), p.add_argument("out")
    p.set_defaults(fn=predict_logits)
    a = ap.parse_args(argv)
    _quiet_import_env()
    import torch

    torch.set_num_threads(1)  # as the training tests do: identical float arithmetic on both sides
    with contextlib.redirect_stdout(io.StringIO()):  # nnunetv2 prints banners; outputs are files
        a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
