"""The retraining trigger's decisions: start once per alert group, suppress repeats and
non-actionable notifications, survive a restart through its audit log, report failures."""
import json

import pytest

from services.settings import SettingsError, TriggerSettings
from services.trigger import Trigger, create_app


def notification(status="firing", action="retrain", group="{}:{alertname=\"KubesegInputDrift\"}", fp="a1"):
    return {"version": "4", "status": status, "receiver": "kubeseg-retrain", "groupKey": group,
            "groupLabels": {"alertname": "KubesegInputDrift"},
            "alerts": [{"status": status, "fingerprint": fp,
                        "labels": {"alertname": "KubesegInputDrift", "check": "intensity", "kubeseg_action": action},
                        "annotations": {"summary": "Inputs drifted from the training data (intensity)"},
                        "startsAt": "2026-11-23T10:00:00Z"}]}


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def setup(tmp_path):
    started = []

    def starter(reason):
        started.append(reason)
        return {"run_id": f"run-{len(started)}", "mode": "local"}

    settings = TriggerSettings(cooldown_seconds=600, audit_log=tmp_path / "audit.jsonl", dataset="/data/raw",
                               model_name="m")
    clock = Clock()
    return Trigger(settings, starter, clock), started, clock, settings


def _value(trigger, name, **labels):
    return trigger.metrics.registry.get_sample_value(name, labels or None)


def test_one_run_per_group_then_duplicates_and_cooldown(setup):
    trigger, started, clock, _ = setup
    first = trigger.handle(notification())
    assert first["event"] == "started" and first["run"]["run_id"] == "run-1"
    assert "KubesegInputDrift" in first["reason"] and "intensity" in first["reason"]
    again = trigger.handle(notification())  # Alertmanager's repeat / a second replica
    assert again["event"] == "suppressed" and again["reason"] == "duplicate"
    other_alert = trigger.handle(notification(fp="b2"))  # the group got a new alert, still inside the cool-down
    assert other_alert["reason"] == "cooldown"
    clock.t += 601
    assert trigger.handle(notification())["event"] == "started"
    assert len(started) == 2
    assert _value(trigger, "kubeseg_retraining_runs_started_total", alertname="KubesegInputDrift") == 2
    assert _value(trigger, "kubeseg_trigger_suppressed_total", reason="duplicate") == 1
    assert _value(trigger, "kubeseg_trigger_alerts_total", alertname="KubesegInputDrift", status="firing") == 4


def test_resolved_and_other_alerts_start_nothing(setup):
    trigger, started, _, _ = setup
    assert trigger.handle(notification(status="resolved"))["reason"] == "not_actionable"
    assert trigger.handle(notification(action="page"))["reason"] == "not_actionable"
    assert started == []
    assert _value(trigger, "kubeseg_trigger_suppressed_total", reason="not_actionable") == 2


def test_cooldown_survives_a_restart(setup):
    trigger, started, clock, settings = setup
    trigger.handle(notification())
    restarted = Trigger(settings, trigger.starter, clock)
    assert restarted.handle(notification())["reason"] == "duplicate"
    assert len(started) == 1
    lines = [json.loads(x) for x in settings.audit_log.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["started", "suppressed"]


def test_a_failed_start_is_counted_audited_and_retried_next_time(tmp_path):
    calls = []

    def failing(reason):
        calls.append(reason)
        raise RuntimeError("kfp host unreachable")

    settings = TriggerSettings(audit_log=tmp_path / "a.jsonl", dataset="/d", model_name="m")
    trigger = Trigger(settings, failing)
    entry = trigger.handle(notification())
    assert entry["event"] == "failed" and "kfp host unreachable" in entry["error"]
    assert trigger.handle(notification())["event"] == "failed"  # no cool-down after a failure
    assert len(calls) == 2
    assert _value(trigger, "kubeseg_trigger_failures_total") == 2


def test_http_layer(setup):
    from starlette.testclient import TestClient

    trigger, started, _, _ = setup
    client = TestClient(create_app(trigger))
    assert client.post("/alerts", content=b"{not json").status_code == 400
    assert client.post("/alerts", json={"hello": 1}).status_code == 400
    assert client.post("/alerts", json=notification()).status_code == 202
    assert client.post("/alerts", json=notification()).status_code == 200
    assert [e["event"] for e in client.get("/runs").json()] == ["started", "suppressed"]
    assert "kubeseg_retraining_runs_started_total" in client.get("/metrics").text


def test_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("KUBESEG_TRIGGER_MODE", "cluster")
    monkeypatch.setenv("KUBESEG_RETRAIN_DATASET", "/d")
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "m")
    with pytest.raises(SettingsError, match="KUBESEG_KFP_HOST"):
        TriggerSettings.from_env()
    monkeypatch.setenv("KUBESEG_KFP_HOST", "http://kfp")
    monkeypatch.setenv("KUBESEG_TRIGGER_COOLDOWN_SECONDS", "soon")
    with pytest.raises(SettingsError, match="KUBESEG_TRIGGER_COOLDOWN_SECONDS"):
        TriggerSettings.from_env()
