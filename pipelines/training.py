"""The training pipeline: raw dataset → fingerprint → plans → preprocessed arrays →
train × (configuration, fold) (``dsl.ParallelFor``, one GPU each) → select (``dsl.Collected``)
→ bundle → register (MLflow model version, alias ``challenger``).

The same pipeline runs on a cluster (compiled YAML uploaded in the Kubeflow UI, or submitted
with ``kfp.Client``) and on one machine through ``kfp.local`` (accelerator settings are ignored
there). :func:`build_pipeline` takes the compile-time choices (parallelism, retries); everything
else is a run-time parameter.
"""

from typing import Callable

from kfp import dsl

from components import steps

PIPELINE_NAME = "kubeseg-training"


def build_pipeline(parallelism: int = 0, retries: int = 2, resources: bool = True) -> Callable:
    """The pipeline function. ``parallelism``: concurrent training tasks (0: no limit);
    ``retries``: per training task (a preempted GPU node, an OOM-killed pod); ``resources``:
    GPU/CPU/memory requests from the run parameters. ``kfp.local`` ignores resource requests, and
    kfp 2.17's local orchestrator cannot resolve parameter-valued ones inside a ``ParallelFor``,
    so local runs build the pipeline with ``resources=False``; the graph is otherwise the same."""

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="nnU-Net-style self-configuring segmentation: plan, preprocess, train every "
                              "configuration x fold on its own GPU, select by cross-validation, bundle, "
                              "register in MLflow.")
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
                 allow_ensembles: bool = True,
                 mlflow_uri: str = "",
                 experiment: str = "kubeseg",
                 model_name: str = "kubeseg-segmentation"):
        # the exit handler ends the MLflow parent run whatever happens (FAILED if a step failed)
        closer = steps.close_run(mlflow_uri=mlflow_uri, experiment=experiment,
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        closer.set_caching_options(False).set_display_name("close MLflow run")
        with dsl.ExitHandler(closer, name="training"):
            raw = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw dataset")

            run = steps.open_run(mlflow_uri=mlflow_uri, experiment=experiment, model_name=model_name,
                                 dataset_uri=dataset_uri, configurations=configurations, folds=folds,
                                 schedule=schedule, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            run.set_caching_options(False).set_display_name("open MLflow run")

            fp = steps.fingerprint(raw=raw.output, num_workers=num_workers).set_display_name("fingerprint")
            planned = steps.plan(raw=raw.output, fingerprint=fp.outputs["fingerprint"], preset=planner_preset,
                                 configurations=configurations, folds=folds).set_display_name("plan")
            pre = steps.preprocess(raw=raw.output, plans=planned.outputs["plans"], fingerprint=fp.outputs["fingerprint"],
                                   configurations=configurations, num_workers=num_workers)
            pre.set_display_name("preprocess")
            if resources:
                pre.set_cpu_limit(train_cpu).set_memory_limit(train_memory)

            with dsl.ParallelFor(planned.outputs["Output"], parallelism=parallelism) as item:
                tr = steps.train(preprocessed=pre.outputs["preprocessed"], configuration=item.configuration,
                                 fold=item.fold, schedule=schedule, device=device, num_workers=num_workers,
                                 torch_threads=torch_threads, mlflow_uri=mlflow_uri, experiment=experiment)
                tr.set_display_name("train configuration x fold").after(run)  # order only: still cacheable
                if resources:
                    tr.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
                    tr.set_cpu_limit(train_cpu).set_memory_limit(train_memory)
                if retries:
                    tr.set_retry(retries, backoff_duration="60s", backoff_factor=2.0)

            sel = steps.select(models=dsl.Collected(tr.outputs["model"]), preprocessed=pre.outputs["preprocessed"],
                               allow_ensembles=allow_ensembles, tracking=run.outputs["tracking"])
            sel.set_display_name("select")
            if resources:
                sel.set_memory_limit(train_memory)
            bun = steps.bundle(selection=sel.outputs["selection"], fingerprint=fp.outputs["fingerprint"])
            bun.set_display_name("bundle")
            reg = steps.register(bundle=bun.outputs["bundle"], model_name=model_name, tracking=run.outputs["tracking"],
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
            reg.set_caching_options(False).set_display_name("register")

    return training


training_pipeline = build_pipeline()


def compile_pipeline(output: str, parallelism: int = 0, retries: int = 2) -> str:
    """Write the pipeline spec (YAML) that a user uploads in the Kubeflow UI."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(parallelism, retries), package_path=str(output))
    return str(output)
