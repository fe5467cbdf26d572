"""The training pipeline: raw dataset → fingerprint → plans → preprocessed arrays →
train × (configuration, fold) (``dsl.ParallelFor``, one GPU each) → [cascade wave] → select →
bundle → register (MLflow model version, alias ``challenger``).

Waves. The first wave trains every non-cascade configuration × fold; a ``gather`` task collects
it (``dsl.Collected``) into one model folder per configuration and returns the size of the
cascade wave. When the plans' ``3d_cascade_fullres`` was asked for (the first stage, ``3d_lowres``,
is then trained on all five folds), a ``dsl.If`` branch exports the low-res stage's out-of-fold
segmentations onto the full-res grid (``cascade_inputs``), trains the cascade folds in a second
``ParallelFor`` and selects over both waves; the ``dsl.Else`` branch selects over the first wave.
Both branches end in the same select → bundle → register tail (:func:`training_waves`).

Why this shape: kfp 2.17 cannot consume ``dsl.Collected`` of a loop outside a ``dsl.If`` from
inside it (kubeflow/pipelines#9808), ``kfp.local`` fails on an empty ``ParallelFor`` feeding
``dsl.Collected`` and cannot resolve ``dsl.OneOf`` over artifacts; so the first wave is gathered
into one artifact before the branch, the cascade loop only exists when it has items, and each
branch carries its own fan-in.

The same pipeline runs on a cluster (compiled YAML uploaded in the Kubeflow UI, or submitted
with ``kfp.Client``) and on one machine through ``kfp.local`` (accelerator settings are ignored
there). :func:`build_pipeline` takes the compile-time choices (parallelism, retries); everything
else is a run-time parameter.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

from kfp import dsl

from components import steps
from pipelines.secrets import PodSecrets, with_mlflow_credentials, with_signing_key

PIPELINE_NAME = "kubeseg-training"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


@dataclass
class RunKnobs:
    """The run parameters (pipeline channels) the training part of a pipeline uses."""

    configurations: Any
    schedule: Any
    device: Any
    gpu_type: Any
    gpu_count: Any
    train_cpu: Any
    train_memory: Any
    num_workers: Any
    torch_threads: Any
    validation_tta: Any
    allow_ensembles: Any
    mlflow_uri: Any
    experiment: Any
    model_name: Any
    checkpoint_uri: Any = ""
    checkpoint_interval_s: Any = 300.0


@dataclass(frozen=True)
class BuildOptions:
    """Compile-time choices. ``s3_secret``: a Kubernetes Secret with ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` (optionally ``AWS_ENDPOINT_URL``) put into the training pods' environment
    for the checkpoint store (kfp-kubernetes; empty: the pods' own credentials, e.g. IRSA)."""

    parallelism: int = 0
    retries: int = 2
    resources: bool = True
    s3_secret: str = ""
    # MLflow account and registration key from Secrets (pipelines/secrets.py); cluster builds only
    secrets: Optional[PodSecrets] = None


def _train_task(pre, item, k: RunKnobs, o: BuildOptions, name: str, **inputs):
    tr = steps.train(preprocessed=pre.outputs["preprocessed"], configuration=item.configuration, fold=item.fold,
                     schedule=k.schedule, device=k.device, num_workers=k.num_workers, torch_threads=k.torch_threads,
                     validation_tta=k.validation_tta, mlflow_uri=k.mlflow_uri, experiment=k.experiment,
                     checkpoint_uri=k.checkpoint_uri, checkpoint_interval_s=k.checkpoint_interval_s,
                     **{key: v for key, v in inputs.items() if v is not None})
    tr.set_display_name(name)
    with_mlflow_credentials(tr, o.secrets)
    if o.s3_secret:
        from kfp import kubernetes
        kubernetes.use_secret_as_env(tr, o.s3_secret, {k_: k_ for k_ in S3_SECRET_KEYS}, optional=True)
    if o.resources:
        tr.set_accelerator_type(k.gpu_type).set_accelerator_limit(k.gpu_count)
        tr.set_cpu_limit(k.train_cpu).set_memory_limit(k.train_memory)
    if o.retries:
        tr.set_retry(o.retries, backoff_duration="60s", backoff_factor=2.0)
    return tr


def selection_tail(models, cascade_models, pre, fp, run, k: RunKnobs, o: BuildOptions):
    """select → bundle → register; returns the register task (its output is the version)."""
    inputs = {"cascade_models": cascade_models} if cascade_models is not None else {}
    sel = steps.select(models=models, preprocessed=pre.outputs["preprocessed"], configurations=k.configurations,
                       allow_ensembles=k.allow_ensembles, tracking=run.outputs["tracking"], **inputs)
    sel.set_display_name("select")
    with_mlflow_credentials(sel, o.secrets)
    if o.resources:
        sel.set_memory_limit(k.train_memory)
    bun = steps.bundle(selection=sel.outputs["selection"], fingerprint=fp.outputs["fingerprint"])
    bun.set_display_name("bundle")
    reg = steps.register(bundle=bun.outputs["bundle"], model_name=k.model_name, tracking=run.outputs["tracking"],
                         pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    reg.set_caching_options(False).set_display_name("register")
    with_signing_key(with_mlflow_credentials(reg, o.secrets), o.secrets)
    return reg


Tail = Callable[..., Any]  # (models, cascade_models) -> last task of the branch


def training_waves(planned, pre, run, k: RunKnobs, o: BuildOptions, tail: Tail, pretrained=None) -> None:
    """The first wave, its fan-in, and the two branches (cascade wave / none), each ending in ``tail``.

    ``planned`` is a task with the plan step's outputs: ``Output`` (first wave), ``cascade_wave``;
    ``pretrained`` (a bundle) fine-tunes every fold from its weights."""
    with dsl.ParallelFor(planned.outputs["Output"], parallelism=o.parallelism) as item:
        tr = _train_task(pre, item, k, o, "train configuration x fold", pretrained=pretrained)
        tr.after(run)  # order only (the MLflow parent run exists first): still cacheable
    first = steps.gather(models=dsl.Collected(tr.outputs["model"]), cascade_wave=planned.outputs["cascade_wave"])
    first.set_display_name("gather first wave")
    with dsl.If(first.outputs["Output"] > 0, name="cascade-wave"):
        ci = steps.cascade_inputs(models=first.outputs["gathered"], preprocessed=pre.outputs["preprocessed"],
                                  cascade_wave=planned.outputs["cascade_wave"], num_workers=k.num_workers)
        ci.set_display_name("cascade inputs (out-of-fold low-res)")
        if o.resources:
            ci.set_memory_limit(k.train_memory)
        with dsl.ParallelFor(ci.outputs["Output"], parallelism=o.parallelism) as item:
            trc = _train_task(pre, item, k, o, "train cascade configuration x fold",
                              previous_stage=ci.outputs["previous_stage"], pretrained=pretrained)
        tail(first.outputs["gathered"], dsl.Collected(trc.outputs["model"]))
    with dsl.Else(name="no-cascade"):
        tail(first.outputs["gathered"], None)


def build_pipeline(parallelism: int = 0, retries: int = 2, resources: bool = True, s3_secret: str = "") -> Callable:
    """The pipeline function. ``parallelism``: concurrent training tasks per wave (0: no limit);
    ``retries``: per training task (a preempted GPU node, an OOM-killed pod); ``resources``:
    GPU/CPU/memory requests from the run parameters. ``kfp.local`` ignores resource requests, and
    kfp 2.17's local orchestrator cannot resolve parameter-valued ones inside a ``ParallelFor``,
    so local runs build the pipeline with ``resources=False``; the graph is otherwise the same."""
    o = BuildOptions(parallelism, retries, resources, s3_secret, PodSecrets.from_env() if resources else None)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="nnU-Net-style self-configuring segmentation: plan, preprocess, train every "
                              "configuration x fold on its own GPU (cascade folds in a second wave), select by "
                              "cross-validation, bundle, register in MLflow.")
    def training(dataset_uri: str,
                 configurations: list = ["2d", "3d_fullres"],  # noqa: B006 - KFP parameter default
                 folds: list = [0, 1, 2, 3, 4],  # noqa: B006
                 schedule: str = "default",
                 planner_preset: str = "default",
                 device: str = "auto",
                 gpu_type: str = "nvidia.com/gpu",
                 gpu_count: int = 1,
                 train_cpu: str = "8",
                 train_memory: str = "32G",
                 num_workers: int = -1,
                 torch_threads: int = 0,
                 validation_tta: bool = True,
                 allow_ensembles: bool = True,
                 mlflow_uri: str = "",
                 experiment: str = "kubeseg",
                 model_name: str = "kubeseg-segmentation",
                 checkpoint_uri: str = "",
                 checkpoint_interval_s: float = 300.0):
        k = RunKnobs(configurations, schedule, device, gpu_type, gpu_count, train_cpu, train_memory, num_workers,
                     torch_threads, validation_tta, allow_ensembles, mlflow_uri, experiment, model_name,
                     checkpoint_uri, checkpoint_interval_s)
        # the exit handler ends the MLflow parent run whatever happens (FAILED if a step failed)
        closer = steps.close_run(mlflow_uri=mlflow_uri, experiment=experiment,
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        closer.set_caching_options(False).set_display_name("close MLflow run")
        with_mlflow_credentials(closer, o.secrets)
        with dsl.ExitHandler(closer, name="training"):
            raw = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw dataset")

            run = steps.open_run(mlflow_uri=mlflow_uri, experiment=experiment, model_name=model_name,
                                 dataset_uri=dataset_uri, configurations=configurations, folds=folds,
                                 schedule=schedule, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            run.set_caching_options(False).set_display_name("open MLflow run")
            with_mlflow_credentials(run, o.secrets)

            fp, planned, pre = data_steps(raw.output, planner_preset, configurations, folds, k, o)
            training_waves(planned, pre, run, k, o,
                           lambda models, cascade: selection_tail(models, cascade, pre, fp, run, k, o))

    return training


def data_steps(raw, planner_preset, configurations, folds, k: RunKnobs, o: BuildOptions):
    """dataset content hash → fingerprint → plan → preprocess; returns ``(fingerprint, plan,
    preprocess)`` tasks. The hash step never caches and is an input of the three others, so their
    cache follows the dataset's contents, not its URI (a dataset fixed in place is read again)."""
    digest = steps.dataset_hash(raw=raw, num_workers=k.num_workers)
    digest.set_caching_options(False).set_display_name("dataset content hash")
    fp = steps.fingerprint(raw=raw, num_workers=k.num_workers, dataset_hash=digest.output)
    fp.set_display_name("fingerprint")
    planned = steps.plan(raw=raw, fingerprint=fp.outputs["fingerprint"], preset=planner_preset,
                         configurations=configurations, folds=folds, dataset_hash=digest.output)
    planned.set_display_name("plan")
    return fp, planned, preprocess_task(raw, planned, fp, k, o, dataset_hash=digest.output)


def preprocess_task(raw, planned, fp, k: RunKnobs, o: BuildOptions, dataset_hash=None):
    extra = {"dataset_hash": dataset_hash} if dataset_hash is not None else {}
    pre = steps.preprocess(raw=raw, plans=planned.outputs["plans"], fingerprint=fp.outputs["fingerprint"],
                           configurations=planned.outputs["preprocess_configurations"], num_workers=k.num_workers,
                           **extra)
    pre.set_display_name("preprocess")
    if o.resources:
        pre.set_cpu_limit(k.train_cpu).set_memory_limit(k.train_memory)
    return pre


training_pipeline = build_pipeline()


def compile_pipeline(output: str, parallelism: int = 0, retries: int = 2, pipeline: Optional[str] = None,
                     s3_secret: str = "") -> str:
    """Write a pipeline spec (YAML) that a user uploads in the Kubeflow UI: ``training`` (default)
    or ``retraining``; ``s3_secret``: see :class:`BuildOptions`."""
    import os

    from kfp import compiler

    s3_secret = s3_secret or os.environ.get("KUBESEG_S3_SECRET", "")
    if pipeline in (None, "training"):
        func = build_pipeline(parallelism, retries, s3_secret=s3_secret)
    elif pipeline == "retraining":
        from pipelines.retraining import build_retraining_pipeline
        func = build_retraining_pipeline(parallelism, retries, s3_secret=s3_secret)
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}: 'training' or 'retraining'")
    compiler.Compiler().compile(func, package_path=str(output))
    return str(output)
