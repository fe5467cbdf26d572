"""nnunetv2's side of ``benchmarks/train.py``, run as a subprocess.

nnunetv2 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` (and
``nnUNet_n_proc_DA``, ``nnUNet_def_n_proc``) when it is imported, so this script sets them
first and imports nnunetv2 afterwards. Two steps, each one process:

    prepare RAW WORK --workers N
        fingerprint, plan (the small CPU settings of kubeseg's "small" preset) and
        preprocess a configuration (3d_fullres by default) under WORK/{raw,preprocessed}; writes WORK/prepare.json.
    train WORK --epochs E --iterations I --val-iterations V --workers N --threads T
        [--expect-val CASE ...] [--turns]
        trains that configuration's fold 0 with nnUNetTrainer (schedule shortened, CPU), runs its own
        final validation (``perform_actual_validation``: Dice in the original image geometry,
        fold_0/validation/summary.json) and also keeps the label maps that the validation's
        sliding-window prediction produced in the *preprocessed* geometry, with the matching
        preprocessed references, under WORK/pred_preprocessed/ (so that the caller can score
        both tools on the same grid). Writes WORK/train.json with timestamps per epoch and
        per training iteration. With --turns it runs an epoch (and finally the validation)
        only when the caller says so on stdin, so that the caller can alternate epochs of two
        trainers (see benchmarks/train.py).

The trainer class is imported directly from its module: nnunetv2's trainer lookup by name
(``recursive_find_python_class`` over nnunetv2.training) imports every trainer variant,
some of which need packages that are not installed here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

FOLD = 0
# kubeseg's "small" planner preset, in nnunetv2's planner attributes
TURN_WAIT = "@@kubeseg-benchmark: waiting for turn"
TURN_DONE = "@@kubeseg-benchmark: epoch done"
SMALL_PLANNER = {"gpu_memory_target_in_gb": 0.5, "UNet_base_num_features": 8,
                 "UNet_max_features_3d": 64, "UNet_max_features_2d": 64}


def _set_env(work: Path, workers: int) -> None:
    for sub in ("raw", "preprocessed", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update(
        nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(work / "results"),
        nnUNet_n_proc_DA=str(workers),             # augmentation workers (0 = in the main process)
        nnUNet_def_n_proc=str(max(1, workers)),    # export / metric workers of the final validation
        nnUNet_compile="false",                    # nnU-Net turns it off on CPU anyway
    )


def _dataset_name(raw: Path) -> str:
    return json.loads((raw / "dataset.json").read_text())["name"]


def _jsonable(o):
    import numpy as np
    return np.asarray(o).tolist()


def prepare(a) -> int:
    raw = Path(a.raw).resolve()
    work = Path(a.work).resolve()
    _set_env(work, a.workers)
    name = _dataset_name(raw)
    link = work / "raw" / name
    if not link.exists():
        link.symlink_to(raw)

    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
        DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    t0 = time.perf_counter()
    extractor = DatasetFingerprintExtractor(name, max(1, a.workers))
    extractor.show_progress_bar = False
    extractor.run(overwrite_existing=True)
    planner = ExperimentPlanner(name, gpu_memory_target_in_gb=SMALL_PLANNER["gpu_memory_target_in_gb"])
    planner.UNet_base_num_features = SMALL_PLANNER["UNet_base_num_features"]
    planner.UNet_max_features_3d = SMALL_PLANNER["UNet_max_features_3d"]
    planner.UNet_max_features_2d = SMALL_PLANNER["UNet_max_features_2d"]
    with contextlib.redirect_stdout(io.StringIO()):
        planner.plan_experiment()  # writes preprocessed/<name>/nnUNetPlans.json
    with contextlib.redirect_stdout(io.StringIO()):  # preprocesses, then copies gt_segmentations/
        preprocess_dataset(int(name[7:10]), planner.plans_identifier, [a.configuration],
                           [max(1, a.workers)], show_progress_bar=False)
    folder = work / "preprocessed" / name
    (work / "prepare.json").write_text(json.dumps({
        "dataset_name": name, "plans_identifier": planner.plans_identifier,
        "plans_file": str(folder / f"{planner.plans_identifier}.json"),
        "seconds": time.perf_counter() - t0}, indent=1))
    return 0


def train(a) -> int:
    work = Path(a.work).resolve()
    _set_env(work, a.workers)
    info = json.loads((work / "prepare.json").read_text())
    name = info["dataset_name"]

    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    plans = json.loads(Path(info["plans_file"]).read_text())
    dataset_json = json.loads((work / "preprocessed" / name / "dataset.json").read_text())
    data_folder = work / "preprocessed" / name / plans["configurations"][a.configuration]["data_identifier"]

    # the split nnU-Net's do_split() will create (seeded 5-fold KFold over the sorted ids)
    ids = sorted(str(p.name)[:-len(".b2nd")] for p in data_folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    val_expected = sorted(str(k) for k in generate_crossval_split(ids, seed=12345, n_splits=5)[FOLD]["val"])
    print(f"nnunetv2 fold {FOLD} validation cases: {val_expected}", flush=True)
    if a.expect_val and sorted(a.expect_val) != val_expected:
        print(f"ERROR: kubeseg validates on {sorted(a.expect_val)}, nnunetv2 would validate on {val_expected}",
              flush=True)
        return 3

    schedule = (a.epochs, a.iterations, a.val_iterations)

    def wait_for_turn():
        """--turns: say so on stdout, then block until the caller writes a line to stdin."""
        if a.turns:
            print(TURN_WAIT, flush=True)
            sys.stdin.readline()  # EOF (caller gone) also lets it go on

    def turn_done():
        if a.turns:
            print(TURN_DONE, flush=True)

    iteration_ends: list[list[float]] = []

    class BenchmarkTrainer(nnUNetTrainer):
        """nnUNetTrainer with the benchmark's schedule and timestamps of the training loop."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = schedule

        def on_epoch_start(self):
            wait_for_turn()  # before the epoch's start timestamp
            super().on_epoch_start()

        def on_epoch_end(self):
            super().on_epoch_end()
            turn_done()

        def on_train_epoch_start(self):
            iteration_ends.append([])
            super().on_train_epoch_start()

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)  # returns the loss as a numpy value: already synchronised
            iteration_ends[-1].append(time.time())
            return out

    # keep what the final validation predicts, in the preprocessed geometry (its
    # sliding-window logits), before nnU-Net resamples it back to the original images
    predicted: list[np.ndarray] = []
    original_predict = nnUNetPredictor.predict_sliding_window_return_logits

    def keep_prediction(self, input_image):
        logits = original_predict(self, input_image)
        predicted.append(torch.argmax(torch.as_tensor(logits), 0).to(torch.uint8).cpu().numpy())
        return logits

    nnUNetPredictor.predict_sliding_window_return_logits = keep_prediction

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.set_num_threads(a.threads)
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops this (run_training.py sets it)
    t0 = time.time()
    trainer = BenchmarkTrainer(plans, a.configuration, FOLD, dataset_json, device=torch.device(a.device))
    trainer.run_training()
    wait_for_turn()
    t_trained = time.time()
    trainer.perform_actual_validation(save_probabilities=False)
    t_validated = time.time()

    tr_keys, val_keys = trainer.do_split()
    val_order = sorted(val_keys)  # perform_actual_validation predicts in the dataset's (sorted) order
    if len(predicted) != len(val_order):
        print(f"ERROR: kept {len(predicted)} predictions for {len(val_order)} validation cases", flush=True)
        return 4
    out_dir = work / "pred_preprocessed"
    out_dir.mkdir(exist_ok=True)
    dataset = trainer.dataset_class(str(data_folder), list(val_order))
    for key, seg in zip(val_order, predicted):
        _, ref, _, _ = dataset.load_case(key)
        ref = np.asarray(ref[0]).astype(np.int16)
        ref[ref < 0] = 0
        if ref.shape != seg.shape:
            print(f"ERROR: {key}: prediction {seg.shape} vs reference {ref.shape}", flush=True)
            return 4
        np.savez_compressed(out_dir / f"{key}.npz", segmentation=seg, reference=ref.astype(np.uint8))

    logging_lists = trainer.logger.local_logger.my_fantastic_logging
    summary_path = Path(trainer.output_folder) / "validation" / "summary.json"
    result = {
        "val_keys": [str(k) for k in val_order],
        "train_keys": sorted(str(k) for k in tr_keys),
        "fold_dir": trainer.output_folder,
        "summary_file": str(summary_path),
        "epoch_start_timestamps": [float(x) for x in logging_lists["epoch_start_timestamps"]],
        "epoch_end_timestamps": [float(x) for x in logging_lists["epoch_end_timestamps"]],
        "train_losses": [float(x) for x in logging_lists["train_losses"]],
        "pseudo_dice": [[float(v) for v in d] for d in logging_lists["dice_per_class_or_region"]],
        "iteration_ends": iteration_ends,
        "seconds_setup_and_training": t_trained - t0,
        "seconds_final_validation": t_validated - t_trained,
        "threads": torch.get_num_threads(),
        "workers": int(os.environ["nnUNet_n_proc_DA"]),
    }
    (work / "train.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("raw")
    pp.add_argument("work")
    pp.add_argument("--workers", type=int, default=2)
    pp.add_argument("--configuration", default="3d_fullres")
    pt = sub.add_parser("train")
    pt.add_argument("work")
    pt.add_argument("--epochs", type=int, required=True)
    pt.add_argument("--iterations", type=int, required=True)
    pt.add_argument("--val-iterations", type=int, required=True)
    pt.add_argument("--workers", type=int, default=2)
    pt.add_argument("--threads", type=int, default=2)
    pt.add_argument("--device", default="cpu")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--configuration", default="3d_fullres")
    pt.add_argument("--expect-val", nargs="*", default=[])
    pt.add_argument("--turns", action="store_true",
                    help=f"take turns with the caller: print {TURN_WAIT!r} and wait for a line on stdin "
                         f"before every epoch and before the final validation; print {TURN_DONE!r} after "
                         "every epoch")
    a = p.parse_args(argv)
    return prepare(a) if a.step == "prepare" else train(a)


if __name__ == "__main__":  # the final validation's export pool uses "spawn": keep this guard
    sys.exit(main())
