"""Run the training pipeline: locally through ``kfp.local`` (the embedded default) or on a
cluster through ``kfp.Client``."""

import builtins
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def run_local(arguments: dict[str, Any], pipeline_root: str | Path, parallelism: int = 2,
              enable_caching: bool = False) -> dict:
    """Run the pipeline on this machine with ``kfp.local.SubprocessRunner`` (components run in
    subprocesses of this Python; accelerator requests are ignored; at most 2 training tasks run at
    once, kfp.local's limit). Returns ``{"version", "run_dir"}``; outputs live under ``pipeline_root``."""
    from kfp import local

    from pipelines.training import PIPELINE_NAME, build_pipeline

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
    version = None
    if run_dir is not None:
        for out in run_dir.rglob("register/executor_output.json"):
            version = json.loads(out.read_text()).get("parameterValues", {}).get("Output")
    return {"version": version, "run_dir": str(run_dir) if run_dir else None,
            "seconds": round(time.perf_counter() - started, 1)}


def submit(host: str, arguments: dict[str, Any], run_name: Optional[str] = None, experiment: Optional[str] = None,
           parallelism: int = 0, retries: int = 2, namespace: Optional[str] = None) -> str:
    """Start a run on a Kubeflow Pipelines cluster; returns the run id. Authentication follows
    ``kfp.Client`` (``KF_PIPELINES_SA_TOKEN_PATH`` or an existing token, if the cluster needs one)."""
    import kfp

    from pipelines.training import build_pipeline

    c = kfp.Client(host=host, namespace=namespace, existing_token=os.environ.get("KUBESEG_KFP_TOKEN"))
    res = c.create_run_from_pipeline_func(build_pipeline(parallelism, retries), arguments=arguments,
                                          run_name=run_name, experiment_name=experiment)
    return res.run_id
