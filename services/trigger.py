"""Retraining trigger: an Alertmanager webhook receiver that starts retraining runs.

``python -m services.trigger [--host H] [--port 8090]`` (settings: ``KUBESEG_*``, see
:class:`services.settings.TriggerSettings`). Endpoints: ``POST /alerts`` (Alertmanager's webhook
format, version 4), ``GET /runs`` (the audit log), ``/livez``, ``/readyz``, ``/metrics``.

For a notification whose firing alerts carry ``kubeseg_action="retrain"`` it starts one
retraining pipeline run (``pipelines/retraining.py`` through :mod:`pipelines.client`: kfp.local
on one machine, ``kfp.Client`` on a cluster). At most one run per alert group (Alertmanager's
``groupKey``) per cool-down: Alertmanager re-sends a firing group every ``repeat_interval``
and several replicas may deliver the same notification, so repeats are answered, counted and
written down, not acted on. Every decision — started, suppressed (and why), failed — is one
JSON line in the audit log, which is also how the cool-down survives a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from services.settings import TriggerSettings, describe

log = logging.getLogger("kubeseg.trigger")

Starter = Callable[[dict], dict]  # reason (alerts) -> run description (run_id, mode, ...)


@dataclass
class TriggerMetrics:
    registry: object
    alerts: object
    runs_started: object
    suppressed: object
    failures: object
    last_run: object


def trigger_metrics() -> TriggerMetrics:
    from prometheus_client import CollectorRegistry, Counter, Gauge

    r = CollectorRegistry()
    return TriggerMetrics(
        registry=r,
        alerts=Counter("kubeseg_trigger_alerts_total", "Alerts received, by alert name and status",
                       ["alertname", "status"], registry=r),
        runs_started=Counter("kubeseg_retraining_runs_started_total", "Retraining runs started, by alert name",
                             ["alertname"], registry=r),
        suppressed=Counter("kubeseg_trigger_suppressed_total",
                           "Notifications not acted on (duplicate | cooldown | not_actionable)", ["reason"], registry=r),
        failures=Counter("kubeseg_trigger_failures_total", "Retraining runs that could not be started", registry=r),
        last_run=Gauge("kubeseg_trigger_last_run_timestamp_seconds", "When the last retraining run started",
                       registry=r),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trigger:
    """Decides per notification; thread-safe (one decision at a time)."""

    def __init__(self, settings: TriggerSettings, starter: Starter, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.starter = starter
        self.clock = clock
        self.metrics = trigger_metrics()
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, frozenset]] = {}  # group key -> (started at, alert fingerprints)
        self._restore()

    # -- audit log --------------------------------------------------------------------------------
    def _restore(self) -> None:
        path = self.settings.audit_log
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the rest is still good
            if e.get("event") == "started":
                self._last[e["group_key"]] = (float(e["unix_time"]), frozenset(e.get("fingerprints", [])))

    def _audit(self, entry: dict) -> dict:
        entry = {"time": _now(), "unix_time": self.clock(), **entry}
        path = self.settings.audit_log
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one line per decision, flushed before answering
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
        return entry

    def audit_entries(self, limit: int = 100) -> list[dict]:
        path = self.settings.audit_log
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines()[-limit:]:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    # -- decisions --------------------------------------------------------------------------------
    def handle(self, payload: dict) -> dict:
        """One Alertmanager notification → what was done, as written to the audit log."""
        alerts = payload.get("alerts")
        if not isinstance(alerts, list) or "status" not in payload:
            raise ValueError("not an Alertmanager webhook notification: 'status' and 'alerts' are required")
        for a in alerts:
            self.metrics.alerts.labels(a.get("labels", {}).get("alertname", ""), a.get("status", "")).inc()
        key = str(payload.get("groupKey") or json.dumps(payload.get("groupLabels", {}), sort_keys=True))
        wanted = self.settings
        actionable = [a for a in alerts if a.get("status") == "firing"
                      and a.get("labels", {}).get(wanted.alert_label) == wanted.alert_value]
        summary = [{"alertname": a.get("labels", {}).get("alertname"), "labels": a.get("labels", {}),
                    "summary": a.get("annotations", {}).get("summary"), "starts_at": a.get("startsAt"),
                    "fingerprint": a.get("fingerprint")} for a in actionable]
        base = {"group_key": key, "receiver": payload.get("receiver"), "notification_status": payload.get("status")}
        if not actionable:
            self.metrics.suppressed.labels("not_actionable").inc()
            return self._audit({**base, "event": "suppressed", "reason": "not_actionable",
                                "detail": f"no firing alert with {wanted.alert_label}={wanted.alert_value}"})
        fingerprints = frozenset(str(a.get("fingerprint") or a.get("labels")) for a in actionable)
        with self._lock:
            last = self._last.get(key)
            now = self.clock()
            if last is not None and now - last[0] < wanted.cooldown_seconds:
                reason = "duplicate" if fingerprints <= last[1] else "cooldown"
                self.metrics.suppressed.labels(reason).inc()
                return self._audit({**base, "event": "suppressed", "reason": reason, "alerts": summary,
                                    "detail": f"a run for this alert group started {now - last[0]:.0f} s ago "
                                              f"(cool-down {wanted.cooldown_seconds:.0f} s)"})
            reason = "; ".join(sorted({f"{s['alertname']}: {s['summary']}" for s in summary}))
            try:
                run = self.starter({"group_key": key, "reason": reason, "alerts": summary})
            except Exception as e:  # noqa: BLE001 - any failure to start is reported, counted, audited
                self.metrics.failures.inc()
                log.error("could not start a retraining run for %s: %s", key, e)
                return self._audit({**base, "event": "failed", "reason": reason, "alerts": summary,
                                    "error": f"{type(e).__name__}: {e}"})
            self._last[key] = (now, fingerprints)
            for name in sorted({s["alertname"] for s in summary}):
                self.metrics.runs_started.labels(name).inc()
            self.metrics.last_run.set(now)
            log.info("started retraining run %s for %s", run.get("run_id"), reason)
            return self._audit({**base, "event": "started", "reason": reason, "alerts": summary, "run": run,
                                "fingerprints": sorted(fingerprints)})


def pipeline_starter(settings: TriggerSettings) -> Starter:
    """Start ``pipelines/retraining.py`` through the one small client (local or cluster)."""
    def start(reason: dict) -> dict:
        from pipelines.client import RetrainRequest, start_retraining

        request = RetrainRequest(
            dataset=settings.dataset, new_cases=settings.new_cases, model_name=settings.model_name,
            tracking_uri=settings.tracking_uri or "", mode=settings.retrain_mode, schedule=settings.schedule,
            host=settings.kfp_host if settings.mode == "cluster" else None, work_dir=str(settings.work_dir),
            reason=reason["reason"])
        run = start_retraining(request)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run).items()}

    return start


def create_app(trigger: Trigger):
    """The webhook receiver as a Starlette app."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def alerts(request: Request):
        try:
            payload = json.loads(await request.body())
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            from starlette.concurrency import run_in_threadpool
            entry = await run_in_threadpool(trigger.handle, payload)
        except (ValueError, json.JSONDecodeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(entry, status_code=202 if entry["event"] == "started" else 200)

    async def runs(request: Request):
        return JSONResponse(trigger.audit_entries(int(request.query_params.get("limit", 100))))

    async def ok(_: Request):
        return PlainTextResponse("ok\n")

    async def metrics(_: Request):
        return Response(generate_latest(trigger.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/alerts", alerts, methods=["POST"]), Route("/runs", runs),
                             Route("/livez", ok), Route("/readyz", ok), Route("/metrics", metrics)])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trigger", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from services.settings import SettingsError
    try:
        settings = TriggerSettings.from_env()
    except SettingsError as e:
        print(f"kubeseg trigger: {e}")
        return 2
    log.info("trigger settings: %s", describe(settings))
    import uvicorn

    uvicorn.run(create_app(Trigger(settings, pipeline_starter(settings))), host=args.host, port=args.port,
                log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
