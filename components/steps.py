"""kubeseg's Kubeflow Pipelines components: one lightweight Python component per engine step.

Each is a thin typed wrapper: unpack the inputs, call one engine function (the same one the
``kubeseg`` CLI verb calls), record metrics. They all run from the kubeseg image
(:data:`IMAGE`, built from the repository's ``Dockerfile``), which has kubeseg and kfp
installed, so pods install nothing at start (``install_kfp_package=False``). Set
``KUBESEG_IMAGE`` before importing this module (or compiling) to use another image.

The function bodies are shipped to the pod as source: imports live inside them.
"""

import os
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

IMAGE = os.environ.get("KUBESEG_IMAGE", "ghcr.io/kubeseg/kubeseg:0.1.0")

component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def open_run(mlflow_uri: str, experiment: str, model_name: str, dataset_uri: str, configurations: list,
             folds: list, schedule: str, pipeline_run: str, tracking: Output[Artifact]):
    """Open the MLflow parent run of this pipeline run (tracking is off if `mlflow_uri` is empty).

    The output names the tracking URI and the run; training, selection and registration nest under it."""
    from kubeseg.tracking import start_pipeline_run, write_run_ref

    run_id = ""
    if mlflow_uri:
        run_id = start_pipeline_run(mlflow_uri, experiment, run_name=f"training {pipeline_run}",
                                    params={"dataset_uri": dataset_uri, "configurations": configurations,
                                            "folds": folds, "schedule": schedule, "model_name": model_name},
                                    tags={"kubeseg.pipeline_run": pipeline_run})
    write_run_ref(tracking.path, mlflow_uri, run_id, experiment)
    tracking.metadata.update({"tracking_uri": mlflow_uri, "run_id": run_id})


@component
def close_run(mlflow_uri: str, experiment: str, pipeline_run: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: end this pipeline run's MLflow parent run, FAILED if any step failed."""
    from kubeseg.tracking import close_pipeline_run

    if mlflow_uri:
        close_pipeline_run(mlflow_uri, experiment, pipeline_run, status.state)


@component
def fingerprint(raw: Input[Dataset], num_workers: int, fingerprint: Output[Dataset]):
    """Dataset fingerprint (nnU-Net v2 `dataset_fingerprint.json`): spacings, shapes and
    foreground intensity statistics of the raw nnU-Net v2 dataset."""
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint

    fp = extract_fingerprint(raw.path, None if num_workers < 0 else num_workers, progress=False)
    write_fingerprint(fp, fingerprint.path)
    fingerprint.metadata["cases"] = len(fp.spacings)


@component
def plan(raw: Input[Dataset], fingerprint: Input[Dataset], preset: str, configurations: list, folds: list,
         plans: Output[Artifact], summary: Output[Markdown]) -> list:
    """Plan the configurations (nnU-Net v2 `plans.json`: patch, batch, topology, spacing,
    normalization) and return the training fan-out, one item per (configuration, fold).

    The Markdown output shows the plans at a glance."""
    from pathlib import Path

    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import read_fingerprint
    from kubeseg.jsonio import write_json
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.planning.summary import plans_markdown
    from kubeseg.workflow import training_items

    p = plan_experiment(load_dataset_json(raw.path), read_fingerprint(fingerprint.path), planner_settings(preset),
                        dataset_name=Path(raw.path).name)
    first, cascade = training_items(p, configurations, folds)
    if cascade:
        from kubeseg.errors import KubesegError
        raise KubesegError(f"cascade configurations {sorted({i['configuration'] for i in cascade})} are not "
                           "trained by the pipeline yet (they need the low-res stage's predictions)")
    write_json(p, plans.path)
    Path(summary.path).write_text(f"### Plans `{p['plans_name']}` for `{p['dataset_name']}`\n\n"
                                  + plans_markdown(p) + f"\n\n{len(first)} training task(s)\n")
    return first


@component
def preprocess(raw: Input[Dataset], plans: Input[Artifact], fingerprint: Input[Dataset], configurations: list,
               num_workers: int, preprocessed: Output[Dataset]):
    """Preprocess every case for the configurations: crop to nonzero, resample (anisotropy aware),
    normalize; memory-mappable arrays plus the reference segmentations."""
    from kubeseg.planning.plans import load_plans
    from kubeseg.preprocessing.preprocess import preprocess_dataset

    p = load_plans(plans.path)
    for c in configurations:
        preprocess_dataset(raw.path, p, c, preprocessed.path, fingerprint.path,
                           None if num_workers < 0 else num_workers)
    preprocessed.metadata["configurations"] = list(configurations)


@component
def train(preprocessed: Input[Dataset], configuration: str, fold: int, schedule: str, device: str,
          num_workers: int, torch_threads: int, mlflow_uri: str, experiment: str,
          model: Output[Model], metrics: Output[Metrics]):
    """Train one configuration x one fold the nnU-Net v2 way (resumes from its last checkpoint).

    Per-epoch losses and pseudo-Dice go to an MLflow run (nested under the pipeline run by the
    select step, so that this step depends only on its inputs and can be cached); the fold's
    validation Dice per class to the metrics output. The model output is nnU-Net's fold layout."""
    from pathlib import Path

    from kubeseg.jsonio import read_json
    from kubeseg.tracking import write_run_ref
    from kubeseg.training.trainer import TrainSettings, train_fold
    from kubeseg.workflow import fold_dice, model_folder_name, parse_schedule

    pre = Path(preprocessed.path)
    p = read_json(pre / "plans.json")
    callbacks = []
    if mlflow_uri:
        from kubeseg.tracking import MlflowTrainingCallback
        callbacks.append(MlflowTrainingCallback(mlflow_uri, experiment=experiment, plans=p))
    settings = TrainSettings(device=device, schedule=parse_schedule(schedule), callbacks=callbacks,
                             num_workers=None if num_workers < 0 else num_workers, deterministic_workers=True,
                             torch_threads=torch_threads or None, progress_bar=False, log_to_console=False)
    fold_dir = train_fold(pre, pre / "plans.json", configuration, fold,
                          Path(model.path) / model_folder_name(p, configuration), settings)
    write_run_ref(Path(model.path) / "mlflow_run.json", mlflow_uri, callbacks[0].run_id if callbacks else "",
                  experiment)
    for label, dice in fold_dice(fold_dir).items():
        metrics.log_metric(f"{configuration}.fold{fold}.dice_{label}", dice)
    model.metadata.update({"configuration": configuration, "fold": fold})


@component
def select(models: Input[List[Model]], preprocessed: Input[Dataset], allow_ensembles: bool,
           tracking: Input[Artifact], selection: Output[Artifact], summary: Output[HTML], metrics: Output[Metrics]):
    """Pick the best configuration or pairwise ensemble by cross-validation foreground Dice and
    decide the postprocessing; the HTML output shows the plans, the CV table and the training
    curves of every fold. Logs the CV table on the pipeline's MLflow run and nests the fold runs."""
    from pathlib import Path

    from kubeseg.jsonio import read_json
    from kubeseg.workflow import select_from_folds, summary_html

    sel = select_from_folds([m.path for m in models], preprocessed.path, selection.path, allow_ensembles)
    page = summary_html(read_json(Path(preprocessed.path) / "plans.json"), sel,
                        sorted(p for p in (Path(selection.path) / "models").iterdir() if p.is_dir()))
    Path(summary.path).write_text(page)
    for label, dice in sel["expected_dice"].items():
        metrics.log_metric(f"cv.dice_{label}", dice)
    metrics.log_metric("cv.foreground_dice", sel["expected_foreground_dice"])
    for cand in sel["candidates"]:
        metrics.log_metric(f"cv.{cand['name'].replace(' + ', '-')}.foreground_dice", cand["foreground_dice"])
    from kubeseg.tracking import link_runs, log_selection, read_run_ref

    mlflow_uri, parent_run_id = read_run_ref(tracking.path)
    if mlflow_uri and parent_run_id:
        log_selection(mlflow_uri, parent_run_id, sel, page)
        refs = [Path(m.path) / "mlflow_run.json" for m in models]
        link_runs(mlflow_uri, parent_run_id, [read_run_ref(r)[1] for r in refs if r.is_file()])


@component
def bundle(selection: Input[Artifact], fingerprint: Input[Dataset], bundle: Output[Model]):
    """Assemble the selected model(s) into one self-contained bundle: everything prediction needs."""
    from kubeseg.bundle import make_bundle
    from kubeseg.jsonio import read_json

    out = make_bundle(selection.path, bundle.path, fingerprint.path, overwrite=True)
    sel = read_json(out / "selection.json")
    bundle.metadata.update({"configurations": [m["configuration"] for m in sel["members"]],
                            "cv_foreground_dice": sel["expected_foreground_dice"]})


@component
def register(bundle: Input[Model], model_name: str, tracking: Input[Artifact], pipeline_run: str) -> str:
    """Register the bundle as a new MLflow model version (tags: CV Dice, fingerprint and plans
    hashes, source run, checksums) with the alias `challenger`; closes the parent run."""
    from kubeseg.registry import register_bundle
    from kubeseg.tracking import finish_run, read_run_ref, require_tracking_uri

    mlflow_uri, parent_run_id = read_run_ref(tracking.path)
    mlflow_uri = require_tracking_uri(mlflow_uri)
    version = register_bundle(bundle.path, model_name, mlflow_uri, parent_run_id or None, source_run=pipeline_run)
    if parent_run_id:
        finish_run(mlflow_uri, parent_run_id)
    return version.version
