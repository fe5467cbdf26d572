"""nnunetv2 as the reference predictor, in its own process (it reads its folders from env vars).

Two actions; kubeseg never imports nnunetv2.

``make-model RAW WORK``: fingerprint and plan RAW with nnunetv2 (the CPU-sized settings of
kubeseg's ``small`` preset: 0.5 GB, 8 base features, at most 64), then write nnU-Net trained-model
folders ``WORK/nnunet/results/Dataset987_Oracle/nnUNetTrainer__<plans>__<config>/`` with its
network, randomly initialised with a fixed seed per fold, saved in nnU-Net's checkpoint format
(numpy scalars in ``logging``, a ``torch.device`` in ``init_args``).

``predict JOBS.json``: for each job ``{model_dir, out, images, folds, tta[, probabilities, repeats, device]}``,
nnUNetPredictor on the job's device (default CPU; no multiprocessing), probabilities saved, and ``out/timings.json``
with the seconds, CPU seconds and peak resident memory of each case (and repetition). One process for all jobs: nnunetv2 is
imported once.

    python -m tests.inference.nnunet_oracle make-model RAW WORK --configs 3d_fullres 2d --folds 0 1
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

DATASET_ID = 987
NAME = f"Dataset{DATASET_ID}_Oracle"


class PeakRSS:
    """This process's peak resident memory during the block, in MiB, from the kernel's high-water mark.

    On entry the mark is reset (``/proc/self/clear_refs`` "5"), on exit ``VmHWM`` is read: exact, and
    free. (A sampling thread, every 5 ms, cost CPU time in proportion to the wall time, which on a
    loaded machine added up to a second of CPU per case to both sides of a benchmark.) Where the
    reset is refused, the peak is the process's since its start (still an upper bound).
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.peak = self._read("VmRSS:")
        return self

    @staticmethod
    def _read(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._read("VmHWM:"), self._read("VmRSS:"))
        return False


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _env(work: Path) -> Path:
    root = work / "nnunet"
    for sub in ("raw", "preprocessed", "results"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))
    return root


def make_model(a) -> int:
    root = _env(Path(a.work).resolve())
    link = root / "raw" / NAME
    if not link.exists():
        link.symlink_to(Path(a.raw).resolve())
    import numpy as np
    import torch
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    extractor = DatasetFingerprintExtractor(NAME, 1)
    extractor.show_progress_bar = False
    with contextlib.redirect_stdout(io.StringIO()):
        fingerprint = extractor.run(overwrite_existing=True)
        planner_class = ExperimentPlanner
        if a.planner != "ExperimentPlanner":  # e.g. nnUNetPlannerResEncM (same CPU-sized budget and widths)
            import nnunetv2
            from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
            planner_class = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                                                        a.planner, current_module="nnunetv2.experiment_planning")
        planner = planner_class(NAME, gpu_memory_target_in_gb=0.5, plans_name="nnUNetSmallPlans")
        planner.UNet_base_num_features = 8
        planner.UNet_max_features_3d = 64
        planner.UNet_max_features_2d = 64
        plans = planner.plan_experiment()
    for config, patch in (("3d_fullres", a.patch_3d), ("2d", a.patch_2d)):
        if patch and config in plans["configurations"]:  # smaller than the image: several tiles per case
            plans["configurations"][config]["patch_size"] = list(patch)
    dataset_json = json.loads((link / "dataset.json").read_text())
    pm = PlansManager(plans)
    lm = pm.get_label_manager(dataset_json)
    n_in = len(dataset_json["channel_names"])
    jsonable = lambda o: json.loads(json.dumps(o, default=lambda v: np.asarray(v).tolist()))  # noqa: E731
    made = {}
    for config in a.configs:
        if config not in plans["configurations"]:
            continue
        cm = pm.get_configuration(config)
        out = root / "results" / NAME / f"nnUNetTrainer__{pm.plans_name}__{config}"
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in (("plans.json", plans), ("dataset.json", dataset_json),
                          ("dataset_fingerprint.json", fingerprint)):
            (out / name).write_text(json.dumps(jsonable(obj), indent=1))
        for fold in a.folds:
            torch.manual_seed(a.seed + 100 * int(fold))
            net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, n_in, lm.num_segmentation_heads,
                                         allow_init=True, deep_supervision=True)
            with torch.no_grad():  # random affine norms, so that the classes compete everywhere
                for m in net.modules():
                    if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.InstanceNorm2d)) and m.affine:
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.3)
            ckpt = {
                "network_weights": net.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                            "train_losses": [np.float32(-0.1)]},
                "_best_ema": np.float64(0.5), "current_epoch": 1,
                "init_args": {"plans": plans, "configuration": config, "fold": int(fold),
                              "dataset_json": dataset_json, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": tuple(range(len(cm.patch_size))),
            }
            (out / f"fold_{fold}").mkdir(exist_ok=True)
            torch.save(ckpt, out / f"fold_{fold}" / "checkpoint_final.pth")
        made[config] = str(out)
    (root / "models.json").write_text(json.dumps(made, indent=1))
    return 0


def predict(a) -> int:
    """Run every job of ``a.jobs`` (JSON list of {model_dir, out, images, folds, tta}) in this process."""
    _env(Path(a.jobs).resolve().parent / "_nnunet_env")
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(a.threads)
    jobs = json.loads(Path(a.jobs).read_text())
    for job in jobs:
        with contextlib.redirect_stdout(io.StringIO()):
            device = torch.device(job.get("device", "cpu"))
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=job["tta"],
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(job["model_dir"], use_folds=[int(f) for f in job["folds"]])
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        timings = []
        for repeat in range(int(job.get("repeats", 1))):
            for image in job["images"]:
                case = Path(image).name[: -len("_0000.nii.gz")]
                with PeakRSS() as mem, contextlib.redirect_stdout(io.StringIO()):
                    t, cpu = time.perf_counter(), _cpu_seconds()
                    predictor.predict_from_files_sequential([[image]], [str(out / case)],
                                                            save_probabilities=job.get("probabilities", True),
                                                            overwrite=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
                timings.append({"case": case, "repeat": repeat, "seconds": seconds, "cpu_seconds": cpu,
                                "peak_rss_mib": mem.peak})
        (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="action", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("raw")
    m.add_argument("work")
    m.add_argument("--configs", nargs="+", default=["3d_fullres", "2d"])
    m.add_argument("--folds", nargs="+", default=["0"])
    m.add_argument("--seed", type=int, default=1234)
    m.add_argument("--planner", default="ExperimentPlanner", help="nnunetv2 planner class")
    m.add_argument("--patch-3d", type=int, nargs=3, help="override the planned 3d_fullres patch size")
    m.add_argument("--patch-2d", type=int, nargs=2, help="override the planned 2d patch size")
    m.set_defaults(fn=make_model)
    q = sub.add_parser("predict")
    q.add_argument("jobs", help="JSON list of {model_dir, out, images, folds, tta[, probabilities]}")
    q.add_argument("--threads", type=int, default=2)
    q.set_defaults(fn=predict)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
