"""Signed bundles: who registered a model, not only whether its files are intact.

A bundle's manifest is the SHA-256 of every file in it (:func:`bundle_checksums`). Registration
signs the manifest's canonical JSON with the registration key (Ed25519, ``cryptography``) and
stores the signature with the version (an artifact and version tags); the copy downloaded for
serving carries it as ``kubeseg-signature.json`` at the bundle's top (the one file the manifest
leaves out). The service and ``kubeseg predict`` check the signature with the public key before
loading anything: a bundle that is unsigned, signed by another key, or altered after signing is
refused with :class:`SignatureError`, whose ``reason`` says which.

Keys: ``python -m kubeseg.signing keygen DIR`` writes ``signing-key.pem`` (private; a Secret that
only the registering pipeline step mounts) and ``signing-key.pub.pem`` (public; the service and
anyone who predicts). ``KUBESEG_SIGNING_KEY`` / ``KUBESEG_MODEL_PUBLIC_KEY`` name the files.

The signature proves which key signed these exact files; it does not bind the version number or
alias (an older signed bundle may be registered again). Who may move aliases is decided by the
registry's own authentication.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kubeseg.errors import KubesegError

SIGNATURE_FILE = "kubeseg-signature.json"
ALGORITHM = "Ed25519"
SIGNING_KEY_ENV = "KUBESEG_SIGNING_KEY"
PUBLIC_KEY_ENV = "KUBESEG_MODEL_PUBLIC_KEY"


class SignatureError(KubesegError):
    """A bundle failed signature verification; ``reason``: unsigned | unknown_key | altered | malformed."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_checksums(bundle_dir: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in the bundle except its signature file."""
    root = Path(bundle_dir)
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() != SIGNATURE_FILE}


def canonical(manifest: dict[str, str]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def manifest_hash(manifest: dict[str, str]) -> str:
    """The hash recorded in the registry's ``bundle_manifest_sha256`` tag and in the signature."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _private_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KubesegError(f"{path} is not an Ed25519 private key")
    return key


def _public_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise KubesegError(f"cannot read the model public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KubesegError(f"{path} is not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key: names the key in tags and logs."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    key_id: str
    manifest_sha256: str
    signature: str  # base64
    signed_by: str
    signed_at: str
    algorithm: str = ALGORITHM

    def to_json(self) -> str:
        return json.dumps(vars(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Signature":
        try:
            d = json.loads(text)
            return cls(**{k: str(d[k]) for k in ("key_id", "manifest_sha256", "signature", "signed_by",
                                                   "signed_at", "algorithm")})
        except (ValueError, KeyError, TypeError) as e:
            raise SignatureError("malformed", f"the signature file is not valid ({type(e).__name__}: {e})") from None


def sign_manifest(manifest: dict[str, str], private_key_path: str | Path, signed_by: str = "") -> Signature:
    key = _private_key(private_key_path)
    sig = key.sign(canonical(manifest))
    return Signature(key_id(key.public_key()), manifest_hash(manifest), base64.b64encode(sig).decode(),
                     signed_by, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def verify_manifest(manifest: dict[str, str], signature: Optional[Signature], public_key_path: str | Path,
                    what: str) -> None:
    """Raise :class:`SignatureError` unless ``signature`` is the public key's signature of ``manifest``."""
    from cryptography.exceptions import InvalidSignature

    key = _public_key(public_key_path)
    if signature is None:
        raise SignatureError("unsigned", f"{what} is not signed; only bundles signed by the registration key "
                                         f"{key_id(key)} are loaded")
    if signature.algorithm != ALGORITHM:
        raise SignatureError("malformed", f"{what}: signature algorithm {signature.algorithm!r} is not {ALGORITHM}")
    if signature.key_id != key_id(key):
        raise SignatureError("unknown_key", f"{what} is signed by key {signature.key_id[:16]!r}, not by the "
                                            f"registration key {key_id(key)}")
    try:
        key.verify(base64.b64decode(signature.signature, validate=True), canonical(manifest))
    except (InvalidSignature, ValueError):
        raise SignatureError("altered", f"{what}: the signature does not match its files (altered after "
                                        "signing, or a forged signature)") from None


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path, signed_by: str = "") -> Signature:
    """Sign a bundle folder in place (writes ``kubeseg-signature.json``)."""
    bundle_dir = Path(bundle_dir)
    signature = sign_manifest(bundle_checksums(bundle_dir), private_key_path, signed_by)
    tmp = bundle_dir / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(signature.to_json())
    tmp.replace(bundle_dir / SIGNATURE_FILE)
    return signature


def verify_bundle(bundle_dir: str | Path, public_key_path: str | Path) -> Signature:
    """Check a bundle folder's files against its signature file; returns the signature."""
    bundle_dir = Path(bundle_dir)
    sig_file = bundle_dir / SIGNATURE_FILE
    signature = Signature.from_json(sig_file.read_text()) if sig_file.is_file() else None
    verify_manifest(bundle_checksums(bundle_dir), signature, public_key_path, str(bundle_dir))
    return signature


def generate_keys(out_dir: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM files (the private one readable by its owner only)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                              PublicFormat)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = out / "signing-key.pem", out / "signing-key.pub.pem"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "keygen":
        print("usage: python -m kubeseg.signing keygen OUT_DIR", file=sys.stderr)
        return 2
    private, public = generate_keys(argv[1])
    print(f"private key (Secret for the registering step): {private}\npublic key (service, predict): {public}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
