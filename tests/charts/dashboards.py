"""The Grafana dashboards' PromQL, ready to run against a Prometheus.

``panel_queries(dashboard_path, variables)`` lists (panel title, query) for every query of every
panel, Grafana's variables substituted, so that a test can run each one against a Prometheus
that scraped the real service (tests/services) or check it offline (tests/charts).

Grafana writes a variable as ``$name``, ``${name}``, ``${name:format}`` or ``[[name]]``. The
built-in interval variables default to values a test Prometheus answers with (override them in
``variables``); any other variable must be given, so that a typo in a dashboard fails loudly.
Values are inserted as they are: the dashboards use ``=~"$var"`` matchers, so ``".*"`` selects
everything, and ``""`` matches series without the label (a Prometheus outside Kubernetes has no
``namespace`` label).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeseg"
DASHBOARDS = CHART / "dashboards"

BUILTIN_DEFAULTS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "15000",
}

_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def dashboard_paths() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        if p.get("type") == "row":
            yield from _panels(p.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            yield p


def panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel of a dashboard, rows' nested panels included."""
    return list(_panels(dashboard.get("panels", [])))


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    values = {**BUILTIN_DEFAULTS, **variables}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value (query: {expr})")
        return str(values[name])

    return _VAR.sub(repl, expr)


def panel_queries(dashboard_path: str | Path, variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, variables substituted.

    Hidden targets are left out; a panel without any query is not an error here (the unit test
    checks that every panel has one)."""
    dashboard = json.loads(Path(dashboard_path).read_text())
    out = []
    for p in panels(dashboard):
        for t in p.get("targets", []):
            if t.get("hide") or not t.get("expr", "").strip():
                continue
            out.append((p["title"], substitute(t["expr"], variables)))
    return out


def variable_queries(dashboard_path: str | Path, variables: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable name, query) of the dashboard's query variables, e.g. label_values(...)."""
    dashboard = json.loads(Path(dashboard_path).read_text())
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        out.append((v["name"], substitute(query, variables)))
    return out
