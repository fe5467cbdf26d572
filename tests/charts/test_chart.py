"""The Helm chart, rendered offline with Helm's own Go library (helm-python-sdk): it lints clean,
every manifest passes kubernetes-validate --strict (oldest supported and newest Kubernetes) or
its Prometheus Operator CRD schema, and the pieces fit together (selectors, ports, probes,
security contexts, Secrets, the alert route, one source for the rules and the dashboards)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

helm = pytest.importorskip("helm_python")
pytest.importorskip("kubernetes_validate")

from tests.charts.helpers import (  # noqa: E402
    CHART, GPU_VALUES, NAMESPACE, RULES_FILE, by_kind, env_of, kube_versions, labels_match, load_values, manifests,
    one, pod_specs, render, validate, validate_crd, validate_kube,
)

FULL = "kubeseg"  # release "kubeseg": resource names are kubeseg-<component>
SEG, TRIG, MLF, UPLOAD = f"{FULL}-segmentation", f"{FULL}-trigger", f"{FULL}-mlflow", f"{FULL}-pipeline-upload"
REVIEW_PVC = f"{SEG}-review"
REVIEW_MOUNT = "/var/lib/kubeseg/review"



def _settings_env(cls_name: str) -> set[str]:
    """The environment variables services/settings.py reads for one settings class."""
    import inspect

    settings = pytest.importorskip("services.settings")
    source = inspect.getsource(getattr(settings, cls_name).from_env)
    return set(re.findall(r'"((?:KUBESEG|MLFLOW)_[A-Z0-9_]+)"', source))


def _from_env_names(path: str, cls_name: str) -> set[str]:
    """The KUBESEG_* names a class's from_env reads, from its source (no import: services.clinical pulls torch)."""
    import ast
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / path).read_text()
    cls = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ClassDef) and n.name == cls_name)
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "from_env")
    return set(re.findall(r'"(KUBESEG_[A-Z0-9_]+)"', ast.get_source_segment(text, fn)))


# the review queue's and the feedback store's settings (services.clinical, services.review_queue,
# services.review_api, kubeseg.feedback_store)
REVIEW_ENV = (_from_env_names("services/clinical.py", "ClinicalSettings")
              | _from_env_names("services/review_queue.py", "QueueRule")
              | _from_env_names("services/review_api.py", "FeedbackSettings")
              | _from_env_names("kubeseg/feedback_store.py", "RefreshRule"))
# what boto3 (the feedback store's S3 backend) and kubeseg's s3_endpoint read
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"}
# the service's and the trigger's settings, and what the chart adds for a read-only root filesystem
SERVICE_ENV = (_settings_env("ServiceSettings") | _settings_env("AuthSettings") | _settings_env("SigningSettings")
               | REVIEW_ENV | S3_ENV)
TRIGGER_ENV = _settings_env("TriggerSettings") | {"KUBESEG_TRIGGER_AUTH"}  # read by settings._trigger_auth
# MLflow's client reads its account from MLFLOW_TRACKING_USERNAME/PASSWORD
RUNTIME_ENV = {"HOME", "BENTOML_HOME", "MPLCONFIGDIR", "TORCH_HOME", "KUBESEG_IMAGE", "KF_PIPELINES_SA_TOKEN_PATH",
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}

SETUPS = {
    "default": lambda: {},
    "gpu-production": lambda: load_values(GPU_VALUES),
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request):
    values = SETUPS[request.param]()
    return request.param, values, manifests(render(values))


@pytest.fixture(scope="module")
def default_docs():
    return manifests(render({}))


@pytest.fixture(scope="module")
def gpu_docs():
    return manifests(render(load_values(GPU_VALUES)))


def _container(docs, kind, name, container=None):
    spec = one(docs, kind, name)["spec"]["template"]["spec"]
    cs = spec["containers"]
    return cs[0] if container is None else next(c for c in cs if c["name"] == container)


# -- Helm: lint, schema, render ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SETUPS))
def test_lint_is_clean(name):
    values = SETUPS[name]()
    for version in kube_versions():
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{version}.0")
        assert report["errors"] == [] and report["messages"] == [], (version, report)


def test_values_schema_accepts_the_shipped_values_and_rejects_mistakes():
    with helm.Chart.load(CHART) as chart:
        assert chart.schema is not None
        chart.validate_schema({})
        chart.validate_schema(load_values(GPU_VALUES))
        for bad, where in [
            ({"segmentation": {"replicaCount": "two"}}, "replicaCount"),
            ({"segmentation": {"replicas": 2}}, "replicas"),  # a typo of replicaCount
            ({"segmentation": {"device": "gpu"}}, "device"),
            ({"mlflow": {"backendStore": {"password": "hunter2"}}}, "password"),  # credentials only from Secrets
            ({"trigger": {"mode": "remote"}}, "mode"),
            ({"monitoring": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
            ({"mlflow": {"artifactStore": {"destination": "/data/artifacts"}}}, "destination"),
            # the feedback store's key only from its Secret
            ({"segmentation": {"review": {"feedbackStoreSecretAccessKey": "hunter2"}}}, "feedbackStoreSecretAccessKey"),
            ({"segmentation": {"review": {"queue": {"persistence": {"accessModes": ["RWX"]}}}}}, "accessModes"),
            ({"segmentation": {"review": {"rule": {"confidenceBelow": 2}}}}, "confidenceBelow"),
        ]:
            with pytest.raises(helm.HelmValuesError, match=where):
                chart.validate_schema(bad)


def test_default_render_has_every_component(default_docs):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    for expected in [("Deployment", SEG), ("Service", SEG), ("HorizontalPodAutoscaler", SEG),
                     ("PodDisruptionBudget", SEG), ("NetworkPolicy", SEG),
                     ("Deployment", TRIG), ("Service", TRIG), ("AlertmanagerConfig", TRIG), ("NetworkPolicy", TRIG),
                     ("Deployment", MLF), ("Service", MLF), ("NetworkPolicy", MLF),
                     ("Job", UPLOAD), ("ConfigMap", UPLOAD),
                     ("ServiceMonitor", SEG), ("ServiceMonitor", TRIG), ("ServiceMonitor", MLF),
                     ("PrometheusRule", FULL), ("ServiceAccount", FULL),
                     ("ConfigMap", f"{FULL}-dashboard-serving"), ("ConfigMap", f"{FULL}-dashboard-drift-quality")]:
        assert expected in kinds, expected
    assert not by_kind(default_docs, "Ingress")  # optional, off by default
    assert not by_kind(default_docs, "PersistentVolumeClaim")  # the trigger's and the review queue's: off
    assert not by_kind(default_docs, "Secret")  # credentials are never rendered
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in default_docs)


def test_gpu_production_render_has_ingresses_and_a_volume(gpu_docs):
    assert {i["metadata"]["name"] for i in by_kind(gpu_docs, "Ingress")} == {SEG, MLF}
    assert one(gpu_docs, "PersistentVolumeClaim", TRIG)
    assert one(gpu_docs, "PersistentVolumeClaim", REVIEW_PVC)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not by_kind(gpu_docs, "Secret")


# -- schemas: Kubernetes (strict) and the Prometheus Operator's CRDs -------------------------------

def test_every_manifest_validates(setup):
    name, _, docs = setup
    versions = kube_versions()
    used = {"crd": set(), "kubernetes": set()}
    for doc in docs:
        used[validate(doc, versions)].add(doc["kind"])
    assert used["crd"] == {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"}, used
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Job",
            "ConfigMap", "ServiceAccount"} <= used["kubernetes"], used


def test_the_validators_reject_broken_objects(default_docs):
    """The checks above are only worth something if they fail on mistakes."""
    version = kube_versions()[-1]
    dep = json.loads(json.dumps(one(default_docs, "Deployment", SEG)))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # wrong case: unknown field
    with pytest.raises(AssertionError, match="readinessprobe"):
        validate_kube(dep, version)

    broken = [
        ("ServiceMonitor", SEG, lambda d: d["spec"]["endpoints"][0].update(intervall="30s"), "intervall"),
        ("ServiceMonitor", SEG, lambda d: d["spec"]["endpoints"][0].update(interval="30 s"), "does not match"),
        ("ServiceMonitor", SEG, lambda d: d["spec"].pop("selector"), "selector"),
        ("PrometheusRule", FULL, lambda d: d["spec"]["groups"][0]["rules"][0].update({"for": "a minute"}), "a minute"),
        ("PrometheusRule", FULL, lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr"), "expr"),
        ("AlertmanagerConfig", TRIG, lambda d: d["spec"]["route"]["matchers"][0].update(matchType="=="), "=="),
        ("AlertmanagerConfig", TRIG, lambda d: d["spec"]["receivers"][0]["webhookConfigs"][0].update(uri="x"), "uri"),
    ]
    for kind, name, breaks, message in broken:
        doc = json.loads(json.dumps(one(default_docs, kind, name)))
        validate_crd(doc)
        breaks(doc)
        with pytest.raises(AssertionError, match=message):
            validate_crd(doc)


# -- monitoring: one source for the rules; the route to the trigger -------------------------------

def test_prometheusrule_is_the_rule_file(setup):
    _, _, docs = setup
    rules = yaml.safe_load(RULES_FILE.read_text())
    rule = one(docs, "PrometheusRule", FULL)
    assert rule["spec"] == rules  # embedded as it is, nothing added or lost
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    annotations = [r["annotations"]["description"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("{{ $labels.check }}" in a for a in annotations)  # not templated by Helm


def test_rules_are_not_copied_anywhere_in_the_chart():
    template = (CHART / "templates" / "monitoring" / "prometheusrule.yaml").read_text()
    assert '.Files.Get "files/prometheus-rules.yaml"' in template
    alerts = [r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    for path in CHART.rglob("*"):
        if path.is_file() and path != RULES_FILE and path.suffix in (".yaml", ".yml", ".tpl", ".json"):
            text = path.read_text()
            assert not any(f"alert: {a}" in text for a in alerts), f"{path} copies an alert rule"


def _matches(matchers, labels):
    ops = {"=": lambda v, x: x == v, "!=": lambda v, x: x != v}
    return all(ops[m.get("matchType", "=")](m.get("value", ""), labels.get(m["name"], "")) for m in matchers)


def test_alertmanagerconfig_routes_retrain_alerts_to_the_trigger(setup):
    _, _, docs = setup
    amc = one(docs, "AlertmanagerConfig", TRIG)["spec"]
    route, receivers = amc["route"], {r["name"]: r for r in amc["receivers"]}
    assert route["receiver"] in receivers
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    retrain = {r["alert"] for r in rules if _matches(route["matchers"], r.get("labels", {}))}
    assert retrain == {r["alert"] for r in rules if r.get("labels", {}).get("kubeseg_action") == "retrain"}
    assert "KubesegInputDrift" in retrain and "KubesegHighErrorRate" not in retrain
    # the webhook is the trigger's Service, its port, POST /alerts
    (hook,) = receivers[route["receiver"]]["webhookConfigs"]
    svc = one(docs, "Service", TRIG)
    (port,) = svc["spec"]["ports"]
    assert hook["url"] == f"http://{TRIG}.{NAMESPACE}.svc:{port['port']}/alerts"
    container = _container(docs, "Deployment", TRIG)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port["targetPort"]] == 8090


def test_rollback_alerts_route_to_the_trigger_and_approval_is_rendered(setup):
    """Production values: promotions wait for approval, rollback alerts reach the trigger, which
    holds the account that may move the alias; dev values: auto-promotion."""
    name, _, docs = setup
    amc = one(docs, "AlertmanagerConfig", f"{TRIG}-rollback")["spec"]
    route, receivers = amc["route"], {r["name"]: r for r in amc["receivers"]}
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    rollback = {r["alert"] for r in rules if _matches(route["matchers"], r.get("labels", {}))}
    assert rollback == {"KubesegNewVersionErrors", "KubesegNewVersionQAFlags", "KubesegNewVersionLatency",
                        "KubesegNewVersionVolumeDrift"}
    # every rollback rule labels its alert with the served version, which the trigger compares with the champion
    for r in rules:
        if r["alert"] in rollback:
            assert "group_left (name, version, semver)" in r["expr"], r["alert"]
    retrain_route = one(docs, "AlertmanagerConfig", TRIG)["spec"]["route"]
    assert not rollback & {r["alert"] for r in rules if _matches(retrain_route["matchers"], r.get("labels", {}))}
    assert set(route["groupBy"]) >= {"alertname", "version"}
    (hook,) = receivers[route["receiver"]]["webhookConfigs"]
    assert hook["url"].endswith(f"{TRIG}.{NAMESPACE}.svc:8090/alerts")
    assert hook["httpConfig"]["authorization"]["credentials"]["name"] == "kubeseg-trigger-webhook"
    trig = env_of(_container(docs, "Deployment", TRIG))
    assert trig["KUBESEG_PROMOTION_APPROVAL"] == "required", name  # default and GPU production values
    assert trig["KUBESEG_ROLLBACK"] == "enabled" and float(trig["KUBESEG_ROLLBACK_WINDOW_SECONDS"]) == 3600
    assert trig["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"]["name"] == "mlflow-pipeline"  # may move the alias


def test_dev_values_promote_automatically_and_rollback_can_be_switched_off():
    dev = manifests(render(load_values(CHART / "values-dev.yaml")))
    assert env_of(_container(dev, "Deployment", TRIG))["KUBESEG_PROMOTION_APPROVAL"] == "auto"
    off = manifests(render({"trigger": {"rollback": {"enabled": False, "windowSeconds": 600}}}))
    trig = env_of(_container(off, "Deployment", TRIG))
    assert trig["KUBESEG_ROLLBACK"] == "disabled"
    assert trig["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"]["name"] == "mlflow-reader"  # read-only again
    assert not [d for d in off if d["kind"] == "AlertmanagerConfig" and d["metadata"]["name"].endswith("-rollback")]
    with pytest.raises(Exception, match="promotionApproval"):
        render({"trigger": {"promotionApproval": "sometimes"}})


def test_servicemonitors_scrape_metrics_of_existing_services(setup):
    _, _, docs = setup
    services = by_kind(docs, "Service")
    for sm in by_kind(docs, "ServiceMonitor"):
        selector = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in services if labels_match(selector, s["metadata"]["labels"])]
        assert len(targets) == 1, (sm["metadata"]["name"], [s["metadata"]["name"] for s in targets])
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [targets[0]["metadata"]["namespace"]]
        ports = {p["name"] for p in targets[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in ports and ep["path"] == "/metrics"
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboards_are_configmaps_for_grafanas_sidecar(setup):
    _, _, docs = setup
    files = {p.name: json.loads(p.read_text()) for p in (CHART / "dashboards").glob("*.json")}
    assert set(files) == {"serving.json", "drift-quality.json"}
    seen = {}
    for cm in by_kind(docs, "ConfigMap"):
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            for key, text in cm["data"].items():
                seen[key] = json.loads(text)
            assert cm["metadata"]["annotations"]["grafana_folder"] == "kubeseg"
    assert seen == files


# -- workloads: services, probes, security, environment --------------------------------------------

def test_services_and_networkpolicies_select_the_pods(setup):
    _, _, docs = setup
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in by_kind(docs, "Deployment")}
    for svc in by_kind(docs, "Service"):
        name = svc["metadata"]["name"]
        template = pods[name]
        assert labels_match(svc["spec"]["selector"], template["metadata"]["labels"]), name
        names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert all(p["targetPort"] in names for p in svc["spec"]["ports"]), name
    templates = _pod_templates(docs)
    for np in by_kind(docs, "NetworkPolicy"):
        name = np["metadata"]["name"]
        selected = [t for t in templates.values()
                    if labels_match(np["spec"]["podSelector"]["matchLabels"], t["metadata"]["labels"])]
        assert selected, f"{name} selects no pod"
        for t in selected:
            ports = {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
            for rule in np["spec"].get("ingress", []):
                assert {p["port"] for p in rule["ports"]} <= ports, name
    # the service and the trigger may reach MLflow's pods
    mlflow_labels = pods[MLF]["metadata"]["labels"]
    for name in (SEG, TRIG):
        egress = one(docs, "NetworkPolicy", name)["spec"]["egress"]
        assert any(labels_match(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), mlflow_labels)
                   for rule in egress for peer in rule.get("to", [])), name


def _pod_templates(docs) -> dict:
    """Every pod template of the release (Deployments and Jobs), by object name."""
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "Job")}


def test_every_pod_is_denied_by_default_and_allowed_only_named_peers(setup):
    _, _, docs = setup
    policies = by_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if not p["spec"].get("ingress") and not p["spec"].get("egress")
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}]
    for name, template in _pod_templates(docs).items():
        labels = template["metadata"]["labels"]
        assert any(labels_match(p["spec"]["podSelector"]["matchLabels"], labels) for p in deny), f"{name}: no default deny"
        own = [p for p in policies if p not in deny and labels_match(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert own, f"{name}: no policy names its peers"
        for p in own:
            assert set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}, p["metadata"]["name"]
            for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", []):
                peers = rule.get("from", rule.get("to", []))
                # no rule opens everything: each names peers, or (egress to stores) names ports
                assert peers or rule.get("ports"), (p["metadata"]["name"], rule)
                for peer in peers:
                    assert peer.get("podSelector") is not None or peer.get("namespaceSelector", {}).get("matchLabels"), \
                        (p["metadata"]["name"], peer)
    seg = one(policies, "NetworkPolicy", SEG)["spec"]
    sources = [peer for rule in seg["ingress"] for peer in rule["from"]]
    assert {"kubernetes.io/metadata.name": "monitoring"} in [s.get("namespaceSelector", {}).get("matchLabels") for s in sources]
    assert all("podSelector" in s for s in sources if s.get("namespaceSelector", {}).get("matchLabels", {}).get(
        "kubernetes.io/metadata.name") == "monitoring")  # Prometheus pods, not the whole namespace


def test_authentication_and_signatures_are_on_by_default(setup):
    name, _, docs = setup
    seg = env_of(_container(docs, "Deployment", SEG))
    assert "KUBESEG_AUTH" not in seg and "KUBESEG_MODEL_SIGNATURES" not in seg  # the programs' default: on
    assert seg["KUBESEG_API_KEYS_FILE"].startswith("/etc/kubeseg/api-keys/")
    assert seg["KUBESEG_MODEL_PUBLIC_KEY"].startswith("/etc/kubeseg/model-signing/")
    assert seg["MLFLOW_TRACKING_USERNAME"]["secretKeyRef"] == {"name": "mlflow-reader", "key": "username"}
    mlflow_monitor = one(docs, "ServiceMonitor", MLF)["spec"]["endpoints"][0]
    assert mlflow_monitor["basicAuth"]["password"] == {"name": "mlflow-reader", "key": "password"}
    trig = env_of(_container(docs, "Deployment", TRIG))
    assert "KUBESEG_TRIGGER_AUTH" not in trig and trig["KUBESEG_TRIGGER_TOKEN_FILE"].startswith("/etc/kubeseg/webhook/")
    mlflow = _container(docs, "Deployment", MLF)
    assert "--app-name basic-auth" in " ".join(mlflow["command"])
    webhook = by_kind(docs, "AlertmanagerConfig")[0]["spec"]["receivers"][0]["webhookConfigs"][0]
    assert webhook["httpConfig"]["authorization"]["credentials"] == {"name": "kubeseg-trigger-webhook", "key": "token"}
    assert one(docs, "Job", f"{MLF}-accounts")


def test_dev_values_switch_authentication_off_explicitly():
    docs = manifests(render(load_values(CHART / "values-dev.yaml")))
    seg = env_of(_container(docs, "Deployment", SEG))
    assert seg["KUBESEG_AUTH"] == "disabled" and seg["KUBESEG_MODEL_SIGNATURES"] == "disabled"
    assert env_of(_container(docs, "Deployment", TRIG))["KUBESEG_TRIGGER_AUTH"] == "disabled"
    assert _container(docs, "Deployment", MLF)["command"] == ["mlflow", "server"]
    assert not [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].endswith("-accounts")]
    with pytest.raises(Exception, match="apiKeysSecret"):  # on, but without any credential source: refused
        render({"security": {"service": {"apiKeysSecret": ""}}})


def test_pods_run_as_non_root_with_a_read_only_root_filesystem(setup):
    _, _, docs = setup
    specs = pod_specs(docs)
    assert len(specs) == 5  # segmentation, trigger, MLflow, upload Job, MLflow accounts Job
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root filesystem needs a writable /tmp"
            assert set(mounts.values()) <= volumes, where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where


def test_segmentation_service_container(setup):
    name, values, docs = setup
    dep = one(docs, "Deployment", SEG)
    c = _container(docs, "Deployment", SEG)
    assert c["command"] == ["bentoml", "serve", "services.service:Segmentation"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 3000}
    assert c["args"][-2:] == ["--port", "3000"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    env = env_of(c)
    assert set(env) <= SERVICE_ENV | RUNTIME_ENV, set(env) - SERVICE_ENV - RUNTIME_ENV
    assert env["MLFLOW_TRACKING_URI"] == f"http://{MLF}.{NAMESPACE}.svc:5000"
    assert env["KUBESEG_MODEL_NAME"] == "kubeseg-segmentation" and env["KUBESEG_MODEL_ALIAS"] == "champion"
    assert "KUBESEG_MODEL_BUNDLE" not in env  # the service refuses both a bundle and a registry name
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert env["KUBESEG_CACHE_DIR"] in mounts
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # a swap never drops capacity
    hpa = one(docs, "HorizontalPodAutoscaler", SEG)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SEG}
    assert "replicas" not in dep["spec"]  # the HPA owns the replica count
    pdb = one(docs, "PodDisruptionBudget", SEG)
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])


def test_cpu_and_gpu_variants(default_docs, gpu_docs):
    cpu = _container(default_docs, "Deployment", SEG)
    assert env_of(cpu)["KUBESEG_DEVICE"] == "auto"
    assert not any("gpu" in k for k in cpu["resources"].get("limits", {}))
    assert "tolerations" not in one(default_docs, "Deployment", SEG)["spec"]["template"]["spec"]

    gpu = _container(gpu_docs, "Deployment", SEG)
    pod = one(gpu_docs, "Deployment", SEG)["spec"]["template"]["spec"]
    assert env_of(gpu)["KUBESEG_DEVICE"] == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # large numbers stay integers (Helm reads numbers as float64)
    assert env_of(gpu)["KUBESEG_MAX_REQUEST_BYTES"] == "1073741824"
    hpa = one(gpu_docs, "HorizontalPodAutoscaler", SEG)["spec"]
    assert hpa["minReplicas"] == 2
    assert [m["type"] for m in hpa["metrics"]] == ["Pods"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "kubeseg_inflight_requests"
    assert one(gpu_docs, "PodDisruptionBudget", SEG)["spec"] == {
        "minAvailable": 1, "selector": one(gpu_docs, "PodDisruptionBudget", SEG)["spec"]["selector"]}
    ing = one(gpu_docs, "Ingress", SEG)["spec"]
    assert ing["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": SEG, "port": {"number": 3000}}
    assert ing["tls"][0]["hosts"] == ["segment.example.org"]


def test_trigger_container(setup):
    name, values, docs = setup
    dep = one(docs, "Deployment", TRIG)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    c = _container(docs, "Deployment", TRIG)
    assert c["command"] == ["python", "-m", "services.trigger"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    env = env_of(c)
    assert set(env) <= TRIGGER_ENV | RUNTIME_ENV, set(env) - TRIGGER_ENV - RUNTIME_ENV
    assert env["KUBESEG_TRIGGER_MODE"] == "cluster"
    assert env["KUBESEG_KFP_HOST"] == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
    state = {m["mountPath"] for m in c["volumeMounts"]}
    for path in (env["KUBESEG_TRIGGER_AUDIT_LOG"], env["KUBESEG_RETRAIN_WORK_DIR"]):
        assert any(path.startswith(m + "/") for m in state), path
    if name == "gpu-production":
        assert env["KUBESEG_RETRAIN_DATASET"].startswith("s3://")
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["state"]["persistentVolumeClaim"]["claimName"] == TRIG


def test_mlflow_credentials_come_from_secrets_only(setup):
    _, values, docs = setup
    c = _container(docs, "Deployment", MLF)
    env = {e["name"]: e for e in c["env"]}
    for name in ("MLFLOW_PG_USER", "MLFLOW_PG_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert env["MLFLOW_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgresql"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-s3"
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql+psycopg2://$(MLFLOW_PG_USER):$(MLFLOW_PG_PASSWORD)@")  # expanded by the kubelet
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    # MLflow's basic-auth app (security.auth): its user store and admin also from a Secret
    assert c["command"][:2] == ["sh", "-c"] and "exec mlflow server --app-name basic-auth" in c["command"][2]
    assert "--serve-artifacts" in c["args"]
    for name in ("KUBESEG_MLFLOW_AUTH_DB_URI", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin", name
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{MLF}.{NAMESPACE}.svc:*" in allowed  # the tracking URI's Host header
    for ing in by_kind(docs, "Ingress"):
        if ing["metadata"]["name"] == MLF:
            assert all(r["host"] in allowed for r in ing["spec"]["rules"])
    # no credential anywhere in plain text
    for doc in docs:
        text = yaml.safe_dump(doc)
        assert "hunter2" not in text and "AWS_SECRET_ACCESS_KEY: " not in text


def test_mlflow_whole_uri_from_a_secret_and_external_mlflow():
    docs = manifests(render({"mlflow": {"backendStore": {"uriKey": "uri"}}}))
    env = {e["name"]: e for e in _container(docs, "Deployment", MLF)["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgresql", "key": "uri"}
    assert "MLFLOW_PG_PASSWORD" not in env

    docs = manifests(render({"mlflow": {"enabled": False, "externalTrackingUri": "https://mlflow.example.org"}}))
    assert not [d for d in docs if d["metadata"]["name"] == MLF]
    assert env_of(_container(docs, "Deployment", SEG))["MLFLOW_TRACKING_URI"] == "https://mlflow.example.org"
    with pytest.raises(helm.HelmRenderError, match="externalTrackingUri"):
        render({"mlflow": {"enabled": False}})


def test_model_bundle_instead_of_the_registry():
    docs = manifests(render({"model": {"bundle": "/models/bundle"}}))
    env = env_of(_container(docs, "Deployment", SEG))
    assert env["KUBESEG_MODEL_BUNDLE"] == "/models/bundle"
    assert "KUBESEG_MODEL_NAME" not in env


def test_pipeline_upload_job(setup):
    _, values, docs = setup
    job = one(docs, "Job", UPLOAD)
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install,post-upgrade"
    assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    c = spec["containers"][0]
    assert c["command"] == ["python", "/opt/kubeseg-upload/upload_pipeline.py"]
    env = env_of(c)
    assert env["KUBESEG_PIPELINE_VERSION"] == "0.1.0-r1"
    assert env["KUBESEG_IMAGE"] == c["image"]  # the pipeline's tasks run this release's image
    cm = one(docs, "ConfigMap", UPLOAD)
    assert cm["data"]["upload_pipeline.py"] == (CHART / "files" / "upload_pipeline.py").read_text().rstrip("\n")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/opt/kubeseg-upload")
    assert volumes[mount["name"]]["configMap"]["name"] == UPLOAD


def test_kubeflow_multi_user_token():
    docs = manifests(render({"kubeflow": {"serviceAccountToken": {"enabled": True}}}))
    for kind, name in (("Deployment", TRIG), ("Job", UPLOAD)):
        spec = one(docs, kind, name)["spec"]["template"]["spec"]
        (token,) = [v for v in spec["volumes"] if v["name"] == "kfp-token"]
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
        c = spec["containers"][0]
        assert env_of(c)["KF_PIPELINES_SA_TOKEN_PATH"] == "/var/run/secrets/kubeflow/pipelines/token"
        validate(one(docs, kind, name), kube_versions())


def test_everything_off_still_renders():
    off = {"segmentation": {"enabled": False}, "trigger": {"enabled": False}, "mlflow": {"enabled": False,
           "externalTrackingUri": "http://mlflow:5000"}, "pipelineUpload": {"enabled": False},
           "monitoring": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                          "dashboards": {"enabled": False}}, "networkPolicy": {"enabled": False}}
    docs = manifests(render(off))
    assert [d["kind"] for d in docs] == ["ServiceAccount"]


def test_long_release_names_stay_within_kubernetes_limits():
    name = "a-very-long-release-name-for-kubeseg-xx"  # 39 characters, Helm allows 53
    docs = manifests(render({}, name=name))
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    for doc in docs:
        validate(doc, kube_versions()[-1:])


def test_every_setting_the_chart_can_pass_is_one_the_programs_read():
    assert {"KUBESEG_MODEL_NAME", "KUBESEG_CACHE_DIR", "KUBESEG_DRIFT_WINDOW"} <= SERVICE_ENV
    assert {"KUBESEG_TRIGGER_MODE", "KUBESEG_RETRAIN_DATASET", "KUBESEG_TRIGGER_AUDIT_LOG"} <= TRIGGER_ENV
    everything = {
        "segmentation": {"settings": {"maxConcurrency": 2, "maxRequestBytes": 10, "maxVoxels": 10,
                                      "registryPollSeconds": 5, "driftWindow": 3, "minSize": 2, "tta": False,
                                      "step": 0.5, "driftThresholds": {"intensity": 1, "spacing": 1, "shape": 1}}},
        "trigger": {"cooldownSeconds": 10, "retrainDataset": "s3://b/d", "retrainNewCases": "s3://b/n",
                    "retrainMode": "retrain", "retrainSchedule": "short"},
    }
    docs = manifests(render(everything))
    seg = env_of(_container(docs, "Deployment", SEG))
    assert set(seg) <= SERVICE_ENV | RUNTIME_ENV, set(seg) - SERVICE_ENV - RUNTIME_ENV
    assert seg["KUBESEG_TTA"] == "false" and seg["KUBESEG_STEP"] == "0.5" and seg["KUBESEG_MAX_CONCURRENCY"] == "2"
    trig = env_of(_container(docs, "Deployment", TRIG))
    assert set(trig) <= TRIGGER_ENV | RUNTIME_ENV, set(trig) - TRIGGER_ENV - RUNTIME_ENV
    assert trig["KUBESEG_RETRAIN_MODE"] == "retrain" and trig["KUBESEG_TRIGGER_COOLDOWN_SECONDS"] == "10"


# -- the review queue and the feedback store ---------------------------------------------------------

def _seg_pod(docs):
    return one(docs, "Deployment", SEG)["spec"]["template"]["spec"]


def _notes(values):
    return next(t for p, t in render(values).items() if p.endswith("NOTES.txt"))


def test_review_queue_on_a_shared_volume_is_mounted_writable_and_configured():
    values = {"segmentation": {"review": {
        "queue": {"maxItems": 500, "maxBytes": 4294967296, "persistence": {"enabled": True, "size": "7Gi",
                                                                          "storageClassName": "nfs-locking"}},
        "rule": {"lowestPercent": 5, "window": 100, "minWindow": 10, "confidenceBelow": 0.6},
        "feedbackBatchSize": 10, "feedbackMinCorrectedFraction": 0.5}}}
    docs = manifests(render(values))
    pvc = one(docs, "PersistentVolumeClaim", REVIEW_PVC)
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs-locking",
                           "resources": {"requests": {"storage": "7Gi"}}}
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = _seg_pod(docs)
    c = _container(docs, "Deployment", SEG)
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == REVIEW_MOUNT]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume == {"name": mount["name"], "persistentVolumeClaim": {"claimName": REVIEW_PVC}}
    # writable under the read-only root: a read-write mount, group-owned through the pod's fsGroup
    assert not mount.get("readOnly") and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["fsGroup"] == c["securityContext"]["runAsGroup"]
    env = env_of(c)
    assert env["KUBESEG_REVIEW_QUEUE_DIR"] == f"{REVIEW_MOUNT}/queue"
    assert set(env) <= SERVICE_ENV | RUNTIME_ENV, set(env) - SERVICE_ENV - RUNTIME_ENV
    for doc in (pvc, one(docs, "Deployment", SEG)):
        validate(doc, kube_versions())
    # the programs read what the chart passes (the settings classes themselves, on the rendered strings)
    from services.clinical import ClinicalSettings
    from services.review_api import FeedbackSettings

    clinical = ClinicalSettings.from_env(env)
    assert str(clinical.review_queue_dir) == f"{REVIEW_MOUNT}/queue"
    assert (clinical.review_queue_max, clinical.review_queue_max_bytes) == (500, 4294967296)
    rule = clinical.review_rule
    assert (rule.lowest_percent, rule.window, rule.min_window, rule.below) == (5.0, 100, 10, 0.6)
    feedback = FeedbackSettings.from_env(env)
    assert (feedback.rule.batch_size, feedback.rule.min_corrected_fraction) == (10, 0.5)
    assert "shared by up to 4 pods" in _notes(values) and "flock(2)" in _notes(values)


def test_review_queue_on_an_existing_claim_renders_no_claim():
    docs = manifests(render({"segmentation": {"review": {"queue": {"persistence": {
        "enabled": True, "existingClaim": "review-nfs"}}}}}))
    assert not by_kind(docs, "PersistentVolumeClaim")
    volume = next(v for v in _seg_pod(docs)["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": "review-nfs"}
    assert env_of(_container(docs, "Deployment", SEG))["KUBESEG_REVIEW_QUEUE_DIR"] == f"{REVIEW_MOUNT}/queue"


def test_review_queue_without_persistence_is_on_tmp_and_notes_warn(default_docs):
    c = _container(default_docs, "Deployment", SEG)
    env = env_of(c)
    assert env["KUBESEG_REVIEW_QUEUE_DIR"] == "/tmp/kubeseg-review-queue"  # explicit, on the /tmp emptyDir
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in _seg_pod(default_docs)["volumes"] if v["name"] == tmp["name"])
    assert REVIEW_MOUNT not in {m["mountPath"] for m in c["volumeMounts"]}
    assert not {"KUBESEG_REVIEW_QUEUE_MAX", "KUBESEG_REVIEW_WINDOW", "KUBESEG_FEEDBACK_STORE"} & set(env)  # unset
    notes = _notes({})  # autoscaling on, up to 4 pods: each has its own queue
    assert "the review queue is on each pod's /tmp" in notes and "up to 4 replicas has its own queue" in notes
    assert "feedbackStore is not set" in notes
    one_pod = _notes({"segmentation": {"autoscaling": {"enabled": False}, "replicaCount": 1}})
    assert "the review queue is on each pod's /tmp" in one_pod and "has its own queue" not in one_pod
    docs = manifests(render(load_values(CHART / "values-dev.yaml")))  # dev stays on /tmp
    assert not by_kind(docs, "PersistentVolumeClaim")
    assert env_of(_container(docs, "Deployment", SEG))["KUBESEG_REVIEW_QUEUE_DIR"] == "/tmp/kubeseg-review-queue"


def test_a_read_write_once_queue_volume_is_refused_for_several_replicas():
    rwo = {"enabled": True, "accessModes": ["ReadWriteOnce"]}
    for scaling in ({}, {"autoscaling": {"enabled": False}, "replicaCount": 2}):  # HPA up to 4, or 2 replicas
        with pytest.raises(helm.HelmRenderError, match="no ReadWriteMany: a ReadWriteOnce volume cannot be mounted"):
            render({"segmentation": dict(scaling, review={"queue": {"persistence": rwo}})})
    single = {"autoscaling": {"enabled": False}, "replicaCount": 1, "review": {"queue": {"persistence": rwo}}}
    docs = manifests(render({"segmentation": single}))
    assert one(docs, "PersistentVolumeClaim", REVIEW_PVC)["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_feedback_store_on_s3_takes_its_key_from_a_secret_only():
    store = {"feedbackStore": "s3://feedback/kubeseg", "feedbackStoreSecret": "feedback-s3",
             "feedbackStoreEndpointUrl": "http://minio.kubeseg.svc:9000", "feedbackStoreRegion": "eu-west-1"}
    docs = manifests(render({"segmentation": {"review": store}}))
    c = _container(docs, "Deployment", SEG)
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBESEG_FEEDBACK_STORE"]["value"] == "s3://feedback/kubeseg"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "feedback-s3"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.kubeseg.svc:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    # the endpoint names are the ones kubeseg's S3 code reads
    import inspect

    from kubeseg.training import checkpoint_store

    source = inspect.getsource(checkpoint_store.s3_endpoint)
    assert '"AWS_ENDPOINT_URL_S3"' in source and '"AWS_ENDPOINT_URL"' in source
    assert not by_kind(docs, "Secret")
    validate(one(docs, "Deployment", SEG), kube_versions())
    # the NetworkPolicy lets the service reach the store; without an S3 store it does not
    egress = one(docs, "NetworkPolicy", SEG)["spec"]["egress"]
    assert {"protocol": "TCP", "port": 9000} in [p for rule in egress for p in rule.get("ports", [])]
    default_egress = one(manifests(render({})), "NetworkPolicy", SEG)["spec"]["egress"]
    assert len(egress) == len(default_egress) + 1
    assert "feedbackStore is not set" not in _notes({"segmentation": {"review": store}})
    with pytest.raises(helm.HelmRenderError, match="feedbackStoreSecret"):
        render({"segmentation": {"review": {"feedbackStore": "s3://feedback/kubeseg"}}})


def test_feedback_store_folder_must_be_on_a_writable_volume():
    ok = {"queue": {"persistence": {"enabled": True}}, "feedbackStore": f"{REVIEW_MOUNT}/feedback"}
    env = env_of(_container(manifests(render({"segmentation": {"review": ok}})), "Deployment", SEG))
    assert env["KUBESEG_FEEDBACK_STORE"] == f"{REVIEW_MOUNT}/feedback"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    for bad in ("/data/feedback", f"{REVIEW_MOUNT}/queue/feedback", "gs://bucket/feedback"):
        with pytest.raises(helm.HelmRenderError, match="feedbackStore"):
            render({"segmentation": {"review": dict(ok, feedbackStore=bad)}})
    with pytest.raises(helm.HelmRenderError, match="read-only"):  # the volume only exists with persistence
        render({"segmentation": {"review": {"feedbackStore": f"{REVIEW_MOUNT}/feedback"}}})


def test_production_values_share_the_review_queue_and_store_reviews_in_s3(gpu_docs):
    c = _container(gpu_docs, "Deployment", SEG)
    env = env_of(c)
    assert env["KUBESEG_REVIEW_QUEUE_DIR"] == f"{REVIEW_MOUNT}/queue"
    assert env["KUBESEG_FEEDBACK_STORE"].startswith("s3://")
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "kubeseg-feedback-s3"
    # the queue's byte bound fits in its volume
    pvc = one(gpu_docs, "PersistentVolumeClaim", REVIEW_PVC)
    size = pvc["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi") and int(env["KUBESEG_REVIEW_QUEUE_MAX_BYTES"]) < int(size[:-2]) * 2 ** 30
