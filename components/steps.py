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
             folds: list, schedule: str, pipeline_run: str, tracking: Output[Artifact], kind: str = "training",
             new_cases_uri: str = "", mode: str = ""):
    """Open the MLflow parent run of this pipeline run (tracking is off if `mlflow_uri` is empty).

    The output names the tracking URI and the run; training, selection and registration nest under it.
    `kind`: training or retraining (then `new_cases_uri` and `mode` are recorded too)."""
    from kubeseg.tracking import start_pipeline_run, write_run_ref

    run_id = ""
    if mlflow_uri:
        params = {"dataset_uri": dataset_uri, "configurations": configurations, "folds": folds,
                  "schedule": schedule, "model_name": model_name}
        if kind != "training":
            params.update({"new_cases_uri": new_cases_uri, "mode": mode})
        run_id = start_pipeline_run(mlflow_uri, experiment, run_name=f"{kind} {pipeline_run}", params=params,
                                    tags={"kubeseg.pipeline_run": pipeline_run, "kubeseg.pipeline": kind})
    write_run_ref(tracking.path, mlflow_uri, run_id, experiment)
    tracking.metadata.update({"tracking_uri": mlflow_uri, "run_id": run_id})


@component
def close_run(mlflow_uri: str, experiment: str, pipeline_run: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: end this pipeline run's MLflow parent run, FAILED if any step failed."""
    from kubeseg.tracking import close_pipeline_run

    if mlflow_uri:
        close_pipeline_run(mlflow_uri, experiment, pipeline_run, status.state)


@component
def merge_cases(raw: Input[Dataset], new_cases: Input[Dataset], num_workers: int, merged: Output[Dataset]):
    """Retraining: a copy of the raw dataset with the new labelled cases added (nnU-Net folder or
    loose files); name clashes and broken cases are refused by name, nothing half-written."""
    from kubeseg.dataset_merge import merge_cases as merge

    res = merge(raw.path, new_cases.path, merged.path, None if num_workers < 0 else num_workers, overwrite=True)
    merged.metadata.update({"added": list(res.added), "num_training": res.num_training})


@component
def dataset_hash(raw: Input[Dataset], num_workers: int) -> str:
    """Content hash of the raw dataset (every file read, `sha256:<hex>`). Never cached itself: it
    is an input of the steps that read the dataset, so a dataset changed in place under the same
    URI is not served from their cache."""
    from kubeseg.dataset_hash import dataset_content_hash

    return dataset_content_hash(raw.path, None if num_workers < 1 else num_workers)


@component
def fingerprint(raw: Input[Dataset], num_workers: int, fingerprint: Output[Dataset], dataset_hash: str = ""):
    """Dataset fingerprint (nnU-Net v2 `dataset_fingerprint.json`): spacings, shapes and
    foreground intensity statistics of the raw nnU-Net v2 dataset. `dataset_hash`: the raw
    dataset's content hash (part of the cache key; recorded in the metadata)."""
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint

    fp = extract_fingerprint(raw.path, None if num_workers < 0 else num_workers, progress=False)
    write_fingerprint(fp, fingerprint.path)
    fingerprint.metadata.update({"cases": len(fp.spacings), "dataset_hash": dataset_hash})


@component
def plan(raw: Input[Dataset], fingerprint: Input[Dataset], preset: str, configurations: list, folds: list,
         plans: Output[Artifact], summary: Output[Markdown], cascade_wave: dsl.OutputPath(list),
         preprocess_configurations: dsl.OutputPath(list), dataset_hash: str = "") -> list:
    """Plan the configurations (nnU-Net v2 `plans.json`: patch, batch, topology, spacing,
    normalization) and return the first training wave, one item per (configuration, fold).

    Cascade stages (3d_cascade_fullres) form a second wave (`cascade_wave`): they train on their
    first stage's out-of-fold predictions, so that stage is trained on all five folds in the first
    wave. `preprocess_configurations`: whose arrays training needs. The Markdown shows the plans."""
    import json
    from pathlib import Path

    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import read_fingerprint
    from kubeseg.jsonio import write_json
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.planning.summary import plans_markdown
    from kubeseg.workflow import preprocess_configurations as needed, training_items, waves_markdown

    from kubeseg.planning.storage import human_bytes, preprocessed_bytes

    spec = load_dataset_json(raw.path)
    fp = read_fingerprint(fingerprint.path)
    p = plan_experiment(spec, fp, planner_settings(preset), dataset_name=Path(raw.path).name)
    first, cascade = training_items(p, configurations, folds)
    write_json(p, plans.path)
    sizes = preprocessed_bytes(p, fp.to_json(), spec.num_channels)
    plans.metadata.update({"dataset_hash": dataset_hash, "preprocessed_bytes": sizes})
    Path(cascade_wave).write_text(json.dumps(cascade))
    Path(preprocess_configurations).write_text(json.dumps(needed(p, configurations)))
    Path(summary.path).write_text(f"### Plans `{p['plans_name']}` for `{p['dataset_name']}`\n\n"
                                  + plans_markdown(p) + "\n\n" + waves_markdown(first, cascade) + "\n\n"
                                  + "Preprocessed arrays (estimate, disk a training pod needs): "
                                  + ", ".join(f"`{c}` {human_bytes(b)}" for c, b in sizes.items()) + "\n")
    return first


@component
def plan_retraining(raw: Input[Dataset], fingerprint: Input[Dataset], mode: str, model_name: str, mlflow_uri: str,
                    preset: str, configurations: list, folds: list, plans: Output[Artifact],
                    summary: Output[Markdown], champion: Output[Model], cascade_wave: dsl.OutputPath(list),
                    preprocess_configurations: dsl.OutputPath(list), candidates: dsl.OutputPath(list),
                    finetune_epochs: int = 10, finetune_lr: float = 1e-4, encoder_lr_scale: float = 0.5,
                    decoder_lr_scale: float = 1.0, max_new_cases: int = 0, case_confidence: dict = {}) -> list:  # noqa: B006
    """Retraining's plan: `finetune` (incremental) downloads the champion bundle (`champion`,
    checksums verified), keeps its plans, members (configurations, folds: the champion's unless
    given) and splits, the new cases joining every fold's training set only, and writes the
    fine-tune's spec (at most `finetune_epochs` epochs, `finetune_lr`, encoder/decoder scales;
    `max_new_cases` of them, the least confident by `case_confidence`) beside the champion's
    weights; `retrain` plans the merged dataset anew (configurations: the champion's, else 2d and
    3d_fullres; folds: all five) and leaves `champion` empty. Returns the first training wave."""
    import json
    from pathlib import Path

    from kubeseg.jsonio import write_json
    from kubeseg.planning.summary import plans_markdown
    from kubeseg.retraining import plan_retraining as make_plan
    from kubeseg.tracking import require_tracking_uri
    from kubeseg.training.finetune import FinetuneSettings
    from kubeseg.workflow import waves_markdown

    ft = FinetuneSettings(int(finetune_epochs), float(finetune_lr), float(encoder_lr_scale), float(decoder_lr_scale),
                          int(max_new_cases))
    r = make_plan(mode, raw.path, fingerprint.path, model_name, require_tracking_uri(mlflow_uri), champion.path,
                  preset, configurations, folds, ft, {str(k): float(v) for k, v in (case_confidence or {}).items()})
    write_json(r.plans, plans.path)
    Path(cascade_wave).write_text(json.dumps(r.cascade_wave))
    Path(preprocess_configurations).write_text(json.dumps(r.preprocess_configurations))
    Path(candidates).write_text(json.dumps(r.candidates))
    champion.metadata.update({"version": r.champion_version or "", "mode": r.mode,
                              **({"finetune": ft.to_json()} if r.mode == "finetune" else {})})
    head = f"### Retraining ({r.mode}" + (f" from {model_name} version {r.champion_version}" if r.champion_version
                                          else "") + f"): plans `{r.plans['plans_name']}`\n\n"
    Path(summary.path).write_text(head + "; ".join(r.notes) + "\n\n" + plans_markdown(r.plans) + "\n\n"
                                  + waves_markdown(r.first_wave, r.cascade_wave) + "\n")
    return r.first_wave


@component
def preprocess(raw: Input[Dataset], plans: Input[Artifact], fingerprint: Input[Dataset], configuration: str,
               num_workers: int, preprocessed: Output[Dataset], reference: Output[Dataset], dataset_hash: str = ""):
    """Preprocess every case for one configuration (one group of training tasks): crop to nonzero,
    resample (anisotropy aware), normalize; memory-mappable arrays plus the reference segmentations.
    Only this configuration's training tasks download `preprocessed`; `reference` is the same folder
    without the arrays (properties, reference segmentations, plans) for selection. `dataset_hash`
    (the raw dataset's content hash) is part of the cache key and written to `dataset_hash.json`."""
    from pathlib import Path

    from kubeseg.dataset_hash import DATASET_HASH_FILE
    from kubeseg.jsonio import write_json
    from kubeseg.planning.plans import load_plans
    from kubeseg.preprocessing.preprocess import preprocess_dataset
    from kubeseg.workflow import copy_reference

    p = load_plans(plans.path)
    data = preprocess_dataset(raw.path, p, configuration, preprocessed.path, fingerprint.path,
                              None if num_workers < 0 else num_workers, progress=False)
    if dataset_hash:
        write_json({"dataset_hash": dataset_hash}, Path(preprocessed.path) / DATASET_HASH_FILE)
    copy_reference(preprocessed.path, reference.path)
    size = sum(f.stat().st_size for f in data.iterdir() if f.is_file())
    preprocessed.metadata.update({"configuration": configuration, "data_identifier": data.name,
                                  "dataset_hash": dataset_hash, "array_bytes": size})
    reference.metadata.update({"configuration": configuration, "data_identifier": data.name})


@component
def training_groups(plans: Input[Artifact], items: list, dataset_hash: str = "") -> list:
    """The training items grouped by the preprocessed arrays they read (one group per data
    identifier: `{"preprocess", "configurations", "items", "dataset_hash"}`): each group preprocesses
    its own artifact, and its training tasks download only that one. The raw dataset's content hash
    travels in each group (a preprocess cache key) because kfp.local replaces every task-output
    parameter that enters a loop with the loop's item."""
    from kubeseg.jsonio import read_json
    from kubeseg.workflow import training_groups as groups

    return [dict(g, dataset_hash=dataset_hash) for g in groups(read_json(plans.path), items)]


@component
def train(preprocessed: Input[Dataset], configuration: str, fold: int, schedule: str, device: str,
          num_workers: int, torch_threads: int, mlflow_uri: str, experiment: str,
          model: Output[Model], metrics: Output[Metrics], validation_tta: bool = True,
          previous_stage: Input[Dataset] = None, pretrained: Input[Model] = None, checkpoint_uri: str = "",
          checkpoint_interval_s: float = 300.0):
    """Train one configuration x one fold the nnU-Net v2 way (resumes from its last checkpoint).

    Cascade stages read their first stage's out-of-fold segmentations from `previous_stage`
    (the cascade_inputs step); `pretrained` (a bundle) fine-tunes from its weights of the same
    configuration and fold. Per-epoch losses and pseudo-Dice go to an MLflow run (nested under
    the pipeline run by the select step, so that this step depends only on its inputs and can be
    cached); the fold's validation Dice per class to the metrics output (`validation_tta`: mirror
    the held-out cases when predicting them, 8x the cost in 3D). The model output is nnU-Net's
    fold layout.

    `checkpoint_uri` (`s3://bucket/prefix` or a mounted folder; empty: off): the resume point is
    uploaded there at most every `checkpoint_interval_s` seconds, keyed by the task's inputs,
    configuration and fold, and restored first when the output folder is empty (a retried pod)."""
    from pathlib import Path

    from kubeseg.jsonio import read_json
    from kubeseg.tracking import write_run_ref
    from kubeseg.training.trainer import train_fold
    from kubeseg.workflow import fold_dice, prepare_training_task

    pre = Path(preprocessed.path)
    callbacks = []
    if mlflow_uri:
        from kubeseg.tracking import MlflowTrainingCallback
        callbacks.append(MlflowTrainingCallback(mlflow_uri, experiment=experiment, plans=read_json(pre / "plans.json")))
    task = prepare_training_task(pre, configuration, fold, schedule, device, num_workers, torch_threads,
                                 validation_tta, model.path, previous_stage.path if previous_stage else None,
                                 pretrained.path if pretrained else None, checkpoint_uri, checkpoint_interval_s,
                                 callbacks)
    fold_dir = train_fold(pre, pre / "plans.json", configuration, fold, task.out_dir, task.settings)
    write_run_ref(Path(model.path) / "mlflow_run.json", mlflow_uri, callbacks[0].run_id if callbacks else "",
                  experiment)
    for label, dice in fold_dice(fold_dir).items():
        metrics.log_metric(f"{configuration}.fold{fold}.dice_{label}", dice)
    model.metadata.update({"configuration": configuration, "fold": fold,
                           "checkpoint_upload_failures": task.store.failures if task.store else 0,
                           "tracking": callbacks[0].report if callbacks else {},
                           "pretrained": str(task.weights.relative_to(pretrained.path)) if task.weights else ""})


@component
def gather_group(models: Input[List[Model]], gathered: Output[Model]):
    """Fan-in of one configuration group's folds into one model folder per configuration."""
    from kubeseg.model_folder import configuration_of
    from kubeseg.workflow import gather_training_outputs

    folders = gather_training_outputs([m.path for m in models], gathered.path)
    gathered.metadata["configurations"] = [configuration_of(f) for f in folders]


@component
def gather(models: Input[List[Model]], references: Input[List[Dataset]], cascade_wave: list,
           gathered: Output[Model], reference: Output[Dataset]) -> int:
    """Fan-in of the first training wave: every fold into one model folder per configuration
    (with the folds' MLflow run references), and the groups' preprocessing references (properties,
    reference segmentations; no arrays) into one. Returns the size of the cascade wave that follows
    (0: none planned)."""
    from kubeseg.model_folder import configuration_of
    from kubeseg.workflow import gather_training_outputs, merge_references

    folders = gather_training_outputs([m.path for m in models], gathered.path)
    gathered.metadata["configurations"] = [configuration_of(f) for f in folders]
    merge_references([r.path for r in references], reference.path)
    return len(cascade_wave)


@component
def cascade_inputs(models: Input[Model], preprocessed: Input[Dataset], cascade_wave: list, num_workers: int,
                   previous_stage: Output[Dataset]) -> list:
    """Before the cascade wave: the first stage's out-of-fold segmentations of every case on the
    cascade's grid (one folder per cascade configuration), checked against every cascade fold's
    cases. Returns the cascade wave, one item per (configuration, fold)."""
    from kubeseg.workflow import cascade_wave_inputs

    items = cascade_wave_inputs(models.path, preprocessed.path, cascade_wave, previous_stage.path,
                                None if num_workers < 0 else num_workers)
    previous_stage.metadata["configurations"] = sorted({i["configuration"] for i in items})
    return items


@component
def select(models: Input[Model], reference: Input[Dataset], configurations: list, allow_ensembles: bool,
           tracking: Input[Artifact], selection: Output[Artifact], summary: Output[HTML], metrics: Output[Metrics],
           cascade_models: Input[List[Model]] = None, cascade_references: Input[List[Dataset]] = None):
    """Pick the best of `configurations` or of their pairwise ensembles by cross-validation
    foreground Dice and decide the postprocessing, over the gathered first wave and the cascade
    wave's folds (a cascade's first stage, trained only to feed it, is kept for the bundle); the HTML
    output shows the plans, the CV table and the training curves of every fold. Logs the CV table
    on the pipeline's MLflow run and nests the fold runs. `reference` (and `cascade_references`): the
    preprocessing properties and reference segmentations of the waves, without arrays."""
    import tempfile
    from pathlib import Path

    from kubeseg.jsonio import read_json
    from kubeseg.workflow import merge_references, run_refs, select_from_folds, summary_html

    outputs = [models.path] + [m.path for m in (cascade_models or [])]
    with tempfile.TemporaryDirectory(prefix="kubeseg-reference-") as tmp:
        pre = Path(reference.path)
        if cascade_references:
            pre = merge_references([reference.path] + [r.path for r in cascade_references], tmp)
        sel = select_from_folds(outputs, pre, selection.path, allow_ensembles, configurations)
        page = summary_html(read_json(pre / "plans.json"), sel,
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
        link_runs(mlflow_uri, parent_run_id, [read_run_ref(r)[1] for r in run_refs(outputs)])


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
    hashes, source run, checksums) with the alias `challenger`; closes the parent run. An
    unreachable tracking server is waited for (backoff, 10 minutes), then the step fails naming it."""
    from kubeseg.registry import register_bundle
    from kubeseg.tracking import finish_run, read_run_ref, require_tracking_uri, wait_for_tracking

    mlflow_uri, parent_run_id = read_run_ref(tracking.path)
    mlflow_uri = require_tracking_uri(mlflow_uri)
    wait_for_tracking(mlflow_uri)  # an outage: retries with backoff, then fails naming the server
    version = register_bundle(bundle.path, model_name, mlflow_uri, parent_run_id or None, source_run=pipeline_run)
    if parent_run_id:
        finish_run(mlflow_uri, parent_run_id)
    return version.version


@component
def promote(model_name: str, version: str, tracking: Input[Artifact], dataset: Input[Dataset], holdout_uri: str,
            tolerance: float, device: str, label_floor: float = 0.1, holdout_set: str = "",
            label_tolerance: float = 0.02, approval: str = "auto") -> str:
    """Gated promotion of the new version to `champion`: every label's CV Dice at least
    `label_floor`; with a registered holdout (`holdout_set`: "" = `<model_name>-holdout` when
    registered, "none", or `NAME[@VERSION]`) the champion and the new version are scored on it in
    this step and every label's Dice must reach `label_floor` and the champion's minus
    `label_tolerance`; without one, CV foreground Dice within `tolerance` of the champion's. A
    sanity prediction of the held-out images (`holdout_uri`, default the dataset's imagesTs) when
    there are any. A refused gate is an outcome (returned as JSON, `promoted` false, with the
    reasons and the holdout scores), not a failure; the champion is then unchanged. `approval` = required: a version that passes only
    waits for `kubeseg models approve` (`awaiting_approval` in the JSON)."""
    import json
    from pathlib import Path

    from kubeseg.retraining import gated_promotion
    from kubeseg.tracking import read_run_ref, require_tracking_uri

    mlflow_uri = require_tracking_uri(read_run_ref(tracking.path)[0])
    holdout = holdout_uri or (str(Path(dataset.path) / "imagesTs") if (Path(dataset.path) / "imagesTs").is_dir()
                              else "")
    outcome = gated_promotion(model_name, version, mlflow_uri, holdout, tolerance, device=device,
                              label_floor=label_floor, holdout_set=holdout_set, label_tolerance=label_tolerance,
                              require_approval=approval == "required")
    return json.dumps(outcome.to_json())
