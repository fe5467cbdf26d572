"""MLflow tracking for kubeseg runs (registry glue: knows MLflow, not Kubeflow).

* one *parent* run per pipeline run (:func:`start_pipeline_run`, :func:`finish_run`);
* one nested run per (configuration, fold), fed by :class:`MlflowTrainingCallback` through the
  trainer's callback interface: the configuration's plans as params, per-epoch losses and
  pseudo-Dice as metrics, the curves, per-epoch metrics and validation summary as artifacts;
* the selection's cross-validation table on the parent run (:func:`log_selection`).

Any tracking URI works. ``sqlite:///PATH`` without a server is the embedded default; its
artifacts go to ``mlartifacts/`` beside the database file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kubeseg"


def tracking_uri(uri: Optional[str] = None) -> str:
    """The URI to use: the argument, else ``MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def require_tracking_uri(uri: Optional[str]) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``; refuses where a pod-local default would lose the record."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        from kubeseg.errors import KubesegError
        raise KubesegError("no MLflow tracking URI: pass mlflow_uri (or set MLFLOW_TRACKING_URI) to register models")
    return uri


def client(uri: Optional[str] = None):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifact_location(uri: str, experiment: str) -> Optional[str]:
    """For a server-less SQLite store: artifacts beside the database (not in the working directory)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts" / experiment).as_uri()
    return None


def ensure_experiment(uri: Optional[str] = None, name: str = DEFAULT_EXPERIMENT) -> str:
    """The id of experiment ``name``, created if needed."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def _clean(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)
    return text[:500]


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def start_pipeline_run(uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT, run_name: str = "training",
                       params: Optional[Mapping[str, Any]] = None, tags: Optional[Mapping[str, str]] = None) -> str:
    """Create the parent run of one pipeline run; returns its id."""
    c = client(uri)
    run = c.create_run(ensure_experiment(uri, experiment), run_name=run_name,
                       tags={"kubeseg.kind": "pipeline", **{k: str(v) for k, v in (tags or {}).items()}})
    for k, v in (params or {}).items():
        c.log_param(run.info.run_id, k, _clean(v))
    return run.info.run_id


def finish_run(uri: Optional[str], run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status)


def plans_params(plans: Mapping[str, Any], configuration: str) -> dict[str, str]:
    """The configuration's plans, flattened to MLflow params (``plans.<key>``)."""
    from kubeseg.planning.plans import configuration as resolve

    c = resolve(dict(plans), configuration)
    out = {"plans.name": plans.get("plans_name"), "plans.dataset": plans.get("dataset_name"),
           "configuration": configuration}
    for key in ("data_identifier", "batch_size", "patch_size", "spacing", "median_image_size_in_voxels",
                "normalization_schemes", "use_mask_for_norm", "batch_dice", "previous_stage"):
        if key in c:
            out[f"plans.{key}"] = c[key]
    arch = c.get("architecture", {}).get("arch_kwargs", {})
    for key in ("n_stages", "features_per_stage", "kernel_sizes", "strides"):
        if key in arch:
            out[f"plans.arch.{key}"] = arch[key]
    return {k: _clean(v) for k, v in out.items() if v is not None}


class MlflowTrainingCallback:
    """Trainer callback: one MLflow run per (configuration, fold), nested under ``parent_run_id``.

    Per-epoch ``train_loss``, ``val_loss``, ``mean_fg_dice``, ``ema_fg_dice``, ``lr``,
    ``epoch_time_s`` and ``pseudo_dice_<label>``; at the end ``val_dice_<label>`` and
    ``val_fg_dice`` and the artifacts ``progress.png``, ``metrics.json``, ``validation/summary.json``
    and the training log. Checkpoints and probabilities are not uploaded (the model goes to the
    registry as a bundle).
    """

    UPLOAD = ("progress.png", "metrics.json", "summary.json")

    def __init__(self, uri: Optional[str] = None, parent_run_id: Optional[str] = None,
                 experiment: str = DEFAULT_EXPERIMENT, plans: Optional[Mapping[str, Any]] = None,
                 run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None):
        self.uri = tracking_uri(uri)
        self.parent_run_id = parent_run_id
        self.experiment = experiment
        self.plans = plans
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.run_id: Optional[str] = None
        self._artifacts: dict[str, Path] = {}
        self._client = None

    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _start(self, info: Mapping[str, Any]) -> None:
        if self.run_id is not None:
            return
        conf, fold = info.get("configuration"), info.get("fold")
        if self.parent_run_id:
            exp_id = self.c.get_run(self.parent_run_id).info.experiment_id
        else:
            exp_id = ensure_experiment(self.uri, self.experiment)
        tags = {"kubeseg.kind": "fold", "kubeseg.configuration": str(conf), "kubeseg.fold": str(fold), **self.tags}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.c.create_run(exp_id, run_name=self.run_name or f"{conf} fold {fold}", tags=tags)
        self.run_id = run.info.run_id
        params = dict(plans_params(self.plans, conf)) if self.plans and conf else {}
        settings = info.get("settings") or {}
        for k in ("seed", "num_workers", "oversample_foreground_percent", "enable_deep_supervision"):
            if k in settings:
                params[f"train.{k}"] = _clean(settings[k])
        for k, v in (settings.get("schedule") or {}).items():
            params[f"schedule.{k}"] = _clean(v)
        for k in ("fold", "device", "train_cases", "val_cases"):
            if k in info:
                params[k] = _clean(info[k])
        from mlflow.entities import Param
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.c.log_batch(self.run_id, params=items[i:i + 100])

    def on_train_start(self, info: Mapping[str, Any]) -> None:
        self._start(info)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric
        import time

        flat = {k: v for k, v in metrics.items() if k not in ("epoch", "pseudo_dice")}
        flat.update({f"pseudo_dice_{k}": v for k, v in (metrics.get("pseudo_dice") or {}).items()})
        ts = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, v, ts, epoch) for k, v in _finite(flat).items()])

    def on_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.name in self.UPLOAD:
            self._artifacts[path.name] = path

    def on_train_end(self, info: Mapping[str, Any]) -> None:
        if self.run_id is None:  # a finished fold found: record it anyway
            fold_dir = Path(info.get("fold_dir", "."))
            self._start({"fold": info.get("fold"), "configuration": self.tags.get("kubeseg.configuration")})
            for name in ("progress.png", "metrics.json"):
                if (fold_dir / name).is_file():
                    self._artifacts[name] = fold_dir / name
            if (fold_dir / "validation" / "summary.json").is_file():
                self._artifacts["summary.json"] = fold_dir / "validation" / "summary.json"
        summary = info.get("validation")
        if summary:
            m = {f"val_dice_{k}": v.get("Dice") for k, v in summary.get("mean", {}).items()}
            m["val_fg_dice"] = summary.get("foreground_mean", {}).get("Dice")
            for k, v in _finite(m).items():
                self.c.log_metric(self.run_id, k, v)
        for name, path in self._artifacts.items():
            if path.is_file():
                self.c.log_artifact(self.run_id, str(path), "validation" if name == "summary.json" else None)
        fold_dir = Path(info.get("fold_dir", "."))
        for logfile in sorted(fold_dir.glob("training_log_*.txt")):
            self.c.log_artifact(self.run_id, str(logfile), "logs")
        self.c.set_terminated(self.run_id, "FINISHED")


def log_selection(uri: Optional[str], run_id: str, selection: Mapping[str, Any],
                  summary_html: Optional[str] = None) -> None:
    """The selection on the parent run: ``cv_dice_<label>`` and ``cv_fg_dice`` of the selected
    candidate, ``cv_fg_dice.<candidate>`` of every candidate, the CV table (Markdown),
    ``selection.json`` and the HTML summary."""
    from kubeseg.workflow import cv_table_rows, markdown_table

    c = client(uri)
    m = {f"cv_dice_{k}": v for k, v in selection["expected_dice"].items()}
    m["cv_fg_dice"] = selection["expected_foreground_dice"]
    m["cv_fg_dice_postprocessed"] = selection.get("expected_foreground_dice_after_postprocessing")
    for cand in selection["candidates"]:
        m[f"cv_fg_dice.{cand['name'].replace(' + ', '-')}"] = cand["foreground_dice"]
    for k, v in _finite(m).items():
        c.log_metric(run_id, k, v)
    c.set_tag(run_id, "kubeseg.selected", " + ".join(x["configuration"] for x in selection["members"]))
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "cv_table.md"
        table.write_text(markdown_table(*cv_table_rows(selection)) + "\n")
        c.log_artifact(run_id, str(table), "selection")
        sel = Path(tmp) / "selection.json"
        sel.write_text(json.dumps(selection, indent=2, default=str))
        c.log_artifact(run_id, str(sel), "selection")
        if summary_html:
            page = Path(tmp) / "summary.html"
            page.write_text(summary_html)
            c.log_artifact(run_id, str(page), "selection")


def write_run_ref(path: str | Path, uri: str, run_id: str, experiment: str = DEFAULT_EXPERIMENT) -> Path:
    """A small JSON file naming the tracking URI and parent run (how pipeline steps find it;
    empty ``uri``: tracking off)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id, "experiment": experiment}))
    return path


def read_run_ref(path: str | Path) -> tuple[str, str]:
    """``(tracking_uri, run_id)`` from :func:`write_run_ref`'s file (empty strings: tracking off)."""
    ref = json.loads(Path(path).read_text())
    return ref.get("tracking_uri") or "", ref.get("run_id") or ""


def link_runs(uri: Optional[str], parent_run_id: str, run_ids: list[str]) -> None:
    """Nest finished runs under ``parent_run_id``. Training steps start their runs on their own so
    that they depend only on their inputs (KFP can cache them); the fan-in step then links them to
    the pipeline run's parent. A cached fold's run moves under the latest pipeline run."""
    c = client(uri)
    for run_id in run_ids:
        if run_id and run_id != parent_run_id:
            c.set_tag(run_id, "mlflow.parentRunId", parent_run_id)


def close_pipeline_run(uri: Optional[str], experiment: str, pipeline_run: str, state: str) -> list[str]:
    """End the parent run(s) of ``pipeline_run`` that are still open: ``FINISHED`` if the pipeline
    succeeded, else ``FAILED`` (the exit handler calls this whatever happened). Returns their ids."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`kubeseg.pipeline_run` = '{pipeline_run}'")
    status = "FINISHED" if str(state).upper() in ("SUCCEEDED", "SUCCESS") else "FAILED"
    closed = []
    for r in runs:
        if r.info.status == "RUNNING":
            c.set_tag(r.info.run_id, "kubeseg.pipeline_state", str(state))
            c.set_terminated(r.info.run_id, status)
            closed.append(r.info.run_id)
    return closed
