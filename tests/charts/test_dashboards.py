"""The Grafana dashboards: every panel has a query, every query is valid PromQL (promtool parses
it as a recording rule), and uses only the metrics and labels the service and the trigger export.
Running the queries against a Prometheus that scraped the real service is tests/services' part
(through tests.charts.dashboards.panel_queries)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.charts.dashboards import dashboard_paths, panel_queries, panels, substitute, variable_queries

# The metrics the service (services/metrics.py) and the trigger (services/trigger.py) export:
# name -> (type, labels). Prometheus adds the target labels below.
METRICS = {
    "kubeseg_requests_total": ("counter", {"endpoint", "status"}),
    "kubeseg_request_duration_seconds": ("histogram", {"endpoint"}),
    "kubeseg_stage_duration_seconds": ("histogram", {"stage"}),
    "kubeseg_input_voxels": ("histogram", set()),
    "kubeseg_predicted_volume_ml": ("histogram", {"label"}),
    "kubeseg_prediction_confidence": ("histogram", set()),
    "kubeseg_drift_score": ("gauge", {"check"}),
    "kubeseg_drift_window_score": ("gauge", {"check"}),
    "kubeseg_drift_threshold": ("gauge", {"check"}),
    "kubeseg_drift_inputs_total": ("counter", {"check", "result"}),
    "kubeseg_model_info": ("gauge", {"name", "version", "alias", "semver"}),
    "kubeseg_model_version": ("gauge", set()),
    "kubeseg_model_swaps_total": ("counter", {"result"}),
    "kubeseg_inflight_requests": ("gauge", set()),
    "kubeseg_gpu_memory_bytes": ("gauge", {"device", "kind"}),
    "kubeseg_trigger_alerts_total": ("counter", {"alertname", "status"}),
    "kubeseg_retraining_runs_started_total": ("counter", {"alertname"}),
    "kubeseg_trigger_suppressed_total": ("counter", {"reason"}),
    "kubeseg_trigger_failures_total": ("counter", set()),
    "kubeseg_trigger_last_run_timestamp_seconds": ("gauge", set()),
    "kubeseg_qa_flags_total": ("counter", {"flag"}),
    "kubeseg_review_queued_total": ("counter", set()),
    "kubeseg_review_queue_length": ("gauge", set()),
    "kubeseg_reviews_total": ("counter", {"outcome", "model_version"}),
    "kubeseg_auth_refusals_total": ("counter", set()),
    "kubeseg_model_signature_refusals_total": ("counter", set()),
    "kubeseg_trigger_refused_total": ("counter", {"status"}),
    "kubeseg_trigger_rollbacks_total": ("counter", {"outcome"}),
}
# job and instance from Prometheus; the rest from the Prometheus Operator's ServiceMonitor relabeling
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}

VARIABLES = {"namespace": "kubeseg", "model": "kubeseg-segmentation", "datasource": "prometheus"}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
            "inf", "nan"}


def series_names() -> dict[str, set[str]]:
    """Every series name a scrape yields -> the labels it may carry."""
    out = {}
    for name, (kind, labels) in METRICS.items():
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = set(labels)
        else:
            out[name] = set(labels)
    return {k: v | TARGET_LABELS for k, v in out.items()}


def analyse(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """A small PromQL reader, enough for these dashboards: (metric names, labels matched per
    metric, labels named in by/on/... clauses). promtool checks the syntax separately."""
    matchers: dict[str, set[str]] = {}
    names: set[str] = set()
    rest = expr
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", expr):
        metric, body = m.group(1), m.group(2)
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)))
        if metric and metric not in KEYWORDS:
            names.add(metric)
            matchers.setdefault(metric, set()).update(labels)
    rest = re.sub(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{[^}]*\}", " ", rest)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    grouping = set()
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", rest):
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", rest):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS or re.fullmatch(r"[0-9.e+-]+", word):
            continue
        names.add(word)
    return names, matchers, grouping


def test_analyse_reads_metric_names_and_labels():
    names, matchers, grouping = analyse(
        'histogram_quantile(0.9, sum by (le, stage) (rate(kubeseg_stage_duration_seconds_bucket{namespace=~"a|b", '
        'stage!="x"}[5m]) and on (job, instance) (kubeseg_model_info{name=~"$m"} == 1))) / kubeseg_input_voxels_sum '
        'or on () vector(0)')
    assert names == {"kubeseg_stage_duration_seconds_bucket", "kubeseg_model_info", "kubeseg_input_voxels_sum"}
    assert matchers["kubeseg_stage_duration_seconds_bucket"] == {"namespace", "stage"}
    assert grouping == {"le", "stage", "job", "instance"}


@pytest.fixture(scope="module")
def queries():
    out = []
    for path in dashboard_paths():
        out += [(path.name, title, expr) for title, expr in panel_queries(path, VARIABLES)]
    return out


def test_there_are_the_two_dashboards_with_their_variables():
    names = {p.name for p in dashboard_paths()}
    assert names == {"serving.json", "drift-quality.json"}
    for path in dashboard_paths():
        d = json.loads(path.read_text())
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert set(variables) == {"datasource", "namespace", "model"}
        assert variables["datasource"]["query"] == "prometheus"
        model_query = variables["model"]["query"]["query"]
        assert model_query.startswith("label_values(kubeseg_model_info") and model_query.endswith(", name)")
        assert d["uid"].startswith("kubeseg-") and "kubeseg" in d["tags"]
        for p in panels(d):
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_panel_has_a_query():
    for path in dashboard_paths():
        d = json.loads(path.read_text())
        titles = [p["title"] for p in panels(d)]
        assert len(titles) == len(set(titles)), f"{path.name}: panel titles must be unique"
        with_query = {t for t, _ in panel_queries(path, VARIABLES)}
        assert with_query == set(titles), set(titles) - with_query
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))


def test_the_issue_s_panels_are_there():
    paths = {p.stem: p for p in dashboard_paths()}
    serving = " | ".join(t for t, _ in panel_queries(paths["serving"], VARIABLES)).lower()
    for words in ("request rate", "error rate", "p50 / p95 / p99", "stage latency p50", "stage latency p95",
                  "stage latency p99", "model version", "gpu memory"):
        assert words in serving, words
    drift = " | ".join(t for t, _ in panel_queries(paths["drift-quality"], VARIABLES)).lower()
    for words in ("intensity drift vs threshold", "spacing drift vs threshold", "shape drift vs threshold",
                  "confidence", "predicted volume per label", "retraining runs started"):
        assert words in drift, words


def test_variables_are_all_substituted(queries):
    for dashboard, title, expr in queries:
        assert "$" not in expr and "[[" not in expr, (dashboard, title, expr)
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute('up{namespace="$nope"}', VARIABLES)
    assert substitute("rate(x[$__rate_interval]) ${model} [[model]]", {"model": "m", "__rate_interval": "2m"}) == \
        "rate(x[2m]) m m"


def test_queries_use_only_exported_metrics_and_labels(queries):
    known = series_names()
    all_labels = set().union(*known.values())
    used = set()
    for dashboard, title, expr in queries:
        names, matchers, grouping = analyse(expr)
        assert names, (title, expr)
        unknown = names - set(known)
        assert not unknown, f"{dashboard} / {title}: unknown metrics {unknown}"
        for metric, labels in matchers.items():
            assert labels <= known[metric], f"{dashboard} / {title}: {metric} has no labels {labels - known[metric]}"
        assert grouping <= all_labels, f"{dashboard} / {title}: unknown labels {grouping - all_labels}"
        used |= names
    base = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in METRICS else n for n in used}
    # every service and trigger metric has a panel
    assert base == set(METRICS), set(METRICS) - base


def test_queries_are_valid_promql(queries, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian: prometheus) is not installed")
    exprs = [expr for _, _, expr in queries]
    for path in dashboard_paths():
        for _, q in variable_queries(path, VARIABLES):
            m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)", q)
            assert m, q
            exprs.append(m.group(1))
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"kubeseg:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout + result.stderr

    # and promtool does catch a broken query
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "kubeseg:broken", "expr": "sum by (le (rate(kubeseg_requests_total[1m]))"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, timeout=60).returncode != 0


def test_panels_that_may_legitimately_be_empty_fall_back_to_zero(queries):
    """Counters with labels appear only once incremented, and the GPU gauge only on a GPU: those
    panels answer 0 instead of nothing, so that every panel has data after plain traffic."""
    for dashboard, title, expr in queries:
        names, _, _ = analyse(expr)
        maybe_absent = {"kubeseg_model_swaps_total", "kubeseg_gpu_memory_bytes", "kubeseg_retraining_runs_started_total",
                        "kubeseg_trigger_alerts_total", "kubeseg_trigger_suppressed_total"}
        if names & maybe_absent:
            assert re.search(r"or (on \(\) )?vector\(0\)$", expr), (title, expr)


def test_the_metric_list_is_what_the_service_and_the_trigger_define():
    """METRICS above is the interface; services/metrics.py and services/trigger.py define it.
    Skipped where the serving extra is missing."""
    pytest.importorskip("prometheus_client")
    import dataclasses

    metrics = pytest.importorskip("services.metrics")
    trigger = pytest.importorskip("services.trigger")
    defined = {}
    for holder in (metrics.service_metrics(), trigger.trigger_metrics()):
        for f in dataclasses.fields(holder):
            m = getattr(holder, f.name)
            if hasattr(m, "_type"):
                name = m._name + ("_total" if m._type == "counter" else "")
                defined[name] = (m._type, set(m._labelnames))
    assert defined == METRICS
