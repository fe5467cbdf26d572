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


class _Sender:
    """Runs tracking calls in order on a background thread, retrying a failing call with
    exponential backoff (1 s doubling to ``max_backoff_s``) until it succeeds, so that training never
    waits for MLflow. Calls that carry metric values count them; when more than ``max_pending``
    values wait, the oldest waiting metric call is dropped and its values counted as lost."""

    def __init__(self, name: str, max_pending: int, max_backoff_s: float = 30.0):
        import collections
        import threading

        self.name, self.max_pending, self.max_backoff_s = name, max_pending, max_backoff_s
        self.queue: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.thread: Optional[Any] = None
        self.closed = self.abandoned = False
        self.failed_calls = self.lost_metrics = self.sent_metrics = 0
        self.outage_s = 0.0
        self.down_since: Optional[float] = None
        self.last_error = ""

    def submit(self, fn, metrics: int = 0) -> None:
        import threading

        with self.cv:
            self.queue.append((fn, metrics))
            while sum(n for _, n in self.queue) > self.max_pending:
                oldest = next(i for i, (_, n) in enumerate(self.queue) if n)
                self.lost_metrics += self.queue[oldest][1]
                del self.queue[oldest]
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name=f"mlflow-{self.name}", daemon=True)
                self.thread.start()
            self.cv.notify_all()

    @property
    def pending_metrics(self) -> int:
        with self.cv:
            return sum(n for _, n in self.queue)

    def _loop(self) -> None:
        import time

        backoff = 1.0
        while True:
            with self.cv:
                while not self.queue and not self.closed and not self.abandoned:
                    self.cv.wait()
                if self.abandoned or not self.queue:
                    return
                fn, n = self.queue[0]
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the tracking server is down or refusing: retry later
                with self.cv:
                    self.failed_calls += 1
                    self.last_error = f"{type(e).__name__}: {str(e)[:300]}"
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("MLflow unreachable (%s); training goes on, tracking calls are buffered",
                                    self.last_error)
                    self.cv.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 1.0
            with self.cv:
                if self.queue and self.queue[0][0] is fn:
                    self.queue.popleft()
                    self.sent_metrics += n
                if self.down_since is not None:
                    self.outage_s += time.monotonic() - self.down_since
                    self.down_since = None
                    log.warning("MLflow reachable again after %d failed call(s); sending the buffered values",
                                self.failed_calls)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every call to go through; on timeout give the rest up (its
        metric values counted as lost). True when everything was sent."""
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout_s)
        with self.cv:
            if self.thread is not None and self.thread.is_alive() or self.queue:
                self.abandoned = True
                self.lost_metrics += sum(n for _, n in self.queue)
                self.queue.clear()
                self.cv.notify_all()
                return False
        return True


class MlflowTrainingCallback:
    """Trainer callback: one MLflow run per (configuration, fold), nested under ``parent_run_id``.

    Per-epoch ``train_loss``, ``val_loss``, ``mean_fg_dice``, ``ema_fg_dice``, ``lr``,
    ``epoch_time_s`` and ``pseudo_dice_<label>``; at the end ``val_dice_<label>`` and
    ``val_fg_dice`` and the artifacts ``progress.png``, ``metrics.json``, ``validation/summary.json``
    and the training log. Checkpoints and probabilities are not uploaded (the model goes to the
    registry as a bundle).

    Outages: every MLflow call runs on a background thread (:class:`_Sender`), in order, retried
    with backoff, so an unreachable server never stops or slows training; metric values wait in
    memory (at most ``max_pending``, else the oldest are dropped and counted) and keep their epoch
    and time. At the end the callback waits up to ``flush_timeout_s`` for the rest; what could not
    be sent is logged as lost, with counts. The run's tags ``kubeseg.tracking.failed_calls``,
    ``.outage_seconds`` and ``.lost_metrics`` report the gap (:attr:`report` too). A retried call
    whose first attempt reached the server may be applied twice (a second run, a repeated value).
    """

    UPLOAD = ("progress.png", "metrics.json", "summary.json")

    def __init__(self, uri: Optional[str] = None, parent_run_id: Optional[str] = None,
                 experiment: str = DEFAULT_EXPERIMENT, plans: Optional[Mapping[str, Any]] = None,
                 run_name: Optional[str] = None, tags: Optional[Mapping[str, str]] = None,
                 flush_timeout_s: float = 300.0, max_pending: int = 100_000, max_backoff_s: float = 30.0):
        self.uri = tracking_uri(uri)
        self.parent_run_id = parent_run_id
        self.experiment = experiment
        self.plans = plans
        self.run_name = run_name
        self.tags = dict(tags or {})
        self.run_id: Optional[str] = None
        self.flush_timeout_s = flush_timeout_s
        self.sender = _Sender("tracking", max_pending, max_backoff_s)
        self.report: dict[str, Any] = {}
        self._artifacts: dict[str, Path] = {}
        self._client = None
        self._started = False

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
        self._started = True
        info = dict(info)
        self.sender.submit(lambda: self._start(info))

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric
        import time

        flat = {k: v for k, v in metrics.items() if k not in ("epoch", "pseudo_dice")}
        flat.update({f"pseudo_dice_{k}": v for k, v in (metrics.get("pseudo_dice") or {}).items()})
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, epoch) for k, v in _finite(flat).items()]
        self.sender.submit(lambda: self.c.log_batch(self.run_id, metrics=batch), metrics=len(batch))

    def on_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.name in self.UPLOAD:
            self._artifacts[path.name] = path

    def on_train_end(self, info: Mapping[str, Any]) -> None:
        fold_dir = Path(info.get("fold_dir", "."))
        if not self._started:  # a finished fold found: record it anyway
            self._started = True
            start = {"fold": info.get("fold"), "configuration": self.tags.get("kubeseg.configuration")}
            self.sender.submit(lambda: self._start(start))
            for name in ("progress.png", "metrics.json"):
                if (fold_dir / name).is_file():
                    self._artifacts[name] = fold_dir / name
            if (fold_dir / "validation" / "summary.json").is_file():
                self._artifacts["summary.json"] = fold_dir / "validation" / "summary.json"
        summary = info.get("validation")
        if summary:
            from mlflow.entities import Metric
            import time

            m = {f"val_dice_{k}": v.get("Dice") for k, v in summary.get("mean", {}).items()}
            m["val_fg_dice"] = summary.get("foreground_mean", {}).get("Dice")
            ts = int(time.time() * 1000)
            batch = [Metric(k, v, ts, 0) for k, v in _finite(m).items()]
            self.sender.submit(lambda: self.c.log_batch(self.run_id, metrics=batch), metrics=len(batch))
        files = [(str(p), "validation" if name == "summary.json" else None) for name, p in self._artifacts.items()
                 if p.is_file()]
        files += [(str(p), "logs") for p in sorted(fold_dir.glob("training_log_*.txt"))]
        for path, where in files:
            self.sender.submit(lambda path=path, where=where: self.c.log_artifact(self.run_id, path, where))

        def close() -> None:
            s = self.sender
            for key, value in (("failed_calls", s.failed_calls), ("outage_seconds", round(s.outage_s, 1)),
                               ("lost_metrics", s.lost_metrics)):
                self.c.set_tag(self.run_id, f"kubeseg.tracking.{key}", str(value))
            self.c.set_terminated(self.run_id, "FINISHED")
        self.sender.submit(close)
        complete = self.sender.drain(self.flush_timeout_s)
        s = self.sender
        self.report = {"complete": complete, "failed_calls": s.failed_calls, "outage_seconds": round(s.outage_s, 1),
                       "lost_metrics": s.lost_metrics, "sent_metrics": s.sent_metrics, "run_id": self.run_id}
        if not complete or s.lost_metrics:
            log.error("MLflow at %s: tracking of %s fold %s incomplete: %d metric value(s) lost, %d failed call(s)%s "
                      "(last error: %s); the trained fold itself is complete", self.uri,
                      self.tags.get("kubeseg.configuration", info.get("configuration", "")), info.get("fold"),
                      s.lost_metrics, s.failed_calls, "" if complete else ", the run was not closed", s.last_error)
        elif s.failed_calls:
            log.warning("MLflow at %s was unreachable for %.0f s during training (%d failed call(s)); every value "
                        "was sent after it returned", self.uri, s.outage_s, s.failed_calls)


def wait_for_tracking(uri: Optional[str], timeout_s: float = 600.0, first_backoff_s: float = 2.0,
                      max_backoff_s: float = 60.0, clock=None, sleep=None) -> None:
    """Before registering: wait until the tracking server answers, retrying with exponential backoff;
    raises :class:`~kubeseg.errors.KubesegError` naming the URI, the time waited and the last error
    when it stays unreachable for ``timeout_s``."""
    import time

    from kubeseg.errors import KubesegError

    clock, sleep = clock or time.monotonic, sleep or time.sleep
    uri = tracking_uri(uri)
    started, backoff, attempts = clock(), first_backoff_s, 0
    while True:
        attempts += 1
        try:
            if uri.startswith(("http://", "https://")):  # MLflow's own client retries for minutes per call
                import urllib.request
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
                    r.read()
            else:
                client(uri).search_experiments(max_results=1)
            return
        except Exception as e:  # noqa: BLE001 - any failure to reach the store
            waited = clock() - started
            if waited + backoff > timeout_s:
                raise KubesegError(f"MLflow tracking server {uri} unreachable for {waited:.0f} s ({attempts} attempts); "
                                   f"the model was not registered. Last error: {type(e).__name__}: "
                                   f"{str(e)[:300]}") from None
            log.warning("MLflow at %s unreachable (attempt %d): retrying in %.0f s", uri, attempts, backoff)
            sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)


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
