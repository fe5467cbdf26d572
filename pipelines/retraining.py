"""The retraining pipeline: new labelled cases → merged dataset → (fine-tune from the champion |
retrain) → select → bundle → register as ``challenger`` → gated promotion.

``mode`` (a run parameter):

* ``finetune`` (default): the champion bundle is downloaded from the registry (checksums
  verified); its plans are kept; its member configurations (a cascade member with its first
  stage) × folds are trained on the merged dataset, each fold initialised from the champion's
  weights of the same configuration and fold.
* ``retrain``: the merged dataset is fingerprinted and planned anew and trained from scratch,
  as the training pipeline does.

The training part is the training pipeline's (:class:`pipelines.training.TrainingWaves`: first
wave, fan-in, cascade wave when planned); its tail adds a ``promote`` step after ``register``: the
gate (CV Dice within ``tolerance`` of the champion's, sanity prediction of the held-out images:
``holdout_uri``, default the dataset's ``imagesTs``) either moves ``champion`` or refuses; a
refusal is the step's recorded outcome (JSON), not a pipeline failure. ``approval=required`` (the
chart's production setting): a version that passes the gate is only marked awaiting approval
(``kubeseg models approve``); ``auto`` moves the champion at once.
"""

from typing import Callable

from kfp import dsl

from components import steps
from pipelines.secrets import PodSecrets, with_mlflow_credentials
from pipelines.training import BuildOptions, RunKnobs, TrainingWaves, selection_tail

PIPELINE_NAME = "kubeseg-retraining"


def build_retraining_pipeline(parallelism: int = 0, retries: int = 2, resources: bool = True,
                              s3_secret: str = "") -> Callable:
    """The retraining pipeline function; compile-time choices as :func:`pipelines.training.build_pipeline`."""
    o = BuildOptions(parallelism, retries, resources, s3_secret, PodSecrets.from_env() if resources else None)
    waves = TrainingWaves(o, pretrained=True)

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="kubeseg retraining: add new labelled cases to the dataset, fine-tune from the "
                              "champion (or retrain), register the result as challenger, gated promotion.")
    def retraining(dataset_uri: str,
                   new_cases_uri: str,
                   model_name: str = "kubeseg-segmentation",
                   mlflow_uri: str = "",
                   mode: str = "finetune",
                   configurations: list = [],  # noqa: B006 - KFP parameter default; [] = the champion's
                   folds: list = [],  # noqa: B006 - [] = the champion's (finetune) or all five (retrain)
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
                   experiment: str = "kubeseg",
                   tolerance: float = 0.02,
                   label_floor: float = 0.1,
                   holdout_uri: str = "",
                   approval: str = "auto",
                   checkpoint_uri: str = "",
                   checkpoint_interval_s: float = 300.0):
        closer = steps.close_run(mlflow_uri=mlflow_uri, experiment=experiment,
                                 pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        closer.set_caching_options(False).set_display_name("close MLflow run")
        with_mlflow_credentials(closer, o.secrets)
        with dsl.ExitHandler(closer, name="retraining"):
            raw = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw dataset")
            new = dsl.importer(artifact_uri=new_cases_uri, artifact_class=dsl.Dataset, reimport=False)
            new.set_display_name("new labelled cases")

            run = steps.open_run(mlflow_uri=mlflow_uri, experiment=experiment, model_name=model_name,
                                 dataset_uri=dataset_uri, configurations=configurations, folds=folds,
                                 schedule=schedule, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kind="retraining",
                                 new_cases_uri=new_cases_uri, mode=mode)
            run.set_caching_options(False).set_display_name("open MLflow run")
            with_mlflow_credentials(run, o.secrets)

            merged = steps.merge_cases(raw=raw.output, new_cases=new.output, num_workers=num_workers)
            # a drop folder keeps its URI while its cases change: never reuse an earlier merge
            merged.set_caching_options(False).set_display_name("merge new cases")
            fp = steps.fingerprint(raw=merged.outputs["merged"], num_workers=num_workers)
            fp.set_display_name("fingerprint")
            planned = steps.plan_retraining(raw=merged.outputs["merged"], fingerprint=fp.outputs["fingerprint"],
                                            mode=mode, model_name=model_name, mlflow_uri=mlflow_uri,
                                            preset=planner_preset, configurations=configurations, folds=folds)
            planned.set_caching_options(False).set_display_name("plan (champion or new)")  # the champion moves
            with_mlflow_credentials(planned, o.secrets)
            k = RunKnobs(planned.outputs["candidates"], schedule, device, gpu_type, gpu_count, train_cpu,
                         train_memory, num_workers, torch_threads, validation_tta, allow_ensembles, mlflow_uri,
                         experiment, model_name, checkpoint_uri, checkpoint_interval_s)

            def tail(first, cascade):
                reg = selection_tail(first, cascade, fp, run, k, o)
                gate = steps.promote(model_name=model_name, version=reg.output, tracking=run.outputs["tracking"],
                                     dataset=merged.outputs["merged"], holdout_uri=holdout_uri, tolerance=tolerance,
                                     label_floor=label_floor, approval=approval,
                                     device=device)
                gate.set_caching_options(False).set_display_name("gated promotion")
                with_mlflow_credentials(gate, o.secrets)
                if o.resources:
                    gate.set_memory_limit(train_memory)
                return gate

            waves.add(merged.outputs["merged"], fp, planned, run, k, tail, pretrained=planned.outputs["champion"])

    return retraining
