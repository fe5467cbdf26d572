"""Container packaging: the Dockerfile (the one kubeseg image), bentofile.yaml (the Bento of the
service) and `make image`, checked without a container engine."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from tests.charts.helpers import CHART, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def test_dockerfile_builds_the_one_image_for_every_component():
    ins = _instructions((ROOT / "Dockerfile").read_text())
    base = next(v for k, v in ins if k == "ARG" and v.startswith("BASE="))
    assert "cuda" in base  # CUDA torch from the PyTorch runtime image
    copied = {v.split()[0] for k, v in ins if k == "COPY"}
    assert {"kubeseg", "components", "pipelines", "services", "pyproject.toml"} <= copied
    run = " ".join(v for k, v in ins if k == "RUN")
    extras = re.search(r"'\.\[([a-z,]+)\]'", run).group(1).split(",")
    assert {"pipelines", "registry", "serving"} <= set(extras)  # kfp, MLflow, BentoML preinstalled
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    # MLflow server on PostgreSQL + S3, and its /metrics (mlflow needs prometheus-flask-exporter for it)
    assert "psycopg2" in run and "boto3" in run and "prometheus-flask-exporter" in run
    # non-root, with the uid the chart's securityContext runs as
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1] not in ("0", "root")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["securityContext"]["runAsUser"]) == users[-1]
    assert re.search(rf"useradd .*--uid {users[-1]}\b", run)
    exposed = {int(p) for k, v in ins if k == "EXPOSE" for p in v.split()}
    assert exposed == {values["segmentation"]["port"], values["mlflow"]["port"], 8090}


def test_bentofile_is_valid_for_bentoml_and_agrees_with_pyproject():
    bentoml_config = pytest.importorskip("bentoml._internal.bento.build_config")
    text = (ROOT / "bentofile.yaml").read_text()
    config = bentoml_config.BentoBuildConfig.from_yaml(__import__("io").StringIO(text))  # BentoML's own checks
    assert config.service == "services.service:Segmentation"
    module, cls = config.service.split(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert re.search(rf"^class {cls}\b", source, re.M)
    declared = re.search(r"@bentoml\.service\(\s*name=\"([^\"]+)\"", source)
    assert declared and declared.group(1) == config.name
    # the serving and registry extras, exactly as pyproject.toml pins them
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert sorted(config.python.packages) == sorted(extras["serving"] + extras["registry"])
    (wheel,) = config.python.wheels
    assert wheel.endswith(f"kubeseg-{VERSION}-py3-none-any.whl")
    assert config.docker.cuda_version and config.docker.python_version
    for pattern in config.include:
        assert list(ROOT.glob(pattern)), pattern
    # the Makefile builds the wheel where the bentofile looks for it
    makefile = (ROOT / "Makefile").read_text()
    assert f"-w {wheel.rsplit('/', 1)[0]} ." in makefile


def _make_image(engine: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "image", f"CONTAINER_ENGINE={engine}"], cwd=ROOT, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_image_stops_with_a_clear_message_without_a_container_engine():
    r = _make_image("")
    assert r.returncode != 0
    assert "no container engine found: install docker or podman" in r.stderr
    r = _make_image("false")  # installed but not answering, like a docker CLI without its daemon
    assert r.returncode != 0
    assert "not running or not reachable" in r.stderr
