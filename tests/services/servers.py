"""Real servers for the service integration tests: bentoml serve, the trigger, Prometheus, Alertmanager."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from tests.pipelines.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "kubeseg" / "files" / "prometheus-rules.yaml"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Server:
    """A subprocess in its own process group, healthy when ``health`` answers 200; log kept in ``log_path``."""

    def __init__(self, name: str, cmd: list[str], health: str, root: Path, env: Optional[dict] = None,
                 startup_s: float = 180):
        self.name, self.cmd, self.health, self.startup_s = name, cmd, health, startup_s
        self.env = {**os.environ, **(env or {})}
        self.log_path = root / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "Server":
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=REPO, start_new_session=True)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if http_get(self.health, 2)[0] == 200:
                return self
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.name} not healthy after {self.startup_s} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text()[-n:] if self.log_path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def bentoml_server(root: Path, env: dict) -> Server:
    port = free_port()
    bentoml = Path(sys.executable).with_name("bentoml")
    s = Server("bentoml", [str(bentoml), "serve", "services.service:Segmentation", "--host", "127.0.0.1",
                           "--port", str(port)], f"http://127.0.0.1:{port}/readyz", root,
               {"BENTOML_HOME": str(root / "bentoml_home"), **env}, startup_s=300)
    s.url = f"http://127.0.0.1:{port}"
    return s


def trigger_server(root: Path, env: dict) -> Server:
    port = free_port()
    s = Server("trigger", [sys.executable, "-m", "services.trigger", "--host", "127.0.0.1", "--port", str(port)],
               f"http://127.0.0.1:{port}/livez", root, env)
    s.url = f"http://127.0.0.1:{port}"
    return s


def alertmanager_server(root: Path, webhook_url: str, token_file: Optional[Path] = None) -> Server:
    port = free_port()
    config = root / "alertmanager.yml"
    # one notification per alert name (several drift checks firing = one group = one run)
    config.write_text(json.dumps({
        "route": {"receiver": "null", "group_by": ["alertname"], "group_wait": "1s", "group_interval": "5s",
                  "repeat_interval": "10s",
                  "routes": [{"receiver": "kubeseg-retrain", "matchers": ['kubeseg_action="retrain"']},
                             # rollback alerts: one group per version, sent at once (the chart's second route)
                             {"receiver": "kubeseg-retrain", "matchers": ['kubeseg_action="rollback"'],
                              "group_by": ["alertname", "version"], "group_wait": "1s"}]},
        "receivers": [{"name": "null"},
                      {"name": "kubeseg-retrain", "webhook_configs": [{
                          "url": webhook_url, "send_resolved": True,
                          # Alertmanager's own webhook authentication, as the chart configures it
                          **({"http_config": {"authorization": {"type": "Bearer",
                                                                "credentials_file": str(token_file)}}}
                             if token_file else {})}]}],
    }))
    binary = shutil.which("prometheus-alertmanager") or "alertmanager"
    s = Server("alertmanager", [binary, f"--config.file={config}", f"--storage.path={root / 'am-data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
               f"http://127.0.0.1:{port}/-/ready", root)
    s.url = f"http://127.0.0.1:{port}"
    return s


def fast_rollback_rules(root: Path, alerts: tuple[str, ...] = ("KubesegNewVersionQAFlags",), hold: str = "5s",
                        window: str = "20s", before: str = "[5m] offset 1m") -> Path:
    """The one rules file with ``alerts`` of the ``kubeseg.rollback`` group made fast for a test:
    ``for:`` is ``hold``, the 5/10-minute rate windows are ``window``, the previous day is
    ``before``. The production file is unchanged; every other rule is copied as it is (the other
    rollback rules keep their day-long baselines, so they stay quiet in a minutes-long test)."""
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        if group["name"] != "kubeseg.rollback":
            continue
        for rule in group["rules"]:
            if rule.get("alert") not in alerts:
                continue
            rule["for"] = hold
            rule["expr"] = (rule["expr"].replace("[10m]", f"[{window}]").replace("[5m]", f"[{window}]")
                            .replace("[1d] offset 1h", before))
    out = root / "prometheus-rules.fast-rollback.yaml"
    out.write_text(yaml.safe_dump(rules, sort_keys=False))
    return out


def prometheus_server(root: Path, targets: dict[str, str], alertmanager: str, rules: Path = RULES) -> Server:
    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager.split("//")[1]]}]}]},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [url.split("//")[1]]}]}
                           for job, url in targets.items()],
    }))
    s = Server("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'prom-data'}",
                              f"--web.listen-address=127.0.0.1:{port}"], f"http://127.0.0.1:{port}/-/ready", root)
    s.url = f"http://127.0.0.1:{port}"
    return s


def prom_query(prometheus_url: str, expr: str) -> list[dict]:
    """Instant query; the result vector (empty list when no data)."""
    status, body = http_get(f"{prometheus_url}/api/v1/query?query={urllib.parse.quote(expr)}")
    data = json.loads(body or b"{}")
    if status != 200 or data.get("status") != "success":
        raise AssertionError(f"query {expr!r} failed ({status}): {body[:500]!r}")
    return data["data"]["result"]


def wait_for(what: str, check, timeout: float, interval: float = 1.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def mlflow_auth_server(root: Path, admin_password: str) -> Server:
    """``mlflow server --app-name basic-auth`` (as the chart runs it): SQLite stores, READ by default,
    every request but /health authenticated; the admin's password from the environment."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = admin\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    mlflow = Path(sys.executable).with_name("mlflow")
    s = Server("mlflow-auth", [str(mlflow), "server", "--app-name", "basic-auth",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
               f"http://127.0.0.1:{port}/health", root,
               {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-csrf-key",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, startup_s=240)  # as the chart runs it
    s.url = f"http://127.0.0.1:{port}"
    return s
