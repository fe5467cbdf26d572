"""charts/kubeseg/files/upload_pipeline.py, the pipeline upload Job's script: creates the
pipeline once, then adds versions, and leaves an existing version alone. The KFP client is a
stand-in (no cluster here); one test compiles the real pipeline spec."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.charts.helpers import CHART

SCRIPT = CHART / "files" / "upload_pipeline.py"


@pytest.fixture(scope="module")
def upload():
    spec = importlib.util.spec_from_file_location("kubeseg_upload_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeKfp:
    """The parts of kfp.Client the script calls, with a pipeline store in memory."""

    def __init__(self, pipelines=None):
        self.pipelines = pipelines or {}  # name -> (id, [version names])
        self.calls = []

    def get_pipeline_id(self, name):
        return self.pipelines[name][0] if name in self.pipelines else None

    def upload_pipeline(self, path, pipeline_name=None, description=None):
        assert Path(path).is_file()
        self.calls.append(("pipeline", pipeline_name))
        self.pipelines[pipeline_name] = (f"id-{pipeline_name}", [pipeline_name])
        return SimpleNamespace(pipeline_id=f"id-{pipeline_name}")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id=None, description=None):
        assert Path(path).is_file()
        self.calls.append(("version", pipeline_version_name, pipeline_id))
        for name, (pid, versions) in self.pipelines.items():
            if pid == pipeline_id:
                versions.append(pipeline_version_name)

    def list_pipeline_versions(self, pipeline_id, page_size=10, filter=None):
        import json

        wanted = json.loads(filter)["predicates"][0]["stringValue"]
        versions = next(v for pid, v in self.pipelines.values() if pid == pipeline_id)
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(display_name=v) for v in versions if v == wanted])


def fake_compile(path, parallelism, retries):
    path.write_text(yaml.safe_dump({"pipelineInfo": {"name": "kubeseg-training"}, "parallelism": parallelism,
                                    "retries": retries}))
    return path


ENV = {"KUBESEG_KFP_HOST": "http://ml-pipeline.kubeflow:8888", "KUBESEG_PIPELINE_NAME": "kubeseg-training",
       "KUBESEG_PIPELINE_VERSION": "0.1.0-r1", "KUBESEG_PIPELINE_PARALLELISM": "4", "KUBESEG_PIPELINE_RETRIES": "1"}


def test_first_install_creates_the_pipeline_then_upgrades_add_versions(upload, capsys):
    kfp = FakeKfp()
    hosts = []
    factory = lambda host: hosts.append(host) or kfp  # noqa: E731
    compiled = []

    def compile_fn(path, parallelism, retries):
        compiled.append((parallelism, retries))
        return fake_compile(path, parallelism, retries)

    assert upload.main(ENV, factory, compile_fn) == 0
    assert hosts == ["http://ml-pipeline.kubeflow:8888"] and compiled == [(4, 1)]
    assert kfp.calls == [("pipeline", "kubeseg-training"), ("version", "0.1.0-r1", "id-kubeseg-training")]
    assert "created pipeline kubeseg-training" in capsys.readouterr().out

    assert upload.main({**ENV, "KUBESEG_PIPELINE_VERSION": "0.1.0-r2"}, factory, compile_fn) == 0
    assert kfp.calls[-1] == ("version", "0.1.0-r2", "id-kubeseg-training")
    assert "uploaded version 0.1.0-r2" in capsys.readouterr().out

    # the Job runs again for the same revision (a retry): nothing is uploaded twice
    n = len(kfp.calls)
    assert upload.main({**ENV, "KUBESEG_PIPELINE_VERSION": "0.1.0-r2"}, factory, compile_fn) == 0
    assert len(kfp.calls) == n
    assert "already has version 0.1.0-r2" in capsys.readouterr().out


def test_missing_settings_are_refused(upload, capsys):
    assert upload.main({"KUBESEG_PIPELINE_VERSION": "1"}, lambda h: pytest.fail("no client"), fake_compile) == 2
    assert "KUBESEG_KFP_HOST" in capsys.readouterr().err


def test_compiles_the_real_pipeline_for_the_given_image(upload, tmp_path, monkeypatch):
    pytest.importorskip("kfp")
    import subprocess
    import sys

    # components read KUBESEG_IMAGE when imported: compile in a fresh interpreter, as the Job does
    code = ("import importlib.util, pathlib, sys; "
            f"s = importlib.util.spec_from_file_location('u', {str(SCRIPT)!r}); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); m.compile_spec(pathlib.Path(sys.argv[1]), 0, 2)")
    out = tmp_path / "training.yaml"
    env = {"KUBESEG_IMAGE": "registry.example.org/kubeseg:test", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=CHART.parents[1], env=env, timeout=120)
    spec = next(yaml.safe_load_all(out.read_text()))  # the pipeline spec, then the platform (Secrets) spec
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {"registry.example.org/kubeseg:test"}
