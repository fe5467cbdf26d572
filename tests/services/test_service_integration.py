"""The whole serving loop with real parts: a real MLflow server holds the model; `bentoml serve`
loads the champion from it; Prometheus (Debian's) scrapes the service and the trigger and
evaluates the repo's alert rules; Alertmanager (Debian's) routes the drift alert to the real
retraining trigger, which starts a real retraining pipeline run (kfp.local), and routes a rollback
alert on a newly promoted, misbehaving champion to the trigger, which rolls it back.

The tests run in file order on one stack (module fixture): bad inputs first, then drift → alert
→ exactly one retraining run, then promotion and rollback while requests flow, then a failing
new champion rolled back automatically (no retraining run, no failed request), then every
Grafana panel's query against the Prometheus that watched it all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from services.auth import new_key
from tests.services.bad_inputs import LIMITS, bad_requests, dicom_zip
from tests.services.servers import (alertmanager_server, bentoml_server, fast_rollback_rules, http_get, prom_query,
                                    prometheus_server, trigger_server, wait_for)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None
                       or (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")) is None,
                       reason="Debian's prometheus and prometheus-alertmanager are not installed (.ci/run installs them)"),
]

NAME = "svc-seg"
API_KEY, API_KEY_LINE = new_key("integration-test")  # the service authenticates every request (services/auth.py)
TRIGGER_TOKEN = "alertmanager-webhook-token-for-tests"
INTENSITY_THRESHOLD = 0.5  # settable; the tiny test model's in-distribution scores stay well below


def _post(url: str, files: list[tuple[str, bytes]], fields: dict | None = None, timeout: float = 300):
    import httpx

    return httpx.post(url, files=[("images", (name, data, "application/octet-stream")) for name, data in files],
                      data={k: str(v) for k, v in (fields or {}).items()}, timeout=timeout,
                      headers={"Authorization": f"Bearer {API_KEY}"})


def _error(response) -> str:
    body = response.json()
    body = body[0] if isinstance(body, list) else body  # BentoML wraps 4xx bodies in a list
    return body["error"]


def _shifted(case: Path, out: Path) -> Path:
    """The same scan with another intensity scale and a coarser spacing."""
    image = sitk.ReadImage(str(case))
    array = sitk.GetArrayFromImage(image).astype(np.float32) * 1.6 + 200
    shifted = sitk.GetImageFromArray(array)
    shifted.CopyInformation(image)
    shifted.SetSpacing([s * 2.0 for s in image.GetSpacing()])
    sitk.WriteImage(shifted, str(out))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import torch

    from kubeseg.registry import GateSettings, promote, register_bundle
    from tests.pipelines.helpers import MlflowServer
    from tests.services.helpers import served_bundle

    root = tmp_path_factory.mktemp("serving")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cached = os.environ.get("KUBESEG_TEST_MODEL_DIR")  # reuse a trained model between local runs
    try:
        model_dir = Path(cached) if cached else root / "model"
        made = served_bundle(model_dir) if not (model_dir / "bundle").is_dir() else {
            "raw": model_dir / "raw" / "Dataset001_SynthCT", "bundle": model_dir / "bundle"}
    finally:
        torch.set_num_threads(threads)
    new_cases = root / "new_cases"
    shutil.copytree(made["raw"] / "imagesTr", new_cases / "imagesTr", ignore=lambda d, f: [x for x in f if "004" not in x])
    shutil.copytree(made["raw"] / "labelsTr", new_cases / "labelsTr", ignore=lambda d, f: [x for x in f if "004" not in x])
    for folder in ("imagesTr", "labelsTr"):  # the "new" case under a name the dataset does not have yet
        for f in (new_cases / folder).iterdir():
            f.rename(f.with_name(f.name.replace("synth_004", "new_104")))
    from kubeseg.signing import generate_keys

    signing_key, public_key = generate_keys(root / "signing")
    token_file = root / "trigger-token"
    token_file.write_text(TRIGGER_TOKEN)
    with MlflowServer(root / "mlflow") as mlflow:
        register_bundle(made["bundle"], NAME, mlflow.uri, signing_key=signing_key)
        gate = GateSettings(holdout=str(made["raw"] / "imagesTs"), device="cpu", label_floor=0.0)  # tiny model
        promote(NAME, "1", gate, mlflow.uri)
        common = {"MLFLOW_TRACKING_URI": mlflow.uri, "KUBESEG_MODEL_NAME": NAME, "PYTHONPATH": str(Path.cwd())}
        trigger_env = {**common, "KUBESEG_TRIGGER_MODE": "local", "KUBESEG_RETRAIN_DATASET": str(made["raw"]),
                       "KUBESEG_RETRAIN_NEW_CASES": str(new_cases), "KUBESEG_RETRAIN_SCHEDULE": "1x2x1",
                       "KUBESEG_RETRAIN_WORK_DIR": str(root / "retraining"),
                       "KUBESEG_TRIGGER_AUDIT_LOG": str(root / "audit.jsonl"),
                       "KUBESEG_TRIGGER_COOLDOWN_SECONDS": "3600", "KUBESEG_TRIGGER_TOKEN_FILE": str(token_file),
                       "KUBESEG_SIGNING_KEY": str(signing_key)}
        service_env = {**common, **LIMITS, "KUBESEG_MODEL_ALIAS": "champion", "KUBESEG_DEVICE": "cpu",
                       "KUBESEG_REGISTRY_POLL_SECONDS": "1", "KUBESEG_DRIFT_WINDOW": "3", "KUBESEG_TTA": "false",
                       "KUBESEG_DRIFT_THRESHOLD_INTENSITY": str(INTENSITY_THRESHOLD),
                       "KUBESEG_CACHE_DIR": str(root / "model-cache"), "OMP_NUM_THREADS": "1",
                       "KUBESEG_API_KEYS": API_KEY_LINE, "KUBESEG_MODEL_PUBLIC_KEY": str(public_key)}
        with trigger_server(root, trigger_env) as trigger, \
                alertmanager_server(root, f"{trigger.url}/alerts", token_file) as alertmanager, \
                bentoml_server(root, service_env) as service, \
                prometheus_server(root, {"kubeseg": service.url, "kubeseg-trigger": trigger.url},
                                  alertmanager.url, fast_rollback_rules(root)) as prometheus:
            try:
                yield {"gate": gate, "root": root, "raw": made["raw"], "bundle": made["bundle"],
                       "mlflow": mlflow.uri, "service": service, "trigger": trigger, "alertmanager": alertmanager,
                       "prometheus": prometheus, "audit": root / "audit.jsonl", "signing_key": signing_key}
            finally:
                _stop_retraining_runs(root / "audit.jsonl")


def _stop_retraining_runs(audit: Path) -> None:
    """The retraining run started by the trigger goes on in the background; end it with the tests."""
    if not audit.is_file():
        return
    groups = [int(pid) for line in audit.read_text().splitlines()
              if (pid := (json.loads(line).get("run") or {}).get("pid"))]
    for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_group_alive(g) for g in groups):
            time.sleep(0.5)
        if not any(_group_alive(g) for g in groups):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _metric(service_url: str, name: str, labels: str = "") -> float | None:
    status, body = http_get(f"{service_url}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
            key = line.split(" ")[0]
            if labels or key == name:
                return float(line.rsplit(" ", 1)[1])
    return None


def test_bad_inputs_get_4xx_and_the_service_keeps_serving(stack):
    url = stack["service"].url
    good_case = sorted((stack["raw"] / "imagesTs").iterdir())[0]
    bad = bad_requests(good_case)
    assert len(bad) >= 12
    for b in bad:
        r = _post(f"{url}/segment", b.files, b.fields)
        assert r.status_code == b.status, (b.kind, r.status_code, r.text[:300])
        assert b.message.lower() in _error(r).lower(), (b.kind, r.text[:300])
    r = _post(f"{url}/segment", [], {})
    assert r.status_code == 400  # no image at all
    # still serving: NIfTI in → NIfTI out with the input's geometry; a DICOM series zip works too
    r = _post(f"{url}/segment", [(good_case.name, good_case.read_bytes())])
    assert r.status_code == 200, r.text[:300]
    out = stack["root"] / "answer.nii.gz"
    out.write_bytes(r.content)
    seg, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(good_case))
    assert seg.GetSize() == image.GetSize() and np.allclose(seg.GetSpacing(), image.GetSpacing())
    assert np.allclose(seg.GetDirection(), image.GetDirection()) and np.allclose(seg.GetOrigin(), image.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}
    r = _post(f"{url}/segment_summary", [("study.zip", dicom_zip(image))])
    assert r.status_code == 200, r.text[:300]
    assert r.json()["model"] == {"name": NAME, "version": "1", "alias": "champion", "semver": "1.0.0"}
    window = r.json()["drift"]["window_scores"]
    # a blank scan is segmented, flagged degenerate, and kept out of the drift window (finite everywhere)
    blank = sitk.Image(image.GetSize(), sitk.sitkInt16)
    blank.CopyInformation(image)
    out_blank = stack["root"] / "blank.nii.gz"
    sitk.WriteImage(blank, str(out_blank))
    r = _post(f"{url}/segment_summary", [("blank.nii.gz", out_blank.read_bytes())])
    assert r.status_code == 200, r.text[:300]
    drift = r.json()["drift"]
    assert drift["degenerate"] == "all voxels are zero" and drift["window_scores"] == window
    assert all(np.isfinite(v) for v in drift["scores"].values())
    assert _metric(url, "kubeseg_drift_inputs_total", 'check="intensity",result="degenerate"') == 1
    assert _metric(url, "kubeseg_requests_total", 'endpoint="segment",status="422"') >= 5
    assert _metric(url, "kubeseg_requests_total", 'endpoint="segment",status="413"') >= 2


def test_drift_fires_the_alert_and_exactly_one_retraining_run_starts(stack):
    url, prom = stack["service"].url, stack["prometheus"].url
    in_distribution = sorted((stack["raw"] / "imagesTr").iterdir())[:3]
    for case in in_distribution:
        r = _post(f"{url}/segment_summary", [(case.name, case.read_bytes())])
        assert r.status_code == 200, r.text[:300]
        summary = r.json()
        assert summary["drift"]["scores"]["spacing"] == 0.0 and summary["volumes_ml"]["body"] > 0
        assert set(summary["timings_seconds"]) == {"decode", "preprocess", "inference", "postprocess", "encode"}
    window = wait_for("the window scores in Prometheus",
                      lambda: prom_query(prom, 'kubeseg_drift_window_score{check="intensity"}'), 20)
    assert float(window[0]["value"][1]) < INTENSITY_THRESHOLD
    time.sleep(3)
    assert prom_query(prom, 'ALERTS{alertname="KubesegInputDrift"}') == []
    assert not stack["audit"].exists() or "started" not in stack["audit"].read_text()

    shifted_dir = stack["root"] / "shifted"
    shifted_dir.mkdir()
    for case in in_distribution:
        s = _shifted(case, shifted_dir / case.name)
        r = _post(f"{url}/segment_summary", [(s.name, s.read_bytes())])
        assert r.status_code == 200, r.text[:300]
        assert r.json()["drift"]["scores"]["spacing"] > 0.1
    drifted = wait_for("the drift window above its threshold",
                       lambda: prom_query(prom, "kubeseg_drift_window_score > kubeseg_drift_threshold"), 20)
    assert {d["metric"]["check"] for d in drifted} >= {"spacing"}
    wait_for("the drift alert to fire",
             lambda: prom_query(prom, 'ALERTS{alertname="KubesegInputDrift", alertstate="firing"}'), 150, 2)

    def started():
        if not stack["audit"].is_file():
            return None
        entries = [json.loads(x) for x in stack["audit"].read_text().splitlines()]
        return [e for e in entries if e["event"] == "started"] or None

    runs = wait_for("the trigger to start a retraining run", started, 60)
    time.sleep(25)  # Alertmanager re-sends the firing group (repeat_interval 10 s): no second run
    entries = [json.loads(x) for x in stack["audit"].read_text().splitlines()]
    runs = [e for e in entries if e["event"] == "started"]
    assert len(runs) == 1, entries
    assert any(e["event"] == "suppressed" and e["reason"] == "duplicate" for e in entries), entries
    run = runs[0]
    assert "KubesegInputDrift" in run["reason"] and "drifted" in run["reason"]
    assert run["alerts"][0]["labels"]["kubeseg_action"] == "retrain"
    assert run["run"]["mode"] == "local" and run["run"]["run_id"]
    # the run really started: the local client's status file and log exist
    status_file = Path(run["run"]["status_path"]) if run["run"].get("status_path") else None
    assert Path(run["run"]["log_path"]).exists() or (status_file and status_file.exists())
    # a forged notification: refused without Alertmanager's token; with it, a new groupKey does not escape
    import httpx

    forged = {"version": "4", "status": "firing", "groupKey": "forged-group", "receiver": "x",
              "alerts": [{"status": "firing", "labels": run["alerts"][0]["labels"], "fingerprint": "forged"}]}
    assert httpx.post(f"{stack['trigger'].url}/alerts", json=forged).status_code == 401
    r = httpx.post(f"{stack['trigger'].url}/alerts", json=forged, headers={"Authorization": f"Bearer {TRIGGER_TOKEN}"})
    assert r.status_code == 200 and r.json()["event"] == "suppressed", r.text
    started_metric = prom_query(stack["prometheus"].url, "kubeseg_retraining_runs_started_total")
    assert started_metric and float(started_metric[0]["value"][1]) == 1


def test_promotion_and_rollback_while_requests_flow(stack):
    from kubeseg.registry import promote, register_bundle, rollback

    url, uri = stack["service"].url, stack["mlflow"]
    case = sorted((stack["raw"] / "imagesTr").iterdir())[0]
    payload = [(case.name, case.read_bytes())]
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = _post(f"{url}/segment_summary", payload)
            results.append((r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text[:200]))

    worker = threading.Thread(target=client)
    worker.start()
    try:
        wait_for("first requests", lambda: len(results) >= 2, 120)
        for probe in ("livez", "readyz"):  # health answers while the service is busy
            t = time.perf_counter()
            status, body = http_get(f"{url}/{probe}", timeout=5)
            assert status == 200 and time.perf_counter() - t < 5, (probe, status)
        assert json.loads(http_get(f"{url}/readyz")[1])["model"]["version"] == "1"
        register_bundle(stack["bundle"], NAME, uri, signing_key=stack["signing_key"])  # version 2
        promote(NAME, "2", stack["gate"], uri)
        wait_for("the service to serve version 2", lambda: _metric(url, "kubeseg_model_version") == 2.0, 120)
        assert json.loads(http_get(f"{url}/readyz")[1])["model"]["version"] == "2"
        n = len(results)
        wait_for("requests on version 2", lambda: any(v == "2" for _, v in results[n:]), 120)
        rollback(NAME, uri)
        wait_for("the service to serve version 1 again", lambda: _metric(url, "kubeseg_model_version") == 1.0, 120)
        n = len(results)
        wait_for("requests on version 1 again", lambda: any(v == "1" for _, v in results[n:]), 120)
    finally:
        stop.set()
        worker.join(300)
    failures = [r for r in results if r[0] != 200]
    assert failures == [], failures
    versions = [v for _, v in results]
    first_two = versions.index("2")
    assert "1" in versions[:first_two] and "1" in versions[first_two:]
    assert _metric(url, "kubeseg_model_info", f'alias="champion",name="{NAME}",semver="1.0.0",version="1"') == 1.0
    assert _metric(url, "kubeseg_model_info", f'alias="champion",name="{NAME}",semver="1.1.0",version="2"') == 0.0
    assert _metric(url, "kubeseg_model_swaps_total", 'result="success"') == 2.0
    history = prom_query(stack["prometheus"].url, "max_over_time(kubeseg_model_version[10m])")
    assert float(history[0]["value"][1]) == 2.0
    ready = http_get(f"{url}/readyz")
    assert ready[0] == 200 and json.loads(ready[1])["model"]["version"] == "1"


def _swapped_labels(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose output channels of ``body`` (1) and ``lesion`` (3) are swapped in
    every segmentation head: a label-order mistake. It passes the gate (known labels, foreground,
    the input's geometry) and then misses ``body`` and reports a body-sized lesion on every scan."""
    import torch

    shutil.copytree(bundle, out)
    for ckpt in out.rglob("checkpoint_final.pth"):
        state = torch.load(ckpt, weights_only=True)
        for key, value in state["network_weights"].items():
            if ".seg_layers." in key:
                value[[1, 3]] = value[[3, 1]].clone()
        torch.save(state, ckpt)
    for stale in [*out.rglob("*.onnx"), *out.rglob("kubeseg-signature.json")]:
        stale.unlink()
    return out


def test_a_failing_new_champion_is_rolled_back_automatically(stack):
    """Promote a version that passes the gate but misbehaves in production: the QA-flag rollback
    alert fires on its version, Alertmanager routes it to the trigger, which rolls the champion
    back with a recorded reason and starts no retraining run; a client sees no failed request."""
    import torch

    from kubeseg.registry import champion_history, get_version, promote, register_bundle

    _stop_retraining_runs(stack["audit"])  # the drift test's run must not promote while this test watches
    url, uri, prom = stack["service"].url, stack["mlflow"], stack["prometheus"].url
    began = time.time()
    before = get_version(NAME, "champion", uri)

    def audit() -> list[dict]:
        return [json.loads(x) for x in stack["audit"].read_text().splitlines()] if stack["audit"].is_file() else []

    audit_lines = len(audit())
    runs_before = sum(1 for e in audit() if e["event"] == "started")
    case = sorted((stack["raw"] / "imagesTr").iterdir())[0]
    payload = [(case.name, case.read_bytes())]
    results: list[tuple[int, str, list]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = _post(f"{url}/segment_summary", payload)
            ok = r.status_code == 200
            results.append((r.status_code, r.json()["model"]["version"] if ok else r.text[:200],
                            [f["flag"] for f in r.json()["qa"]["flags"]] if ok else []))

    worker = threading.Thread(target=client)
    worker.start()
    try:
        wait_for("first requests", lambda: len(results) >= 2, 120)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            bad = register_bundle(_swapped_labels(stack["bundle"], stack["root"] / "swapped"), NAME, uri,
                                  signing_key=stack["signing_key"])
            promote(NAME, bad.version, stack["gate"], uri, reason="integration test: a version that will misbehave")
        finally:
            torch.set_num_threads(threads)
        promoted = time.time()
        wait_for("the service to serve the new version",
                 lambda: _metric(url, "kubeseg_model_version") == float(bad.version), 120)
        n = len(results)
        wait_for("requests on the new version", lambda: any(v == bad.version for _, v, _ in results[n:]), 120)
        wait_for("the trigger to roll the champion back",
                 lambda: get_version(NAME, "champion", uri).version == before.version, 180, 1)
        rolled = time.time()
        wait_for("the service to serve the previous champion again",
                 lambda: _metric(url, "kubeseg_model_version") == float(before.version), 120)
        n = len(results)
        wait_for("requests on the previous champion", lambda: any(v == before.version for _, v, _ in results[n:]), 120)
    finally:
        stop.set()
        worker.join(300)
    assert [r for r in results if r[0] != 200] == []  # no failed request throughout
    bad_flags = [f for _, ver, f in results if ver == bad.version]
    assert any("label_missing" in f and "volume_out_of_range" in f for f in bad_flags), bad_flags
    # the rollback alerts that fired on the new version (the QA-flag rise; the volume drift too: a
    # lesion volume where there was none), with the labels the trigger and the route use
    fired = prom_query(prom, f'max by (alertname, kubeseg_action, name, semver) (max_over_time('
                             f'ALERTS{{alertstate="firing", version="{bad.version}"}}[10m]))')
    assert {a["metric"]["alertname"] for a in fired} >= {"KubesegNewVersionQAFlags"}, fired
    assert {(a["metric"]["kubeseg_action"], a["metric"]["name"], a["metric"]["semver"]) for a in fired} == {
        ("rollback", NAME, bad.tags["kubeseg.semver"])}
    # why, recorded: the trigger's audit log, the registry's tags and champion log
    entries = audit()[audit_lines:]
    done = [e for e in entries if e["event"] == "rolled_back"]
    assert len(done) == 1 and done[0]["version"] == bad.version and done[0]["champion"] == before.version, entries
    assert "KubesegNewVersion" in done[0]["detail"] and done[0]["by"] == "alertmanager:bearer"
    tags = get_version(NAME, bad.version, uri).tags
    assert tags["kubeseg.rolled_back_by"] == "kubeseg-trigger (alertmanager:bearer)"
    assert f"automatic rollback of version {bad.version}" in tags["kubeseg.rollback_reason"]
    assert "KubesegNewVersion" in tags["kubeseg.rollback_reason"]
    assert champion_history(NAME, uri)[-1] == before.version and bad.version not in champion_history(NAME, uri)
    # no retraining run, and later notifications about the old version change nothing
    time.sleep(12)  # Alertmanager's repeat interval (10 s) in the test
    entries = audit()
    assert sum(1 for e in entries if e["event"] == "started") == runs_before
    assert get_version(NAME, "champion", uri).version == before.version
    assert sum(1 for e in entries if e["event"] == "rolled_back") == 1
    # the served version's semver: /readyz and the version metric
    ready = json.loads(http_get(f"{url}/readyz")[1])["model"]
    assert ready["version"] == before.version and ready["semver"] == before.tags["kubeseg.semver"]
    assert _metric(url, "kubeseg_model_info",
                   f'alias="champion",name="{NAME}",semver="{before.tags["kubeseg.semver"]}",version="{before.version}"') == 1
    print(f"rollback: promoted {promoted - began:.0f} s after the start, rolled back {rolled - promoted:.0f} s after "
          f"the promotion; whole test {time.time() - began:.0f} s")


def test_every_dashboard_panel_query_returns_data(stack):
    dashboards = Path(__file__).resolve().parents[2] / "charts" / "kubeseg" / "dashboards"
    panel_queries = pytest.importorskip("tests.charts.dashboards").panel_queries
    files = sorted(dashboards.glob("*.json"))
    assert files, f"no dashboards in {dashboards}"
    time.sleep(3)  # one more scrape after the last requests
    empty = []
    for f in files:
        for title, expr in panel_queries(f, {"namespace": ".*", "model": NAME, "job": ".*"}):
            if "gpu" in expr.lower():
                continue  # GPU memory exists only where there is a GPU
            if not prom_query(stack["prometheus"].url, expr):
                empty.append((f.name, title, expr))
    assert empty == [], empty
