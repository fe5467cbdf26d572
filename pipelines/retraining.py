"""The retraining pipeline: new labelled cases → merged dataset → (fine-tune from the champion |
retrain) → select → bundle → register as ``challenger`` → gated promotion.

``mode`` (a run parameter):

* ``finetune`` (default): *incremental* fine-tuning. The champion bundle is downloaded from the
  registry (checksums verified); its plans and its ``splits_final.json`` are kept, the new cases
  joining every fold's training set only (no fold validates on a case its champion fold trained
  on); its member configurations (a cascade member with its first stage) × folds are trained on
  the merged dataset, each fold from the champion's weights of the same configuration and fold,
  for at most ``finetune_epochs`` (10) epochs of the run schedule's iterations at ``finetune_lr``
  (1e-4, poly decay), encoder × ``encoder_lr_scale`` (0.5), decoder × ``decoder_lr_scale`` (1.0).
  ``max_new_cases`` > 0 uses only that many new cases (the least confident by ``case_confidence``).
* ``retrain``: the merged dataset is fingerprinted and planned anew and trained from scratch,
  as the training pipeline does.

The training part is the training pipeline's (:class:`pipelines.training.TrainingWaves`: first
wave, fan-in, cascade wave when planned); its tail adds a ``promote`` step after ``register``: the
gate either moves ``champion`` or refuses; a refusal is the step's recorded outcome (JSON), not a
pipeline failure. With a registered holdout (``holdout_set``; default ``<model_name>-holdout`` when
one is registered) the champion and the challenger are scored on it per label in that step and
that decides (``label_floor``, ``label_tolerance``); without one, CV Dice within ``tolerance`` of the
champion's. A sanity prediction of the held-out images (``holdout_uri``, default the dataset's
``imagesTs``) runs when there are any. ``approval=required`` (the chart's production setting): a
version that passes the gate is only marked awaiting approval (``kubeseg models approve``);
``auto`` moves the champion at once.
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
                   checkpoint_interval_s: float = 300.0,
                   finetune_epochs: int = 10,
                   finetune_lr: float = 1e-4,
                   encoder_lr_scale: float = 0.5,
                   decoder_lr_scale: float = 1.0,
                   max_new_cases: int = 0,
                   case_confidence: dict = {},  # noqa: B006 - case -> confidence (the review queue's)
                   holdout_set: str = "",
                   label_tolerance: float = 0.02):
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
                                            preset=planner_preset, configurations=configurations, folds=folds,
                                            finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                                            encoder_lr_scale=encoder_lr_scale, decoder_lr_scale=decoder_lr_scale,
                                            max_new_cases=max_new_cases, case_confidence=case_confidence)
            planned.set_caching_options(False).set_display_name("plan (champion or new)")  # the champion moves
            with_mlflow_credentials(planned, o.secrets)
            k = RunKnobs(planned.outputs["candidates"], schedule, device, gpu_type, gpu_count, train_cpu,
                         train_memory, num_workers, torch_threads, validation_tta, allow_ensembles, mlflow_uri,
                         experiment, model_name, checkpoint_uri, checkpoint_interval_s)

            def tail(first, cascade):
                reg = selection_tail(first, cascade, fp, run, k, o)
                gate = steps.promote(model_name=model_name, version=reg.output, tracking=run.outputs["tracking"],
                                     dataset=merged.outputs["merged"], holdout_uri=holdout_uri, tolerance=tolerance,
                                     label_floor=label_floor, approval=approval, holdout_set=holdout_set,
                                     label_tolerance=label_tolerance, device=device)
                gate.set_caching_options(False).set_display_name("gated promotion")
                with_mlflow_credentials(gate, o.secrets)
                if o.resources:
                    gate.set_memory_limit(train_memory)
                return gate

            waves.add(merged.outputs["merged"], fp, planned, run, k, tail, pretrained=planned.outputs["champion"])

    return retraining
