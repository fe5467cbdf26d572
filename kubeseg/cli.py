"""The ``kubeseg`` command: one verb per engine step, each a few lines around one engine function.

Settings come from flags, then ``KUBESEG_*`` environment variables, then defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kubeseg.errors import DatasetError, KubesegError

log = logging.getLogger("kubeseg")


def _env(name: str, default=None, cast=str):
    value = os.environ.get(f"KUBESEG_{name}")
    return default if value in (None, "") else cast(value)


def _workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("-j", "--num-workers", type=int, default=_env("NUM_WORKERS", None, int),
                   help="worker processes (default: one per core; env KUBESEG_NUM_WORKERS)")


def _planner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=_env("PLANNER_PRESET", "default"),
                   help="planner preset: 'default' (nnU-Net's), 'small' (CPU-sized), 'resenc-m', 'resenc-l', "
                        "'resenc-xl' (nnU-Net's residual encoder planners); env KUBESEG_PLANNER_PRESET")
    p.add_argument("--gpu-memory-gb", type=float, default=_env("GPU_MEMORY_GB", None, float),
                   help="GPU memory budget the plans are sized for (nnU-Net default 8)")
    p.add_argument("--base-features", type=int, default=None, help="features of the first U-Net stage (default 32)")
    p.add_argument("--plans-name", default=None, help="plans identifier (default nnUNetPlans)")


# ---- verbs -----------------------------------------------------------------------------------

def cmd_dataset_check(a) -> int:
    from kubeseg.dataset_check import check_dataset

    problems = check_dataset(a.raw_dir, a.num_workers)
    if problems:
        print(f"{a.raw_dir}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"{a.raw_dir}: OK")
    return 0


def cmd_dataset_synth(a) -> int:
    from kubeseg.synth import SynthSettings, synthesize

    settings = SynthSettings(kind=a.kind, num_cases=a.cases, shape=tuple(a.shape), num_test_cases=a.test_cases,
                             seed=a.seed, **({"dataset_name": a.name} if a.name else {}))
    out = synthesize(a.out_dir, settings)
    print(f"wrote {a.cases} {a.kind} case(s) to {out}")
    return 0


def cmd_dataset_merge(a) -> int:
    from kubeseg.dataset_merge import merge_cases

    res = merge_cases(a.raw_dir, a.new_cases, a.output, a.num_workers, overwrite=a.overwrite)
    print(f"{len(res.added)} new case(s) merged into {res.dataset} ({res.num_training} training cases)")
    return 0


def cmd_fingerprint(a) -> int:
    from kubeseg.fingerprint import extract_fingerprint, write_fingerprint

    fp = extract_fingerprint(a.raw_dir, a.num_workers)
    write_fingerprint(fp, a.output)
    print(f"fingerprint of {len(fp.spacings)} case(s) written to {a.output}")
    return 0


def cmd_plan(a) -> int:
    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import extract_fingerprint, read_fingerprint
    from kubeseg.jsonio import write_json
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.planning.summary import print_plans

    spec = load_dataset_json(a.raw_dir)
    fp = read_fingerprint(a.fingerprint) if a.fingerprint else extract_fingerprint(a.raw_dir, a.num_workers)
    settings = planner_settings(a.preset, gpu_memory_gb=a.gpu_memory_gb, base_features=a.base_features,
                                plans_name=a.plans_name)
    plans = plan_experiment(spec, fp, settings, dataset_name=Path(a.raw_dir).resolve().name)
    write_json(plans, a.output)
    print_plans(plans)
    print(f"plans written to {a.output}")
    return 0


def cmd_preprocess(a) -> int:
    from kubeseg.planning.plans import load_plans
    from kubeseg.preprocessing.preprocess import preprocess_dataset

    plans = load_plans(a.plans)
    for c in a.configuration:
        folder = preprocess_dataset(a.raw_dir, plans, c, a.output, a.fingerprint, a.num_workers)
        print(f"{c}: preprocessed arrays in {folder}")
    return 0


def cmd_train(a) -> int:
    from kubeseg.training.trainer import TrainSettings, train_fold
    from kubeseg.workflow import parse_schedule

    fold = a.fold if a.fold == "all" else int(a.fold)
    if a.previous_stage:  # every case of the fold needs its out-of-fold first-stage segmentation
        from kubeseg.cascade import check_cascade_inputs
        check_cascade_inputs(a.previous_stage, a.preprocessed_dir, a.configuration, fold, a.splits)
    from dataclasses import replace

    from kubeseg.training.schedule import OptimizerSettings

    optimizer = replace(OptimizerSettings(), encoder_lr_scale=a.encoder_lr_scale, decoder_lr_scale=a.decoder_lr_scale,
                        **({"initial_lr": a.initial_lr} if a.initial_lr is not None else {}))
    settings = TrainSettings(device=a.device, schedule=parse_schedule(a.schedule), seed=a.seed, optimizer=optimizer,
                             num_workers=a.num_workers, splits_file=a.splits, previous_stage_dir=a.previous_stage,
                             run_validation=not a.no_validation, pretrained_weights=a.pretrained_weights,
                             log_to_console=False)
    folder = train_fold(a.preprocessed_dir, a.plans, a.configuration, fold, a.output, settings)
    print(f"fold {a.fold} of {a.configuration}: {folder}")
    return 0


def cmd_cascade_inputs(a) -> int:
    from kubeseg.cascade import export_cascade_inputs

    res = export_cascade_inputs(a.previous_model, a.preprocessed_dir, a.configuration, a.output, a.num_workers)
    folds = ",".join(sorted(set(res.source_fold.values())))
    print(f"{a.configuration}: {res.previous_stage}'s out-of-fold segmentations of {len(res.source_fold)} case(s) "
          f"(folds {folds}) in {res.folder}; train with --previous-stage {res.folder}")
    return 0


def cmd_predict(a) -> int:
    from kubeseg.inference import PredictSettings, predict

    if a.public_key:  # only a bundle signed by the registration key is loaded
        from kubeseg.signing import verify_bundle

        sig = verify_bundle(a.model, a.public_key)
        print(f"{a.model}: signature by key {sig.key_id} verified")
    settings = PredictSettings(use_mirroring=not a.disable_tta, step=a.step, device=a.device,
                               batch_size=a.batch_size, fold_average=a.fold_average, backend=a.backend,
                               num_threads=a.threads)
    from kubeseg.clinical.dicom_predict import is_dicom_folder

    if is_dicom_folder(a.input):
        return _predict_dicom(a, settings)
    written = predict(a.input, a.output, a.model, settings, a.configuration, a.folds, a.save_probabilities,
                      postprocess=not a.no_postprocessing, max_resampled_voxels=a.max_resampled_voxels)
    print(f"{len(written)} segmentation(s) written to {a.output}")
    return 0


def _dicom_segmenter(a, settings):
    from kubeseg.clinical.dicom_predict import DicomSegmenter
    from kubeseg.clinical.qa import QASettings
    from kubeseg.drift import DriftSettings

    return DicomSegmenter(a.model, settings, a.configuration, a.folds, postprocess=not a.no_postprocessing,
                          qa=QASettings.from_env(), drift_thresholds=DriftSettings().thresholds())


def _predict_dicom(a, settings) -> int:
    """A folder of DICOM series: label map, DICOM-SEG, summary, FHIR report (kubeseg.clinical)."""
    from kubeseg.clinical.dicom_predict import parse_mapping

    mapping = parse_mapping(a.series)  # a bad mapping is refused before the model loads
    out = _dicom_segmenter(a, settings).run(Path(a.input), Path(a.output), mapping, saliency=a.saliency)
    flags = [f["flag"] for f in out.summary_json["qa"]["flags"]]
    print(f"DICOM input: {out.segmentation.name}, {out.dicom_seg.name}, {out.summary.name}, {out.report.name}"
          f"{', saliency' if out.saliency else ''} written to {out.folder}; QA flags: {', '.join(flags) or 'none'}")
    return 0


def cmd_pacs_segment(a) -> int:
    from kubeseg.clinical.dicom_predict import parse_mapping
    from kubeseg.clinical.dicomweb import DicomWebClient
    from kubeseg.clinical.pacs import segment_study
    from kubeseg.inference import PredictSettings

    settings = PredictSettings(use_mirroring=not a.disable_tta, device=a.device, progress=False)
    a.configuration, a.folds, a.no_postprocessing = None, None, False
    client = DicomWebClient(a.url, timeout=a.timeout)
    mapping = parse_mapping(a.series)
    res = segment_study(client, _dicom_segmenter(a, settings), a.study, Path(a.output),
                        a.series_uid, mapping, saliency=a.saliency, store=not a.no_store)
    print(f"study {a.study}: series {', '.join(res.fetched_series)} segmented; DICOM-SEG "
          f"{res.outputs.seg_series_uid} {'stored' if not a.no_store else 'written'}; outputs in {res.outputs.folder}")
    return 0


def cmd_export_onnx(a) -> int:
    from kubeseg.inference.backends import export_models

    written = export_models(a.model, a.configuration, a.folds)
    for path in written:
        print(path)
    print(f"{len(written)} ONNX model(s) written")
    return 0


def cmd_select(a) -> int:
    from kubeseg.selection import SelectSettings, select_model

    sel = select_model(a.model_dirs, a.preprocessed_dir, a.output, SelectSettings(allow_ensembles=not a.no_ensembles))
    names = " + ".join(m["configuration"] for m in sel["members"])
    print(f"selected {names}: mean foreground Dice {sel['expected_foreground_dice']:.4f} "
          f"({sel['expected_foreground_dice_after_postprocessing']:.4f} after postprocessing); {a.output}")
    return 0


def cmd_bundle(a) -> int:
    from kubeseg.bundle import make_bundle

    out = make_bundle(a.selection, a.output, a.fingerprint, overwrite=a.overwrite)
    print(f"bundle written to {out}")
    return 0


def cmd_import_nnunet(a) -> int:
    from kubeseg.import_nnunet import import_nnunet

    out = import_nnunet(a.source, a.output, a.configuration, a.folds, overwrite=a.overwrite)
    print(f"nnU-Net model imported as bundle {out}")
    return 0


def cmd_demo(a) -> int:
    if a.engine_only:  # the engine chain in one process, no Kubeflow/MLflow needed
        from kubeseg.demo import DemoSettings, run_demo

        run_demo(a.out_dir, DemoSettings(cases=a.cases, seed=a.seed, preset=a.preset,
                                         schedule=a.schedule or "tiny", device=a.device, num_workers=a.num_workers))
        return 0
    from pipelines.demo import DemoSettings as PipelineDemo, run_demo as run_pipeline_demo

    s = PipelineDemo(cases=a.cases, seed=a.seed, preset=a.preset, device=a.device,
                     **({"configurations": tuple(a.configurations)} if a.configurations else {}),
                     **({"folds": tuple(int(f) for f in a.folds)} if a.folds else {}),
                     **({"schedule": a.schedule} if a.schedule else {}),
                     **({"num_workers": a.num_workers} if a.num_workers is not None else {}))
    run_pipeline_demo(a.out_dir, s)
    return 0


# ---- pipelines and registry (need the `pipelines` / `registry` extras) -----------------------

def _pipeline_arguments(a, dataset_uri: str) -> dict:
    return {"dataset_uri": dataset_uri, "configurations": a.configurations, "folds": [int(f) for f in a.folds],
            "schedule": a.schedule, "planner_preset": a.preset, "device": a.device, "gpu_type": a.gpu_type,
            "gpu_count": a.gpu_count, "train_cpu": a.cpu, "train_memory": a.memory, "num_workers": a.num_workers,
            "torch_threads": a.torch_threads, "validation_tta": not a.no_validation_tta,
            "allow_ensembles": not a.no_ensembles, "mlflow_uri": a.mlflow_uri, "experiment": a.experiment,
            "model_name": a.model_name, "checkpoint_uri": a.checkpoint_uri,
            "checkpoint_interval_s": a.checkpoint_interval}


def cmd_pipeline_compile(a) -> int:
    if a.image:
        os.environ["KUBESEG_IMAGE"] = a.image
    from pipelines.training import compile_pipeline

    output = a.output or f"{a.pipeline}.yaml"
    compile_pipeline(output, a.parallelism, a.retries, a.pipeline, s3_secret=a.s3_secret)
    print(f"{a.pipeline} pipeline spec written to {output} (upload it in the Kubeflow Pipelines UI)")
    return 0


def cmd_pipeline_submit(a) -> int:
    if a.image:
        os.environ["KUBESEG_IMAGE"] = a.image
    from pipelines.run import submit

    run_id = submit(a.host, _pipeline_arguments(a, a.dataset_uri), a.run_name, a.kfp_experiment, a.parallelism,
                    a.retries, a.namespace, s3_secret=a.s3_secret)
    print(f"started run {run_id} on {a.host}")
    return 0


def cmd_pipeline_run(a) -> int:
    from pipelines.run import run_local

    if not a.local:
        raise KubesegError("only --local runs are started here; use 'kubeseg pipeline submit --host URL' for a cluster")
    a.mlflow_uri = a.mlflow_uri or _default_tracking_uri()
    result = run_local(_pipeline_arguments(a, str(Path(a.dataset_uri).resolve())), a.pipeline_root,
                       parallelism=a.parallelism or 2, enable_caching=a.cache)
    print(f"pipeline finished in {result['seconds']} s: {a.model_name} version {result['version']} (challenger); "
          f"outputs in {result['run_dir']}")
    return 0


def _retrain_request(a):
    from pipelines.client import RetrainRequest

    return RetrainRequest(
        dataset=a.dataset_uri, new_cases=a.new_cases_uri, model_name=a.model_name, tracking_uri=a.mlflow_uri,
        mode=a.mode, schedule=a.schedule, host=a.host, work_dir=a.work_dir, reason=a.reason,
        configurations=list(a.configurations or []), folds=[f if f == "all" else int(f) for f in a.folds or []],
        planner_preset=a.preset, device=a.device, gpu_type=a.gpu_type, gpu_count=a.gpu_count, train_cpu=a.cpu,
        train_memory=a.memory, num_workers=a.num_workers, torch_threads=a.torch_threads,
        validation_tta=not a.no_validation_tta, allow_ensembles=not a.no_ensembles, experiment=a.experiment,
        tolerance=a.tolerance, holdout=a.holdout or "", approval=a.approval, kfp_experiment=a.kfp_experiment,
        namespace=a.namespace,
        run_name=a.run_name, parallelism=a.parallelism, retries=a.retries, holdout_set=a.holdout_set,
        label_tolerance=a.label_tolerance, finetune_epochs=a.finetune_epochs, finetune_lr=a.finetune_lr,
        encoder_lr_scale=a.encoder_lr_scale, decoder_lr_scale=a.decoder_lr_scale, max_new_cases=a.max_new_cases,
        case_confidence=_confidences(a.case_confidence),
        **({"label_floor": a.label_floor} if a.label_floor is not None else {}))


def _confidences(path) -> dict:
    """case -> confidence from a JSON file: an object, or a list of {"case_id"|"id", "confidence"}."""
    if not path:
        return {}
    import json

    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("items", data)
    if isinstance(data, dict):
        return {str(k): float(v) for k, v in data.items()}
    return {str(i.get("stored_as") or i.get("case_id") or i["id"]): float(i["confidence"]) for i in data
            if i.get("confidence") is not None}


def cmd_pipeline_retrain(a) -> int:
    import json

    from pipelines.client import pipeline_arguments, run_local_with_status, start_retraining

    if a.image:
        os.environ["KUBESEG_IMAGE"] = a.image
    if bool(a.local) == bool(a.host):
        raise KubesegError("say where: --local (kfp.local on this machine) or --host URL (a Kubeflow cluster)")
    if a.host or a.detach:
        if not a.arguments and not (a.dataset_uri and a.new_cases_uri):
            raise KubesegError("--dataset and --new-cases are required")
        run = start_retraining(_retrain_request(a))
        where = f"on {run.host}" if run.host else f"in the background (pid {run.pid}); log {run.log_path}, " \
                                                  f"status {run.status_path}"
        print(f"started retraining run {run.run_id} ({run.retrain_mode}) {where}")
        return 0
    if a.arguments:  # the detached run the client started
        args = json.loads(Path(a.arguments).read_text())
    else:
        if not (a.dataset_uri and a.new_cases_uri):
            raise KubesegError("--dataset and --new-cases are required")
        args = pipeline_arguments(_retrain_request(a), a.mlflow_uri or _default_tracking_uri())
        for key in ("dataset_uri", "new_cases_uri"):
            args[key] = str(Path(args[key]).resolve())
    if a.status_file:
        result = run_local_with_status(args, a.pipeline_root, a.status_file)
    else:
        from pipelines.run import run_local
        result = run_local(args, a.pipeline_root, pipeline="retraining")
    outcome = result.get("promotion") or {}
    verdict = ("promoted to champion" if outcome.get("promoted") else
               "not promoted: " + "; ".join(outcome.get("reasons") or ["no gate outcome"]))
    print(f"retraining finished in {result['seconds']} s: {args['model_name']} version {result['version']} "
          f"(challenger) {verdict}; outputs in {result['run_dir']}")
    return 0


def _default_tracking_uri() -> str:
    from kubeseg.tracking import tracking_uri

    return tracking_uri(os.environ.get("KUBESEG_MLFLOW_URI"))


def cmd_register(a) -> int:
    from kubeseg.registry import register_bundle

    v = register_bundle(a.bundle, a.name, a.tracking_uri, a.parent_run, source_run=a.source_run or "",
                        signing_key=a.signing_key, retrain_mode=a.retrain_mode)
    print(f"registered {a.name} version {v.version} ({v.tags.get('kubeseg.semver', '?')}, alias challenger), "
          f"CV foreground Dice {v.cv_foreground_dice:.4f}")
    return 0


def cmd_models_list(a) -> int:
    from kubeseg.registry import champion_history, list_versions, versions_table
    from kubeseg.workflow import text_table

    versions = list_versions(a.name, a.tracking_uri)
    print(text_table(*versions_table(versions)))
    print(f"champion history: {champion_history(a.name, a.tracking_uri)}")
    waiting = [v.version for v in versions if v.tags.get("kubeseg.approval") == "awaiting"
               and "champion" not in v.aliases]
    if waiting:
        print(f"awaiting approval: {waiting} (kubeseg models approve VERSION --name {a.name} --reason ...)")
    return 0


def cmd_models_promote(a) -> int:
    from kubeseg.registry import GateSettings, promote

    if not a.holdout and not a.holdout_set:
        raise KubesegError("the gate needs --holdout (images for the sanity prediction) and/or --holdout-set "
                           "(a registered labelled holdout)")
    gate = GateSettings(tolerance=a.tolerance, holdout=a.holdout, holdout_labels=a.holdout_labels,
                        min_dice=a.min_dice, device=a.device, holdout_set=a.holdout_set or None,
                        label_tolerance=a.label_tolerance,
                        **({"label_floor": a.label_floor} if a.label_floor is not None else {}))
    require = None if a.approval is None else a.approval == "required"
    p = promote(a.name, a.version, gate, a.tracking_uri, reason=a.reason or "", public_key=a.public_key,
                require_approval=require)
    if p.awaiting_approval:
        print(f"{a.name} version {p.version} passed the gate and awaits approval (champion stays "
              f"{p.previous or 'none'}): kubeseg models approve {p.version} --name {a.name} --reason ...")
        return 0
    print(f"{a.name} version {p.version} is the champion (previous: {p.previous or 'none'}): " + "; ".join(p.reasons))
    return 0


def cmd_models_approve(a) -> int:
    from kubeseg.registry import approve

    p = approve(a.name, a.version, a.reason, a.tracking_uri)
    print(f"{a.name} version {p.version} is the champion (previous: {p.previous or 'none'}): " + "; ".join(p.reasons))
    return 0


def cmd_holdout_register(a) -> int:
    from kubeseg.holdout import register_holdout

    v, created = register_holdout(a.folder, a.model_name, a.tracking_uri, a.name)
    print(f"holdout {v.name} version {v.version} ({'registered' if created else 'same contents as before'}; "
          f"alias current): {v.cases} case(s), {v.sha256}")
    return 0


def cmd_holdout_show(a) -> int:
    from kubeseg.holdout import get_holdout, parse_ref

    name, ref = parse_ref(a.holdout or "", a.model_name)
    v = get_holdout(name, ref, a.tracking_uri)
    print(f"holdout {v.name} version {v.version}: {v.cases} case(s), labels {v.labels or 'n/a'}, {v.sha256}")
    return 0


def cmd_models_rollback(a) -> int:
    from kubeseg.registry import rollback

    p = rollback(a.name, a.tracking_uri, reason=a.reason or "")
    print(f"{a.name} champion rolled back from version {p.previous} to version {p.version}")
    return 0


def cmd_models_download(a) -> int:
    from kubeseg.registry import load_version

    out = load_version(a.name, a.ref, a.output, a.tracking_uri, public_key=a.public_key)
    print(f"{a.name}@{a.ref} downloaded and verified: {out}")
    return 0


def cmd_review_queue(a) -> int:
    from kubeseg.review_client import fetch_queue, queue_table
    from kubeseg.workflow import text_table

    key = (os.environ.get(a.api_key_env) or None) if a.api_key_env else None  # unset: the service says 401
    items = fetch_queue(a.url, key, a.limit, a.status)
    if a.json:
        import json

        print(json.dumps(items, indent=1))
    else:
        print(text_table(*queue_table(items)) if items else "the review queue is empty")
    return 0


def cmd_review_export(a) -> int:
    from kubeseg.feedback_store import FeedbackStore, RefreshRule

    rule = RefreshRule.from_env()
    rule = RefreshRule(a.batch_size or rule.batch_size,
                       a.min_corrected if a.min_corrected is not None else rule.min_corrected_fraction)
    out = FeedbackStore(a.store, rule).export(a.to, a.file_ending, all_labelled=a.all, overwrite=a.overwrite)
    print(f"{len(out['cases'])} reviewed case(s) of batch(es) {[b['batch'] for b in out['batches']]} "
          f"written to {out['dataset']} (feedback log: feedback.jsonl)")
    return 0


def cmd_review_batches(a) -> int:
    from kubeseg.feedback_store import FeedbackStore, RefreshRule
    from kubeseg.workflow import text_table

    store = FeedbackStore(a.store, RefreshRule.from_env())
    rows = [[str(b["batch"]), f"{b['reviewed']}/{b['size']}", str(b["corrected"]), "yes" if b["marked"] else "no"]
            for b in (x.to_json(store.rule) for x in store.batches())]
    print(text_table(["batch", "reviewed", "corrected", "marked"], rows) if rows else "no labelled review yet")
    return 0


def _review_parsers(sub) -> None:
    rv = sub.add_parser("review", help="the service's review queue, and reviewed cases for the next fine-tune") \
        .add_subparsers(dest="review_cmd", required=True)
    p = rv.add_parser("queue", help="list the service's review queue (id, confidence, QA flags, model, status)")
    p.add_argument("--url", default=_env("SERVICE_URL", "http://127.0.0.1:3000"),
                   help="the segmentation service (env KUBESEG_SERVICE_URL)")
    p.add_argument("--api-key-env", default="KUBESEG_API_KEY",
                   help="environment variable holding the API key or token (default KUBESEG_API_KEY; '' for none)")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--status", choices=["pending", "approved", "rejected", "corrected"], default=None)
    p.add_argument("--json", action="store_true", help="print the items as JSON")
    p.set_defaults(fn=cmd_review_queue)
    store_help = "the feedback store: a folder or s3://bucket/prefix (env KUBESEG_FEEDBACK_STORE)"
    p = rv.add_parser("export", help="write the cases of batches marked by the correction rule as a raw dataset "
                                     "for `kubeseg dataset merge`")
    p.add_argument("--store", default=_env("FEEDBACK_STORE"), required=_env("FEEDBACK_STORE") is None, help=store_help)
    p.add_argument("--to", required=True, help="the new raw-dataset folder (imagesTr, labelsTr, feedback.jsonl)")
    p.add_argument("--batch-size", type=int, default=None, help="for batches not yet started (env "
                                                                "KUBESEG_FEEDBACK_BATCH_SIZE, 20)")
    p.add_argument("--min-corrected", type=float, default=None,
                   help="share of a batch's cases that needed correction (env KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION, 0.3)")
    p.add_argument("--all", action="store_true", help="every approved or corrected case, marked or not")
    p.add_argument("--file-ending", default=".nii.gz", help="the raw dataset's file ending (converted if not .nii.gz)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_review_export)
    p = rv.add_parser("batches", help="review batches: reviewed, corrected, marked for the next refresh")
    p.add_argument("--store", default=_env("FEEDBACK_STORE"), required=_env("FEEDBACK_STORE") is None, help=store_help)
    p.set_defaults(fn=cmd_review_batches)


# ---- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", required=True)

    ds = sub.add_parser("dataset", help="check, synthesize or extend raw datasets") \
        .add_subparsers(dest="action", required=True)
    p = ds.add_parser("check", help="validate a raw nnU-Net v2 dataset; exit 1 on problems")
    p.add_argument("raw_dir")
    _workers(p)
    p.set_defaults(fn=cmd_dataset_check)
    p = ds.add_parser("synth", help="write a synthetic dataset (CT-like or two-channel MRI-like)")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=("ct", "mri"), default="ct")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 96, 96), metavar=("Z", "Y", "X"),
                   help="median shape in voxels")
    p.add_argument("--test-cases", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="dataset name in dataset.json")
    p.set_defaults(fn=cmd_dataset_synth)
    p = ds.add_parser("merge", help="a copy of a raw dataset with new labelled cases added")
    p.add_argument("raw_dir")
    p.add_argument("new_cases", help="nnU-Net-format folder (imagesTr, labelsTr) or loose <case>_0000 + <case> files")
    p.add_argument("-o", "--output", required=True, help="the new dataset folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _workers(p)
    p.set_defaults(fn=cmd_dataset_merge)

    p = sub.add_parser("fingerprint", help="extract the dataset fingerprint")
    p.add_argument("raw_dir")
    p.add_argument("-o", "--output", required=True)
    _workers(p)
    p.set_defaults(fn=cmd_fingerprint)

    p = sub.add_parser("plan", help="plan configurations (nnU-Net v2 plans.json)")
    p.add_argument("raw_dir")
    p.add_argument("--fingerprint", help="fingerprint.json (extracted if not given)")
    p.add_argument("-o", "--output", required=True)
    _planner_flags(p)
    _workers(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("preprocess", help="preprocess a dataset for one or more configurations")
    p.add_argument("raw_dir")
    p.add_argument("--plans", required=True)
    p.add_argument("-c", "--configuration", nargs="+", required=True)
    p.add_argument("-o", "--output", required=True, help="preprocessed dataset folder")
    p.add_argument("--fingerprint", help="copied beside the arrays as dataset_fingerprint.json")
    _workers(p)
    p.set_defaults(fn=cmd_preprocess)

    p = sub.add_parser("train", help="train one configuration x fold (resumes from checkpoint_latest)")
    p.add_argument("preprocessed_dir", help="preprocessed dataset folder (from kubeseg preprocess)")
    p.add_argument("--plans", required=True)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-f", "--fold", required=True, help="0-4 or 'all'")
    p.add_argument("-o", "--output", required=True, help="model folder; the fold goes to OUTPUT/fold_<F>")
    p.add_argument("--device", default=_env("DEVICE", "auto"), choices=("auto", "cpu", "cuda"))
    p.add_argument("--schedule", default=_env("SCHEDULE", "default"),
                   help="'default' (1000 x 250), 'tiny', 'short', '<N>epochs' or 'EPOCHSxITERS[xVAL]'; env KUBESEG_SCHEDULE")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--splits", help="user-supplied splits_final.json")
    p.add_argument("--previous-stage", help="cascade: folder of the low-res stage's out-of-fold segmentations "
                                            "(from kubeseg cascade-inputs)")
    p.add_argument("--no-validation", action="store_true", help="skip the held-out fold's full-case validation")
    p.add_argument("--pretrained-weights", metavar="PATH",
                   help="fine-tune: start from this checkpoint_final.pth of a compatible network "
                        "(output heads skipped if the labels differ; ignored when resuming)")
    p.add_argument("--initial-lr", type=float, default=None, help="initial learning rate (nnU-Net: 1e-2)")
    p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="layer-wise rates: the encoder's learning rate x this (incremental fine-tuning: 0.5)")
    p.add_argument("--decoder-lr-scale", type=float, default=1.0, help="the decoder's (and heads') x this")
    _workers(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("cascade-inputs", help="export the first stage's out-of-fold segmentations on the cascade's "
                                              "grid (the cascade's extra training input)")
    p.add_argument("previous_model", help="the first stage's training output (<Trainer>__<Plans>__3d_lowres, "
                                          "fold_*/validation/*.npz)")
    p.add_argument("--preprocessed-dir", required=True, help="preprocessed dataset with the cascade's arrays")
    p.add_argument("-c", "--configuration", default="3d_cascade_fullres", help="the cascade stage")
    p.add_argument("-o", "--output", default=None,
                   help="folder for <case>.npy (default PREVIOUS_MODEL/predicted_next_stage/<configuration>)")
    _workers(p)
    p.set_defaults(fn=cmd_cascade_inputs)

    p = sub.add_parser("predict", help="segment an image file or a folder of cases with a bundle or model folder")
    p.add_argument("-i", "--input", required=True, help="image file, or folder of <case>_<channel:04d><ending> files")
    p.add_argument("-o", "--output", required=True, help="output folder (or file, for one input file)")
    p.add_argument("-m", "--model", required=True,
                   help="bundle, trained-model folder (kubeseg or nnU-Net v2), or a folder of those (with -c)")
    p.add_argument("-c", "--configuration", nargs="+", help="configuration(s); several = ensemble")
    p.add_argument("-f", "--folds", nargs="+", help="folds to use (default: all finished)")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>.npz (probabilities)")
    p.add_argument("--no-postprocessing", action="store_true", help="skip the bundle's postprocessing")
    p.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--step", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    p.add_argument("--batch-size", type=int, default=_env("PREDICT_BATCH", None, int),
                   help="network inputs per forward call, mirrored copies included (default: 8 on a GPU, 1 on the CPU)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino", "auto"),
                   default=_env("BACKEND", "torch"),
                   help="what runs the network: torch, or its ONNX export under ONNX Runtime or OpenVINO "
                        "(files from `kubeseg export-onnx`, else exported on the fly); auto: the fastest installed")
    p.add_argument("--threads", type=int, default=_env("THREADS", None, int),
                   help="CPU threads (default: the cores this process may use, capped by a container's CPU "
                        "limit; OpenVINO runs one stream per thread)")
    p.add_argument("--fold-average", choices=("probabilities", "logits"), default="probabilities",
                   help="how folds are combined ('logits' is nnU-Net v2's)")
    p.add_argument("--max-resampled-voxels", type=int, default=_env("MAX_RESAMPLED_VOXELS", 2 ** 29, int),
                   help="refuse an input whose header implies a larger grid after resampling, in any "
                        "configuration (default 2^29; KUBESEG_MAX_RESAMPLED_VOXELS)")
    p.add_argument("--series", nargs="+", metavar="CHANNEL=SERIES",
                   help="DICOM input: which series feeds which channel (channel index or name = series UID, "
                        "description or modality); default: by description, then modality")
    p.add_argument("--saliency", action="store_true",
                   help="DICOM input: also write a Grad-CAM++ map of the most uncertain label (NIfTI + PNG)")
    p.add_argument("--public-key", default=os.environ.get("KUBESEG_MODEL_PUBLIC_KEY") or None,
                   help="registration public key (PEM): refuse a bundle it has not signed "
                        "(default: KUBESEG_MODEL_PUBLIC_KEY; unset: no check)")
    p.set_defaults(fn=cmd_predict)

    pacs = sub.add_parser("pacs", help="segment studies from a PACS over DICOMweb").add_subparsers(dest="pacs_cmd",
                                                                                                  required=True)
    p = pacs.add_parser("segment", help="fetch a study (WADO-RS), segment it, store the DICOM-SEG (STOW-RS)")
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web")
    p.add_argument("--study", required=True, help="StudyInstanceUID")
    p.add_argument("--series-uid", nargs="+", help="series to fetch (default: every image series of the study)")
    p.add_argument("--series", nargs="+", metavar="CHANNEL=SERIES", help="channel mapping, as for predict")
    p.add_argument("-m", "--model", required=True, help="bundle")
    p.add_argument("-o", "--output", required=True, help="folder for the NIfTI, DICOM-SEG, summary and FHIR report")
    p.add_argument("--saliency", action="store_true", help="also a Grad-CAM++ map of the most uncertain label")
    p.add_argument("--no-store", action="store_true", help="do not store the DICOM-SEG back (dry run)")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per DICOMweb request")
    p.set_defaults(fn=cmd_pacs_segment)


    p = sub.add_parser("export-onnx", help="write fold_<N>/network.onnx (patch-size input, dynamic batch) for "
                                           "every configuration x fold of a bundle or model folder")
    p.add_argument("model", help="bundle, trained-model folder, or a folder of those (with -c)")
    p.add_argument("-c", "--configuration", nargs="+", help="configuration(s)")
    p.add_argument("-f", "--folds", nargs="+", help="folds (default: all finished)")
    p.set_defaults(fn=cmd_export_onnx)

    p = sub.add_parser("select", help="pick the best configuration or pairwise ensemble by CV Dice")
    p.add_argument("model_dirs", nargs="+", help="training output folders, one per configuration")
    p.add_argument("--preprocessed-dir", required=True, help="preprocessed dataset folder (gt_segmentations)")
    p.add_argument("-o", "--output", required=True, help="folder for selection.json and postprocessing.json")
    p.add_argument("--no-ensembles", action="store_true", help="single configurations only")
    p.set_defaults(fn=cmd_select)

    p = sub.add_parser("bundle", help="assemble the selected model(s) into one self-contained folder")
    p.add_argument("selection", help="selection.json (or its folder) from kubeseg select")
    p.add_argument("-o", "--output", required=True, help="bundle folder")
    p.add_argument("--fingerprint", help="dataset_fingerprint.json, if the model folders lack it")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_bundle)

    p = sub.add_parser("import-nnunet", help="import an nnU-Net v2 model (zip or results folder) as a bundle")
    p.add_argument("source", help="zip from nnU-Net's export / AIMI, or an nnU-Net results folder")
    p.add_argument("-o", "--output", required=True, help="bundle folder")
    p.add_argument("-c", "--configuration", nargs="+", help="configuration(s) to import (default: the best guess)")
    p.add_argument("-f", "--folds", nargs="+", help="folds to import (default: all)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_import_nnunet)

    p = sub.add_parser("demo", help="the whole loop on a synthetic dataset: local pipeline, MLflow, champion")
    p.add_argument("--out-dir", default=_env("DEMO_DIR", "demo_out"))
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=_env("PLANNER_PRESET", "small"))
    p.add_argument("--schedule", default=_env("SCHEDULE", None),
                   help="training schedule (pipeline demo default 40x25x2: 40 epochs x 25 iterations; "
                        "--engine-only default tiny)")
    p.add_argument("--configurations", nargs="+", default=None, help="default: the demo's (2d)")
    p.add_argument("--folds", nargs="+", default=None, help="default: the demo's (0 1)")
    p.add_argument("--engine-only", action="store_true",
                   help="the engine chain in one process (train 3d_fullres fold 0, select, bundle, predict), "
                        "without Kubeflow or MLflow")
    p.add_argument("--device", default=_env("DEVICE", "auto"), choices=("auto", "cpu", "cuda"))
    _workers(p)
    p.set_defaults(fn=cmd_demo)

    _pipeline_parsers(sub)
    return parser


def _tracking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=_env("MLFLOW_URI", None),
                   help="MLflow tracking/registry URI (env KUBESEG_MLFLOW_URI, then MLFLOW_TRACKING_URI, "
                        "then sqlite:///mlflow.db)")


def _pipeline_parsers(sub) -> None:
    pl = sub.add_parser("pipeline", help="compile, submit or run the Kubeflow training pipeline") \
        .add_subparsers(dest="action", required=True)

    def compile_flags(p):
        p.add_argument("--parallelism", type=int, default=0,
                       help="concurrent training tasks per configuration (0: no limit)")
        p.add_argument("--retries", type=int, default=2, help="retries per training task")
        p.add_argument("--image", default=None, help="kubeseg image for every task (env KUBESEG_IMAGE)")
        p.add_argument("--s3-secret", default=_env("S3_SECRET", ""),
                       help="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY[/AWS_ENDPOINT_URL] for "
                            "the training pods' checkpoint store (env KUBESEG_S3_SECRET)")

    def run_flags(p):
        p.add_argument("--configurations", nargs="+", default=["2d", "3d_fullres"])
        p.add_argument("--folds", nargs="+", default=["0", "1", "2", "3", "4"])
        p.add_argument("--schedule", default=_env("SCHEDULE", "default"),
                       help="'default', 'short', 'tiny', '<N>epochs' or 'EPOCHSxITERS[xVAL]'")
        p.add_argument("--preset", default=_env("PLANNER_PRESET", "default"), help="planner preset")
        p.add_argument("--device", default=_env("DEVICE", "auto"), choices=("auto", "cpu", "cuda"))
        p.add_argument("--gpu-type", default="nvidia.com/gpu", help="accelerator type of training tasks")
        p.add_argument("--gpu-count", type=int, default=1)
        p.add_argument("--cpu", default="8", help="CPU limit of training tasks (augmentation workers)")
        p.add_argument("--memory", default="32G", help="memory limit of training tasks")
        p.add_argument("-j", "--num-workers", type=int, default=_env("NUM_WORKERS", -1, int),
                       help="augmentation workers per training task (-1: one per core)")
        p.add_argument("--torch-threads", type=int, default=0, help="torch threads per task (0: torch's default)")
        p.add_argument("--no-validation-tta", action="store_true",
                       help="predict each fold's held-out cases without mirroring (8x cheaper in 3D)")
        p.add_argument("--no-ensembles", action="store_true")
        p.add_argument("--mlflow-uri", default=_env("MLFLOW_URI", ""), help="MLflow tracking URI (env KUBESEG_MLFLOW_URI)")
        p.add_argument("--experiment", default="kubeseg", help="MLflow experiment")
        p.add_argument("--model-name", default="kubeseg-segmentation", help="registered model name")
        p.add_argument("--checkpoint-uri", default=_env("CHECKPOINT_URI", ""),
                       help="durable resume points of training tasks: s3://bucket/prefix or a mounted folder "
                            "(env KUBESEG_CHECKPOINT_URI; empty: off)")
        p.add_argument("--checkpoint-interval", type=float, default=_env("CHECKPOINT_INTERVAL_S", 300.0, float),
                       help="least seconds between two checkpoint uploads (checked at epoch ends)")

    p = pl.add_parser("compile", help="write a pipeline spec to upload in the Kubeflow UI")
    p.add_argument("-o", "--output", default=None, help="spec file (default <pipeline>.yaml)")
    p.add_argument("--pipeline", choices=("training", "retraining"), default="training")
    compile_flags(p)
    p.set_defaults(fn=cmd_pipeline_compile)

    p = pl.add_parser("submit", help="start a run on a Kubeflow Pipelines cluster (kfp.Client)")
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    p.add_argument("--dataset-uri", required=True, help="raw dataset as the cluster sees it (s3://, gs://, minio://)")
    p.add_argument("--run-name", default=None)
    p.add_argument("--kfp-experiment", default=None, help="KFP experiment name")
    p.add_argument("--namespace", default=None)
    compile_flags(p)
    run_flags(p)
    p.set_defaults(fn=cmd_pipeline_submit)

    p = pl.add_parser("run", help="run the pipeline on this machine through kfp.local")
    p.add_argument("--local", action="store_true", help="run through kfp.local (the only mode here)")
    p.add_argument("--dataset-uri", "--dataset", required=True, help="raw dataset folder")
    p.add_argument("--pipeline-root", default="kfp_outputs", help="where task outputs go")
    p.add_argument("--parallelism", type=int, default=2, help="concurrent training tasks (kfp.local: at most 2)")
    p.add_argument("--cache", action="store_true", help="reuse outputs of identical earlier tasks")
    run_flags(p)
    p.set_defaults(fn=cmd_pipeline_run)

    p = pl.add_parser("retrain", help="run the retraining pipeline: new cases merged, fine-tune (or retrain), "
                                      "register as challenger, gated promotion")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="through kfp.local on this machine")
    where.add_argument("--host", default=None, help="KFP API endpoint of a cluster (kfp.Client)")
    p.add_argument("--dataset-uri", "--dataset", default=None, help="raw dataset (folder, or a URI the cluster reads)")
    p.add_argument("--new-cases-uri", "--new-cases", default=None,
                   help="new labelled cases: nnU-Net folder (imagesTr, labelsTr) or loose files")
    p.add_argument("--mode", choices=("finetune", "retrain"), default="finetune",
                   help="finetune: incremental, from the champion's weights, plans and splits (new cases in "
                        "training sets only); retrain: plan and train anew")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="promotion gate without a registered holdout: CV Dice tolerance vs champion")
    p.add_argument("--holdout", default=None, help="held-out images for the gate's sanity prediction "
                                                   "(default: the dataset's imagesTs)")
    p.add_argument("--holdout-set", default="",
                   help="registered holdout that decides (kubeseg holdout register): NAME[@VERSION], "
                        "'none'; default <model-name>-holdout when one is registered")
    p.add_argument("--label-tolerance", type=float, default=0.02,
                   help="holdout gate: how far a label's Dice may fall below the champion's")
    p.add_argument("--label-floor", type=float, default=None, help="every label's Dice must reach this (0.1)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="finetune: at most this many epochs")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="finetune: initial learning rate")
    p.add_argument("--encoder-lr-scale", type=float, default=0.5, help="finetune: encoder learning rate x this")
    p.add_argument("--decoder-lr-scale", type=float, default=1.0, help="finetune: decoder learning rate x this")
    p.add_argument("--max-new-cases", type=int, default=0,
                   help="finetune: use at most this many new cases (0: all; the least confident with "
                        "--case-confidence, else the most recent)")
    p.add_argument("--case-confidence", default=None,
                   help="JSON file: case -> confidence (or the review queue's items) to choose --max-new-cases")
    p.add_argument("--approval", choices=("auto", "required"), default=os.environ.get("KUBESEG_PROMOTION_APPROVAL") or "auto",
                   help="required: a version that passes the gate waits for `kubeseg models approve` "
                        "(default: KUBESEG_PROMOTION_APPROVAL, else auto)")
    p.add_argument("--pipeline-root", default="kfp_outputs", help="local: where task outputs go")
    p.add_argument("--status-file", default=None, help="local: keep a status JSON (running/succeeded/failed)")
    p.add_argument("--detach", action="store_true",
                   help="local: start in the background (log and status under --work-dir) and return")
    p.add_argument("--work-dir", default="retraining_runs", help="local --detach: folder for the runs")
    p.add_argument("--arguments", default=None, help=argparse.SUPPRESS)  # the client's request file
    p.add_argument("--reason", default="", help="why this run (recorded in its status)")
    p.add_argument("--run-name", default=None)
    p.add_argument("--kfp-experiment", default="kubeseg-retraining", help="KFP experiment name (cluster)")
    p.add_argument("--namespace", default=None)
    compile_flags(p)
    run_flags(p)
    # retraining's defaults: the champion's configurations and folds (retrain: all five folds)
    p.set_defaults(fn=cmd_pipeline_retrain, configurations=[], folds=[])

    p = sub.add_parser("register", help="register a bundle as a new MLflow model version (alias challenger)")
    p.add_argument("bundle")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--parent-run", default=None, help="MLflow run to nest the registration run under")
    p.add_argument("--source-run", default=None, help="source pipeline run, recorded as a tag")
    p.add_argument("--signing-key", default=None,
                   help="Ed25519 registration key (PEM) that signs the manifest (default: KUBESEG_SIGNING_KEY)")
    p.add_argument("--retrain-mode", choices=("finetune", "retrain"), default=None,
                   help="how the bundle was made: finetune bumps the semver's patch, retrain its minor "
                        "(a changed label set or plans: its major)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_register)

    mo = sub.add_parser("models", help="list, promote, approve, roll back or download registered model versions") \
        .add_subparsers(dest="action", required=True)
    p = mo.add_parser("list", help="versions, aliases, CV Dice, champion history")
    p.add_argument("--name", required=True)
    _tracking_flag(p)
    p.set_defaults(fn=cmd_models_list)
    p = mo.add_parser("promote", help="gated promotion of the challenger (or --version) to champion")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default=None, help="version to promote (default: the challenger)")
    p.add_argument("--holdout", default=None, help="held-out images (folder of raw cases) for the sanity prediction")
    p.add_argument("--holdout-set", default=None,
                   help="registered holdout that decides per label: NAME[@VERSION] or 'auto' (<name>-holdout)")
    p.add_argument("--label-tolerance", type=float, default=0.02,
                   help="holdout gate: how far a label's Dice may fall below the champion's")
    p.add_argument("--holdout-labels", default=None, help="their reference labels (checks --min-dice)")
    p.add_argument("--min-dice", type=float, default=0.0)
    p.add_argument("--label-floor", type=float, default=None,
                   help="every label's CV (and held-out) Dice must reach this (default: GateSettings', 0.1)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="how far below the champion's CV foreground Dice the challenger may be")
    p.add_argument("--device", default=_env("DEVICE", "auto"))
    p.add_argument("--reason", default=None, help="why (recorded with who, in the registry and the audit log)")
    p.add_argument("--public-key", default=None,
                   help="refuse a version this key has not signed (default: KUBESEG_MODEL_PUBLIC_KEY)")
    p.add_argument("--approval", choices=("required", "auto"), default=None,
                   help="required: a version that passes the gate waits for `models approve` "
                        "(default: KUBESEG_PROMOTION_APPROVAL, else auto)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_models_promote)
    p = mo.add_parser("approve", help="make a version that passed the gate and awaits approval the champion")
    p.add_argument("version", help="the version number awaiting approval")
    p.add_argument("--name", required=True)
    p.add_argument("--reason", required=True, help="why (recorded with who, in the registry and the audit log)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_models_approve)
    ho = sub.add_parser("holdout", help="the fixed, versioned labelled holdout the promotion gate scores on") \
        .add_subparsers(dest="action", required=True)
    p = ho.add_parser("register", help="register a labelled set (images/+labels/, or imagesTs/+labelsTs/) as a "
                                       "new holdout version (alias current)")
    p.add_argument("folder")
    p.add_argument("--model-name", required=True, help="the model it gates (holdout name: <model-name>-holdout)")
    p.add_argument("--name", default=None, help="another holdout name")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_holdout_register)
    p = ho.add_parser("show", help="a holdout version: cases, labels, content hash")
    p.add_argument("--model-name", required=True)
    p.add_argument("--holdout", default=None, help="NAME[@VERSION] (default <model-name>-holdout@current)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_holdout_show)

    p = mo.add_parser("rollback", help="return champion to the previous champion")
    p.add_argument("--name", required=True)
    p.add_argument("--reason", default=None, help="why (recorded with who, in the registry and the audit log)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_models_rollback)
    _review_parsers(sub)
    p = mo.add_parser("download", help="download a version (number or alias) and verify its checksums")
    p.add_argument("--name", required=True)
    p.add_argument("--ref", default="champion", help="version number or alias")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--public-key", default=os.environ.get("KUBESEG_MODEL_PUBLIC_KEY") or None,
                   help="refuse a version this key has not signed (default: KUBESEG_MODEL_PUBLIC_KEY)")
    _tracking_flag(p)
    p.set_defaults(fn=cmd_models_download)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # its thread-count notice is not for users
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KubesegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
