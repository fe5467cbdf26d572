"""``make demo``: the whole loop on one machine, with a console a person can read.

synthetic CT-like dataset (with held-out references) → the training pipeline through
``kfp.local`` (fingerprint, plan, preprocess, train × folds, two at a time, select, bundle,
register in MLflow on a local SQLite store) → gated promotion to ``champion`` (every label must
reach the floor in cross-validation and on the held-out cases). The console shows one line per
pipeline step and per training task, the CV Dice table by label name, the version and what to
do next; kfp.local's own output (executor JSON, task logs) goes to ``<out>/demo.log``.

The demo's dataset is kubeseg's CT synthesizer with lesions that a few CPU minutes can learn
(stronger contrast, larger, at least one per case: ``DEMO_SYNTH``); the tests and the parity
checks keep the harder default. Its budget is sized for a 2-core CPU: under 10 minutes.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.console import RunWatcher, quiet_console

# lesion contrast 100-150 HU, radius 45-70 % of the organ's smallest radius, one or more per case
DEMO_SYNTH = {"lesion_contrast_hu": (100.0, 150.0), "lesion_size": (0.45, 0.7), "min_lesions": 1}


@dataclass(frozen=True)
class DemoSettings:
    cases: int = 10
    test_cases: int = 2
    shape: tuple = (32, 80, 80)
    seed: int = 0
    preset: str = "small"
    # 2d learns every label of this dataset in a CPU budget (the lesion appears after ~700
    # iterations); 3d_fullres costs about 4x more per iteration here (--configurations adds it)
    configurations: tuple = ("2d",)
    folds: tuple = (0, 1)
    schedule: str = "40x25x2"
    device: str = "auto"
    num_workers: int = 1
    torch_threads: int = 1
    model_name: str = "kubeseg-demo"
    tolerance: float = 0.02
    # the promotion gate's per-label floor: the demo's champion must segment every label
    label_floor: float = 0.5
    extra: dict = field(default_factory=dict)


def run_demo(out_dir, s: DemoSettings = DemoSettings()) -> dict:
    from kubeseg.errors import KubesegError
    from kubeseg.registry import GateSettings, list_versions, promote, versions_table
    from kubeseg.synth import SynthSettings, synthesize
    from kubeseg.workflow import cv_table_rows, text_table
    from pipelines.run import pipeline_builder, run_local

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per step, not per file
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "demo.log"
    started = time.perf_counter()
    say = lambda text: print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)  # noqa: E731

    raw = out / "raw" / "Dataset001_SynthCT"
    if not (raw / "dataset.json").is_file():
        synthesize(raw, SynthSettings(kind="ct", num_cases=s.cases, num_test_cases=s.test_cases, shape=s.shape,
                                      seed=s.seed, dataset_name=raw.name, test_labels=True, **DEMO_SYNTH))
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    say(f"synthetic CT-like dataset: {s.cases} training and {s.test_cases} held-out cases, labels "
        + ", ".join(f"{k} ({v})" for k, v in labels.items() if v) + f"  [{raw}]")

    uri = f"sqlite:///{out / 'mlflow.db'}"
    args = {"dataset_uri": str(raw), "configurations": list(s.configurations), "folds": list(s.folds),
            "schedule": s.schedule, "planner_preset": s.preset, "device": s.device, "num_workers": s.num_workers,
            "torch_threads": s.torch_threads, "mlflow_uri": uri, "experiment": "kubeseg-demo",
            "model_name": s.model_name, **s.extra}
    say(f"training pipeline (kfp.local): {' + '.join(s.configurations)} x folds {list(s.folds)}, "
        f"schedule {s.schedule}, two tasks at a time; its full output goes to {log_path}")
    pipeline_name, _ = pipeline_builder("training")
    try:
        with quiet_console(log_path) as terminal:
            emit = lambda line: print(line, file=terminal, flush=True)  # noqa: E731
            with RunWatcher(out / "kfp", pipeline_name, emit, t0=started):
                result = run_local(args, out / "kfp", parallelism=2)
    except Exception as e:
        say(f"the pipeline failed: {type(e).__name__}: {e}")
        say(f"see {log_path} (the last lines name the failing task)")
        raise
    version = result["version"]
    say(f"pipeline finished in {result['seconds']:.0f} s: registered {s.model_name} version {version} (challenger)")

    selection = json.loads((Path(result["selection"]) / "selection.json").read_text())
    print("\nCross-validation Dice (out-of-fold cases of the trained folds, image geometry):")
    print(text_table(*cv_table_rows(selection, labels)))
    print()
    gate = GateSettings(tolerance=s.tolerance, holdout=str(raw / "imagesTs"), holdout_labels=str(raw / "labelsTs"),
                        label_floor=s.label_floor, device=s.device)
    promoted = None
    logging.getLogger("kubeseg").setLevel(logging.WARNING)  # the gate says its verdict below; no per-case lines
    try:
        p = promote(s.model_name, version, gate, uri)
        promoted = p.version
        say(f"promoted version {p.version} to champion: " + "; ".join(p.reasons))
    except KubesegError as e:
        say(f"not promoted: {e}")
    print()
    print(text_table(*versions_table(list_versions(s.model_name, uri))))
    seconds = round(time.perf_counter() - started, 1)
    summary = {"version": version, "champion": promoted, "cv_foreground_dice": selection["expected_foreground_dice"],
               "cv_dice": selection["expected_dice"],
               "cv_dice_by_name": {k: selection["expected_dice"].get(str(v)) for k, v in labels.items() if v},
               "selected": [m["configuration"] for m in selection["members"]], "tracking_uri": uri,
               "seconds": seconds, "pipeline_run_dir": result["run_dir"], "log": str(log_path)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo finished in {seconds:.0f} s; {s.model_name} version {version}"
          + (" is the champion" if promoted else " was NOT promoted (see the reason above)"))
    mlflow = Path(".venv/bin/mlflow") if Path(".venv/bin/mlflow").exists() else "mlflow"
    kubeseg = Path(".venv/bin/kubeseg") if Path(".venv/bin/kubeseg").exists() else "kubeseg"
    print("\nWhat next:")
    print(f"  segment the held-out cases:  {kubeseg} predict -i {raw / 'imagesTs'} -o {out / 'predictions'} "
          f"-m {result['bundle']}")
    print(f"  browse runs and versions:    {mlflow} ui --backend-store-uri {uri} --port 5000   "
          f"(http://127.0.0.1:5000)")
    print(f"  versions, promote, rollback: {kubeseg} models list --name {s.model_name} --tracking-uri {uri}")
    print(f"  serve the champion:          see README, 'Segmentation service' (KUBESEG_MODEL_NAME={s.model_name}, "
          f"MLFLOW_TRACKING_URI={uri})")
    if not promoted:
        raise KubesegError(f"the demo's model was not promoted: {s.model_name} version {version}")
    return summary
