"""The service's authentication middleware on a small Starlette app: deny by default, 401 without
or with a bad credential, 403 without the scope, JWT checks (signature, issuer, audience, expiry,
algorithm), hashed API keys, refusals counted, open paths exact."""

from __future__ import annotations

import base64
import json
import time

import pytest

from services.auth import AuthMiddleware, hash_key, new_key, parse_api_keys
from services.settings import AuthSettings, SettingsError

ISSUER, AUDIENCE = "https://idp.example", "kubeseg"


def _keys():
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    good = RSAKey.generate_key(2048, parameters={"kid": "k1"}, auto_kid=False)
    other = RSAKey.generate_key(2048, parameters={"kid": "k1"}, auto_kid=False)  # same kid, another key
    ed = OKPKey.generate_key("Ed25519", parameters={"kid": "k2"}, auto_kid=False)
    ec = ECKey.generate_key("P-256", parameters={"kid": "k3"}, auto_kid=False)
    return good, other, ed, ec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    root = tmp_path_factory.mktemp("auth")
    good, other, ed, ec = _keys()
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps({"keys": [good.as_dict(private=False), ed.as_dict(private=False),
                                         ec.as_dict(private=False)]}))
    machine_key, line = new_key("pacs-bridge")
    admin_key, admin_line = new_key("ops", "kubeseg:admin,kubeseg:segment")
    keys_file = root / "api-keys"
    keys_file.write_text(f"# kubeseg API keys\n{line}\n{admin_line}\n")
    settings = AuthSettings(jwks_file=jwks, issuer=ISSUER, audience=AUDIENCE, api_keys_file=keys_file)
    settings.validate()
    refusals = []

    async def hello(request):
        return JSONResponse({"caller": request.scope.get("state", {}).get("caller")})

    routes = [Route(p, hello, methods=["GET", "POST"]) for p in
              ("/segment", "/segment_summary", "/model", "/livez", "/readyz", "/metrics", "/brand_new_endpoint")]
    app = AuthMiddleware(Starlette(routes=routes), settings, on_refusal=lambda: refusals.append(1))
    return {"client": TestClient(app), "good": good, "other": other, "ed": ed, "ec": ec, "machine": machine_key,
            "admin": admin_key, "refusals": refusals, "keys_file": keys_file}


def token(key, alg="RS256", **claims):
    from joserfc import jwt

    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice@radiology", "exp": now + 300, "iat": now,
            "scope": "openid kubeseg:segment", **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": key.kid}, body, key, algorithms=[alg])


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


def test_open_paths_answer_without_credentials_and_everything_else_is_denied(world):
    c = world["client"]
    for path in ("/livez", "/readyz", "/metrics"):
        assert c.get(path).status_code == 200
    for path in ("/segment", "/segment_summary", "/model", "/brand_new_endpoint", "/livez/", "/metrics/x"):
        r = c.post(path)
        assert r.status_code in (401, 404), (path, r.status_code)  # never 200 without a credential
        if r.status_code == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert c.post("/brand_new_endpoint").status_code == 401  # an endpoint added later is covered


def test_valid_tokens_pass_with_their_subject(world):
    c = world["client"]
    for key, alg in ((world["good"], "RS256"), (world["ed"], "EdDSA"), (world["ec"], "ES256")):
        r = c.post("/segment", headers=bearer(token(key, alg)))
        assert r.status_code == 200, (alg, r.text)
        assert r.json()["caller"] == "jwt:alice@radiology"
    assert c.post("/segment", headers=bearer(token(world["good"], scope=None, scp=["kubeseg:segment"]))).status_code == 200


@pytest.mark.parametrize("case", ["expired", "wrong_issuer", "wrong_audience", "no_exp", "other_key", "garbage",
                                  "alg_none", "hs256_with_public_key", "basic_scheme", "empty"])
def test_bad_tokens_get_401(world, case):
    c, good = world["client"], world["good"]
    if case == "expired":
        h = bearer(token(good, exp=int(time.time()) - 3600))
    elif case == "wrong_issuer":
        h = bearer(token(good, iss="https://evil.example"))
    elif case == "wrong_audience":
        h = bearer(token(good, aud="another-service"))
    elif case == "no_exp":
        h = bearer(token(good, exp=None))
    elif case == "other_key":
        h = bearer(token(world["other"]))
    elif case == "garbage":
        h = bearer("abc.def.ghi")
    elif case == "alg_none":
        part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
        h = bearer(f"{part({'alg': 'none', 'kid': 'k1'})}.{part({'iss': ISSUER, 'aud': AUDIENCE, 'sub': 'x', 'exp': 2**31, 'scope': 'kubeseg:segment kubeseg:admin'})}.")
    elif case == "hs256_with_public_key":
        import hashlib
        import hmac
        part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
        head = f"{part({'alg': 'HS256', 'kid': 'k1'})}.{part({'iss': ISSUER, 'aud': AUDIENCE, 'sub': 'x', 'exp': 2**31, 'scope': 'kubeseg:segment'})}"
        secret = json.dumps(good.as_dict(private=False)).encode()
        sig = base64.urlsafe_b64encode(hmac.new(secret, head.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
        h = bearer(f"{head}.{sig}")
    elif case == "basic_scheme":
        h = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode()}
    else:
        h = {"Authorization": "Bearer "}
    before = len(world["refusals"])
    r = c.post("/segment", headers=h)
    assert r.status_code == 401, (case, r.text)
    assert "error" in r.json() and r.headers["www-authenticate"].startswith("Bearer")
    assert len(world["refusals"]) == before + 1


def test_scopes_decide_403(world):
    c = world["client"]
    segment_only = bearer(token(world["good"]))
    assert c.get("/model", headers=segment_only).status_code == 403
    for variant in ("/model/", "//model"):  # no spelling of the admin path falls back to the weaker scope
        assert c.get(variant, headers=segment_only).status_code in (403, 404)
    r = c.get("/model", headers=segment_only)
    assert 'insufficient_scope' in r.headers["www-authenticate"] and "kubeseg:admin" in r.json()["error"]
    assert c.get("/model", headers=bearer(token(world["good"], scope="kubeseg:admin"))).status_code == 200
    assert c.post("/segment", headers=bearer(token(world["good"], scope="openid profile"))).status_code == 403


def test_api_keys_are_checked_against_hashes(world):
    c = world["client"]
    assert c.post("/segment", headers=bearer(world["machine"])).json()["caller"] == "api-key:pacs-bridge"
    assert c.post("/segment", headers={"X-API-Key": world["machine"]}).status_code == 200
    assert c.get("/model", headers=bearer(world["machine"])).status_code == 403  # default scope: segment only
    assert c.get("/model", headers=bearer(world["admin"])).status_code == 200
    assert c.post("/segment", headers=bearer(world["machine"] + "x")).status_code == 401
    assert world["machine"] not in world["keys_file"].read_text()  # only the hash is stored
    assert hash_key(world["machine"]) in world["keys_file"].read_text()


def test_settings_refuse_an_unusable_configuration(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="no credential source"):
        AuthSettings().validate()
    with pytest.raises(SettingsError, match="ISSUER"):
        AuthSettings(jwks_url="https://idp/jwks").validate()
    with pytest.raises(SettingsError, match="sha256"):
        parse_api_keys("ops notahash")
    monkeypatch.setenv("KUBESEG_AUTH", "off")
    with pytest.raises(SettingsError, match="KUBESEG_AUTH"):
        AuthSettings.from_env()
    monkeypatch.setenv("KUBESEG_AUTH", "disabled")
    assert AuthSettings.from_env().enabled is False
    monkeypatch.delenv("KUBESEG_AUTH")
    with pytest.raises(SettingsError, match="no credential source"):  # on unless switched off
        AuthSettings.from_env()
