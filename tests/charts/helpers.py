"""Render the kubeseg chart with Helm's own library (helm-python-sdk, offline) and validate what
comes out: Kubernetes kinds with kubernetes-validate (strict), the Prometheus Operator's kinds
with the CRD schemas in tests/charts/crds."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubeseg"
GPU_VALUES = CHART / "values-production-gpu.yaml"
RULES_FILE = CHART / "files" / "prometheus-rules.yaml"
CRDS = Path(__file__).resolve().parent / "crds"
RELEASE = "kubeseg"
NAMESPACE = "kubeseg"

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.yaml",
    ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"): "alertmanagerconfig.yaml",
}
_CRD_BASE = "https://kubeseg.invalid/crds/"


def load_values(path: Path) -> dict:
    import helm_python as helm

    return helm.values_from_yaml(path.read_text())


def render(values: Optional[dict] = None, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text (Helm's engine; `fail`/`required` raise HelmRenderError)."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        return chart.render(values=copy.deepcopy(values or {}), name=name, namespace=namespace,
                            is_install=True, revision=1)


def manifests(rendered: dict[str, str]) -> list[dict]:
    """Every object in the rendered templates (NOTES.txt left out)."""
    out = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def by_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Iterable[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: Iterable[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


def env_of(container: dict) -> dict[str, Any]:
    """name -> value (or valueFrom) of a container's environment."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# -- validation --------------------------------------------------------------------------------

def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest one
    kubernetes-validate ships schemas for."""
    from kubernetes_validate.utils import latest_version

    minimum = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    oldest = minimum.lstrip(">=").split("-")[0]
    return [".".join(oldest.split(".")[:2]), latest_version()]


@lru_cache(maxsize=None)
def _crd_validators():
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    def resource(name):
        return Resource.from_contents(yaml.safe_load((CRDS / name).read_text()), default_specification=DRAFT202012)

    registry = Registry().with_resources(
        [(_CRD_BASE + p.name, resource(p.name)) for p in sorted(CRDS.glob("*.yaml"))])
    validators = {}
    for key, name in CRD_SCHEMAS.items():
        schema = dict(yaml.safe_load((CRDS / name).read_text()), **{"$id": _CRD_BASE + name})
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[key] = jsonschema.Draft202012Validator(schema, registry=registry,
                                                          format_checker=jsonschema.FormatChecker())
    return validators


def validate_crd(doc: dict) -> None:
    """Validate a Prometheus Operator resource against its CRD schema; raises on the first
    error (all errors listed in the message)."""
    validator = _crd_validators()[(doc["apiVersion"], doc["kind"])]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} fails its CRD schema:\n" + "\n".join(lines))


def validate_kube(doc: dict, version: str) -> None:
    """kubernetes-validate --strict for one object (the library call the CLI makes)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata'].get('name')} fails "
                             f"Kubernetes {version} strict validation at {path}: {e.message}") from None


def validate(doc: dict, versions: list[str]) -> str:
    """Validate any rendered object; returns which validator took it. An object that neither
    knows is an error, never a silent skip."""
    if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        validate_crd(doc)
        return "crd"
    import kubernetes_validate

    for v in versions:
        try:
            validate_kube(doc, v)
        except kubernetes_validate.SchemaNotFoundError:
            raise AssertionError(f"no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {v}") from None
    return "kubernetes"


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
