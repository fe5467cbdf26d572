"""``make demo``: the whole loop on one machine.

synthetic CT-like dataset → the training pipeline through ``kfp.local`` (fingerprint, plan,
preprocess, train 2d and 3d_fullres × folds, two at a time, select, bundle, register in MLflow on a
local SQLite store) → gated promotion of the new version to ``champion``. Prints the CV Dice
table, the model version and the command that opens the MLflow UI on the demo store.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path



@dataclass(frozen=True)
class DemoSettings:
    cases: int = 10
    test_cases: int = 2
    shape: tuple = (32, 80, 80)
    seed: int = 0
    preset: str = "small"
    configurations: tuple = ("2d", "3d_fullres")
    folds: tuple = (0, 1)
    schedule: str = "8x12x2"
    device: str = "auto"
    num_workers: int = 1
    torch_threads: int = 1
    model_name: str = "kubeseg-demo"
    tolerance: float = 0.02
    extra: dict = field(default_factory=dict)


def run_demo(out_dir, s: DemoSettings = DemoSettings()) -> dict:
    from kubeseg.errors import KubesegError
    from kubeseg.registry import GateSettings, list_versions, promote, versions_table
    from kubeseg.synth import SynthSettings, synthesize
    from kubeseg.workflow import cv_table_rows, text_table
    from pipelines.run import run_local

    out = Path(out_dir).resolve()
    started = time.perf_counter()
    step = lambda text: print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)  # noqa: E731

    raw = out / "raw" / "Dataset001_SynthCT"
    if not (raw / "dataset.json").is_file():
        synthesize(raw, SynthSettings(kind="ct", num_cases=s.cases, num_test_cases=s.test_cases, shape=s.shape,
                                      seed=s.seed, dataset_name=raw.name))
    step(f"synthetic CT-like dataset: {raw} ({s.cases} training, {s.test_cases} test cases)")

    db = out / "mlflow.db"
    uri = f"sqlite:///{db}"
    args = {"dataset_uri": str(raw), "configurations": list(s.configurations), "folds": list(s.folds),
            "schedule": s.schedule, "planner_preset": s.preset, "device": s.device, "num_workers": s.num_workers,
            "torch_threads": s.torch_threads, "mlflow_uri": uri, "experiment": "kubeseg-demo",
            "model_name": s.model_name, **s.extra}
    step(f"training pipeline through kfp.local: {list(s.configurations)} x folds {list(s.folds)}, "
         f"schedule {s.schedule} (outputs in {out / 'kfp'})")
    result = run_local(args, out / "kfp", parallelism=2)
    version = result["version"]
    step(f"pipeline finished in {result['seconds']:.0f} s: registered {s.model_name} version {version} (challenger)")

    selection = json.loads((Path(result["selection"]) / "selection.json").read_text())
    print("\nCross-validation Dice (out-of-fold cases of the trained folds, image geometry):")
    print(text_table(*cv_table_rows(selection)))
    print()
    try:
        p = promote(s.model_name, version, GateSettings(tolerance=s.tolerance, holdout=str(raw / "imagesTs"),
                                                        device=s.device), uri)
        step(f"promoted version {p.version} to champion: " + "; ".join(p.reasons))
    except KubesegError as e:
        step(f"not promoted: {e}")
    print()
    print(text_table(*versions_table(list_versions(s.model_name, uri))))
    seconds = round(time.perf_counter() - started, 1)
    summary = {"version": version, "cv_foreground_dice": selection["expected_foreground_dice"],
               "cv_dice": selection["expected_dice"], "selected": [m["configuration"] for m in selection["members"]],
               "tracking_uri": uri, "seconds": seconds, "pipeline_run_dir": result["run_dir"]}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ndemo finished in {seconds:.0f} s; model {s.model_name} version {version}, "
          f"CV foreground Dice {selection['expected_foreground_dice']:.4f}")
    print(f"MLflow UI on the demo store:  {Path('.venv/bin/mlflow') if Path('.venv/bin/mlflow').exists() else 'mlflow'} "
          f"ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    return summary
