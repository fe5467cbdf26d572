"""The retraining trigger's decisions: start once per alert (its own de-duplication key), suppress
repeats, forged group keys, runs while one is in flight and non-actionable notifications, survive
a restart through its audit log, report failures; the webhook's authentication and bounds."""
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


def test_a_forged_group_key_does_not_escape_deduplication(setup):
    trigger, started, _, _ = setup
    assert trigger.handle(notification())["event"] == "started"
    for i in range(5):  # the sender picks a new groupKey (and fingerprint) each time
        entry = trigger.handle(notification(group=f"forged-{i}", fp=f"f{i}"))
        assert entry["event"] == "suppressed" and entry["reason"] in ("duplicate", "cooldown")
        assert entry["sender_group_key"] == f"forged-{i}" and "forged" not in entry["dedup_key"]
    assert len(started) == 1


def test_at_most_one_run_in_flight_per_model(tmp_path):
    running = {"yes": True}
    started = []
    settings = TriggerSettings(cooldown_seconds=600, audit_log=tmp_path / "a.jsonl", dataset="/d", model_name="m")
    trigger = Trigger(settings, lambda r: started.append(r) or {"run_id": f"r{len(started)}"},
                      in_flight=lambda run: running["yes"])
    assert trigger.handle(notification())["event"] == "started"
    other = notification()
    other["alerts"][0]["labels"]["alertname"] = "SomethingElse"  # another key: not a duplicate, but a run goes on
    entry = trigger.handle(other)
    assert entry["event"] == "suppressed" and entry["reason"] == "in_flight" and "r1" in entry["detail"]
    running["yes"] = False
    assert trigger.handle(other)["event"] == "started"
    assert len(started) == 2


def test_hostile_label_values_never_become_metric_labels(setup):
    trigger, _, _, _ = setup
    n = notification()
    n["alerts"][0]["labels"]["alertname"] = "x" * 10_000 + '"}\n evil{a="'
    n["alerts"][0]["status"] = "firing\n"
    trigger.handle(n)
    assert _value(trigger, "kubeseg_trigger_alerts_total", alertname="invalid", status="invalid") == 1
    with pytest.raises(ValueError, match="at most"):
        trigger.handle({**notification(), "alerts": notification()["alerts"] * 101})


def _client(trigger, tmp_path, basic=False):
    from dataclasses import replace

    from starlette.testclient import TestClient

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    password = tmp_path / "password"
    password.write_text("pa55word")
    trigger.settings = replace(trigger.settings, token_file=None if basic else token,
                               basic_user="alertmanager" if basic else None,
                               basic_password_file=password if basic else None, max_body_bytes=4096)
    return TestClient(create_app(trigger))


def test_http_layer(setup, tmp_path):
    trigger, started, _, _ = setup
    client = _client(trigger, tmp_path)
    auth = {"Authorization": "Bearer s3cret-token"}
    assert client.post("/alerts", content=b"{not json", headers=auth).status_code == 400
    assert client.post("/alerts", json={"hello": 1}, headers=auth).status_code == 400
    assert client.post("/alerts", json=notification(), headers=auth).status_code == 202
    assert client.post("/alerts", json=notification(), headers=auth).status_code == 200
    assert [e["event"] for e in client.get("/runs", headers=auth).json()][-2:] == ["started", "suppressed"]
    assert client.get("/runs", headers=auth).json()[-1]["by"] == "alertmanager:bearer"
    assert "kubeseg_retraining_runs_started_total" in client.get("/metrics").text
    assert client.get("/livez").status_code == 200


def test_webhook_refuses_without_credentials_and_bounds_the_body(setup, tmp_path):
    trigger, started, _, _ = setup
    client = _client(trigger, tmp_path)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YTpi"}):
        r = client.post("/alerts", json=notification(), headers=headers)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    assert client.get("/runs").status_code == 401
    big = {**notification(), "padding": "x" * 10_000}
    assert client.post("/alerts", json=big, headers={"Authorization": "Bearer s3cret-token"}).status_code == 413
    assert started == []
    assert _value(trigger, "kubeseg_trigger_refused_total", status="401") == 4
    assert _value(trigger, "kubeseg_trigger_refused_total", status="413") == 1


def test_basic_auth_as_alertmanager_sends_it(setup, tmp_path):
    import base64

    trigger, started, _, _ = setup
    client = _client(trigger, tmp_path, basic=True)
    good = {"Authorization": "Basic " + base64.b64encode(b"alertmanager:pa55word").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"alertmanager:guess").decode()}
    assert client.post("/alerts", json=notification(), headers=bad).status_code == 401
    assert client.post("/alerts", json=notification(), headers=good).status_code == 202
    assert trigger.audit_entries()[-1]["by"] == "alertmanager:basic:alertmanager"


def test_settings_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBESEG_RETRAIN_DATASET", "/d")
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "m")
    with pytest.raises(SettingsError, match="KUBESEG_TRIGGER_TOKEN_FILE"):  # authentication is on by default
        TriggerSettings.from_env()
    token = tmp_path / "t"
    token.write_text("x")
    monkeypatch.setenv("KUBESEG_TRIGGER_TOKEN_FILE", str(token))
    assert TriggerSettings.from_env().auth_enabled
    monkeypatch.setenv("KUBESEG_TRIGGER_MODE", "cluster")
    monkeypatch.setenv("KUBESEG_RETRAIN_DATASET", "/d")
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "m")
    with pytest.raises(SettingsError, match="KUBESEG_KFP_HOST"):
        TriggerSettings.from_env()
    monkeypatch.setenv("KUBESEG_KFP_HOST", "http://kfp")
    monkeypatch.setenv("KUBESEG_TRIGGER_COOLDOWN_SECONDS", "soon")
    with pytest.raises(SettingsError, match="KUBESEG_TRIGGER_COOLDOWN_SECONDS"):
        TriggerSettings.from_env()


# ---- automatic rollback ----------------------------------------------------------------------------

def rollback_notification(version="2", name="m", alertname="KubesegNewVersionQAFlags", status="firing"):
    return {"version": "4", "status": status, "receiver": "kubeseg-rollback", "groupKey": "{}:{}",
            "alerts": [{"status": status, "fingerprint": f"r{version}",
                        "labels": {"alertname": alertname, "kubeseg_action": "rollback", "name": name,
                                   "version": version, "semver": "1.0.1", "job": "kubeseg"},
                        "annotations": {"summary": f"version {version} of {name}: QA flags on 80% of requests"},
                        "startsAt": "2026-11-23T10:00:00Z"}]}


class FakeRegistry:
    """The registry as the trigger sees it: how the champion became champion, and a rollback."""

    def __init__(self, version="2", event="promote", at=1_000_000.0 - 600):
        self.since = {"version": version, "event": event, "at": "then", "unix_time": at}
        self.rolled = []

    def champion_since(self):
        return self.since

    def rollback(self, version, reason, by):
        assert version == self.since["version"]  # expected: the version the alert named
        self.rolled.append((version, reason, by))
        self.since = {"version": "1", "event": "rollback", "at": "now", "unix_time": 1_000_000.0}
        return {"champion": "1", "rolled_back": version}


@pytest.fixture
def rollback_setup(tmp_path):
    started = []
    settings = TriggerSettings(audit_log=tmp_path / "audit.jsonl", dataset="/data/raw", model_name="m",
                               rollback_window_seconds=3600)
    registry = FakeRegistry()
    trigger = Trigger(settings, lambda reason: started.append(reason) or {"run_id": "x"}, Clock(), registry=registry)
    return trigger, registry, started


def test_rollback_alert_on_a_new_champion_rolls_back_and_never_retrains(rollback_setup):
    trigger, registry, started = rollback_setup
    entry = trigger.handle(rollback_notification(), caller="alertmanager:bearer")
    assert entry["event"] == "rolled_back" and entry["version"] == "2" and entry["champion"] == "1"
    assert "600 s after its promote" in entry["detail"] and "QA flags on 80%" in entry["detail"]
    assert registry.rolled and registry.rolled[0][2] == "kubeseg-trigger (alertmanager:bearer)"
    assert "KubesegNewVersionQAFlags" in registry.rolled[0][1]
    assert started == []  # no retraining run
    # Alertmanager sends the still-firing group again: version 2 is no longer champion, nothing happens
    again = trigger.handle(rollback_notification())
    assert again["event"] == "suppressed" and again["reason"] == "not_champion"
    assert len(registry.rolled) == 1 and started == []
    # the alert now joined to the restored version 1: a version a rollback restored is left alone
    restored = trigger.handle(rollback_notification(version="1"))
    assert restored["reason"] == "restored_version" and len(registry.rolled) == 1
    lines = [json.loads(x) for x in trigger.settings.audit_log.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["rolled_back", "suppressed", "suppressed"]
    assert all(e["action"] == "rollback" for e in lines)
    assert _value(trigger, "kubeseg_trigger_rollbacks_total", outcome="rolled_back") == 1
    assert _value(trigger, "kubeseg_trigger_rollbacks_total", outcome="not_champion") == 1


@pytest.mark.parametrize("since, note, reason", [
    ({"version": "2", "event": "promote", "at": "long ago", "unix_time": 1_000_000.0 - 3601}, None, "outside_window"),
    ({"version": "2", "event": "approve", "at": "now", "unix_time": 1_000_000.0 - 10}, {"name": "other"},
     "other_model"),
    ({"version": "2", "event": "approve", "at": "now", "unix_time": 1_000_000.0 - 10}, {"version": ""}, "no_version"),
    (None, None, "no_record"),
])
def test_rollback_alerts_that_are_not_acted_on_are_written_down(rollback_setup, since, note, reason):
    trigger, registry, started = rollback_setup
    registry.since = since
    payload = rollback_notification()
    payload["alerts"][0]["labels"].update(note or {})
    entry = trigger.handle(payload)
    assert entry["event"] == "suppressed" and entry["reason"] == reason, entry
    assert registry.rolled == [] and started == []
    assert json.loads(trigger.settings.audit_log.read_text().splitlines()[-1])["reason"] == reason


def test_approved_version_rolls_back_and_resolved_or_disabled_rollbacks_do_nothing(tmp_path):
    registry = FakeRegistry(event="approve")
    settings = TriggerSettings(audit_log=tmp_path / "a.jsonl", dataset="/d", model_name="m")
    trigger = Trigger(settings, lambda r: {"run_id": "x"}, Clock(), registry=registry)
    assert trigger.handle(rollback_notification(status="resolved"))["reason"] == "not_actionable"
    assert trigger.handle(rollback_notification())["event"] == "rolled_back"
    off = Trigger(TriggerSettings(audit_log=tmp_path / "b.jsonl", dataset="/d", model_name="m", rollback_enabled=False),
                  lambda r: {"run_id": "x"}, Clock(), registry=FakeRegistry())
    assert off.handle(rollback_notification())["reason"] == "not_actionable"


def test_rollback_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBESEG_RETRAIN_DATASET", "/d")
    monkeypatch.setenv("KUBESEG_MODEL_NAME", "m")
    monkeypatch.setenv("KUBESEG_TRIGGER_AUTH", "disabled")
    monkeypatch.setenv("KUBESEG_ROLLBACK_WINDOW_SECONDS", "900")
    monkeypatch.setenv("KUBESEG_PROMOTION_APPROVAL", "required")
    s = TriggerSettings.from_env()
    assert s.rollback_window_seconds == 900 and s.promotion_approval == "required" and s.rollback_enabled
    monkeypatch.setenv("KUBESEG_PROMOTION_APPROVAL", "maybe")
    with pytest.raises(SettingsError, match="KUBESEG_PROMOTION_APPROVAL"):
        TriggerSettings.from_env()
    monkeypatch.setenv("KUBESEG_PROMOTION_APPROVAL", "auto")
    monkeypatch.setenv("KUBESEG_ROLLBACK", "disabled")
    assert not TriggerSettings.from_env().rollback_enabled
