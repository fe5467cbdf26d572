"""The main job end to end on one machine, on a synthetic dataset: what ``make demo`` runs.

synthesize → fingerprint → plan (small preset) → preprocess → train 3d_fullres fold 0 (a short
schedule) → select → bundle → predict the test cases. Every step is the same engine function
that the CLI verbs and, later, the pipeline components call; this module only chains them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kubeseg.dataset import load_dataset_json
from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
from kubeseg.jsonio import write_json
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.planning.summary import print_plans
from kubeseg.preprocessing.preprocess import preprocess_dataset
from kubeseg.synth import SynthSettings, synthesize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    cases: int = 10
    test_cases: int = 2
    shape: tuple[int, int, int] = (32, 80, 80)
    seed: int = 0
    preset: str = "small"
    configuration: str = "3d_fullres"
    schedule: str = "tiny"
    device: str = "auto"
    num_workers: int | None = None


def run_demo(out_dir: str | Path, s: DemoSettings = DemoSettings()) -> dict:
    """Run every step into ``out_dir``; a rerun reuses finished steps (training resumes). Returns a summary."""
    from kubeseg.bundle import make_bundle
    from kubeseg.model_folder import model_folder_name
    from kubeseg.inference import PredictSettings, predict
    from kubeseg.selection import select_model
    from kubeseg.training.trainer import TrainSettings, train_fold

    out = Path(out_dir)
    started = time.perf_counter()
    step = lambda i, text: print(f"[{i}/7] {text}  ({time.perf_counter() - started:.0f} s)", flush=True)  # noqa: E731

    raw = out / "raw" / "Dataset001_SynthCT"
    if not (raw / "dataset.json").is_file():
        synthesize(raw, SynthSettings(kind="ct", num_cases=s.cases, num_test_cases=s.test_cases, shape=s.shape,
                                      seed=s.seed, dataset_name=raw.name))
    step(1, f"synthetic CT-like dataset: {raw}")

    fp = extract_fingerprint(raw, s.num_workers)
    fp_path = write_fingerprint(fp, out / "fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings(s.preset), dataset_name=raw.name)
    plans_path = write_json(plans, out / "plans.json")
    step(2, f"fingerprint and plans: {plans_path}")
    print_plans(plans)

    pre = out / "preprocessed"
    preprocess_dataset(raw, plans, s.configuration, pre, fp_path, s.num_workers)
    step(3, f"preprocessed {s.configuration}: {pre}")

    model = out / "models" / model_folder_name(plans, s.configuration)
    fold_dir = train_fold(pre, pre / "plans.json", s.configuration, 0, model,
                          TrainSettings(device=s.device, schedule=s.schedule, num_workers=s.num_workers,
                                        validation_mirroring=False, log_to_console=False))
    step(4, f"trained {s.configuration} fold 0 ({s.schedule} schedule): {fold_dir}")

    selection = select_model([model], pre, out / "selection")
    step(5, f"selection: {' + '.join(m['configuration'] for m in selection['members'])}, "
            f"cross-validation foreground Dice {selection['expected_foreground_dice']:.3f}")

    bundle = make_bundle(out / "selection", out / "bundle", fp_path, overwrite=True)
    step(6, f"model bundle: {bundle}")

    written = predict(raw / "imagesTs", out / "predictions", bundle, PredictSettings(device=s.device))
    step(7, f"{len(written)} test case(s) segmented: {out / 'predictions'}")
    summary = {"bundle": str(bundle), "predictions": [str(p) for p in written],
               "cv_foreground_dice": selection["expected_foreground_dice"],
               "seconds": round(time.perf_counter() - started, 1)}
    write_json(summary, out / "demo_summary.json")
    print(f"demo finished in {summary['seconds']} s")
    return summary
