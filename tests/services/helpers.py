"""A small trained bundle for the service tests, and the real servers they start."""

from __future__ import annotations

from pathlib import Path

from tests.pipelines.helpers import tiny_raw

# Long enough that the network finds the body (the intensity drift check looks inside the
# predicted foreground), short enough for CI: about a minute on 2 cores.
SERVICE_SCHEDULE = (8, 16, 2)


def served_bundle(root: Path, schedule=SERVICE_SCHEDULE) -> dict:
    """Raw synthetic CT → plans (small preset) → 3d_fullres fold 0 → selection → bundle."""
    from kubeseg.bundle import make_bundle
    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
    from kubeseg.jsonio import write_json
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.preprocessing.preprocess import preprocess_dataset
    from kubeseg.training.schedule import Schedule
    from kubeseg.training.trainer import TrainSettings, train_fold
    from kubeseg.workflow import model_folder_name, select_from_folds

    raw = tiny_raw(root)
    fp = extract_fingerprint(raw, 1, progress=False)
    fp_path = write_fingerprint(fp, root / "fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small"), dataset_name=raw.name)
    write_json(plans, root / "plans.json")
    pre = root / "pre"
    preprocess_dataset(raw, plans, "3d_fullres", pre, fp_path, 1, progress=False)
    fold_out = root / "train_out"
    train_fold(pre, pre / "plans.json", "3d_fullres", 0, fold_out / model_folder_name(plans, "3d_fullres"),
               TrainSettings(device="cpu", schedule=Schedule(*schedule, "service-test"), num_workers=0,
                             validation_mirroring=False, progress_bar=False, log_to_console=False))
    select_from_folds([fold_out], pre, root / "selection")
    bundle = make_bundle(root / "selection", root / "bundle", fp_path)
    return {"raw": raw, "bundle": bundle, "fingerprint": fp_path, "plans": plans}
