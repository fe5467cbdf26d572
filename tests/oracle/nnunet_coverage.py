"""nnunetv2 (the reference oracle) for the coverage parity tests: plans variants, resampling, networks.

Runs in the oracle's own interpreter (``tests.oracle.run_oracle``), as a script path: it imports
nothing from ``tests`` (whose ``__init__`` needs pytest, which the oracle venv lacks); kubeseg
never imports nnunetv2.

    python tests/oracle/nnunet_coverage.py plan RAW WORK --planner CLASS[:GB] ... [--configs 3d_fullres 2d]
        [--cases CASE ...]
        -> WORK/nnunet/plans_<CLASS>[_GB].json and WORK/nnunet/<CLASS>[_GB]/<config>/<case>{.npy,_seg.npy,.json}
    python tests/oracle/nnunet_coverage.py preprocess RAW PLANS.json OUT --configs 3d_fullres --cases CASE ...
        -> OUT/<config>/<case>{.npy,_seg.npy} and <case>.json (class_location_counts)
    python tests/oracle/nnunet_coverage.py resample SPEC.json IN.npz OUT.npz
        SPEC: [{"fn": NAME, "kwargs": {...}, "array": KEY, "shape": [...], "current": [...], "new": [...]}]
        -> OUT[str(i)] = fn(IN[array], shape, current, new, **kwargs)
    python tests/oracle/nnunet_coverage.py loss SPEC.json IN.npz OUT.npz
        -> nnunetv2's DC_and_CE_loss / DC_and_BCE_loss (regions, ignore label) on fixed inputs
    python tests/oracle/nnunet_coverage.py postprocess SPEC.json
        SPEC: [{"predictions": DIR, "references": DIR, "dataset_json": FILE}] -> nnunetv2's
           determine_postprocessing on each (serially, no worker pools): DIR/postprocessing.json and the
           postprocessed label maps in DIR/postprocessed/
    python tests/oracle/nnunet_coverage.py batch JOBS.json
        JOBS: [[SCRIPT, ACTION, ARG, ...], ...] with SCRIPT "coverage" (this file) or "model"
           (tests/inference/nnunet_oracle.py): every job in this one process, so nnunetv2 is imported once
    python tests/oracle/nnunet_coverage.py network PLANS.json DATASET.json CONFIG OUT.npz [--seed 0] [--weights CKPT]
        -> the network nnunetv2 builds from the plans (its own init, seeded): every state_dict tensor
           (``w:<key>``) and its logits (deep supervision off) for a fixed input (``input``, ``logits``);
           with --weights, the logits of that checkpoint loaded strictly (``logits_weights``)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

DATASET_ID = 988


def _jsonable(o):
    import numpy as np
    return np.asarray(o).tolist()


def plan(a) -> int:
    work = Path(a.work).resolve() / "nnunet"
    name = f"Dataset{DATASET_ID}_Coverage"
    for sub in ("raw", "preprocessed", "results"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    link = work / "raw" / name
    if not link.exists():
        link.symlink_to(Path(a.raw).resolve())
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"))
    _set_nnunet_paths()  # in a batch, nnunetv2 may have been imported already
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    _serial_pools()
    if not (work / "preprocessed" / name / "dataset_fingerprint.json").is_file():
        extractor = DatasetFingerprintExtractor(name, a.num_workers)
        extractor.show_progress_bar = False
        with contextlib.redirect_stdout(io.StringIO()):
            extractor.run(overwrite_existing=True)
    for planner_spec in a.planner:
        _plan_one(planner_spec, name, work, link, a)
    return 0


def _plan_one(planner_spec: str, name: str, work: Path, link: Path, a) -> None:
    import numpy as np
    import nnunetv2
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    planner_name, _, gb = planner_spec.partition(":")
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), planner_name,
                                      current_module="nnunetv2.experiment_planning")
    kwargs = {"gpu_memory_target_in_gb": float(gb)} if gb else {}
    with contextlib.redirect_stdout(io.StringIO()):
        planner = cls(name, **kwargs)
        plans = planner.plan_experiment()
    tag = planner_spec.replace(":", "_")
    (work / f"plans_{tag}.json").write_text(json.dumps(plans, indent=1, default=_jsonable))
    pm = PlansManager(plans)
    dataset_json = json.loads((link / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    for config in a.configs if (not a.preprocess or planner_spec in a.preprocess) else []:
        if config not in plans["configurations"]:
            continue
        cm = pm.get_configuration(config)
        out = work / tag / config
        out.mkdir(parents=True, exist_ok=True)
        pre = DefaultPreprocessor(verbose=False)
        for case in a.cases:
            images = [str(link / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
            data, seg, props = pre.run_case(images, str(link / "labelsTr" / f"{case}{ending}"), pm, cm, dataset_json)
            np.save(out / f"{case}.npy", data.astype(np.float32))
            np.save(out / f"{case}_seg.npy", seg)
            (out / f"{case}.json").write_text(json.dumps(
                {k: np.asarray(v).tolist() for k, v in props.items() if k in
                 ("bbox_used_for_cropping", "shape_before_cropping", "shape_after_cropping_and_before_resampling")}))


def preprocess(a) -> int:
    """nnunetv2's DefaultPreprocessor on some cases of RAW with the given plans."""
    import numpy as np
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = Path(a.raw)
    plans = json.loads(Path(a.plans).read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    pm = PlansManager(plans)
    ending = dataset_json["file_ending"]
    for config in a.configs:
        cm = pm.get_configuration(config)
        out = Path(a.out) / config
        out.mkdir(parents=True, exist_ok=True)
        pre = DefaultPreprocessor(verbose=False)
        for case in a.cases:
            n_channels = len(dataset_json["channel_names"])
            images = [str(raw / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(n_channels)]
            data, seg, props = pre.run_case(images, str(raw / "labelsTr" / f"{case}{ending}"), pm, cm, dataset_json)
            np.save(out / f"{case}.npy", data.astype(np.float32))
            np.save(out / f"{case}_seg.npy", seg)
            counts = {str(k): len(v) for k, v in props["class_locations"].items()}
            (out / f"{case}.json").write_text(json.dumps({"class_location_counts": counts}))
    return 0


def resample(a) -> int:
    import numpy as np
    from nnunetv2.preprocessing.resampling.utils import recursive_find_resampling_fn_by_name

    spec = json.loads(Path(a.spec).read_text())
    out = {}
    with np.load(a.inputs) as arrays:
        for i, call in enumerate(spec):
            fn = recursive_find_resampling_fn_by_name(call["fn"])
            try:
                result = fn(arrays[call["array"]], call["shape"], call["current"], call["new"], **call["kwargs"])
                out[str(i)] = np.asarray(result)
            except Exception as e:  # the test asserts on what nnunetv2 does with such plans
                out[f"error_{i}"] = np.array(f"{type(e).__name__}: {e}")
    np.savez(a.out, **out)
    return 0


def network(a) -> int:
    import numpy as np
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads(Path(a.plans).read_text())
    dataset_json = json.loads(Path(a.dataset_json).read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration(a.configuration)
    lm = pm.get_label_manager(dataset_json)
    torch.manual_seed(a.seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import,
                                 determine_num_input_channels(pm, cm, dataset_json),
                                 lm.num_segmentation_heads, allow_init=True, deep_supervision=False)
    net.eval()
    gen = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn((1, determine_num_input_channels(pm, cm, dataset_json), *cm.patch_size), generator=gen)
    with torch.no_grad():
        logits = net(x)
    out = {f"w:{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    if a.weights:  # a checkpoint kubeseg wrote: strict loading, then the same input
        ckpt = torch.load(a.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(ckpt["network_weights"], strict=True)
        with torch.no_grad():
            out["logits_weights"] = net(x).numpy()
    np.savez(a.out, input=x.numpy(), logits=logits.numpy(), cls=np.array(type(net).__name__), **out)
    return 0


def loss(a) -> int:
    """nnunetv2's training losses on fixed inputs: IN.npz holds ``x_<i>``/``y_<i>`` and SPEC a list of
    {"kind": "ce"|"bce", "batch_dice": bool, "ignore_label": int|null}; OUT[str(i)] the loss value."""
    import numpy as np
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    spec = json.loads(Path(a.spec).read_text())
    out = {}
    with np.load(a.inputs) as arrays:
        for i, s in enumerate(spec):
            dice_kw = {"batch_dice": s["batch_dice"], "smooth": 1e-5, "ddp": False}
            if s["kind"] == "bce":
                fn = DC_and_BCE_loss({}, {**dice_kw, "do_bg": True}, use_ignore_label=s["ignore_label"] is not None,
                                     dice_class=MemoryEfficientSoftDiceLoss)
            else:
                fn = DC_and_CE_loss({**dice_kw, "do_bg": False}, {}, weight_ce=1, weight_dice=1,
                                    ignore_label=s["ignore_label"], dice_class=MemoryEfficientSoftDiceLoss)
            value = fn(torch.from_numpy(arrays[f"x_{i}"]), torch.from_numpy(arrays[f"y_{i}"]))
            out[str(i)] = np.asarray(float(value))
    np.savez(a.out, **out)
    return 0


class _Done:
    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self, timeout=None):
        return self.value


class _SerialPool:
    """Stands in for a multiprocessing pool: the same calls, in this process (no spawned workers to start,
    each of which would import nnunetv2 again)."""

    _pool: list = []  # no workers to watch

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]

    def starmap_async(self, fn, iterable):
        return _Done(self.starmap(fn, iterable))


class _SerialMultiprocessing:
    class _Context:
        Pool = _SerialPool

    @staticmethod
    def get_context(_method=None):
        return _SerialMultiprocessing._Context


def _serial_pools() -> None:
    """nnunetv2's fingerprint extraction and postprocessing decision without worker processes."""
    import nnunetv2.evaluation.evaluate_predictions as evaluation
    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fingerprint
    import nnunetv2.postprocessing.remove_connected_components as pp

    evaluation.multiprocessing = pp.multiprocessing = fingerprint.multiprocessing = _SerialMultiprocessing


def postprocess(a) -> int:
    """nnunetv2's postprocessing decision (determine_postprocessing) on folders of label maps."""
    import nnunetv2.postprocessing.remove_connected_components as pp

    _serial_pools()
    for job in json.loads(Path(a.spec).read_text()):
        plans = {"plans_name": "oracle", "image_reader_writer": "SimpleITKIO", "configurations": {}}
        dataset_json = json.loads(Path(job["dataset_json"]).read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            pp.determine_postprocessing(job["predictions"], job["references"], plans, dataset_json, num_processes=1,
                                        keep_postprocessed_files=True)
    return 0


def _set_nnunet_paths() -> None:
    """nnunetv2 reads its folder variables once, at import; a batch job that moved them updates every copy."""
    for name, module in list(sys.modules.items()):
        if name.startswith("nnunetv2"):
            for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                if hasattr(module, var):
                    setattr(module, var, os.environ.get(var))


def batch(a) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nnunet_oracle", Path(__file__).resolve().parents[1] / "inference"
                                                  / "nnunet_oracle.py")
    model_oracle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_oracle)
    _serial_pools()
    for job in json.loads(Path(a.jobs).read_text()):
        script, argv = job[0], [str(x) for x in job[1:]]
        if script == "model" and argv[0] == "make-model":  # sets the folder variables before nnunetv2 reads them
            model_oracle._env(Path(argv[2]).resolve())
            _set_nnunet_paths()
        code = (model_oracle.main if script == "model" else main)(argv)
        if code:
            return code
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="action", required=True)
    pp = sub.add_parser("plan")
    pp.add_argument("raw")
    pp.add_argument("work")
    pp.add_argument("--planner", nargs="+", required=True, metavar="CLASS[:GB]",
                    help="planner class names, each optionally with a GPU memory target")
    pp.add_argument("--configs", nargs="*", default=[])
    pp.add_argument("--preprocess", nargs="*", default=[], metavar="CLASS[:GB]",
                    help="preprocess the cases only for these planners (default: all)")
    pp.add_argument("--cases", nargs="*", default=[])
    pp.add_argument("-j", "--num-workers", type=int, default=1)
    pq = sub.add_parser("preprocess")
    pq.add_argument("raw")
    pq.add_argument("plans")
    pq.add_argument("out")
    pq.add_argument("--configs", nargs="+", default=["3d_fullres"])
    pq.add_argument("--cases", nargs="+", required=True)
    pr = sub.add_parser("resample")
    pr.add_argument("spec")
    pr.add_argument("inputs")
    pr.add_argument("out")
    pl = sub.add_parser("loss")
    pl.add_argument("spec")
    pl.add_argument("inputs")
    pl.add_argument("out")
    po = sub.add_parser("postprocess")
    po.add_argument("spec")
    pb = sub.add_parser("batch")
    pb.add_argument("jobs")
    pn = sub.add_parser("network")
    pn.add_argument("plans")
    pn.add_argument("dataset_json")
    pn.add_argument("configuration")
    pn.add_argument("out")
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--weights", help="also load this checkpoint (strictly) and save its logits")
    a = p.parse_args(argv)
    return {"plan": plan, "preprocess": preprocess, "resample": resample, "network": network,
            "loss": loss, "postprocess": postprocess, "batch": batch}[a.action](a)


if __name__ == "__main__":
    sys.exit(main())
