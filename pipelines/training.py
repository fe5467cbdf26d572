"""The training pipeline: raw dataset → content hash → fingerprint → plans → per configuration
group: preprocess → train × folds (``dsl.ParallelFor``, one GPU each) → [cascade wave] → select →
bundle → register (MLflow model version, alias ``challenger``).

Artifacts sized for pods. The planned training items are grouped by the arrays they read (one group
per data identifier: ``2d``, ``3d_lowres``, ``3d_fullres``, the cascade sharing ``3d_fullres``'s).
Each group is a small sub-pipeline (:func:`group_pipeline`): preprocess that one configuration →
its folds in an inner ``ParallelFor`` → fan-in of its folds. So a ``2d`` training pod downloads
only the 2d arrays. The preprocess step also writes a *reference* artifact (plans, reference
segmentations, per-case preprocessing properties; no arrays) that selection reads instead of
the arrays.

Waves. The first wave runs one group sub-pipeline per non-cascade group (outer ``ParallelFor``);
a ``gather`` task collects them (``dsl.Collected``) into one model folder per configuration and
one reference, and returns the size of the cascade wave. When the plans' ``3d_cascade_fullres``
was asked for (the first stage, ``3d_lowres``, is then trained on all five folds), a ``dsl.If``
branch runs the cascade groups: preprocess (the same inputs as the ``3d_fullres`` group, so a
cached result serves both), export the low-res stage's out-of-fold segmentations onto the
full-res grid (``cascade_inputs``), train the cascade folds; then selects over both waves; the
``dsl.Else`` branch selects over the first wave. Both branches end in the same select → bundle →
register tail (:class:`TrainingWaves`).

Why this shape: kfp 2.17 cannot consume ``dsl.Collected`` of a loop outside a ``dsl.If`` from
inside it (kubeflow/pipelines#9808), ``kfp.local`` fails on an empty ``ParallelFor`` feeding
``dsl.Collected``, cannot resolve ``dsl.OneOf`` over artifacts, iterates only over a task's return
value (``Output``), replaces every task-output parameter entering a loop with the loop's item
(so the content hash rides in the group items), and fails on two ``ParallelFor`` nested in one
DAG (the inner item resolves to the outer one; ``dsl.Collected`` of a nested loop is a list of
lists). A loop *over a sub-pipeline*
that has its own loop works in kfp.local and compiles to a nested DAG; each sub-pipeline gathers
its folds itself, so the outer fan-in collects one artifact per group.

The same pipeline runs on a cluster (compiled YAML uploaded in the Kubeflow UI, or submitted
with ``kfp.Client``) and on one machine through ``kfp.local`` (accelerator settings are ignored
there). :func:`build_pipeline` takes the compile-time choices (parallelism, retries); everything
else is a run-time parameter.
"""

from dataclasses import dataclass
import inspect
from typing import Any, Callable, NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

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


class Wave(NamedTuple):
    """What a training wave hands to selection: its models (one artifact, or a ``dsl.Collected``
    list) and its preprocessing reference(s) (geometry, reference segmentations; no arrays)."""

    models: Any
    reference: Any


# the run parameters a group sub-pipeline passes to its tasks: (name = RunKnobs field, type)
GROUP_KNOBS = (("schedule", str), ("device", str), ("num_workers", int), ("torch_threads", int),
               ("validation_tta", bool), ("mlflow_uri", str), ("experiment", str), ("checkpoint_uri", str),
               ("checkpoint_interval_s", float), ("gpu_type", str), ("gpu_count", int), ("train_cpu", str),
               ("train_memory", str))


def _train_task(pre, item, a: dict, o: BuildOptions, name: str, **inputs):
    tr = steps.train(preprocessed=pre, configuration=item.configuration, fold=item.fold,
                     schedule=a["schedule"], device=a["device"], num_workers=a["num_workers"],
                     torch_threads=a["torch_threads"], validation_tta=a["validation_tta"], mlflow_uri=a["mlflow_uri"],
                     experiment=a["experiment"], checkpoint_uri=a["checkpoint_uri"],
                     checkpoint_interval_s=a["checkpoint_interval_s"],
                     **{key: v for key, v in inputs.items() if v is not None})
    tr.set_display_name(name)
    with_mlflow_credentials(tr, o.secrets)
    if o.s3_secret:
        from kfp import kubernetes
        kubernetes.use_secret_as_env(tr, o.s3_secret, {k_: k_ for k_ in S3_SECRET_KEYS}, optional=True)
    if o.resources:
        tr.set_accelerator_type(a["gpu_type"]).set_accelerator_limit(a["gpu_count"])
        tr.set_cpu_limit(a["train_cpu"]).set_memory_limit(a["train_memory"])
    if o.retries:
        tr.set_retry(o.retries, backoff_duration="60s", backoff_factor=2.0)
    return tr


def preprocess_step(raw, plans, fingerprint, configuration, num_workers, dataset_hash="", cpu=None, memory=None):
    """One configuration's preprocess task (outputs ``preprocessed``: arrays for its training tasks;
    ``reference``: the same without arrays, for selection)."""
    pre = steps.preprocess(raw=raw, plans=plans, fingerprint=fingerprint, configuration=configuration,
                           num_workers=num_workers, dataset_hash=dataset_hash)
    pre.set_display_name("preprocess")
    if cpu is not None:
        pre.set_cpu_limit(cpu)
    if memory is not None:
        pre.set_memory_limit(memory)
    return pre


GroupOutputs = NamedTuple("GroupOutputs", [("models", Model), ("reference", Dataset)])


def group_pipeline(o: BuildOptions, cascade: bool = False, pretrained: bool = False) -> Callable:
    """The sub-pipeline of one configuration group: preprocess its configuration → train its
    (configuration, fold) items (``ParallelFor``; the cascade first exports its previous stage's
    out-of-fold segmentations from ``first_wave``) → gather its folds. Outputs ``models`` (one
    model folder per configuration) and ``reference``.

    Its signature depends on the build (``first_wave`` for a cascade group, ``pretrained`` when
    fine-tuning): KFP reads a pipeline's inputs from the function's signature, so it is set
    explicitly, and KFP calls the function positionally in that order."""
    P = inspect.Parameter
    names = [("raw", Input[Dataset]), ("plans", Input[Artifact]), ("fingerprint", Input[Dataset]),
             ("preprocess_configuration", str), ("items", list), ("dataset_hash", str), *GROUP_KNOBS]
    if cascade:
        names.append(("first_wave", Input[Model]))
    if pretrained:
        names.append(("pretrained", Input[Model]))
    params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in names]

    def body(*args):
        a = dict(zip([p.name for p in params], args))
        pre = preprocess_step(a["raw"], a["plans"], a["fingerprint"], a["preprocess_configuration"],
                              a["num_workers"], a["dataset_hash"], a["train_cpu"] if o.resources else None,
                              a["train_memory"] if o.resources else None)
        items, extra = a["items"], {}
        if pretrained:
            extra["pretrained"] = a["pretrained"]
        if cascade:
            ci = steps.cascade_inputs(models=a["first_wave"], preprocessed=pre.outputs["preprocessed"],
                                      cascade_wave=items, num_workers=a["num_workers"])
            ci.set_display_name("cascade inputs (out-of-fold low-res)")
            if o.resources:
                ci.set_memory_limit(a["train_memory"])
            items, extra["previous_stage"] = ci.outputs["Output"], ci.outputs["previous_stage"]
        with dsl.ParallelFor(items, parallelism=o.parallelism) as item:
            tr = _train_task(pre.outputs["preprocessed"], item, a, o,
                             "train cascade configuration x fold" if cascade else "train configuration x fold",
                             **extra)
        folds = steps.gather_group(models=dsl.Collected(tr.outputs["model"]))
        folds.set_display_name("gather folds")
        return GroupOutputs(models=folds.outputs["gathered"], reference=pre.outputs["reference"])

    body.__signature__ = inspect.Signature(params, return_annotation=GroupOutputs)
    body.__name__ = "train_cascade_configuration" if cascade else "train_configuration"
    body.__doc__ = ("One configuration group of the cascade wave: preprocess, cascade inputs, train its folds."
                    if cascade else "One configuration group: preprocess it, train its folds, gather them.")
    return dsl.pipeline(body)


def selection_tail(first: Wave, cascade: Optional[Wave], fp, run, k: RunKnobs, o: BuildOptions):
    """select → bundle → register; returns the register task (its output is the version)."""
    inputs = {"cascade_models": cascade.models, "cascade_references": cascade.reference} if cascade else {}
    sel = steps.select(models=first.models, reference=first.reference, configurations=k.configurations,
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


Tail = Callable[..., Any]  # (first: Wave, cascade: Wave | None) -> last task of the branch


class TrainingWaves:
    """The training part of a pipeline: group sub-pipelines of the first wave, their fan-in, and
    the two branches (cascade wave / none), each ending in a tail. Built before the pipeline
    function (KFP defines a sub-pipeline outside any pipeline), used inside it with :meth:`add`."""

    def __init__(self, o: BuildOptions, pretrained: bool = False):
        self.o, self.pretrained = o, pretrained
        self.first = group_pipeline(o, cascade=False, pretrained=pretrained)
        self.cascade = group_pipeline(o, cascade=True, pretrained=pretrained)

    def add(self, raw, fp, planned, run, k: RunKnobs, tail: Tail, pretrained=None, dataset_hash="") -> None:
        """``planned``: a task with the plan step's outputs (``Output``: first wave, ``cascade_wave``,
        ``plans``); ``pretrained`` (a bundle, when built with ``pretrained=True``) fine-tunes every fold
        from its weights; ``dataset_hash``: the raw dataset's content hash (a cache key)."""
        o = self.o
        common = dict(raw=raw, plans=planned.outputs["plans"], fingerprint=fp.outputs["fingerprint"],
                      **{n: getattr(k, n) for n, _ in GROUP_KNOBS})
        if self.pretrained:
            common["pretrained"] = pretrained
        # kfp.local caps each loop level at 2 threads: one group at a time keeps `parallelism` training
        # tasks at once on one machine; on a cluster every group runs at once, `parallelism` folds each
        outer = 0 if o.resources else 1
        groups = steps.training_groups(plans=planned.outputs["plans"], items=planned.outputs["Output"],
                                       dataset_hash=dataset_hash)
        groups.set_display_name("group the first wave by configuration")
        with dsl.ParallelFor(groups.output, parallelism=outer) as g:
            sub = self.first(preprocess_configuration=g.preprocess, items=g.items, dataset_hash=g.dataset_hash,
                             **common)
            sub.set_display_name("preprocess + train one configuration")
            sub.after(run)  # order only (the MLflow parent run exists first): still cacheable
        first = steps.gather(models=dsl.Collected(sub.outputs["models"]),
                             references=dsl.Collected(sub.outputs["reference"]),
                             cascade_wave=planned.outputs["cascade_wave"])
        first.set_display_name("gather first wave")
        done = Wave(first.outputs["gathered"], first.outputs["reference"])
        with dsl.If(first.outputs["Output"] > 0, name="cascade-wave"):
            cgroups = steps.training_groups(plans=planned.outputs["plans"], items=planned.outputs["cascade_wave"],
                                            dataset_hash=dataset_hash)
            cgroups.set_display_name("group the cascade wave by configuration")
            with dsl.ParallelFor(cgroups.output, parallelism=outer) as g:
                csub = self.cascade(preprocess_configuration=g.preprocess, items=g.items, dataset_hash=g.dataset_hash,
                                    first_wave=first.outputs["gathered"], **common)
                csub.set_display_name("preprocess + cascade inputs + train one cascade configuration")
            tail(done, Wave(dsl.Collected(csub.outputs["models"]), dsl.Collected(csub.outputs["reference"])))
        with dsl.Else(name="no-cascade"):
            tail(done, None)


def build_pipeline(parallelism: int = 0, retries: int = 2, resources: bool = True, s3_secret: str = "") -> Callable:
    """The pipeline function. ``parallelism``: concurrent training tasks per configuration (0: no limit);
    ``retries``: per training task (a preempted GPU node, an OOM-killed pod); ``resources``:
    GPU/CPU/memory requests from the run parameters. ``kfp.local`` ignores resource requests, and
    kfp 2.17's local orchestrator cannot resolve parameter-valued ones inside a ``ParallelFor``,
    so local runs build the pipeline with ``resources=False``; the graph is otherwise the same."""
    o = BuildOptions(parallelism, retries, resources, s3_secret, PodSecrets.from_env() if resources else None)
    waves = TrainingWaves(o)

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

            digest, fp, planned = data_steps(raw.output, planner_preset, configurations, folds, k)
            waves.add(raw.output, fp, planned, run, k,
                      lambda first, cascade: selection_tail(first, cascade, fp, run, k, o), dataset_hash=digest.output)

    return training


def data_steps(raw, planner_preset, configurations, folds, k: RunKnobs):
    """dataset content hash → fingerprint → plan; returns ``(hash, fingerprint, plan)`` tasks. The
    hash step never caches and is an input of fingerprint, plan and every preprocess step, so their
    cache follows the dataset's contents, not its URI (a dataset fixed in place is read again)."""
    digest = steps.dataset_hash(raw=raw, num_workers=k.num_workers)
    digest.set_caching_options(False).set_display_name("dataset content hash")
    fp = steps.fingerprint(raw=raw, num_workers=k.num_workers, dataset_hash=digest.output)
    fp.set_display_name("fingerprint")
    planned = steps.plan(raw=raw, fingerprint=fp.outputs["fingerprint"], preset=planner_preset,
                         configurations=configurations, folds=folds, dataset_hash=digest.output)
    planned.set_display_name("plan")
    return digest, fp, planned


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
