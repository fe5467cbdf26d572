"""Run nnunetv2 (the reference oracle) on a raw dataset, in its own process.

nnunetv2 reads its folders from environment variables at import time, so it runs here, in a
subprocess with its own environment; kubeseg never imports it. Writes under WORK/nnunet:
``plans.json``, ``fingerprint.json``, ``timings.json`` and, per configuration, the preprocessed
arrays of the requested cases (``<config>/<case>.npy`` and ``<case>_seg.npy``).

    python -m tests.oracle.nnunet_run RAW WORK [--gpu-memory-gb 8] [--base-features 32]
        [--max-features-3d 320] [--max-features-2d 512] [--configs 3d_fullres 2d]
        [--cases CASE ...] [--all-cases] [-j N]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("raw")
    p.add_argument("work")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:GB:BASE:MAX3D:MAX2D",
                   help="extra planner settings, planned into plans_NAME.json (repeatable)")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0)
    p.add_argument("--base-features", type=int, default=32)
    p.add_argument("--max-features-3d", type=int, default=320)
    p.add_argument("--max-features-2d", type=int, default=512)
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--cases", nargs="*", default=[])
    p.add_argument("--all-cases", action="store_true", help="preprocess the whole dataset (benchmark)")
    p.add_argument("-j", "--num-workers", type=int, default=2)
    a = p.parse_args(argv)

    work = Path(a.work).resolve() / "nnunet"
    name = f"Dataset{DATASET_ID}_Oracle"
    for sub in ("raw", "preprocessed", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    link = work / "raw" / name
    if not link.exists():
        link.symlink_to(Path(a.raw).resolve())
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"))

    import numpy as np
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    import resource

    def cpu() -> float:  # this process and its reaped worker processes (nnU-Net's pools), user + system
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    timings = {}
    t, c = time.perf_counter(), cpu()
    extractor = DatasetFingerprintExtractor(name, a.num_workers)
    extractor.show_progress_bar = False
    fingerprint = extractor.run(overwrite_existing=True)
    timings["fingerprint"], timings["cpu_fingerprint"] = time.perf_counter() - t, cpu() - c

    def plan(gb, base, max3d, max2d):
        planner = ExperimentPlanner(name, gpu_memory_target_in_gb=gb)
        planner.UNet_base_num_features = base
        planner.UNet_max_features_3d = max3d
        planner.UNet_max_features_2d = max2d
        with contextlib.redirect_stdout(io.StringIO()):
            return planner, planner.plan_experiment()

    for v in a.variant:
        vname, gb, base, max3d, max2d = v.split(":")
        _, extra = plan(float(gb), int(base), int(max3d), int(max2d))
        (work / f"plans_{vname}.json").write_text(json.dumps(extra, indent=1, default=lambda o: np.asarray(o).tolist()))
    t, c = time.perf_counter(), cpu()
    planner, plans = plan(a.gpu_memory_gb, a.base_features, a.max_features_3d, a.max_features_2d)
    timings["plan"], timings["cpu_plan"] = time.perf_counter() - t, cpu() - c

    pm = PlansManager(plans)
    dataset_json = json.loads((link / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    for config in a.configs:
        if config not in plans["configurations"]:
            continue
        cm = pm.get_configuration(config)
        pre = DefaultPreprocessor(verbose=False)
        pre.show_progress_bar = False
        if a.all_cases:
            t, c = time.perf_counter(), cpu()
            with contextlib.redirect_stdout(io.StringIO()):
                pre.run(name, config, planner.plans_identifier, a.num_workers)
            timings[f"preprocess_{config}"], timings[f"cpu_preprocess_{config}"] = time.perf_counter() - t, cpu() - c
        out = work / config
        out.mkdir(exist_ok=True)
        for case in a.cases:
            images = [str(link / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
            data, seg, props = pre.run_case(images, str(link / "labelsTr" / f"{case}{ending}"), pm, cm, dataset_json)
            np.save(out / f"{case}.npy", data.astype(np.float32))
            np.save(out / f"{case}_seg.npy", seg)
            (out / f"{case}.json").write_text(json.dumps(
                {k: np.asarray(v).tolist() for k, v in props.items() if k in
                 ("bbox_used_for_cropping", "shape_before_cropping", "shape_after_cropping_and_before_resampling")}))
    (work / "plans.json").write_text(json.dumps(plans, indent=1, default=lambda o: np.asarray(o).tolist()))
    (work / "fingerprint.json").write_text(json.dumps(fingerprint, default=lambda o: np.asarray(o).tolist()))
    (work / "timings.json").write_text(json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
