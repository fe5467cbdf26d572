"""Run a pipeline (``training`` or ``retraining``): locally through ``kfp.local`` (the embedded
default) or on a cluster through ``kfp.Client``."""

import builtins
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


PIPELINES = ("training", "retraining")


def pipeline_builder(pipeline: str = "training") -> tuple[str, Callable]:
    """``(name, build function)`` of ``training`` or ``retraining``."""
    if pipeline == "training":
        from pipelines.training import PIPELINE_NAME, build_pipeline
        return PIPELINE_NAME, build_pipeline
    if pipeline == "retraining":
        from pipelines.retraining import PIPELINE_NAME, build_retraining_pipeline
        return PIPELINE_NAME, build_retraining_pipeline
    raise ValueError(f"unknown pipeline {pipeline!r}: one of {PIPELINES}")


def run_local(arguments: dict[str, Any], pipeline_root: str | Path, parallelism: int = 2,
              enable_caching: bool = False, pipeline: str = "training") -> dict:
    """Run the pipeline on this machine with ``kfp.local.SubprocessRunner`` (components run in
    subprocesses of this Python; accelerator requests are ignored; at most 2 training tasks run at
    once, kfp.local's limit). Returns ``{"version", "run_dir", "selection", "bundle", "promotion",
    "seconds"}`` (``promotion``: the retraining gate's outcome); outputs live under ``pipeline_root``."""
    from kfp import local

    PIPELINE_NAME, build_pipeline = pipeline_builder(pipeline)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(root / "workspace"), raise_on_error=True, enable_caching=enable_caching)
    pipeline = build_pipeline(parallelism=parallelism, retries=0, resources=False)
    if str(arguments.get("mlflow_uri", "")).startswith("sqlite:"):
        # create the SQLite store's tables once, before parallel tasks open it
        from kubeseg.tracking import ensure_experiment
        ensure_experiment(arguments["mlflow_uri"], arguments.get("experiment", "kubeseg"))
    started = time.perf_counter()
    out, err, plain_print = sys.stdout, sys.stderr, builtins.print
    try:
        task = pipeline(**arguments)
    finally:  # kfp.local indents print() while tasks run (patching builtins.print; parallel tasks can
        sys.stdout, sys.stderr, builtins.print = out, err, plain_print  # leave it patched): undo that
    del task  # a pipeline with an exit handler returns nothing: the version is the register step's output
    new = sorted((p for p in root.iterdir() if p.name not in before and p.name.startswith(PIPELINE_NAME)),
                 key=lambda p: p.stat().st_mtime)
    run_dir = new[-1] if new else None
    result = {"version": None, "run_dir": str(run_dir) if run_dir else None,
              "seconds": round(time.perf_counter() - started, 1)}
    if run_dir is not None:
        result.update(run_outputs(run_dir))
    return result


def task_dir(run_dir: str | Path, task: str) -> Optional[Path]:
    """The output folder of ``task`` in a ``kfp.local`` run folder. A task of a ``dsl.If``/``dsl.Else``
    branch is named ``task`` in one branch and ``task-N`` in the other; the one that ran has an
    ``executor_output.json``."""
    run_dir = Path(run_dir)
    found = [p for p in sorted(run_dir.iterdir()) if p.is_dir() and (p.name == task or (
        p.name.startswith(f"{task}-") and p.name[len(task) + 1:].isdigit())) and (p / "executor_output.json").is_file()]
    return found[-1] if found else None


def run_outputs(run_dir: str | Path) -> dict:
    """What a finished local run produced: the registered version, the selection and bundle folders."""
    out: dict = {"version": None, "selection": None, "bundle": None, "promotion": None}

    def output(task: str):
        d = task_dir(run_dir, task)
        return None if d is None else json.loads((d / "executor_output.json").read_text()).get(
            "parameterValues", {}).get("Output")

    out["version"] = output("register")
    promotion = output("promote")
    out["promotion"] = json.loads(promotion) if promotion else None
    sel, bun = task_dir(run_dir, "select"), task_dir(run_dir, "bundle")
    if sel is not None:
        out["selection"] = str(sel / "selection")
    if bun is not None:
        out["bundle"] = str(bun / "bundle")
    return out


def submit(host: str, arguments: dict[str, Any], run_name: Optional[str] = None, experiment: Optional[str] = None,
           parallelism: int = 0, retries: int = 2, namespace: Optional[str] = None, pipeline: str = "training",
           s3_secret: str = "") -> str:
    """Start a run on a Kubeflow Pipelines cluster; returns the run id. Authentication follows
    ``kfp.Client`` (``KF_PIPELINES_SA_TOKEN_PATH`` or an existing token, if the cluster needs one)."""
    import kfp

    _, build_pipeline = pipeline_builder(pipeline)

    c = kfp.Client(host=host, namespace=namespace, existing_token=os.environ.get("KUBESEG_KFP_TOKEN"))
    res = c.create_run_from_pipeline_func(build_pipeline(parallelism, retries, s3_secret=s3_secret), arguments=arguments,
                                          run_name=run_name, experiment_name=experiment)
    return res.run_id
