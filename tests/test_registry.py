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
