"""The one small client the service layer uses to start retraining runs.

``start_retraining(RetrainRequest(...)) -> RetrainRun`` returns as soon as the run has started:

* **cluster** (``request.host`` set): the retraining pipeline is submitted with
  ``kfp.Client(host).create_run_from_pipeline_func`` into the KFP experiment
  ``request.kfp_experiment``; ``run_id`` is KFP's.
* **local** (no host): a detached ``kubeseg pipeline retrain --local ...`` process runs the same
  pipeline through ``kfp.local``. Everything of the run lives in ``work_dir/<run_id>/``:
  ``run.log`` (the process's output), ``status.json`` and ``pipeline_root/`` (task outputs).

``status.json`` (written atomically; :func:`read_status` reads it)::

    {"run_id": "...", "state": "starting" | "running" | "succeeded" | "failed",
     "pid": 1234 | null, "started_at": "2026-...Z", "updated_at": "...", "finished_at": "..." | null,
     "mode": "finetune" | "retrain", "model_name": "...", "reason": "...",
     "log_path": "...", "pipeline_root": "...", "run_dir": "..." | null, "seconds": 812.4 | null,
     "outcome": null | {"version": "7", "promoted": false, "champion": "5", "previous_champion": "5",
                        "reasons": ["refusing to promote ..."]},
     "error": null | "KubesegError: ..."}

``outcome.version`` is the version registered as ``challenger``; ``promoted`` says whether the gate
moved ``champion`` to it. A refused gate is a succeeded run with ``promoted: false``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

STATUS_FILE = "status.json"
LOG_FILE = "run.log"
STATES = ("starting", "running", "succeeded", "failed")


@dataclass
class RetrainRequest:
    """What to retrain. ``dataset``/``new_cases``: folders (local) or URIs the cluster can read
    (``s3://``, ``gs://``, ``minio://``). ``host``: the KFP API endpoint; None runs locally."""

    dataset: str
    new_cases: str
    model_name: str = "kubeseg-segmentation"
    tracking_uri: str = ""  # MLflow; local default KUBESEG_MLFLOW_URI, MLFLOW_TRACKING_URI, sqlite:///mlflow.db
    mode: str = "finetune"  # or "retrain"
    schedule: str = "default"
    host: Optional[str] = None
    work_dir: str = "retraining_runs"  # local runs: logs, status files, task outputs
    reason: str = ""  # why (e.g. the firing alerts); recorded in the status file and the run name
    configurations: list = field(default_factory=list)  # [] = the champion's
    folds: list = field(default_factory=list)  # [] = the champion's (finetune) / all five (retrain)
    planner_preset: str = "default"
    device: str = "auto"
    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 1
    train_cpu: str = "8"
    train_memory: str = "32G"
    num_workers: int = -1
    torch_threads: int = 0
    validation_tta: bool = True
    allow_ensembles: bool = True
    experiment: str = "kubeseg"  # MLflow experiment
    tolerance: float = 0.02
    label_floor: float = 0.1  # every label's CV Dice must reach it (kubeseg.registry.GateSettings)
    holdout: str = ""  # held-out images for the gate; "" = the dataset's imagesTs
    approval: str = "auto"  # required: a version that passes the gate waits for `kubeseg models approve`
    holdout_set: str = ""  # registered holdout (kubeseg.holdout); "" = <model_name>-holdout if registered; "none"
    label_tolerance: float = 0.02  # per label on the holdout, vs the champion
    finetune_epochs: int = 10  # incremental fine-tuning (kubeseg.training.finetune.FinetuneSettings)
    finetune_lr: float = 1e-4
    encoder_lr_scale: float = 0.5
    decoder_lr_scale: float = 1.0
    max_new_cases: int = 0  # 0 = all new cases; else the least confident by case_confidence
    case_confidence: dict = field(default_factory=dict)
    kfp_experiment: str = "kubeseg-retraining"
    namespace: Optional[str] = None
    run_name: Optional[str] = None
    parallelism: int = 0  # concurrent training tasks (cluster; local runs use kfp.local's 2)
    retries: int = 2


@dataclass
class RetrainRun:
    """A started run. ``mode``: ``local`` or ``cluster``; ``retrain_mode``: ``finetune`` or ``retrain``."""

    run_id: str
    mode: str
    started_at: str
    retrain_mode: str
    model_name: str
    host: Optional[str] = None
    log_path: Optional[str] = None
    status_path: Optional[str] = None
    pid: Optional[int] = None
    pipeline_root: Optional[str] = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pipeline_arguments(request: RetrainRequest, tracking_uri: Optional[str] = None) -> dict[str, Any]:
    """The retraining pipeline's run parameters for ``request``."""
    return {"dataset_uri": request.dataset, "new_cases_uri": request.new_cases, "model_name": request.model_name,
            "mlflow_uri": request.tracking_uri if tracking_uri is None else tracking_uri, "mode": request.mode,
            "configurations": list(request.configurations),
            "folds": [f if str(f) == "all" else int(f) for f in request.folds], "schedule": request.schedule,
            "planner_preset": request.planner_preset, "device": request.device, "gpu_type": request.gpu_type,
            "gpu_count": request.gpu_count, "train_cpu": request.train_cpu, "train_memory": request.train_memory,
            "num_workers": request.num_workers, "torch_threads": request.torch_threads,
            "validation_tta": request.validation_tta, "allow_ensembles": request.allow_ensembles,
            "experiment": request.experiment, "tolerance": request.tolerance, "label_floor": request.label_floor,
            "holdout_uri": request.holdout, "approval": request.approval, "holdout_set": request.holdout_set,
            "label_tolerance": request.label_tolerance, "finetune_epochs": request.finetune_epochs,
            "finetune_lr": request.finetune_lr, "encoder_lr_scale": request.encoder_lr_scale,
            "decoder_lr_scale": request.decoder_lr_scale, "max_new_cases": request.max_new_cases,
            "case_confidence": {str(k): float(v) for k, v in request.case_confidence.items()}}


def _check(request: RetrainRequest) -> None:
    from kubeseg.errors import KubesegError
    from kubeseg.retraining import MODES

    if request.mode not in MODES:
        raise KubesegError(f"mode must be one of {MODES}, got {request.mode!r}")
    if not request.dataset or not request.new_cases:
        raise KubesegError("a retraining request needs the dataset and the new cases' location")


def start_retraining(request: RetrainRequest) -> RetrainRun:
    """Start one retraining run (cluster if ``request.host``, else local) and return at once."""
    _check(request)
    return _start_cluster(request) if request.host else _start_local(request)


def _start_cluster(request: RetrainRequest) -> RetrainRun:
    from pipelines.run import submit

    started = _now()
    name = request.run_name or f"retraining {request.model_name} {started}"
    run_id = submit(request.host, pipeline_arguments(request), run_name=name, experiment=request.kfp_experiment,
                    parallelism=request.parallelism, retries=request.retries, namespace=request.namespace,
                    pipeline="retraining")
    return RetrainRun(run_id=run_id, mode="cluster", started_at=started, retrain_mode=request.mode,
                      model_name=request.model_name, host=request.host)


def _start_local(request: RetrainRequest) -> RetrainRun:
    from kubeseg.tracking import tracking_uri

    run_id = time.strftime("retrain-%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
    folder = Path(request.work_dir).resolve() / run_id
    folder.mkdir(parents=True)
    log_path, status_path, root = folder / LOG_FILE, folder / STATUS_FILE, folder / "pipeline_root"
    uri = tracking_uri(request.tracking_uri or os.environ.get("KUBESEG_MLFLOW_URI") or None)
    args = pipeline_arguments(request, uri)
    local_paths = {k: str(Path(args[k]).resolve()) for k in ("dataset_uri", "new_cases_uri") if "://" not in args[k]}
    args.update(local_paths)
    if args["holdout_uri"] and "://" not in args["holdout_uri"]:
        args["holdout_uri"] = str(Path(args["holdout_uri"]).resolve())
    started = _now()
    write_status(status_path, {"run_id": run_id, "state": "starting", "pid": None, "started_at": started,
                               "mode": request.mode, "model_name": request.model_name, "reason": request.reason,
                               "log_path": str(log_path), "pipeline_root": str(root), "run_dir": None,
                               "seconds": None, "finished_at": None, "outcome": None, "error": None})
    (folder / "request.json").write_text(json.dumps(args, indent=1))
    cmd = [sys.executable, "-m", "kubeseg.cli", "pipeline", "retrain", "--local", "--arguments",
           str(folder / "request.json"), "--pipeline-root", str(root), "--status-file", str(status_path)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, name=f"reap-{run_id}", daemon=True).start()  # no zombie
    return RetrainRun(run_id=run_id, mode="local", started_at=started, retrain_mode=request.mode,
                      model_name=request.model_name, log_path=str(log_path), status_path=str(status_path),
                      pid=proc.pid, pipeline_root=str(root))


# ---- the status file ----------------------------------------------------------------------------

def write_status(path: str | Path, status: dict) -> dict:
    """Write (merge into) the status file atomically; returns what was written."""
    from kubeseg.jsonio import read_json, write_json

    path = Path(path)
    current = {}
    if path.is_file():
        try:
            current = read_json(path)
        except ValueError:
            current = {}
    current.update(status)
    current["updated_at"] = _now()
    write_json(current, path, indent=1)
    return current


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_status(run: RetrainRun | str | Path) -> dict:
    """The status of a local run (its :class:`RetrainRun` or status file). A run whose process is
    gone without saying how it ended reads as ``failed``."""
    path = Path(run.status_path if isinstance(run, RetrainRun) else run)
    status = json.loads(path.read_text())
    if status.get("state") in ("starting", "running") and status.get("pid") and not _alive(status["pid"]):
        status = {**status, "state": "failed", "error": status.get("error") or
                  f"the run's process {status['pid']} ended without a final status (see {status.get('log_path')})"}
    return status


def run_local_with_status(arguments: dict[str, Any], pipeline_root: str | Path, status_file: str | Path,
                          parallelism: int = 2) -> dict:
    """The body of ``kubeseg pipeline retrain --local``: run the retraining pipeline through
    ``kfp.local`` and keep ``status_file`` up to date (running → succeeded | failed)."""
    from pipelines.run import run_local

    started = time.perf_counter()
    write_status(status_file, {"state": "running", "pid": os.getpid(), "pipeline_root": str(pipeline_root),
                               "mode": arguments.get("mode"), "model_name": arguments.get("model_name")})
    try:
        result = run_local(arguments, pipeline_root, parallelism=parallelism, pipeline="retraining")
    except BaseException as e:
        sys.stdout.flush()
        sys.stderr.flush()
        error = _plain(f"{type(e).__name__}: {e}".strip())
        cause = _task_error(json.loads(Path(status_file).read_text()).get("log_path"))
        write_status(status_file, {"state": "failed", "finished_at": _now(),
                                   "seconds": round(time.perf_counter() - started, 1),
                                   "error": f"{error} {cause}".strip() if cause else error,
                                   "traceback": traceback.format_exc(limit=5)})
        raise
    write_status(status_file, {"state": "succeeded", "finished_at": _now(), "seconds": result["seconds"],
                               "run_dir": result["run_dir"], "outcome": result.get("promotion"),
                               "version": result.get("version"), "bundle": result.get("bundle")})
    return result


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _task_error(log_path: Optional[str]) -> str:
    """The last error a failed task printed (kfp.local's own message names only the task)."""
    if not log_path or not Path(log_path).is_file():
        return ""
    pattern = re.compile(r"^\s*((?:[\w.]+\.)?\w*(?:Error|Exception)): (.+)$")
    found = ""
    for line in _plain(Path(log_path).read_text(errors="replace")).splitlines():
        m = pattern.match(line)
        if m and not m.group(1).endswith("RuntimeError"):
            found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    return found


def as_dict(run: RetrainRun) -> dict:
    return asdict(run)
