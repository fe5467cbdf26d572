"""Who may call the segmentation service: bearer tokens (OIDC/JWT) and hashed API keys.

:class:`Authenticator` turns an ``Authorization`` header into a :class:`Caller` or refuses with
401 (no or bad credential) / 403 (a good credential without the scope the path needs).
:class:`AuthMiddleware` puts it in front of every route of the ASGI app, deny by default: only
the paths in ``AuthSettings.open_paths`` (health and metrics, which the NetworkPolicy opens to
the kubelet and Prometheus only) pass without a credential, so an endpoint added later is
protected without anyone remembering to. It logs each request's caller (a token's subject or
an API key's id, never request content) and counts refusals (``kubeseg_auth_refusals_total``).

API keys: high-entropy random strings (``python -m services.auth new-key ID``); the service
holds only their SHA-256, one ``<key id> <sha256 hex> [scope,scope]`` line each (a file from a
Secret, or ``;``-separated in ``KUBESEG_API_KEYS``). A fast hash suffices because the keys are
random 256-bit values, not passwords. Tokens: signature checked with the JWKS (RSA, EC or
EdDSA keys; never ``none`` or HMAC), then ``iss``, ``aud`` and ``exp`` (required), scopes from
``scope`` (space-separated) or ``scp`` (list).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from services.settings import AuthSettings, SettingsError

log = logging.getLogger("kubeseg.auth")

JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519")
MAX_HEADER = 8192  # bytes of an Authorization header worth looking at
MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: ``kind`` (jwt | api-key | anonymous), an identity safe to log, scopes."""

    kind: str
    identity: str
    scopes: frozenset

    def __str__(self) -> str:
        return f"{self.kind}:{self.identity}"


class AuthError(Exception):
    """A refusal: ``status`` 401 or 403 and a message that is safe to show the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(text: str) -> dict[str, tuple[str, frozenset]]:
    """``{sha256: (key id, scopes)}`` from ``<id> <sha256> [scopes]`` lines (``#`` comments, ``;`` separators)."""
    out: dict[str, tuple[str, frozenset]] = {}
    for n, line in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or len(parts[1]) != 64 or any(c not in "0123456789abcdef" for c in parts[1].lower()):
            raise SettingsError(f"API key entry {n} is not '<key id> <sha256 hex> [scope,scope]'")
        scopes = frozenset(s for s in (parts[2].split(",") if len(parts) == 3 else []) if s)
        out[parts[1].lower()] = (parts[0], scopes)
    return out


class JwksCache:
    """The JWKS from a URL (refetched every ``ttl`` seconds, at most every 30 s on an unknown key) or a file."""

    def __init__(self, settings: AuthSettings, fetch: Optional[Callable[[str], bytes]] = None):
        self.settings = settings
        self._fetch = fetch or self._http
        self._keys = None
        self._loaded = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _http(url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read(MAX_JWKS_BYTES + 1)

    def get(self, refresh: bool = False):
        from joserfc.jwk import KeySet

        with self._lock:
            now = time.monotonic()
            age = now - self._loaded
            stale = self._keys is None or age > self.settings.jwks_cache_seconds or (refresh and age > 30)
            if stale:
                s = self.settings
                raw = s.jwks_file.read_bytes() if s.jwks_file else self._fetch(s.jwks_url)
                if len(raw) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS larger than 1 MiB")
                self._keys = KeySet.import_key_set(json.loads(raw))
                self._loaded = now
            return self._keys


class Authenticator:
    """Credentials → :class:`Caller`, and the scope each path needs."""

    def __init__(self, settings: AuthSettings, fetch: Optional[Callable[[str], bytes]] = None):
        self.settings = settings
        text = ""
        if settings.api_keys_file is not None:
            text += settings.api_keys_file.read_text() + "\n"
        text += settings.api_keys or ""
        self.api_keys = parse_api_keys(text)
        self.jwks = JwksCache(settings, fetch) if settings.oidc else None

    # -- paths ------------------------------------------------------------------------------------
    @staticmethod
    def normalise(path: str) -> str:
        while "//" in path:
            path = path.replace("//", "/")
        return path.rstrip("/") or "/"

    def is_open(self, path: str) -> bool:
        return path in self.settings.open_paths  # exact match only: anything else needs a credential

    def required_scope(self, path: str) -> str:
        p = self.normalise(path)
        if any(p == a or p.startswith(a + "/") for a in self.settings.admin_paths):
            return self.settings.admin_scope
        return self.settings.segment_scope

    # -- credentials ------------------------------------------------------------------------------
    def authenticate(self, authorization: Optional[str], api_key_header: Optional[str] = None) -> Caller:
        """Who is calling; :class:`AuthError` 401 when nobody we know."""
        if api_key_header:
            return self._api_key(api_key_header)
        if not authorization:
            raise AuthError(401, "authentication required: send 'Authorization: Bearer <token or API key>'")
        if len(authorization) > MAX_HEADER:
            raise AuthError(401, "the Authorization header is too long")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError(401, "only 'Authorization: Bearer <token or API key>' is accepted")
        if credential.count(".") == 2 and self.jwks is not None:
            return self._jwt(credential)
        return self._api_key(credential)

    def _api_key(self, key: str) -> Caller:
        digest = hash_key(key.strip())
        match = None
        for known, entry in self.api_keys.items():  # compare every entry, in constant time each
            if hmac.compare_digest(known, digest):
                match = entry
        if match is None:
            raise AuthError(401, "unknown API key")
        key_id, scopes = match
        return Caller("api-key", key_id, scopes or frozenset({self.settings.segment_scope}))

    def _jwt(self, token: str) -> Caller:
        from joserfc import jwt
        from joserfc.errors import JoseError

        s = self.settings
        try:
            try:
                decoded = jwt.decode(token, self.jwks.get(), algorithms=list(JWT_ALGORITHMS))
            except JoseError as e:
                if type(e).__name__ not in ("InvalidKeyIdError", "MissingKeyError", "InvalidKeyLengthError",
                                            "BadSignatureError"):
                    raise
                decoded = jwt.decode(token, self.jwks.get(refresh=True), algorithms=list(JWT_ALGORITHMS))
            registry = jwt.JWTClaimsRegistry(leeway=s.leeway_seconds, iss={"essential": True, "value": s.issuer},
                                             aud={"essential": True, "value": s.audience},
                                             exp={"essential": True})
            registry.validate(decoded.claims)
        except JoseError as e:
            raise AuthError(401, f"invalid token ({type(e).__name__})") from None
        except (ValueError, TypeError, KeyError) as e:
            raise AuthError(401, f"invalid token ({type(e).__name__})") from None
        except OSError as e:
            log.error("JWKS unavailable: %s", e)
            raise AuthError(401, "token keys (JWKS) unavailable; try again") from None
        claims = decoded.claims
        raw_scopes = claims.get("scope", "")
        scopes = set(raw_scopes.split()) if isinstance(raw_scopes, str) else set()
        scp = claims.get("scp")
        if isinstance(scp, list):
            scopes |= {x for x in scp if isinstance(x, str)}
        subject = str(claims.get("sub") or claims.get("client_id") or "unknown")[:128]
        return Caller("jwt", subject, frozenset(scopes))

    def authorise(self, caller: Caller, path: str) -> None:
        needed = self.required_scope(path)
        if needed not in caller.scopes:
            raise AuthError(403, f"{caller} lacks the scope {needed!r} that {self.normalise(path)} needs")


def _header(scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class AuthMiddleware:
    """ASGI middleware: every HTTP/WebSocket request authenticated and authorised unless its path is open.

    ``on_refusal`` is called once per refused request (the service counts them). Each request's
    method, path, caller, status and duration are logged at INFO (``kubeseg.auth``)."""

    def __init__(self, app, settings: AuthSettings, on_refusal: Callable[[], None] = lambda: None,
                 fetch: Optional[Callable[[str], bytes]] = None):
        self.app = app
        self.settings = settings
        self.on_refusal = on_refusal
        self.auth = Authenticator(settings, fetch) if settings.enabled else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.auth is None:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.auth.is_open(path):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        try:
            from starlette.concurrency import run_in_threadpool

            caller = await run_in_threadpool(self.auth.authenticate, _header(scope, b"authorization"),
                                             _header(scope, b"x-api-key"))
            self.auth.authorise(caller, path)
        except AuthError as e:
            self.on_refusal()
            log.warning("refused %s %s (%d): %s", scope.get("method", "WS"), path[:200], e.status, e.message)
            return await self._refuse(scope, send, e)
        scope.setdefault("state", {})["caller"] = str(caller)
        status = {"code": 0}

        async def watched(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            log.info("%s %s by %s -> %s in %.2f s", scope.get("method", "WS"), path[:200], caller,
                     status["code"] or "-", time.perf_counter() - started)

    async def _refuse(self, scope, send, e: AuthError):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"error": e.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if e.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="kubeseg"'))
        else:
            scope_needed = self.auth.required_scope(scope.get("path", "")).encode()
            headers.append((b"www-authenticate",
                            b'Bearer realm="kubeseg", error="insufficient_scope", scope="' + scope_needed + b'"'))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def warn_if_disabled(settings: AuthSettings, what: str = "the segmentation service") -> None:
    if not settings.enabled:
        log.warning("!!! AUTHENTICATION IS DISABLED (KUBESEG_AUTH=disabled): anyone who can reach %s may call "
                    "every endpoint. Development only. !!!", what)


def new_key(key_id: str, scopes: str = "") -> tuple[str, str]:
    """A fresh random API key and its line for the keys file."""
    key = "ks_" + secrets.token_urlsafe(32)
    return key, f"{key_id} {hash_key(key)}" + (f" {scopes}" if scopes else "")


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m services.auth new-key ID [scope,scope]``: print a key (for the client) and its line (for the Secret)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] != "new-key":
        print("usage: python -m services.auth new-key KEY_ID [scope,scope]", file=sys.stderr)
        return 2
    key, line = new_key(argv[1], argv[2] if len(argv) == 3 else "")
    print(f"key (give to the client):   {key}")
    print(f"line (add to the API keys Secret): {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
