"""Retraining trigger: an Alertmanager webhook receiver that starts retraining runs and rolls
back a newly promoted champion that misbehaves.

``python -m services.trigger [--host H] [--port 8090]`` (settings: ``KUBESEG_*``, see
:class:`services.settings.TriggerSettings`). Endpoints: ``POST /alerts`` (Alertmanager's webhook
format, version 4), ``GET /runs`` (the audit log), ``/livez``, ``/readyz``, ``/metrics``.

For a notification whose firing alerts carry ``kubeseg_action="retrain"`` it starts one
retraining pipeline run (``pipelines/retraining.py`` through :mod:`pipelines.client`: kfp.local
on one machine, ``kfp.Client`` on a cluster). At most one run per de-duplication key per
cool-down, where the trigger derives the key itself from each actionable alert's identifying
labels (``alertname`` plus ``dedup_labels``: namespace, job, model), never from the payload's
``groupKey``, which a sender chooses freely. Alertmanager re-sends a firing group every
``repeat_interval`` and several replicas may deliver the same notification, so repeats are
answered, counted and written down, not acted on. And at most one run is in flight per model
whatever the key: a second actionable alert while a run goes on is suppressed (``in_flight``).

For firing alerts with ``kubeseg_action="rollback"`` (the rules of the ``kubeseg.rollback`` group:
error rate, QA-flag rate, latency, drift of the predicted volumes, each labelled with the served
model's ``name`` and ``version``) it rolls ``champion`` back (:func:`kubeseg.registry.rollback`,
under the registry lock, only if the alert's version is still the champion) when that version
became champion by a promotion or an approval less than ``rollback_window_seconds`` ago. It never
starts a retraining run for them. Outside the window, for a version that is no longer champion,
one that a rollback restored, or another model, it does nothing and writes down why.

Who may post: Alertmanager's own webhook authentication (``http_config``: a bearer token or
basic auth, the secret mounted from a Secret on both sides); every path except ``/livez``,
``/readyz`` and ``/metrics`` needs it. Bodies over ``max_body_bytes`` get 413 before they are
read; alert names become metric labels only after they pass a length and charset check.

Every decision — started, suppressed (and why), failed, refused — is one JSON line in the audit
log, with who (the credential that authenticated the call) and why; the log is also how the
cool-down survives a restart.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from services.settings import TriggerSettings, describe

log = logging.getLogger("kubeseg.trigger")

Starter = Callable[[dict], dict]  # reason (alerts) -> run description (run_id, mode, ...)


class Registry:
    """What the rollback decision needs from the model registry (:mod:`kubeseg.registry`)."""

    def __init__(self, model_name: str, tracking_uri: Optional[str]):
        self.model_name, self.tracking_uri = model_name, tracking_uri

    def champion_since(self) -> Optional[dict]:
        from kubeseg.registry import champion_since

        return champion_since(self.model_name, self.tracking_uri)

    def rollback(self, version: str, reason: str, by: str) -> dict:
        from kubeseg.registry import rollback

        p = rollback(self.model_name, self.tracking_uri, reason=reason, expected=version, by=by)
        return {"champion": p.version, "rolled_back": p.previous}

InFlight = Callable[[dict], bool]  # run description -> still running?
OPEN_PATHS = ("/livez", "/readyz", "/metrics")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_:.\-]{1,64}$")
MAX_TEXT = 256  # characters kept of any label or annotation in the audit log


def bounded_label(value) -> str:
    """A value fit to be a metric label: short, plain characters; anything else is ``invalid``."""
    return value if isinstance(value, str) and _LABEL_VALUE.match(value) else "invalid"


def _text(value) -> str:
    return str(value)[:MAX_TEXT] if value is not None else ""


def _labels(alert: dict) -> dict[str, str]:
    labels = alert.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {_text(k)[:64]: _text(v) for k, v in list(labels.items())[:30]}


@dataclass
class TriggerMetrics:
    registry: object
    alerts: object
    runs_started: object
    suppressed: object
    failures: object
    last_run: object
    refused: object
    rollbacks: object


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
                           "Notifications not acted on (duplicate | cooldown | in_flight | not_actionable)", ["reason"],
                           registry=r),
        failures=Counter("kubeseg_trigger_failures_total", "Retraining runs that could not be started", registry=r),
        last_run=Gauge("kubeseg_trigger_last_run_timestamp_seconds", "When the last retraining run started",
                       registry=r),
        refused=Counter("kubeseg_trigger_refused_total",
                        "Webhook calls refused: no or bad credential (401), body too large (413), not a notification (400)",
                        ["status"], registry=r),
        rollbacks=Counter("kubeseg_trigger_rollbacks_total",
                          "Rollback alerts by outcome (rolled_back | outside_window | not_champion | restored_version | "
                          "no_previous | other_model | no_version | no_record | failed)", ["outcome"], registry=r),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trigger:
    """Decides per notification; thread-safe (one decision at a time)."""

    def __init__(self, settings: TriggerSettings, starter: Starter, clock: Callable[[], float] = time.time,
                 in_flight: InFlight = lambda run: False, registry: Optional[Registry] = None):
        self.settings = settings
        self.starter = starter
        self.registry = registry or Registry(settings.model_name or "", settings.tracking_uri)
        self.clock = clock
        self.in_flight = in_flight
        self.metrics = trigger_metrics()
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, frozenset]] = {}  # dedup key -> (started at, alert fingerprints)
        self._runs: list[tuple[float, dict]] = []  # (started at, run) of this model's runs
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
            if e.get("event") == "started" and e.get("dedup_key"):
                self._last[e["dedup_key"]] = (float(e["unix_time"]), frozenset(e.get("fingerprints", [])))
                self._runs.append((float(e["unix_time"]), e.get("run") or {}))

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
    def dedup_key(self, alert: dict) -> str:
        """The alert's identity for de-duplication: ``alertname`` and the other ``dedup_labels``."""
        labels = _labels(alert)
        return json.dumps({k: labels.get(k, "") for k in self.settings.dedup_labels}, sort_keys=True)

    def _running(self, now: float) -> Optional[dict]:
        for started, run in reversed(self._runs):
            if now - started < self.settings.max_run_seconds and self.in_flight(run):
                return run
        return None

    def handle(self, payload: dict, caller: str = "unauthenticated") -> dict:
        """One Alertmanager notification → what was done, as written to the audit log."""
        alerts = payload.get("alerts")
        if not isinstance(alerts, list) or "status" not in payload:
            raise ValueError("not an Alertmanager webhook notification: 'status' and 'alerts' are required")
        if len(alerts) > self.settings.max_alerts:
            raise ValueError(f"{len(alerts)} alerts in one notification; at most {self.settings.max_alerts}")
        if not all(isinstance(a, dict) for a in alerts):
            raise ValueError("every alert must be a JSON object")
        for a in alerts:
            status = a.get("status") if a.get("status") in ("firing", "resolved") else "invalid"
            self.metrics.alerts.labels(bounded_label(_labels(a).get("alertname", "")), status).inc()
        wanted = self.settings
        base = {"by": caller, "receiver": _text(payload.get("receiver")),
                "notification_status": _text(payload.get("status")),
                "sender_group_key": _text(payload.get("groupKey"))}  # recorded, never trusted
        rollbacks = [a for a in alerts if a.get("status") == "firing" and wanted.rollback_enabled
                     and _labels(a).get(wanted.alert_label) == wanted.rollback_value]
        retrains = [a for a in alerts if a.get("status") == "firing"
                    and _labels(a).get(wanted.alert_label) == wanted.alert_value]
        if rollbacks:
            decision = self._rollback(rollbacks, base)
            if not retrains:
                return decision
            return {**self._retrain(retrains, caller, payload), "rollback": decision}
        return self._retrain(retrains, caller, payload)

    def _retrain(self, actionable: list, caller: str, payload: dict) -> dict:
        """The retraining decision for the firing ``kubeseg_action=retrain`` alerts of one notification."""
        wanted = self.settings
        summary = [{"alertname": _labels(a).get("alertname", ""), "labels": _labels(a),
                    "summary": _text((a.get("annotations") or {}).get("summary")
                                     if isinstance(a.get("annotations"), dict) else None),
                    "starts_at": _text(a.get("startsAt")), "fingerprint": _text(a.get("fingerprint"))}
                   for a in actionable]
        keys = sorted({self.dedup_key(a) for a in actionable})
        key = " | ".join(keys)
        base = {"dedup_key": key, "by": caller, "receiver": _text(payload.get("receiver")),
                "notification_status": _text(payload.get("status")),
                "sender_group_key": _text(payload.get("groupKey"))}  # recorded, never trusted
        if not actionable:
            self.metrics.suppressed.labels("not_actionable").inc()
            return self._audit({**base, "event": "suppressed", "reason": "not_actionable",
                                "detail": f"no firing alert with {wanted.alert_label}={wanted.alert_value}"})
        fingerprints = frozenset(s["fingerprint"] or json.dumps(s["labels"], sort_keys=True) for s in summary)
        with self._lock:
            now = self.clock()
            recent = [self._last[k] for k in keys if k in self._last and now - self._last[k][0] < wanted.cooldown_seconds]
            if len(recent) == len(keys):  # every alert's key had a run within the cool-down
                seen = frozenset().union(*(r[1] for r in recent))
                reason = "duplicate" if fingerprints <= seen else "cooldown"
                self.metrics.suppressed.labels(reason).inc()
                return self._audit({**base, "event": "suppressed", "reason": reason, "alerts": summary,
                                    "detail": f"a run for these alerts started {now - max(r[0] for r in recent):.0f} s "
                                              f"ago (cool-down {wanted.cooldown_seconds:.0f} s)"})
            running = self._running(now)
            if running is not None:
                self.metrics.suppressed.labels("in_flight").inc()
                return self._audit({**base, "event": "suppressed", "reason": "in_flight", "alerts": summary,
                                    "detail": f"retraining run {running.get('run_id')} of {wanted.model_name} is "
                                              "still in flight: at most one per model"})
            reason = "; ".join(sorted({f"{s['alertname']}: {s['summary']}" for s in summary}))
            try:
                run = self.starter({"group_key": key, "reason": reason, "alerts": summary})
            except Exception as e:  # noqa: BLE001 - any failure to start is reported, counted, audited
                self.metrics.failures.inc()
                log.error("could not start a retraining run for %s: %s", key, e)
                return self._audit({**base, "event": "failed", "reason": reason, "alerts": summary,
                                    "error": f"{type(e).__name__}: {e}"})
            for k in keys:
                self._last[k] = (now, fingerprints)
            self._runs.append((now, run))
            for name in sorted({s["alertname"] for s in summary}):
                self.metrics.runs_started.labels(bounded_label(name)).inc()
            self.metrics.last_run.set(now)
            log.info("started retraining run %s for %s (alert posted by %s)", run.get("run_id"), reason, caller)
            return self._audit({**base, "event": "started", "reason": reason, "alerts": summary, "run": run,
                                "fingerprints": sorted(fingerprints)})

    def _rollback(self, alerts: list, base: dict) -> dict:
        """Roll the champion back for firing rollback alerts on it, inside its watch window; else
        write down why not. One decision per notification: the alerts name one version."""
        wanted = self.settings
        summary = [{"alertname": _labels(a).get("alertname", ""), "labels": _labels(a),
                    "summary": _text((a.get("annotations") or {}).get("summary")
                                     if isinstance(a.get("annotations"), dict) else None),
                    "starts_at": _text(a.get("startsAt"))} for a in alerts]
        entry = {**base, "action": "rollback", "alerts": summary}
        names = {s["labels"].get("name", "") for s in summary}
        versions = sorted({s["labels"].get("version", "") for s in summary if s["labels"].get("name") == wanted.model_name})
        reason = "; ".join(sorted({f"{s['alertname']}: {s['summary']}" for s in summary}))

        def outcome(kind: str, detail: str, event: str = "suppressed", **more) -> dict:
            self.metrics.rollbacks.labels(kind).inc()
            log.info("rollback alert (%s): %s", kind, detail)
            return self._audit({**entry, "event": event, "reason": kind, "detail": detail, **more})

        if wanted.model_name not in names:
            return outcome("other_model", f"the alerts are about {sorted(names)}, this trigger rolls back "
                                          f"{wanted.model_name}")
        if not versions or versions == [""]:
            return outcome("no_version", "the alerts carry no version label: nothing to compare with the champion")
        with self._lock:
            now = self.clock()
            try:
                since = self.registry.champion_since()
            except Exception as e:  # noqa: BLE001 - registry down: written down, Alertmanager sends again
                self.metrics.failures.inc()
                return outcome("failed", f"cannot read the champion: {type(e).__name__}: {e}", event="failed")
            if since is None:
                return outcome("no_record", f"{wanted.model_name} has no champion, or its champion log does not say "
                                            "how it became champion")
            champion = str(since["version"])
            if champion not in versions:
                return outcome("not_champion", f"the alerts are about version(s) {versions}; the champion is "
                                               f"version {champion}")
            if since.get("event") == "rollback":
                return outcome("restored_version", f"version {champion} became champion again by a rollback at "
                                                   f"{since.get('at')}: restored versions are not rolled back "
                                                   "automatically")
            age = now - float(since.get("unix_time") or 0)
            if since.get("unix_time") is None or age > wanted.rollback_window_seconds:
                return outcome("outside_window", f"version {champion} became champion ({since.get('event')}) at "
                                                 f"{since.get('at')}, {age:.0f} s ago: outside the watch window of "
                                                 f"{wanted.rollback_window_seconds:.0f} s")
            why = (f"automatic rollback of version {champion}, {age:.0f} s after its {since.get('event')} "
                   f"(watch window {wanted.rollback_window_seconds:.0f} s): {reason}")
            try:
                done = self.registry.rollback(champion, why[:1000], f"kubeseg-trigger ({base['by']})")
            except Exception as e:  # noqa: BLE001 - no previous champion, lock timeout, registry down
                if "no previous champion" in str(e):  # nothing to go back to: not a failure of the trigger
                    return outcome("no_previous", str(e), version=champion)
                self.metrics.failures.inc()
                log.error("could not roll back %s version %s: %s", wanted.model_name, champion, e)
                return outcome("failed", f"{type(e).__name__}: {e}", event="failed", version=champion)
            log.warning("rolled %s back from version %s to %s: %s", wanted.model_name, champion, done.get("champion"),
                        reason)
            return outcome("rolled_back", why, event="rolled_back", version=champion, champion=done.get("champion"))

    def refused(self, status: int, why: str, caller: Optional[str] = None) -> None:
        """Count a refused call; audit it when the caller authenticated (401s are only logged and
        counted, so that anonymous traffic cannot fill the audit log)."""
        self.metrics.refused.labels(str(status)).inc()
        log.warning("refused a webhook call (%d) from %s: %s", status, caller or "an unauthenticated caller", why)
        if caller is not None:
            self._audit({"event": "refused", "status": status, "reason": why[:MAX_TEXT], "by": caller})


def pipeline_starter(settings: TriggerSettings) -> Starter:
    """Start ``pipelines/retraining.py`` through the one small client (local or cluster)."""
    def start(reason: dict) -> dict:
        from pipelines.client import RetrainRequest, start_retraining

        request = RetrainRequest(
            dataset=settings.dataset, new_cases=settings.new_cases, model_name=settings.model_name,
            tracking_uri=settings.tracking_uri or "", mode=settings.retrain_mode, schedule=settings.schedule,
            host=settings.kfp_host if settings.mode == "cluster" else None, work_dir=str(settings.work_dir),
            reason=reason["reason"], approval=settings.promotion_approval)
        run = start_retraining(request)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run).items()}

    return start


def pipeline_in_flight(settings: TriggerSettings) -> InFlight:
    """Whether a run the starter returned still goes on: the local status file, or the KFP run's state."""
    def in_flight(run: dict) -> bool:
        try:
            if run.get("status_path"):
                from pipelines.client import read_status

                return read_status(run["status_path"]).get("state") in ("starting", "running")
            if run.get("run_id") and settings.kfp_host:
                import kfp

                state = str(kfp.Client(host=settings.kfp_host).get_run(run["run_id"]).state or "").upper()
                return state in ("", "PENDING", "RUNNING", "PAUSED", "CANCELING", "RUNTIME_STATE_UNSPECIFIED")
        except Exception as e:  # noqa: BLE001 - unknown counts as in flight until max_run_seconds
            log.warning("cannot tell whether run %s is in flight (%s); assuming it is", run.get("run_id"), e)
            return True
        return False

    return in_flight


class WebhookAuth:
    """Alertmanager's webhook credentials: ``Authorization: Bearer <token>`` or ``Basic user:password``,
    compared in constant time (as SHA-256 digests) with the secrets mounted from the Secret."""

    def __init__(self, settings: TriggerSettings):
        self.enabled = settings.auth_enabled
        self.token = self._digest(settings.token_file.read_text().strip()) if settings.token_file else None
        self.basic = None
        if settings.basic_user and settings.basic_password_file:
            pair = f"{settings.basic_user}:{settings.basic_password_file.read_text().strip()}"
            self.basic = self._digest(pair)
        self.basic_user = settings.basic_user

    @staticmethod
    def _digest(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def caller(self, authorization: Optional[str]) -> Optional[str]:
        """Who authenticated (``bearer`` or ``basic:<user>``), or None."""
        if not authorization or len(authorization) > 4096:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.token is not None:
            return "alertmanager:bearer" if hmac.compare_digest(self._digest(value), self.token) else None
        if scheme.lower() == "basic" and self.basic is not None:
            try:
                pair = base64.b64decode(value, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            return f"alertmanager:basic:{self.basic_user}" if hmac.compare_digest(self._digest(pair), self.basic) \
                else None
        return None


async def _bounded_body(request, limit: int) -> Optional[bytes]:
    """The body, or None once it exceeds ``limit`` (judged from Content-Length first, then as it streams)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return None
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(trigger: Trigger):
    """The webhook receiver as a Starlette app; every path but /livez, /readyz and /metrics authenticated."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    auth = WebhookAuth(trigger.settings)
    if not auth.enabled:
        log.warning("!!! THE TRIGGER'S WEBHOOK AUTHENTICATION IS DISABLED (KUBESEG_TRIGGER_AUTH=disabled): anyone "
                    "who reaches it can start retraining runs. Development only. !!!")

    class Authenticate:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not auth.enabled:
                return await self.app(scope, receive, send)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
            who = auth.caller(headers.get("authorization"))
            if who is None:
                trigger.refused(401, f"no valid credential for {scope['path'][:100]}")
                response = JSONResponse({"error": "authentication required (Alertmanager http_config: "
                                                  "bearer token or basic auth)"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Bearer realm="kubeseg-trigger"'})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["caller"] = who
            return await self.app(scope, receive, send)

    async def alerts(request: Request):
        caller = request.scope.get("state", {}).get("caller", "unauthenticated (auth disabled)")
        body = await _bounded_body(request, trigger.settings.max_body_bytes)
        if body is None:
            trigger.refused(413, "body too large", caller)
            return JSONResponse({"error": f"the body exceeds {trigger.settings.max_body_bytes} bytes "
                                          "(KUBESEG_TRIGGER_MAX_BODY_BYTES)"}, status_code=413)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            from starlette.concurrency import run_in_threadpool
            entry = await run_in_threadpool(trigger.handle, payload, caller)
        except (ValueError, RecursionError) as e:
            trigger.refused(400, str(e)[:200], caller)
            return JSONResponse({"error": str(e)[:500]}, status_code=400)
        return JSONResponse(entry, status_code=202 if entry["event"] == "started" else 200)

    async def runs(request: Request):
        try:
            limit = min(max(int(request.query_params.get("limit", 100)), 1), 1000)
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        return JSONResponse(trigger.audit_entries(limit))

    async def ok(_: Request):
        return PlainTextResponse("ok\n")

    async def metrics(_: Request):
        return Response(generate_latest(trigger.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from starlette.middleware import Middleware

    return Starlette(routes=[Route("/alerts", alerts, methods=["POST"]), Route("/runs", runs),
                             Route("/livez", ok), Route("/readyz", ok), Route("/metrics", metrics)],
                     middleware=[Middleware(Authenticate)])


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

    trigger = Trigger(settings, pipeline_starter(settings), in_flight=pipeline_in_flight(settings))
    uvicorn.run(create_app(trigger), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
