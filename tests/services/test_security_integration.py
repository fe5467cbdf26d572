"""The security perimeter with real parts: MLflow's basic-auth server holds the registry,
`bentoml serve` follows its champion with a read-only account and serves only signed models.

- anonymous and read-only registry writes (new version, alias move) are refused by MLflow;
- every service door but health and metrics needs a credential (401), the right scope (403);
  API keys and OIDC tokens (JWKS file) both work end to end;
- a client with registry write access moves ``champion`` to an unsigned version, one signed by
  another key, and one altered after signing: each is refused, counted, audited, and the signed
  version keeps serving; a properly signed promotion is then followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.services.servers import bentoml_server, http_get, mlflow_auth_server, wait_for

pytestmark = pytest.mark.integration

NAME = "secure-seg"
ADMIN = ("admin", "admin-password-for-tests")
WRITER = ("pipeline", "writer-password-for-tests")
READER = ("segmentation", "reader-password-for-tests")
ISSUER, AUDIENCE = "https://idp.test", "kubeseg"


@contextlib.contextmanager
def as_user(user: tuple[str, str] | None):
    """MLflow's clients read MLFLOW_TRACKING_USERNAME/PASSWORD at each request."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        if user is None:
            mp.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
            mp.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        else:
            mp.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            mp.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
        yield


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import torch
    from joserfc.jwk import RSAKey

    from kubeseg.registry import GateSettings, promote, register_bundle
    from kubeseg.registry_auth import bootstrap
    from kubeseg.signing import generate_keys
    from services.auth import new_key
    from tests.pipelines.helpers import tiny_bundle

    root = tmp_path_factory.mktemp("security")
    ours, theirs = generate_keys(root / "keys-ours"), generate_keys(root / "keys-theirs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = tiny_bundle(root / "model", (1, 2, 1))
    finally:
        torch.set_num_threads(threads)
    client_key, client_line = new_key("test-client")
    admin_key, admin_line = new_key("ops", "kubeseg:admin,kubeseg:segment")
    keys_file = root / "api-keys"
    keys_file.write_text(f"{client_line}\n{admin_line}\n")
    idp = RSAKey.generate_key(2048, parameters={"kid": "idp-1"}, auto_kid=False)
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps({"keys": [idp.as_dict(private=False)]}))
    with mlflow_auth_server(root / "mlflow", ADMIN[1]) as mlflow:
        with as_user(ADMIN):
            bootstrap(NAME, WRITER, READER, mlflow.url)
        gate = GateSettings(holdout=str(made["raw"] / "imagesTs"), device="cpu", label_floor=0.0)  # tiny model
        with as_user(WRITER):
            register_bundle(made["bundle"], NAME, mlflow.url, signing_key=ours[0])
            promote(NAME, "1", gate, mlflow.url, reason="first signed model", public_key=ours[1])
        env = {"MLFLOW_TRACKING_URI": mlflow.url, "MLFLOW_TRACKING_USERNAME": READER[0],
               "MLFLOW_TRACKING_PASSWORD": READER[1], "KUBESEG_MODEL_NAME": NAME, "PYTHONPATH": str(Path.cwd()),
               "KUBESEG_MODEL_PUBLIC_KEY": str(ours[1]), "KUBESEG_API_KEYS_FILE": str(keys_file),
               "KUBESEG_OIDC_JWKS_FILE": str(jwks), "KUBESEG_OIDC_ISSUER": ISSUER, "KUBESEG_OIDC_AUDIENCE": AUDIENCE,
               "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false", "KUBESEG_REGISTRY_POLL_SECONDS": "1",
               "KUBESEG_CACHE_DIR": str(root / "cache"), "KUBESEG_AUDIT_LOG": str(root / "service-audit.jsonl"),
               "OMP_NUM_THREADS": "1"}
        for var in ("KUBESEG_AUTH", "KUBESEG_MODEL_SIGNATURES", "KUBESEG_SIGNING_KEY"):
            env[var] = ""  # whatever the developer's shell says: the defaults (on) are under test
        with bentoml_server(root, env) as service:
            yield {"root": root, "made": made, "mlflow": mlflow.url, "service": service, "ours": ours,
                   "theirs": theirs, "client_key": client_key, "admin_key": admin_key, "idp": idp, "gate": gate}


def _post(url, path, headers=None, case: Path | None = None):
    import httpx

    files = [("images", (case.name, case.read_bytes(), "application/octet-stream"))] if case else None
    return httpx.post(f"{url}{path}", files=files, headers=headers or {}, timeout=300)


def _metric(url: str, name: str) -> float:
    for line in http_get(f"{url}/metrics")[1].decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _token(key, **claims) -> str:
    from joserfc import jwt

    now = int(time.time())
    return jwt.encode({"alg": "RS256", "kid": key.kid},
                      {"iss": ISSUER, "aud": AUDIENCE, "sub": "dr.house", "exp": now + 300, "iat": now,
                       "scope": "kubeseg:segment", **claims}, key, algorithms=["RS256"])


def test_anonymous_and_read_only_registry_writes_are_refused(stack):
    import httpx
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    api = f"{stack['mlflow']}/api/2.0/mlflow"
    alias = {"name": NAME, "alias": "champion", "version": "1"}
    version = {"name": NAME, "source": "s3://evil/bundle"}
    for auth, expected in ((None, 401), (READER, 403)):
        assert httpx.post(f"{api}/registered-models/alias", json=alias, auth=auth).status_code == expected
        assert httpx.post(f"{api}/model-versions/create", json=version, auth=auth).status_code == expected
        assert httpx.delete(f"{api}/registered-models/alias", params={"name": NAME, "alias": "champion"},
                            auth=auth).status_code == expected
    assert httpx.post(f"{api}/registered-models/create", json={"name": "anonymous"}).status_code == 401
    with as_user(READER), pytest.raises(MlflowException):
        MlflowClient(stack["mlflow"]).set_registered_model_alias(NAME, "champion", "1")
    with as_user(READER):  # the reader reads
        assert MlflowClient(stack["mlflow"]).get_model_version_by_alias(NAME, "champion").version == "1"
        tags = MlflowClient(stack["mlflow"]).get_model_version(NAME, "1").tags
    assert tags["kubeseg.promoted_by"] == WRITER[0] and tags["kubeseg.promotion_reason"] == "first signed model"
    assert tags["kubeseg.registered_by"] == WRITER[0] and tags["kubeseg.signature_key_id"] != "unsigned"


def test_every_service_door_needs_a_credential(stack):
    url = stack["service"].url
    case = sorted((stack["made"]["raw"] / "imagesTs").iterdir())[0]
    for path in ("/livez", "/readyz", "/metrics"):
        assert http_get(f"{url}{path}")[0] == 200, path
    before = _metric(url, "kubeseg_auth_refusals_total")
    refused = [
        (_post(url, "/segment", case=case), 401),
        (_post(url, "/segment_summary", {"Authorization": "Bearer not-a-key"}, case), 401),
        (_post(url, "/segment", {"Authorization": f"Bearer {_token(stack['idp'], aud='other')}"}, case), 401),
        (_post(url, "/model", {"Authorization": f"Bearer {stack['client_key']}"}), 403),
        (_post(url, "/docs.json"), 401),  # not an allow-listed path: protected like any new endpoint
    ]
    for r, status in refused:
        assert r.status_code == status, (status, r.status_code, r.text[:200])
    assert refused[0][0].headers["www-authenticate"].startswith("Bearer")
    assert _metric(url, "kubeseg_auth_refusals_total") == before + len(refused)
    r = _post(url, "/model", {"Authorization": f"Bearer {stack['admin_key']}"})
    assert r.status_code == 200 and r.json()["model"]["version"] == "1"
    assert r.json()["settings"]["auth"]["enabled"] is True
    r = _post(url, "/segment_summary", {"Authorization": f"Bearer {stack['client_key']}"}, case)
    assert r.status_code == 200, r.text[:300]
    r = _post(url, "/segment_summary", {"Authorization": f"Bearer {_token(stack['idp'])}"}, case)
    assert r.status_code == 200 and r.json()["model"]["version"] == "1", r.text[:300]
    # the request log names the caller (written once the response is sent: wait for it)
    log = wait_for("the request log", lambda: (lambda t: t if "by api-key:test-client -> 200" in t
                                                and "by jwt:dr.house -> 200" in t else None)(
        stack["service"].tail(200_000)), 30)
    assert stack["client_key"] not in log


def _forge(stack, how: str) -> str:
    """A client with registry write access registers a version and moves champion to it directly."""
    from mlflow.tracking import MlflowClient

    from kubeseg.registry import register_bundle
    from kubeseg.signing import SIGNATURE_FILE

    bundle = stack["root"] / f"forged-{how}"
    shutil.copytree(stack["made"]["bundle"], bundle)
    post = bundle / "postprocessing.json"
    post.write_text(post.read_text() + "\n")  # different bytes, still a loadable bundle
    key = {"unsigned": None, "other_key": stack["theirs"][0], "altered": None}[how]
    with as_user(WRITER):
        c = MlflowClient(stack["mlflow"])
        v = register_bundle(bundle, NAME, stack["mlflow"], signing_key=key)
        if how == "altered":  # version 1's genuine signature put next to different files
            import mlflow.artifacts

            genuine = mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{c.get_model_version(NAME, '1').run_id}/{SIGNATURE_FILE}",
                dst_path=str(stack["root"] / "genuine"), tracking_uri=stack["mlflow"])
            c.log_artifact(v.run_id, genuine)
        c.set_registered_model_alias(NAME, "champion", v.version)
    return v.version


def test_forged_models_are_refused_and_the_signed_version_keeps_serving(stack):
    from kubeseg.registry import promote, register_bundle

    url = stack["service"].url
    case = sorted((stack["made"]["raw"] / "imagesTs").iterdir())[0]
    key = {"Authorization": f"Bearer {stack['client_key']}"}
    audit = stack["root"] / "service-audit.jsonl"
    for n, how in enumerate(("unsigned", "other_key", "altered"), 1):
        version = _forge(stack, how)
        wait_for(f"the {how} version {version} to be refused",
                 lambda: _metric(url, "kubeseg_model_signature_refusals_total") >= n, 120)
        assert json.loads(http_get(f"{url}/readyz")[1])["model"]["version"] == "1"
        r = _post(url, "/segment_summary", key, case)
        assert r.status_code == 200 and r.json()["model"]["version"] == "1", r.text[:300]
        entries = [json.loads(x) for x in audit.read_text().splitlines()]
        refusal = [e for e in entries if e["event"] == "signature_refused" and e["version"] == version]
        expected = {"unsigned": "unsigned", "other_key": "unknown_key", "altered": "altered"}[how]
        assert refusal and refusal[0]["reason"] == expected and refusal[0]["registered_by"] == WRITER[0], entries
    time.sleep(3)  # a refused version is not downloaded and counted again at every poll
    assert _metric(url, "kubeseg_model_signature_refusals_total") == 3
    assert "REFUSED model" in stack["service"].tail(200_000)
    # the legitimate path still works: a signed version, promoted through the gate, is followed
    with as_user(WRITER):
        v = register_bundle(stack["made"]["bundle"], NAME, stack["mlflow"], signing_key=stack["ours"][0])
        with pytest.raises(Exception, match="not signed|signed by key"):  # the gate refuses forged versions too
            promote(NAME, "2", stack["gate"], stack["mlflow"], public_key=stack["ours"][1])
        promote(NAME, v.version, stack["gate"], stack["mlflow"], reason="signed retrain", public_key=stack["ours"][1])
    wait_for("the service to serve the signed version",
             lambda: json.loads(http_get(f"{url}/readyz")[1]).get("model", {}).get("version") == v.version, 120)
    assert os.environ.get("MLFLOW_TRACKING_USERNAME") != WRITER[0]
