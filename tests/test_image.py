"""The kubeseg container image, run the way the chart and Kubeflow run it.

Built here by ``make image-cpu`` (podman on a debootstrap'd Debian base, CPU torch; the
Dockerfile's default GPU base is for clusters). Three checks, each in a fresh container as uid
1000 with a read-only root filesystem, every capability dropped and no privilege escalation:

* every module of kubeseg, components, pipelines and services imports from the installed package;
* a pipeline component runs end to end as Kubeflow runs it: the fingerprint and plan steps'
  commands, with their executor input, on a tiny synthetic dataset; no network, only /tmp and
  the scratch /work (the task's artifacts) writable;
* the service answers ``/readyz`` from the chart's own command, working directory, environment,
  security context and volumes, read from the rendered Helm chart, with a tiny bundle mounted.

Building takes minutes (README, "Container image"), so the tests use an image that exists and
skip, naming the command, when there is none or when its ``org.kubeseg.source`` label
(docker/source_hash.py) says it was built from other sources than this checkout's;
``KUBESEG_BUILD_IMAGE=1`` builds it first. ``KUBESEG_TEST_IMAGE`` names another image to test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.pipelines.helpers import free_port, tiny_bundle, tiny_raw
from tests.services.servers import http_get

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# docker/source_hash.py (a script, not a package): what the image is built from, and its label
_spec = importlib.util.spec_from_file_location("source_hash", ROOT / "docker" / "source_hash.py")
_source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_source)
LABEL, PACKAGES, source_hash = _source.LABEL, _source.PACKAGES, _source.source_hash
PODMAN = shutil.which("podman")
# rootful podman as this machine runs it: runc, ulimits under the container's hard limits
PODMAN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _make_var(name: str) -> str:
    """A variable of the Makefile (the image's name has one owner)."""
    out = subprocess.run(["make", "-s", "-C", str(ROOT), f"print-{name}"], capture_output=True, text=True,
                         encoding="utf-8", timeout=60)
    return out.stdout.strip()


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    if PODMAN is None:
        pytest.skip("podman not installed (apt-get install podman debootstrap runc); the image checks need it")
    if os.geteuid() != 0:
        pytest.skip("the image checks run rootful podman (uid 1000 inside, host folders mounted): run as root")
    name = os.environ.get("KUBESEG_TEST_IMAGE") or _make_var("CPU_IMAGE")
    problem = _image_problem(name)
    if problem:
        if os.environ.get("KUBESEG_BUILD_IMAGE") != "1":
            pytest.skip(f"{problem}: `make image-cpu` (7-11 min here), or KUBESEG_BUILD_IMAGE=1")
        subprocess.run(["make", "-C", str(ROOT), "image-cpu", f"CPU_IMAGE={name}"], check=True, timeout=3600)
        assert _image_problem(name) is None, _image_problem(name)
    return name


def _image_problem(name: str) -> str | None:
    """Why `name` is not this checkout's image (missing, or built from other sources), or None."""
    res = _podman("image", "inspect", "--format", "{{json .Labels}}", name, check=False)
    if res.returncode != 0:
        return f"image {name} not built"
    built = (json.loads(res.stdout.strip() or "null") or {}).get(LABEL)
    if built != source_hash(ROOT):
        return f"image {name} was built from other sources ({LABEL}={built}, this checkout {source_hash(ROOT)})"
    return None


def _restricted(name: str) -> list[str]:
    """`podman run` flags of the chart's securityContext (uid/gid 1000, read-only root, no caps)."""
    return ["run", "--rm", "--name", name, *PODMAN_FLAGS, "--user", "1000:1000", "--read-only",
            "--read-only-tmpfs=false", "--cap-drop", "all", "--security-opt", "no-new-privileges"]


def _tmpfs(path: str) -> list[str]:
    """An emptyDir: empty, writable by the pod's user, gone with the container."""
    return ["--tmpfs", f"{path}:rw,mode=1777,size=1g"]


def _module_names() -> list[str]:
    """Every module of the source tree, by file (so a module the package leaves out is noticed)."""
    names = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


IMPORT_ALL = """
import importlib, json, os, sys
out = {"uid": os.getuid(), "failed": {}, "outside": []}
for name in sys.argv[1:]:
    try:
        mod = importlib.import_module(name)
    except BaseException as e:
        out["failed"][name] = repr(e)
        continue
    if "site-packages" not in (mod.__file__ or ""):
        out["outside"].append(name)
try:
    open("/opt/kubeseg/probe", "w")
    out["root_writable"] = True
except OSError:
    out["root_writable"] = False
print(json.dumps(out))
"""


def test_image_imports_every_module(image):
    names = _module_names()
    name = f"kubeseg-test-{uuid.uuid4().hex[:8]}"
    try:
        # the service module reads its settings at import: a model name, and no credentials or
        # signing key to look for (settings the service does not know are ignored)
        env = ["-e", "KUBESEG_MODEL_NAME=import-check", "-e", "KUBESEG_AUTH=disabled",
               "-e", "KUBESEG_MODEL_SIGNATURES=disabled"]
        res = _podman(*_restricted(name), "--network", "none", *_tmpfs("/tmp"), *env,
                      image, "python", "-c", IMPORT_ALL, *names, timeout=600, check=False)
    finally:
        _podman("rm", "-f", "--time", "5", name, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}, out["failed"]
    assert out["outside"] == [], f"imported from outside the installed package: {out['outside']}"
    assert out["uid"] == 1000 and out["root_writable"] is False


def _task_command(component, arguments: dict, pipeline_root: str) -> tuple[list[str], str]:
    """The container command Kubeflow runs for `component` (kfp's own placeholder resolution), and
    its task folder; artifact and output paths lie under `pipeline_root` (a path in the container)."""
    from kfp.local import executor_input_utils, placeholder_utils

    spec = component.pipeline_spec
    comp_name, comp_spec = list(spec.components.items())[0]
    container = spec.deployment_spec["executors"][comp_spec.executor_label]["container"]
    task = executor_input_utils.get_local_task_resource_name(comp_name)
    pipeline = executor_input_utils.get_local_pipeline_resource_name(spec.pipeline_info.name)
    task_root = executor_input_utils.construct_local_task_root(pipeline_root, pipeline, task)
    executor_input = executor_input_utils.construct_executor_input(comp_spec, arguments, task_root,
                                                                   block_input_artifact=False)
    executor_dict = executor_input_utils.executor_input_to_dict(executor_input, comp_spec)
    command = placeholder_utils.replace_placeholders(list(container["command"]) + list(container["args"]),
                                                     executor_dict, pipeline, task, pipeline_root,
                                                     placeholder_utils.make_random_id())
    return command, task_root


def _run_task(image: str, work: Path, command: list[str]) -> None:
    name = f"kubeseg-test-{uuid.uuid4().hex[:8]}"
    try:
        res = _podman(*_restricted(name), "--network", "none", *_tmpfs("/tmp"), "-v", f"{work}:/work",
                      "--workdir", "/work", "-e", "HOME=/tmp", image, *command, timeout=600, check=False)
    finally:
        _podman("rm", "-f", "--time", "5", name, check=False)
    assert res.returncode == 0, f"{command[-1][:200]}...\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"


def test_pipeline_component_runs_in_the_image(image, tmp_path):
    pytest.importorskip("kfp")
    from kfp import dsl

    from components import steps  # the command is the image's whatever base_image the spec names
    from kubeseg.dataset import load_dataset_json
    from kubeseg.fingerprint import read_fingerprint
    from kubeseg.planning.planner import plan_experiment, planner_settings

    work = tmp_path / "work"
    raw = tiny_raw(work)  # work/raw/Dataset001_SynthCT, 6 cases of 16 x 40 x 40
    for p in [work, *work.rglob("*")]:  # the pod's user writes /work (an fsGroup-owned volume on a cluster)
        p.chmod(0o777 if p.is_dir() else 0o666)
    in_work = lambda p: "/work/" + str(Path(p).relative_to(work))  # noqa: E731
    raw_artifact = dsl.Dataset(name="raw", uri=in_work(raw))

    command, fp_root = _task_command(steps.fingerprint, {"raw": raw_artifact, "num_workers": 1}, "/work/kfp")
    _run_task(image, work, command)
    fp_host = work / Path(fp_root).relative_to("/work")
    out = json.loads((fp_host / "executor_output.json").read_text())
    assert out["artifacts"]["fingerprint"]["artifacts"][0]["metadata"]["cases"] == 6
    assert (fp_host / "fingerprint").stat().st_uid == 1000  # written by the pod's user
    fingerprint = read_fingerprint(fp_host / "fingerprint")
    assert len(fingerprint.spacings) == 6

    fp_artifact = dsl.Dataset(name="fingerprint", uri=f"{fp_root}/fingerprint")
    command, plan_root = _task_command(steps.plan, {"raw": raw_artifact, "fingerprint": fp_artifact,
                                                    "preset": "small", "configurations": ["3d_fullres"],
                                                    "folds": [0, 1]}, "/work/kfp")
    _run_task(image, work, command)
    plan_host = work / Path(plan_root).relative_to("/work")
    plans = json.loads((plan_host / "plans").read_text())
    # the image plans exactly what this checkout plans from the same fingerprint
    expected = plan_experiment(load_dataset_json(raw), fingerprint, planner_settings("small"), dataset_name=raw.name)
    assert plans == json.loads(json.dumps(expected))
    wave = json.loads((plan_host / "executor_output.json").read_text())["parameterValues"]["Output"]
    assert [(w["configuration"], w["fold"]) for w in wave] == [("3d_fullres", 0), ("3d_fullres", 1)]


def _segmentation_pod(bundle_path: str) -> dict:
    from tests.charts.helpers import manifests, one, render

    docs = manifests(render({"model": {"bundle": bundle_path}}))
    deployments = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("segmentation")]
    assert len(deployments) == 1, [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"]
    return one(docs, "Deployment", deployments[0]["metadata"]["name"])["spec"]["template"]["spec"]


def test_service_serves_readyz_as_the_chart_runs_it(image, tmp_path):
    pytest.importorskip("helm_python")
    pod = _segmentation_pod("/models/bundle")
    (container,) = pod["containers"]
    sc, volumes = container["securityContext"], {v["name"]: v for v in pod["volumes"]}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (1000, 1000)

    mounts = []
    for m in container["volumeMounts"]:
        kind = volumes[m["name"]]
        assert "emptyDir" in kind, f"volume {m['name']} is not an emptyDir: teach this test its kind: {kind}"
        mounts += _tmpfs(m["mountPath"])
    env = []
    for e in container["env"]:
        # a secret-backed value (e.g. an API token) gets a stand-in; /readyz answers without it
        env += ["-e", f"{e['name']}={e.get('value', 'image-test-secret')}"]
    port = free_port()  # host network: the chart's port may be taken on a shared machine
    args = list(container["args"])
    args[args.index("--port") + 1] = str(port)

    bundle = tiny_bundle(tmp_path / "tiny")["bundle"]
    for p in [bundle, *Path(bundle).rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    name = f"kubeseg-test-{uuid.uuid4().hex[:8]}"
    cmd = [PODMAN, *_restricted(name), "--network", "host", *mounts, *env, "-v", f"{bundle}:/models/bundle:ro",
           "--workdir", container["workingDir"], image, *container["command"], *args]
    log_path = tmp_path / "service.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url, deadline, status = f"http://127.0.0.1:{port}", time.time() + 300, 0
            while time.time() < deadline and proc.poll() is None:
                status, body = http_get(f"{url}/readyz", 2)
                if status == 200:
                    break
                time.sleep(1)
            assert status == 200, f"no /readyz 200 (exit {proc.poll()}):\n{log_path.read_text()[-4000:]}"
            ready = json.loads(body)
            assert ready["ready"] is True and ready["model"], ready
            assert http_get(f"{url}/livez")[0] == 200
        finally:
            _podman("stop", "--time", "10", name, check=False, timeout=60)
            _podman("rm", "-f", "--time", "5", name, check=False)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
