"""Model versions in MLflow: register, verified download, gated promotion, rollback (server-less
SQLite store; the pipeline integration test does the same against a real mlflow server)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("mlflow")

from kubeseg.cli import main  # noqa: E402
from kubeseg.errors import KubesegError  # noqa: E402
from kubeseg.registry import (GateSettings, champion_history, get_version, list_versions, load_version,  # noqa: E402
                              promote, register_bundle, rollback)
from kubeseg.tracking import client  # noqa: E402
from tests.pipelines.helpers import tiny_bundle  # noqa: E402

NAME = "tiny-seg"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_bundle(tmp_path_factory.mktemp("tiny"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _aliases(uri):
    return {k: str(v) for k, v in client(uri).get_registered_model(NAME).aliases.items()}


def test_register_tags_and_verified_download(trained, uri, tmp_path):
    v = register_bundle(trained["bundle"], NAME, uri, source_run="run-42")
    assert v.version == "1" and v.aliases == ("challenger",)
    sel = json.loads((trained["bundle"] / "selection.json").read_text())
    assert v.cv_foreground_dice == pytest.approx(sel["expected_foreground_dice"], abs=1e-6)
    assert set(v.cv_dice) == {"1", "2", "3"}
    for tag in ("dataset_fingerprint_sha256", "plans_sha256", "bundle_manifest_sha256", "kubeseg_version"):
        assert len(v.tags[tag]) > 3, tag
    assert v.tags["source_pipeline_run"] == "run-42" and v.tags["configurations"] == "3d_fullres"

    out = load_version(NAME, "challenger", tmp_path / "dl", uri)
    assert (out / "selection.json").read_bytes() == (trained["bundle"] / "selection.json").read_bytes()
    # a file changed in the artifact store after registration is caught
    store = Path(urlparse(client(uri).get_run(v.run_id).info.artifact_uri).path) / "bundle" / "plans.json"
    store.write_text(store.read_text() + " ")
    with pytest.raises(KubesegError, match=r"failed verification: .*changed \['plans.json'\]"):
        load_version(NAME, "1", tmp_path / "dl2", uri)


def test_promote_gate_and_rollback(trained, uri, tmp_path):
    # label_floor=0: this test is about the mean, the sanity prediction and rollback (the tiny
    # model misses the lesion; the per-label floor has its own test below)
    holdout = str(trained["raw"] / "imagesTs")
    register_bundle(trained["bundle"], NAME, uri)
    # no held-out cases: refused, nothing changes
    with pytest.raises(KubesegError, match="no held-out cases"):
        promote(NAME, gate=GateSettings(label_floor=0.0), uri=uri)
    assert _aliases(uri) == {"challenger": "1"}
    with pytest.raises(KubesegError, match="no champion to roll back"):
        rollback(NAME, uri)

    p = promote(NAME, gate=GateSettings(holdout=holdout, device="cpu", label_floor=0.0), uri=uri)
    assert (p.version, p.previous) == ("1", None)
    assert _aliases(uri) == {"champion": "1"}
    with pytest.raises(KubesegError, match="no previous champion"):
        rollback(NAME, uri)
    assert _aliases(uri) == {"champion": "1"} and champion_history(NAME, uri) == ["1"]

    # a worse challenger is refused by the CV gate, and says why
    worse = register_bundle(trained["bundle"], NAME, uri, tags={"cv_foreground_dice": "-1.0"})
    with pytest.raises(KubesegError, match=r"CV foreground Dice -1.0000 is below the champion's \(version 1"):
        promote(NAME, gate=GateSettings(holdout=holdout, device="cpu", label_floor=0.0), uri=uri)
    assert _aliases(uri) == {"champion": "1", "challenger": worse.version}
    # ... and by the sanity prediction when the held-out cases cannot be segmented
    with pytest.raises(KubesegError, match="sanity prediction failed"):
        promote(NAME, worse.version, GateSettings(tolerance=5, holdout=str(tmp_path / "missing"), label_floor=0.0), uri)
    assert _aliases(uri) == {"champion": "1", "challenger": worse.version}

    p = promote(NAME, worse.version, GateSettings(tolerance=5, holdout=holdout, device="cpu", label_floor=0.0), uri)
    assert (p.version, p.previous) == ("2", "1")
    assert _aliases(uri) == {"champion": "2"} and champion_history(NAME, uri) == ["1", "2"]
    with pytest.raises(KubesegError, match="already the champion"):
        promote(NAME, "2", GateSettings(holdout=holdout, label_floor=0.0), uri)

    r = rollback(NAME, uri)
    assert (r.version, r.previous) == ("1", "2")
    assert get_version(NAME, "champion", uri).version == "1" and champion_history(NAME, uri) == ["1"]
    assert "kubeseg.rolled_back_at" in get_version(NAME, "2", uri).tags
    log = json.loads(client(uri).get_registered_model(NAME).tags["kubeseg.champion_log"])
    assert [e["event"] for e in log] == ["promote", "promote", "rollback"]
    assert [v.version for v in list_versions(NAME, uri)] == ["2", "1"]


def test_cli_models(trained, uri, capsys):
    assert main(["register", str(trained["bundle"]), "--name", NAME, "--tracking-uri", uri]) == 0
    assert "version 1 (1.0.0, alias challenger)" in capsys.readouterr().out
    assert main(["models", "rollback", "--name", NAME, "--tracking-uri", uri]) == 2
    assert "no champion to roll back" in capsys.readouterr().err
    promote_args = ["models", "promote", "--name", NAME, "--tracking-uri", uri, "--device", "cpu",
                    "--holdout", str(trained["raw"] / "imagesTs")]
    assert main(promote_args) == 2  # the tiny model misses the lesion: the default floor refuses it
    assert "misses label(s)" in capsys.readouterr().err
    assert main(promote_args + ["--label-floor", "0"]) == 0
    assert "version 1 is the champion" in capsys.readouterr().out
    assert main(["models", "list", "--name", NAME, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "champion history: ['1']" in out
    assert main(["models", "list", "--name", "nope", "--tracking-uri", uri]) == 2
    assert "no registered model 'nope'" in capsys.readouterr().err


def test_a_model_that_misses_a_label_is_never_promoted(trained, uri, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    from kubeseg.inference import PredictSettings, predict

    holdout = trained["raw"] / "imagesTs"
    # CV: one label at 0.0 refuses promotion, naming it, whatever the foreground mean
    v = register_bundle(trained["bundle"], NAME, uri, tags={"cv_dice.1": "0.9", "cv_dice.2": "0.9",
                                                                  "cv_dice.3": "0.000000", "cv_foreground_dice": "0.9"})
    with pytest.raises(KubesegError, match=r"misses label\(s\): label '\w+' \(3\): CV Dice 0.000 under the floor 0.5; champion"):
        promote(NAME, v.version, GateSettings(holdout=str(holdout), device="cpu", label_floor=0.5), uri)
    assert get_version(NAME, "challenger", uri).version == v.version and "champion" not in _aliases(uri)

    # held out: references in which label 2 lies where the model never predicts it
    ok = register_bundle(trained["bundle"], NAME, uri, tags={f"cv_dice.{k}": "0.9" for k in (1, 2, 3)})
    written = predict(holdout, tmp_path / "pred", trained["bundle"], PredictSettings(device="cpu",
                                                                                    use_mirroring=False))
    refs = tmp_path / "refs"
    refs.mkdir()
    for out in written:
        pred = sitk.ReadImage(str(out))
        arr = sitk.GetArrayFromImage(pred)
        ref = np.zeros_like(arr)
        ref[arr != 2] = 2  # disjoint from the prediction of label 2
        img = sitk.GetImageFromArray(ref)
        img.CopyInformation(pred)
        sitk.WriteImage(img, str(refs / out.name))
    gate = GateSettings(holdout=str(holdout), holdout_labels=str(refs), device="cpu", label_floor=0.1)
    with pytest.raises(KubesegError, match=r"label '\w+' \(2\)(: held-out Dice 0.000 under the floor| is in the "
                                           r"references of \d+ held-out case\(s\) but never predicted)"):
        promote(NAME, ok.version, gate, uri)
    assert "champion" not in _aliases(uri)


# ---- semantic versions, approval, the registry lock ---------------------------------------------

def test_semver_rules():
    from kubeseg.registry import ModelVersion, next_semver, semver_change

    base = ModelVersion("m", "3", (), "", "", 0.5, {}, {"labels_sha256": "L", "plans_sha256": "P",
                                                        "kubeseg.semver": "1.2.0"})
    assert semver_change(None, "L", "P", None)[0] == "initial"
    assert semver_change(base, "L", "P", "finetune") == ("patch", "fine-tuned from version 3's plans and labels")
    assert semver_change(base, "L", "P", "retrain")[0] == "minor" and semver_change(base, "L", "P", None)[0] == "minor"
    assert semver_change(base, "L2", "P", "finetune") == ("major", "label set changed against version 3")
    assert semver_change(base, "L", "P2", "retrain") == ("major", "plans changed against version 3")
    taken = ["1.0.0", "1.1.0", "1.2.0", "1.2.1", "2.0.0"]
    assert next_semver("patch", "1.2.0", taken) == "1.2.2"  # above every patch of 1.2: unique
    assert next_semver("minor", "1.2.0", taken) == "1.3.0"
    assert next_semver("major", "1.2.0", taken) == "3.0.0"
    assert next_semver("initial", None, []) == "1.0.0"


def test_semver_and_the_approval_flow(trained, uri, tmp_path, monkeypatch, capsys):
    from kubeseg.registry import approve, awaiting_approval, champion_since

    monkeypatch.setenv("KUBESEG_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    holdout = str(trained["raw"] / "imagesTs")
    gate = GateSettings(holdout=holdout, device="cpu", label_floor=0.0)
    v1 = register_bundle(trained["bundle"], NAME, uri)
    assert v1.tags["kubeseg.semver"] == "1.0.0" and v1.tags["kubeseg.change"] == "initial"
    monkeypatch.setenv("KUBESEG_ACTOR", "pipeline")
    p = promote(NAME, "1", gate, uri, require_approval=True)  # the gate passes; the champion does not move
    assert p.awaiting_approval and p.previous is None and "champion" not in _aliases(uri)
    assert [v.version for v in awaiting_approval(NAME, uri)] == ["1"]
    with pytest.raises(KubesegError, match="needs a reason"):
        approve(NAME, "1", " ", uri)
    monkeypatch.setenv("KUBESEG_ACTOR", "dr.house")
    assert approve(NAME, "1", "looked at 20 cases", uri).version == "1"
    v = get_version(NAME, "champion", uri)
    assert v.version == "1" and v.tags["kubeseg.approval"] == "approved" and v.tags["kubeseg.gate"] == "passed"
    assert v.tags["kubeseg.approved_by"] == "dr.house" and v.tags["kubeseg.approval_reason"] == "looked at 20 cases"
    assert champion_since(NAME, uri)["event"] == "approve" and champion_history(NAME, uri) == ["1"]
    with pytest.raises(KubesegError, match="already the champion"):
        approve(NAME, "1", "again", uri)

    # fine-tuned → patch, retrained → minor, plans changed → major; the champion is the base
    v2 = register_bundle(trained["bundle"], NAME, uri, retrain_mode="finetune", tags={"cv_foreground_dice": "-1.0"})
    v3 = register_bundle(trained["bundle"], NAME, uri, retrain_mode="retrain")
    other = tmp_path / "other-plans"
    import shutil
    shutil.copytree(trained["bundle"], other)
    plans = json.loads((other / "plans.json").read_text())
    plans["plans_name"] = "changedPlans"
    (other / "plans.json").write_text(json.dumps(plans))
    v4 = register_bundle(other, NAME, uri)
    assert [x.tags["kubeseg.semver"] for x in (v2, v3, v4)] == ["1.0.1", "1.1.0", "2.0.0"]
    assert v4.tags["kubeseg.change_reason"] == "plans changed against version 1"

    # a version whose gate failed, or that never ran it, cannot be approved
    with pytest.raises(KubesegError, match="CV foreground Dice -1.0000 is below"):
        promote(NAME, v2.version, gate, uri, require_approval=True)
    assert get_version(NAME, v2.version, uri).tags["kubeseg.gate"] == "failed"
    with pytest.raises(KubesegError, match=r"refusing to approve .* version 2: it failed the gate \(refusing to promote"):
        approve(NAME, v2.version, "trust me", uri)
    with pytest.raises(KubesegError, match="version 3: it has not passed the gate"):
        approve(NAME, v3.version, "trust me", uri)
    assert get_version(NAME, "champion", uri).version == "1"
    # the CLI: list shows semvers and what waits; promote --approval required, then models approve
    assert main(["models", "promote", "--name", NAME, "--version", v3.version, "--tracking-uri", uri, "--device", "cpu",
                 "--holdout", holdout, "--label-floor", "0", "--approval", "required"]) == 0
    assert "awaits approval (champion stays 1)" in capsys.readouterr().out
    assert main(["models", "list", "--name", NAME, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "1.1.0" in out and "2.0.0" in out and "awaiting approval: ['3']" in out
    assert main(["models", "approve", v3.version, "--name", NAME, "--reason", "reviewed", "--tracking-uri", uri]) == 0
    assert get_version(NAME, "champion", uri).version == "3" and champion_history(NAME, uri) == ["1", "3"]
    events = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    approvals = [e for e in events if e["event"] == "approve"]
    assert [(e["version"], e["by"], e["reason"]) for e in approvals] == [
        ("1", "dr.house", "looked at 20 cases"), ("3", "dr.house", "reviewed")]
    assert [e["event"] for e in events if e["event"] in ("awaiting_approval", "approve", "promote")] == [
        "awaiting_approval", "approve", "awaiting_approval", "approve"]
    # an automatic rollback names the version it expects: once it is no longer champion, nothing moves
    with pytest.raises(KubesegError, match="the champion is version 3, not 2; nothing rolled back"):
        rollback(NAME, uri, reason="alert", expected="2")
    assert rollback(NAME, uri, reason="QA flags", expected="3", by="kubeseg-trigger").version == "1"
    assert get_version(NAME, "3", uri).tags["kubeseg.rolled_back_by"] == "kubeseg-trigger"
    assert champion_since(NAME, uri)["event"] == "rollback"


def test_stale_locks_are_broken_and_live_ones_wait(uri, monkeypatch):
    from kubeseg.registry import LockSettings, lock_name, registry_lock

    c = client(uri)
    c.create_registered_model(NAME)
    c.create_registered_model(lock_name(NAME), tags={"kubeseg.lock.holder": "dead@host:1",
                                                     "kubeseg.lock.expires": "1000"})  # expired long ago
    with registry_lock(NAME, uri, "test") as holder:
        assert client(uri).get_registered_model(lock_name(NAME)).tags["kubeseg.lock.holder"] == holder
        with pytest.raises(KubesegError, match=r"held by .*gave up after 0 s"):
            with registry_lock(NAME, uri, "second", LockSettings(wait_seconds=0.3)):
                pass
    with pytest.raises(Exception):
        client(uri).get_registered_model(lock_name(NAME))  # released


LOCK_WORKER = r"""
import json, sys, time
from kubeseg.registry import registry_lock
from kubeseg.tracking import client
uri, name, me, out, start_at = sys.argv[1:]
c = client(uri)
while time.time() < float(start_at):
    time.sleep(0.01)
for i in range(3):
    with registry_lock(name, uri, "test"):
        t0 = time.time()
        seen = json.loads(c.get_registered_model(name).tags.get("seen", "[]"))
        time.sleep(0.3)  # a read-modify-write that loses updates without the lock
        c.set_registered_model_tag(name, "seen", json.dumps(seen + [f"{me}.{i}"]))
        t1 = time.time()
    with open(out, "a") as f:
        f.write(json.dumps([me, i, t0, t1]) + "\n")
"""

PROMOTE_WORKER = r"""
import json, sys, time
from kubeseg.errors import KubesegError
from kubeseg.registry import GateSettings, promote
uri, name, version, holdout, start_at, out = sys.argv[1:]
while time.time() < float(start_at):
    time.sleep(0.01)
try:
    p = promote(name, version, GateSettings(holdout=holdout, device="cpu", label_floor=0.0), uri)
    result = {"version": version, "promoted": True, "previous": p.previous}
except KubesegError as e:
    result = {"version": version, "promoted": False, "error": str(e)}
with open(out, "w") as f:
    json.dump(result, f)
"""


def _start(code: str, args: list[str], tmp_path: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
def test_concurrent_processes_leave_one_consistent_champion(trained, tmp_path):
    """Real processes against a real `mlflow server` on PostgreSQL as in the chart (SQLite, the
    embedded default, where PostgreSQL is not installed; .ci/run installs it): the lock serialises
    read-modify-write sections (none lost, none overlapping); and two promotions that finish together
    leave one champion, the last entry of a history that has both. (One backend per run: each costs
    over a minute here.)"""
    import time

    from tests.pipelines.helpers import MlflowServer, Postgres

    backend = "postgresql" if Postgres.bindir() is not None else "sqlite"
    with (Postgres() if backend == "postgresql" else _Nothing()) as pg:
        db = pg.uri("mlflow") if pg is not None else None
        with MlflowServer(tmp_path / "mlflow", backend=db) as server:
            uri = server.uri
            client(uri).create_registered_model(NAME)
            out = tmp_path / "sections.jsonl"
            start = time.time() + 8  # every worker imported MLflow by then (a loaded machine: later is fine)
            workers = [_start(LOCK_WORKER, [uri, NAME, f"w{k}", out, start], tmp_path) for k in range(3)]
            for w in workers:
                assert w.wait(240) == 0, w.stdout.read()[-3000:]
            seen = json.loads(client(uri).get_registered_model(NAME).tags["seen"])
            assert sorted(seen) == sorted(f"w{k}.{i}" for k in range(3) for i in range(3))  # no update lost
            spans = sorted((t0, t1) for _, _, t0, t1 in map(json.loads, out.read_text().splitlines()))
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # never two holders at once

            holdout = tmp_path / "holdout"
            holdout.mkdir()
            case = sorted((trained["raw"] / "imagesTs").iterdir())[0]
            (holdout / case.name).write_bytes(case.read_bytes())
            register_bundle(trained["bundle"], NAME, uri)
            promote(NAME, "1", GateSettings(holdout=str(holdout), device="cpu", label_floor=0.0), uri)
            a, b = (register_bundle(trained["bundle"], NAME, uri).version for _ in range(2))
            start = time.time() + 10
            procs = [_start(PROMOTE_WORKER, [uri, NAME, v, holdout, start, tmp_path / f"p{v}.json"], tmp_path)
                     for v in (a, b)]
            for p in procs:
                assert p.wait(300) == 0, p.stdout.read()[-3000:]
            history, champion = champion_history(NAME, uri), get_version(NAME, "champion", uri).version
            events = json.loads(client(uri).get_registered_model(NAME).tags["kubeseg.champion_log"])
    results = {v: json.loads((tmp_path / f"p{v}.json").read_text()) for v in (a, b)}
    assert all(r["promoted"] for r in results.values()), results  # equal CV Dice: both pass, one after the other
    assert history[0] == "1" and sorted(history[1:]) == sorted([a, b]) and champion == history[-1]
    first, second = history[1], history[2]
    assert results[first]["previous"] == "1" and results[second]["previous"] == first  # each saw the other
    assert [(e["event"], e["version"], e["previous"]) for e in events] == [
        ("promote", "1", None), ("promote", first, "1"), ("promote", second, first)]


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
