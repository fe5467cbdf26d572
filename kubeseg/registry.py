"""Model versions in the MLflow registry (registry glue: knows MLflow, not Kubeflow or BentoML).

A registered version is one bundle (:mod:`kubeseg.bundle`), logged as plain artifacts of its own
run (``bundle/`` plus ``bundle.sha256.json``, the checksum of every file). Its tags: CV Dice per
class and foreground mean, dataset fingerprint hash, plans hash, source pipeline run, kubeseg
version and the checksum manifest's own hash. Aliases: ``challenger`` (set by
:func:`register_bundle`) and ``champion`` (moved by :func:`promote` and :func:`rollback`).

The registry only ever moves aliases and writes tags; it never rewrites files. Every refusal is
a :class:`~kubeseg.errors.KubesegError` raised before anything is changed.

The champion history is a JSON list of versions in the registered model's tag
``kubeseg.champion_history`` (the last entry is the champion); every promotion and rollback is
also appended to ``kubeseg.champion_log``, with who moved it and why (``by``, ``reason``), and
written to the JSON audit trail (:mod:`kubeseg.audit`).

Semantic versions (``kubeseg.semver``, computed at registration against the champion, else the
newest version): major when the label set or the plans changed, minor for a retrained version,
patch for a fine-tuned one (the retraining mode reaches :func:`register_bundle` as ``retrain_mode``).

Approval: ``promote(..., require_approval=True)`` runs the gate and, when it passes, only marks the
version ``kubeseg.approval=awaiting``; :func:`approve` (a person, with a reason) then makes it the
champion. A version whose gate failed (``kubeseg.gate=failed``) or never ran cannot be approved.

Atomic alias updates: MLflow has no compare-and-set, so every change of the champion (promote,
approve, rollback) and every registration (its semver) runs under :func:`registry_lock`, a
registered model ``<name>.kubeseg-lock`` that only one holder can create (the store's unique
name constraint answers ``RESOURCE_ALREADY_EXISTS`` to the others); it carries its holder and an
expiry, after which another holder may break it. Inside the lock the champion and history are
read again, so two runs finishing together leave one champion and a history that has both.

Signatures (:mod:`kubeseg.signing`): with a registration key (``signing_key`` or
``KUBESEG_SIGNING_KEY``) the manifest is signed and the signature logged next to it
(``kubeseg-signature.json``) and tagged (``kubeseg.signature_key_id``). :func:`load_version`
with a public key refuses a version whose signature does not verify, tags the version
``kubeseg.signature_refused`` (where the caller may write tags) and audits the refusal.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from kubeseg import audit
from kubeseg.errors import KubesegError
from kubeseg.signing import (PUBLIC_KEY_ENV, SIGNATURE_FILE, SIGNING_KEY_ENV, Signature, SignatureError,
                             bundle_checksums, manifest_hash, sign_manifest, verify_manifest)
from kubeseg.tracking import DEFAULT_EXPERIMENT, client, ensure_experiment, tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "kubeseg.champion_history"
LOG_TAG = "kubeseg.champion_log"
MANIFEST = "bundle.sha256.json"
BUNDLE_PATH = "bundle"
SEMVER_TAG = "kubeseg.semver"
CHANGE_TAG = "kubeseg.change"  # major | minor | patch | initial, and why (kubeseg.change_reason)
RETRAIN_MODE_TAG = "kubeseg.retrain_mode"  # finetune | retrain, as the retraining pipeline registered it
LABELS_TAG = "labels_sha256"
GATE_TAG = "kubeseg.gate"  # passed | failed
APPROVAL_TAG = "kubeseg.approval"  # awaiting | approved
LOCK_SUFFIX = ".kubeseg-lock"
APPROVAL_ENV = "KUBESEG_PROMOTION_APPROVAL"  # required | auto: the default of promote(require_approval=None)


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, as kubeseg sees it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    source: str
    cv_foreground_dice: float
    cv_dice: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    created: str = ""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class GateSettings:
    """Promotion gate. ``tolerance``: how far (absolute CV foreground Dice) the challenger may fall
    below the champion. ``label_floor``: every foreground label's CV Dice must reach it (a model
    that misses a label is never promoted, whatever its mean). Sanity prediction on ``holdout``
    images (a folder of raw cases or one image): every output must have the input's geometry,
    labels of the dataset only, and some foreground; with ``holdout_labels``, each case's
    foreground Dice must reach ``min_dice``, every label present in the references must be
    predicted somewhere, and its mean held-out Dice must reach ``label_floor``.

    ``holdout_set``: a registered, versioned holdout (:mod:`kubeseg.holdout`; ``"auto"`` =
    ``<name>-holdout@current``, ``"X@3"`` a given one). Then the champion and the challenger are
    scored on it in the same run and it decides instead of the CV comparison: every label's Dice
    must reach ``label_floor`` and the champion's minus ``label_tolerance``."""

    tolerance: float = 0.02
    holdout: Optional[str] = None
    holdout_labels: Optional[str] = None
    min_dice: float = 0.0
    label_floor: float = 0.1
    device: str = "auto"
    holdout_set: Optional[str] = None
    label_tolerance: float = 0.02


@dataclass(frozen=True)
class Promotion:
    """What a promotion, approval or rollback did. ``awaiting_approval``: the gate passed and the
    version waits for :func:`approve`; the champion did not move (``previous`` is the champion)."""

    name: str
    version: str
    previous: Optional[str]
    reasons: tuple[str, ...]
    awaiting_approval: bool = False


# ---- helpers -----------------------------------------------------------------------------------

_manifest_hash = manifest_hash  # one owner: kubeseg.signing


def _json_hash(path: Path) -> str:
    if not path.is_file():
        return ""
    return hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()


def _kubeseg_version() -> str:
    try:
        from importlib.metadata import version
        return version("kubeseg")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _to_version(mv, name: str) -> ModelVersion:
    tags = dict(mv.tags or {})
    cv = {k.removeprefix("cv_dice."): float(v) for k, v in tags.items() if k.startswith("cv_dice.")}
    fg = float(tags.get("cv_foreground_dice", "nan"))
    return ModelVersion(name, str(mv.version), tuple(sorted(getattr(mv, "aliases", []) or [])), mv.run_id or "",
                        mv.source, fg, cv, tags,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((mv.creation_timestamp or 0) / 1000)))


def semver_of(v: ModelVersion) -> str:
    """The version's semantic version ("" for versions registered before kubeseg kept one)."""
    return v.tags.get(SEMVER_TAG, "")


def _registered(c, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException:
        raise KubesegError(f"no registered model {name!r} in this registry") from None


def _aliases(rm) -> dict[str, str]:
    return {k: str(v) for k, v in (rm.aliases or {}).items()}


def _history(rm) -> list[str]:
    return json.loads((rm.tags or {}).get(HISTORY_TAG, "[]"))


def _append_log(c, rm, event: dict) -> None:
    entries = json.loads((rm.tags or {}).get(LOG_TAG, "[]"))
    entries = (entries + [event])[-30:]  # bounded: tags are short strings (MLflow: 5000 characters)
    while len(entries) > 1 and len(json.dumps(entries, separators=(",", ":"))) > 4800:
        entries = entries[1:]
    c.set_registered_model_tag(rm.name, LOG_TAG, json.dumps(entries, separators=(",", ":")))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_time(text: str) -> Optional[float]:
    """Seconds since the epoch of a ``_now()`` timestamp; None when it is not one."""
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (TypeError, ValueError):
        return None


# ---- the registry lock -------------------------------------------------------------------------

@dataclass(frozen=True)
class LockSettings:
    """:func:`registry_lock`: a holder keeps the lock at most ``ttl_seconds`` (then anyone may break
    it: the holder died); a waiter gives up after ``wait_seconds``. Critical sections are a few
    registry calls, so the defaults are generous. ``KUBESEG_REGISTRY_LOCK_TTL_SECONDS`` and
    ``KUBESEG_REGISTRY_LOCK_WAIT_SECONDS`` override them."""

    ttl_seconds: float = 120.0
    wait_seconds: float = 180.0
    poll_seconds: float = 0.2

    @classmethod
    def from_env(cls) -> "LockSettings":
        d = cls()
        return cls(float(os.environ.get("KUBESEG_REGISTRY_LOCK_TTL_SECONDS") or d.ttl_seconds),
                   float(os.environ.get("KUBESEG_REGISTRY_LOCK_WAIT_SECONDS") or d.wait_seconds))


_LOCK_HOLDER, _LOCK_EXPIRES = "kubeseg.lock.holder", "kubeseg.lock.expires"


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


def _error_code(e) -> str:
    return str(getattr(e, "error_code", ""))


@contextmanager
def registry_lock(name: str, uri: Optional[str] = None, purpose: str = "",
                  settings: Optional[LockSettings] = None) -> Iterator[str]:
    """Hold ``name``'s registry lock for the ``with`` block; yields the holder id.

    The lock is the registered model ``<name>.kubeseg-lock``: creating it succeeds for exactly one
    caller (the store's unique constraint; the others get ``RESOURCE_ALREADY_EXISTS`` and retry).
    Its tags name the holder and when it expires; an expired lock is broken (audited) and taken.
    Known limit: two callers that break the *same* stale lock at the same millisecond can both
    proceed; stale locks only exist when a holder died inside its critical section.
    """
    from mlflow.exceptions import MlflowException

    settings = settings or LockSettings.from_env()
    c = client(uri)
    lock = lock_name(name)
    holder = f"{audit.actor()}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + settings.wait_seconds
    while True:
        try:
            c.create_registered_model(lock, tags={_LOCK_HOLDER: holder,
                                                  _LOCK_EXPIRES: f"{time.time() + settings.ttl_seconds:.3f}"},
                                      description=f"kubeseg registry lock of {name}: {purpose}"[:500])
            break
        except MlflowException as e:
            # ALREADY_EXISTS: held. DOES_NOT_EXIST: the store's unique constraint refused this
            # create and the holder released before the store could read it back: nothing was
            # created, so try again
            if _error_code(e) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        try:
            held = c.get_registered_model(lock)
        except MlflowException:
            continue  # released meanwhile: try again at once
        tags = held.tags or {}
        if tags.get(_LOCK_HOLDER) == holder:
            break  # our own create succeeded but its answer was lost and retried by the client
        try:
            expires = float(tags[_LOCK_EXPIRES])
        except (KeyError, ValueError):  # tags not (yet) readable: judge by when it was created
            expires = (held.creation_timestamp or 0) / 1000 + settings.ttl_seconds
        if time.time() > expires:
            _break_stale(c, lock, held, tags.get(_LOCK_HOLDER, "?"), holder)
            continue
        if time.monotonic() > deadline:
            raise KubesegError(f"the registry lock of {name} ({lock}) is held by {tags.get(_LOCK_HOLDER, '?')} "
                               f"(expires in {expires - time.time():.0f} s); gave up after {settings.wait_seconds:.0f} s")
        time.sleep(settings.poll_seconds * (0.5 + random.random()))
    try:
        yield holder
    finally:
        try:
            current = c.get_registered_model(lock)
            if (current.tags or {}).get(_LOCK_HOLDER) == holder:
                c.delete_registered_model(lock)
            else:  # our lock expired and someone broke it: say so, the section may have overlapped
                log.error("registry lock %s was taken from %s by %s", lock, holder,
                          (current.tags or {}).get(_LOCK_HOLDER))
        except MlflowException as e:
            log.error("registry lock %s of %s was broken while held (%s)", lock, holder, _error_code(e))


def _break_stale(c, lock: str, seen, stale_holder: str, breaker: str) -> None:
    """Delete the lock instance judged stale (same creation time and holder), never a newer one."""
    from mlflow.exceptions import MlflowException

    try:
        again = c.get_registered_model(lock)
        if again.creation_timestamp != seen.creation_timestamp or \
                (again.tags or {}).get(_LOCK_HOLDER, "?") != stale_holder:
            return
        c.delete_registered_model(lock)
    except MlflowException:
        return  # gone already
    log.warning("broke the stale registry lock %s of %s", lock, stale_holder)
    audit.record("registry_lock_broken", lock=lock, stale_holder=stale_holder, by=breaker)


# ---- semantic versions -------------------------------------------------------------------------

def parse_semver(text: str) -> Optional[tuple[int, int, int]]:
    parts = str(text or "").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def semver_change(base: Optional[ModelVersion], labels_sha: str, plans_sha: str,
                  retrain_mode: Optional[str]) -> tuple[str, str]:
    """What kind of change a new version is against ``base`` (the champion, else the newest
    version): ``major`` (label set or plans changed), ``patch`` (fine-tuned), ``minor``
    (retrained), or ``initial``; and why."""
    if base is None:
        return "initial", "the first version of this model"
    changed = []
    if base.tags.get(LABELS_TAG) and labels_sha and base.tags[LABELS_TAG] != labels_sha:
        changed.append("label set")
    if base.tags.get("plans_sha256") and plans_sha and base.tags["plans_sha256"] != plans_sha:
        changed.append("plans")
    if changed:
        return "major", f"{' and '.join(changed)} changed against version {base.version}"
    if retrain_mode == "finetune":
        return "patch", f"fine-tuned from version {base.version}'s plans and labels"
    return "minor", f"retrained with version {base.version}'s plans and labels"


def next_semver(change: str, base: Optional[str], taken: Sequence[str]) -> str:
    """The semver for a ``change`` of ``base``, above every taken one of its line (so unique):
    major (and initial): the next major; minor: the next minor of base's major; patch: the next
    patch of base's major.minor. A base without a semver counts as the highest taken one."""
    used = [t for t in (parse_semver(x) for x in taken) if t is not None]
    if not used:
        return "1.0.0"
    major, minor, _ = parse_semver(base or "") or max(used)
    if change in ("initial", "major"):
        return f"{max(u[0] for u in used) + 1}.0.0"
    if change == "minor":
        return f"{major}.{max([u[1] for u in used if u[0] == major], default=-1) + 1}.0"
    return f"{major}.{minor}.{max([u[2] for u in used if u[:2] == (major, minor)], default=-1) + 1}"


def _labels_hash(bundle_dir: Path) -> str:
    ds = bundle_dir / "dataset.json"
    if not ds.is_file():
        return ""
    labels = json.loads(ds.read_text()).get("labels", {})
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()


def _assign_semver(c, name: str, labels_sha: str, plans_sha: str, retrain_mode: Optional[str]) -> dict[str, str]:
    """Tags of the next version's semver (call under the registry lock, so it is unique)."""
    rm = c.get_registered_model(name)
    versions = [_to_version(mv, name) for mv in c.search_model_versions(f"name='{name}'")]
    champ = _aliases(rm).get(CHAMPION)
    base = next((v for v in versions if v.version == champ), None) or \
        max(versions, key=lambda v: int(v.version), default=None)
    change, why = semver_change(base, labels_sha, plans_sha, retrain_mode)
    semver = next_semver(change, semver_of(base) if base else None, [semver_of(v) for v in versions])
    return {SEMVER_TAG: semver, CHANGE_TAG: change, "kubeseg.change_reason": why,
            **({RETRAIN_MODE_TAG: retrain_mode} if retrain_mode else {})}


# ---- API ---------------------------------------------------------------------------------------

def register_bundle(bundle_dir: str | Path, name: str, uri: Optional[str] = None,
                    parent_run_id: Optional[str] = None, source_run: str = "",
                    experiment: str = DEFAULT_EXPERIMENT, tags: Optional[dict[str, str]] = None,
                    signing_key: Optional[str | Path] = None, retrain_mode: Optional[str] = None) -> ModelVersion:
    """Log ``bundle_dir`` as one new version of ``name`` (created if needed) and point ``challenger`` at it.

    ``signing_key`` (default ``KUBESEG_SIGNING_KEY``): the Ed25519 registration key that signs the
    manifest; without one the version is registered unsigned (and verifying consumers refuse it).
    ``retrain_mode`` (``finetune`` | ``retrain``; also read from ``tags['kubeseg.retrain_mode']``)
    decides the semver's patch or minor step (:func:`semver_change`)."""
    from kubeseg.inference.run import SELECTION_FILENAME

    bundle_dir = Path(bundle_dir)
    sel_file = bundle_dir / SELECTION_FILENAME
    if not sel_file.is_file():
        raise KubesegError(f"{bundle_dir} is not a kubeseg bundle (no {SELECTION_FILENAME})")
    selection = json.loads(sel_file.read_text())
    manifest = bundle_checksums(bundle_dir)
    signing_key = signing_key or os.environ.get(SIGNING_KEY_ENV) or None
    who = audit.actor()
    signature = sign_manifest(manifest, signing_key, signed_by=who) if signing_key else None
    if signature is None:
        log.warning("registering %s unsigned (no %s): services that verify signatures will refuse it",
                    name, SIGNING_KEY_ENV)
    uri = tracking_uri(uri)
    c = client(uri)
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description="kubeseg segmentation bundles (nnU-Net v2 layout)")
        except MlflowException as e:  # another registration created it meanwhile
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
    if parent_run_id:
        parent = c.get_run(parent_run_id)
        exp_id = parent.info.experiment_id
        if retrain_mode is None and (parent.data.params or {}).get("mode") in ("finetune", "retrain"):
            retrain_mode = parent.data.params["mode"]  # the retraining pipeline's run parameter
    else:
        exp_id = ensure_experiment(uri, experiment)
    run_tags = {"kubeseg.kind": "register", "kubeseg.model_name": name}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=f"register {name}", tags=run_tags)
    run_id = run.info.run_id
    c.log_artifacts(run_id, str(bundle_dir), BUNDLE_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        mf = Path(tmp) / MANIFEST
        mf.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        c.log_artifact(run_id, str(mf))
        if signature is not None:
            sf = Path(tmp) / SIGNATURE_FILE
            sf.write_text(signature.to_json())
            c.log_artifact(run_id, str(sf))
    c.set_terminated(run_id, "FINISHED")

    members = " + ".join(m["configuration"] for m in selection.get("members", []))
    vtags = {
        "cv_foreground_dice": f"{float(selection.get('expected_foreground_dice', float('nan'))):.6f}",
        **{f"cv_dice.{k}": f"{float(v):.6f}" for k, v in (selection.get("expected_dice") or {}).items()
           if v is not None},
        "configurations": members,
        "dataset_fingerprint_sha256": _json_hash(bundle_dir / "dataset_fingerprint.json"),
        "plans_sha256": _json_hash(bundle_dir / "plans.json"),
        "source_pipeline_run": source_run or "",
        "kubeseg_version": _kubeseg_version(),
        "bundle_manifest_sha256": _manifest_hash(manifest),
        "bundle_files": str(len(manifest)),
        "kubeseg.registered_by": who,
        "kubeseg.signature_key_id": signature.key_id if signature else "unsigned",
        LABELS_TAG: _labels_hash(bundle_dir),
        **(tags or {}),
    }
    retrain_mode = retrain_mode or vtags.get(RETRAIN_MODE_TAG) or None
    if retrain_mode not in (None, "finetune", "retrain"):
        raise KubesegError(f"retrain_mode must be finetune or retrain, not {retrain_mode!r}")
    with registry_lock(name, uri, f"register a version of {name}"):  # one semver per version
        vtags.update(_assign_semver(c, name, vtags[LABELS_TAG], vtags["plans_sha256"], retrain_mode))
        mv = c.create_model_version(name, source=f"runs:/{run_id}/{BUNDLE_PATH}", run_id=run_id, tags=vtags,
                                    description=f"{vtags[SEMVER_TAG]} ({members}): CV foreground Dice "
                                                f"{vtags['cv_foreground_dice']}")
        c.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s version %s, %s (%s)", name, mv.version, vtags[SEMVER_TAG], CHALLENGER)
    audit.record("register", by=who, model=name, version=str(mv.version), run_id=run_id, semver=vtags[SEMVER_TAG],
                 change=vtags[CHANGE_TAG], signature_key_id=vtags["kubeseg.signature_key_id"],
                 source_pipeline_run=source_run or "")
    return get_version(name, str(mv.version), uri)


def get_version(name: str, ref: str, uri: Optional[str] = None) -> ModelVersion:
    """A version by number or alias."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    _registered(c, name)
    try:
        mv = c.get_model_version(name, ref) if str(ref).isdigit() else c.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise KubesegError(f"{name} has no version or alias {ref!r}") from None
    return _to_version(mv, name)


def list_versions(name: str, uri: Optional[str] = None) -> list[ModelVersion]:
    """All versions of ``name``, newest first."""
    c = client(uri)
    _registered(c, name)
    mvs = c.search_model_versions(f"name='{name}'")
    return sorted((_to_version(c.get_model_version(name, mv.version), name) for mv in mvs),
                  key=lambda v: int(v.version), reverse=True)


def champion_history(name: str, uri: Optional[str] = None) -> list[str]:
    return _history(_registered(client(uri), name))


def _signature_of(run_id: str, uri: str, staging: Path) -> Optional[Signature]:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{SIGNATURE_FILE}",
                                                   dst_path=str(staging / "s"), tracking_uri=uri)
    except (MlflowException, OSError):
        return None  # no signature artifact: unsigned
    return Signature.from_json(Path(path).read_text())


def _refused(c, v: ModelVersion, e: SignatureError) -> None:
    """Audit a refused signature and tag the version (best effort: a read-only caller cannot tag)."""
    audit.record("signature_refused", model=v.name, version=v.version, reason=e.reason, detail=str(e),
                 registered_by=v.tags.get("kubeseg.registered_by", ""))
    try:
        c.set_model_version_tag(v.name, v.version, "kubeseg.signature_refused",
                                json.dumps({"reason": e.reason, "by": audit.actor(), "at": _now()}))
    except Exception as te:  # noqa: BLE001 - read-only credentials: the audit log has it
        log.info("could not tag %s version %s as refused: %s", v.name, v.version, type(te).__name__)


def load_version(name: str, ref: str, dst: str | Path, uri: Optional[str] = None,
                 public_key: Optional[str | Path] = None) -> Path:
    """Download version ``ref`` (number or alias) of ``name`` into ``dst`` and verify every file
    against the checksums recorded at registration and, with ``public_key``, the manifest's
    signature (:class:`~kubeseg.signing.SignatureError` when it does not verify); returns the
    bundle folder, which carries the signature file when the version is signed."""
    import mlflow.artifacts

    uri = tracking_uri(uri)
    v = get_version(name, ref, uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download.", dir=dst))
    try:
        bundle = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{v.run_id}/{BUNDLE_PATH}",
                                                          dst_path=str(staging / "b"), tracking_uri=uri))
        mf = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{v.run_id}/{MANIFEST}",
                                                      dst_path=str(staging / "m"), tracking_uri=uri))
        manifest = json.loads(mf.read_text())
        if _manifest_hash(manifest) != v.tags.get("bundle_manifest_sha256"):
            error = KubesegError(f"{name} version {v.version}: the checksum manifest does not match the one "
                                 "recorded at registration")
            if public_key:
                error = SignatureError("altered", str(error))
                _refused(client(uri), v, error)
            raise error
        found = bundle_checksums(bundle)
        missing = sorted(set(manifest) - set(found))
        extra = sorted(set(found) - set(manifest))
        changed = sorted(k for k in set(manifest) & set(found) if manifest[k] != found[k])
        if missing or extra or changed:
            error = KubesegError(f"{name} version {v.version} failed verification: "
                                 f"missing {missing}, unexpected {extra}, changed {changed}")
            if public_key:  # files changed after registration: for a verifying consumer, a refused signature
                error = SignatureError("altered", str(error))
                _refused(client(uri), v, error)
            raise error
        signature = _signature_of(v.run_id, uri, staging)
        if public_key:
            try:
                verify_manifest(manifest, signature, public_key, f"{name} version {v.version}")
            except SignatureError as e:
                _refused(client(uri), v, e)
                raise
        if signature is not None:
            (bundle / SIGNATURE_FILE).write_text(signature.to_json())
        target = dst / f"{name}-v{v.version}"
        if target.exists():
            shutil.rmtree(target)
        bundle.rename(target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sanity_check(bundle: str | Path, gate: GateSettings) -> list[str]:
    """Predict the held-out cases with ``bundle``; returns the problems found (empty: passed)."""
    import numpy as np
    import SimpleITK as sitk

    from kubeseg.inference import PredictSettings, predict
    from kubeseg.jsonio import read_json

    if not gate.holdout:
        return ["no held-out cases given for the sanity prediction"]
    holdout = Path(gate.holdout)
    if not holdout.exists():
        return [f"held-out cases {holdout} do not exist"]
    names = label_names(read_json(Path(bundle) / "dataset.json"))
    labels = {0, *names}
    problems = []
    per_label: dict[int, list[float]] = {lab: [] for lab in names}  # held-out Dice where the label occurs
    predicted: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            written = predict(holdout, Path(tmp) / "pred", bundle,
                              PredictSettings(device=gate.device, use_mirroring=False, progress=False))
        except Exception as e:  # noqa: BLE001 - any failure fails the gate
            return [f"prediction failed: {type(e).__name__}: {e}"]
        if not written:
            return [f"no case predicted from {holdout}"]
        for out in written:
            seg = sitk.ReadImage(str(out))
            arr = sitk.GetArrayFromImage(seg)
            case = out.name.split(".")[0]
            inputs = sorted(holdout.glob(f"{case}_0000.*")) if holdout.is_dir() else [holdout]
            if inputs:
                ref_img = sitk.ReadImage(str(inputs[0]))
                if ref_img.GetSize() != seg.GetSize() or not np.allclose(ref_img.GetSpacing(), seg.GetSpacing()):
                    problems.append(f"{case}: output geometry {seg.GetSize()} differs from input {ref_img.GetSize()}")
            found = set(np.unique(arr).tolist())
            predicted |= found
            if not found <= labels:
                problems.append(f"{case}: unknown label(s) {sorted(found - labels)}")
            if not (arr > 0).any():
                problems.append(f"{case}: no foreground predicted")
            if gate.holdout_labels:
                ref_file = Path(gate.holdout_labels) / out.name
                if ref_file.is_file():
                    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_file)))
                    dices = []
                    for lab in sorted(names):
                        a, b = arr == lab, ref == lab
                        if a.any() or b.any():
                            dices.append(2 * (a & b).sum() / (a.sum() + b.sum()))
                        if b.any():
                            per_label[lab].append(float(dices[-1]))
                    d = float(np.mean(dices)) if dices else float("nan")
                    if not d >= gate.min_dice:
                        problems.append(f"{case}: foreground Dice {d:.3f} below {gate.min_dice}")
    for lab, dices in per_label.items():
        if not dices:
            continue
        if lab not in predicted:
            problems.append(f"label {names[lab]!r} ({lab}) is in the references of {len(dices)} held-out case(s) "
                            f"but never predicted")
        elif not float(np.mean(dices)) >= gate.label_floor:
            problems.append(f"label {names[lab]!r} ({lab}): held-out Dice {np.mean(dices):.3f} under the floor "
                            f"{gate.label_floor}")
    return problems


def label_names(dataset_json: dict) -> dict[int, str]:
    """Foreground label value -> name, from nnU-Net's ``labels`` (name -> value)."""
    return {int(v): str(k) for k, v in dataset_json["labels"].items() if int(v) != 0}


def cv_label_problems(version: ModelVersion, names: dict[int, str], floor: float) -> list[str]:
    """Every foreground label must reach ``floor`` in cross-validation. A label with no CV Dice at
    all (NaN: neither in the validation references nor predicted) cannot be judged and passes;
    one that is in the references but never predicted scores 0 and is refused."""
    problems = []
    for lab, name in sorted(names.items()):
        dice = version.cv_dice.get(str(lab))
        if dice is None or dice != dice:
            continue
        if not dice >= floor:
            problems.append(f"label {name!r} ({lab}): CV Dice {dice:.3f} under the floor {floor}")
    return problems


def promote(name: str, version: Optional[str] = None, gate: GateSettings = GateSettings(),
            uri: Optional[str] = None, reason: str = "", public_key: Optional[str | Path] = None,
            require_approval: Optional[bool] = None) -> Promotion:
    """Make ``version`` (default: the ``challenger``) the ``champion`` if it passes the gate;
    otherwise raise :class:`KubesegError` saying why, changing nothing but the version's gate tags
    (``kubeseg.gate=failed`` and why). With ``public_key`` (default ``KUBESEG_MODEL_PUBLIC_KEY``)
    an unsigned or badly signed version is refused too. ``reason`` (why a person or pipeline
    promotes) goes into the champion log and the audit trail.

    ``require_approval`` (default: ``KUBESEG_PROMOTION_APPROVAL=required``): a version that passes
    the gate is only marked ``kubeseg.approval=awaiting``; :func:`approve` makes it the champion."""
    if require_approval is None:
        require_approval = approval_required()
    uri = tracking_uri(uri)
    try:
        return _gate_and_promote(name, version, gate, uri, reason, public_key, require_approval)
    except KubesegError as e:
        _record_gate_failure(name, version, uri, str(e))
        raise


def approval_required() -> bool:
    """``KUBESEG_PROMOTION_APPROVAL``: ``required`` (a person approves every promotion) or ``auto``."""
    value = (os.environ.get(APPROVAL_ENV) or "auto").strip().lower()
    if value not in ("required", "auto"):
        raise KubesegError(f"{APPROVAL_ENV} must be required or auto, not {value!r}")
    return value == "required"


def _record_gate_failure(name: str, version: Optional[str], uri: str, why: str) -> None:
    """Tag a version whose gate refused it (best effort: a refusal before the version is known is not tagged)."""
    from mlflow.exceptions import MlflowException

    try:
        v = get_version(name, version or CHALLENGER, uri)
        if "refusing" not in why:
            return  # not a gate verdict (e.g. already the champion, no such version)
        c = client(uri)
        c.set_model_version_tag(name, v.version, GATE_TAG, "failed")
        c.set_model_version_tag(name, v.version, "kubeseg.gate_at", _now())
        c.set_model_version_tag(name, v.version, "kubeseg.gate_reasons", why[:1000])
        if v.tags.get(APPROVAL_TAG) == "awaiting":  # a re-run of the gate that failed: no longer approvable
            c.set_model_version_tag(name, v.version, APPROVAL_TAG, "withdrawn")
    except (KubesegError, MlflowException) as e:
        log.info("could not tag the gate failure of %s version %s: %s", name, version, e)


def _cv_rule(cand: ModelVersion, champ: ModelVersion, tolerance: float) -> bool:
    return cand.cv_foreground_dice >= champ.cv_foreground_dice - tolerance


def _gate_and_promote(name: str, version: Optional[str], gate: GateSettings, uri: str, reason: str,
                      public_key: Optional[str | Path], require_approval: bool) -> Promotion:
    """The gate (outside the lock: it predicts), then :func:`_after_gate` under the lock."""
    public_key = public_key or os.environ.get(PUBLIC_KEY_ENV) or None
    c = client(uri)
    rm = _registered(c, name)
    ref = version or CHALLENGER
    cand = get_version(name, ref, uri)
    champ_v = _aliases(rm).get(CHAMPION)
    if champ_v is not None and champ_v == cand.version:
        raise KubesegError(f"{name} version {cand.version} is already the champion")
    reasons = []
    if champ_v is not None and gate.holdout_set:
        reasons.append("CV Dice not compared with the champion's (other data): the holdout decides")
    elif champ_v is not None:
        champ = get_version(name, str(champ_v), uri)
        if not cand.cv_foreground_dice >= champ.cv_foreground_dice - gate.tolerance:
            raise KubesegError(
                f"refusing to promote {name} version {cand.version}: its CV foreground Dice "
                f"{cand.cv_foreground_dice:.4f} is below the champion's (version {champ.version}, "
                f"{champ.cv_foreground_dice:.4f}) by more than the tolerance {gate.tolerance}; champion unchanged")
        reasons.append(f"CV foreground Dice {cand.cv_foreground_dice:.4f} vs champion {champ.cv_foreground_dice:.4f} "
                       f"(tolerance {gate.tolerance})")
    else:
        reasons.append(f"no champion yet; CV foreground Dice {cand.cv_foreground_dice:.4f}")
    from kubeseg.jsonio import read_json

    with tempfile.TemporaryDirectory() as tmp:
        try:
            bundle = load_version(name, cand.version, tmp, uri, public_key)
        except KubesegError as e:
            raise KubesegError(f"refusing to promote {name} version {cand.version}: {e}; champion unchanged") from None
        names = label_names(read_json(Path(bundle) / "dataset.json"))
        missed = cv_label_problems(cand, names, gate.label_floor)
        if missed:
            raise KubesegError(f"refusing to promote {name} version {cand.version}: it misses label(s): "
                               + "; ".join(missed) + "; champion unchanged")
        reasons.append(f"every label's CV Dice reaches {gate.label_floor}: "
                       + ", ".join(f"{names[k]} {cand.cv_dice[str(k)]:.3f}" for k in sorted(names)
                                   if str(k) in cand.cv_dice))
        if gate.holdout_set:  # both models scored on the fixed holdout, per label (kubeseg/holdout.py)
            from kubeseg.holdout import holdout_gate
            reasons += holdout_gate(name, cand.version, bundle, champ_v, gate.holdout_set, gate.label_floor,
                                    gate.label_tolerance, uri, gate.device, public_key).reasons
        problems = sanity_check(bundle, gate) if gate.holdout or not gate.holdout_set else []
    if problems:
        raise KubesegError(f"refusing to promote {name} version {cand.version}: the sanity prediction failed: "
                           + "; ".join(problems) + "; champion unchanged")
    if gate.holdout or not gate.holdout_set:
        reasons.append(f"sanity prediction passed on {gate.holdout}"
                       + (f" (references {gate.holdout_labels})" if gate.holdout_labels else ""))

    return _after_gate(c, uri, name, cand, champ_v, reasons, gate.tolerance, reason, require_approval)


def _after_gate(c, uri: str, name: str, cand: ModelVersion, gated_against: Optional[str], reasons: list[str],
                tolerance: float, reason: str, require_approval: bool) -> Promotion:
    """Under the registry lock: re-read the champion (another run may have moved it while this
    gate ran; the CV rule is then checked against the new one), record the gate, and either make
    ``cand`` the champion or mark it awaiting approval."""
    with registry_lock(name, uri, f"promote version {cand.version}"):
        rm = _registered(c, name)
        champ_v = _aliases(rm).get(CHAMPION)
        if champ_v == cand.version:
            raise KubesegError(f"{name} version {cand.version} is already the champion")
        if champ_v is not None and champ_v != gated_against:
            now = get_version(name, champ_v, uri)
            if not _cv_rule(cand, now, tolerance):
                raise KubesegError(
                    f"refusing to promote {name} version {cand.version}: while its gate ran, version {champ_v} "
                    f"became the champion and its CV foreground Dice {now.cv_foreground_dice:.4f} is above the "
                    f"challenger's {cand.cv_foreground_dice:.4f} by more than the tolerance {tolerance}; "
                    "champion unchanged")
            reasons.append(f"re-checked against version {champ_v}, which became the champion while the gate ran")
        who = audit.actor()
        for k, v in {GATE_TAG: "passed", "kubeseg.gate_at": _now(), "kubeseg.gate_reasons": "; ".join(reasons)[:1000],
                     "kubeseg.gate_champion": champ_v or "", "kubeseg.gate_tolerance": str(tolerance)}.items():
            c.set_model_version_tag(name, cand.version, k, v)
        if require_approval:
            c.set_model_version_tag(name, cand.version, APPROVAL_TAG, "awaiting")
            _append_log(c, rm, {"event": "awaiting_approval", "version": cand.version, "previous": champ_v,
                                "at": _now(), "by": who, "reason": (reason or "gate passed")[:200]})
            audit.record("awaiting_approval", by=who, model=name, version=cand.version, champion=champ_v,
                         reason=reason or "", gate=list(reasons))
            log.info("%s version %s passed the gate and awaits approval (champion stays %s)", name, cand.version,
                     champ_v)
            return Promotion(name, cand.version, champ_v, tuple(reasons), awaiting_approval=True)
        why = reason or "; ".join(reasons)
        _make_champion(c, rm, cand.version, champ_v, "promote", who, why, gate=list(reasons))
    return Promotion(name, cand.version, None if champ_v is None else str(champ_v), tuple(reasons))


def _make_champion(c, rm, version: str, previous: Optional[str], event: str, who: str, why: str, **extra) -> None:
    """Point ``champion`` at ``version`` and record it (history, log, version tags, audit); under the lock."""
    name = rm.name
    history = _history(rm)
    c.set_registered_model_alias(name, CHAMPION, version)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps([str(h) for h in history] + [version]))
    _append_log(c, rm, {"event": event, "version": version, "previous": previous, "at": _now(), "by": who,
                        "reason": why[:200]})
    c.set_model_version_tag(name, version, "kubeseg.promoted_at", _now())
    c.set_model_version_tag(name, version, "kubeseg.promoted_by", who)
    c.set_model_version_tag(name, version, "kubeseg.promotion_reason", why[:500])
    audit.record(event, by=who, model=name, version=version, previous=previous, reason=why, **extra)
    if _aliases(rm).get(CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    log.info("%s version %s is the champion (was %s; %s)", name, version, previous, event)


def approve(name: str, version: str, reason: str, uri: Optional[str] = None) -> Promotion:
    """A person approves ``version`` (which passed the gate and awaits approval): it becomes the
    champion, with who (:func:`kubeseg.audit.actor`) and why recorded in the version's tags, the
    champion log and the audit trail. Refused (changing nothing) for a version that failed the
    gate, never ran it, is not awaiting approval, or no longer passes the CV rule against a
    champion that changed since its gate ran."""
    if not reason or not reason.strip():
        raise KubesegError("an approval needs a reason (--reason)")
    uri = tracking_uri(uri)
    c = client(uri)
    who = audit.actor()
    with registry_lock(name, uri, f"approve version {version}"):
        rm = _registered(c, name)
        v = get_version(name, str(version), uri)
        gate, state = v.tags.get(GATE_TAG), v.tags.get(APPROVAL_TAG)
        if gate != "passed":
            why = v.tags.get("kubeseg.gate_reasons", "")
            raise KubesegError(f"refusing to approve {name} version {v.version}: it "
                               + (f"failed the gate ({why[:300]})" if gate == "failed" else "has not passed the gate")
                               + "; champion unchanged")
        champ_v = _aliases(rm).get(CHAMPION)
        if champ_v == v.version:
            raise KubesegError(f"{name} version {v.version} is already the champion")
        if state != "awaiting":
            raise KubesegError(f"refusing to approve {name} version {v.version}: it is not awaiting approval "
                               f"({APPROVAL_TAG}={state or 'unset'}); champion unchanged")
        if champ_v is not None and champ_v != v.tags.get("kubeseg.gate_champion", ""):
            now = get_version(name, champ_v, uri)
            tolerance = float(v.tags.get("kubeseg.gate_tolerance", GateSettings.tolerance))
            if not _cv_rule(v, now, tolerance):
                raise KubesegError(f"refusing to approve {name} version {v.version}: version {champ_v} became the "
                                   f"champion after its gate and is better by more than {tolerance}; run the gate "
                                   "again; champion unchanged")
        for k, val in {APPROVAL_TAG: "approved", "kubeseg.approved_by": who, "kubeseg.approved_at": _now(),
                       "kubeseg.approval_reason": reason[:500]}.items():
            c.set_model_version_tag(name, v.version, k, val)
        _make_champion(c, rm, v.version, champ_v, "approve", who, reason, semver=semver_of(v))
    return Promotion(name, v.version, champ_v, (f"approved by {who}: {reason}",))


def awaiting_approval(name: str, uri: Optional[str] = None) -> list[ModelVersion]:
    """Versions that passed the gate and wait for :func:`approve`, newest first."""
    return [v for v in list_versions(name, uri) if v.tags.get(APPROVAL_TAG) == "awaiting"
            and v.tags.get(GATE_TAG) == "passed" and CHAMPION not in v.aliases]


def champion_since(name: str, uri: Optional[str] = None) -> Optional[dict]:
    """How the current champion became champion: the latest champion-log event that made it so
    (``event``: promote | approve | rollback, ``at``, ``by``, ``reason``, ``unix_time``); None
    without a champion or when the bounded log no longer has it."""
    rm = _registered(client(uri), name)
    champ = _aliases(rm).get(CHAMPION)
    if champ is None:
        return None
    for e in reversed(json.loads((rm.tags or {}).get(LOG_TAG, "[]"))):
        if e.get("event") in ("promote", "approve", "rollback") and str(e.get("version")) == champ:
            return {**e, "version": champ, "unix_time": parse_time(e.get("at", ""))}
        if e.get("event") in ("promote", "approve", "rollback"):
            return None  # the latest move made another version champion: the log is inconsistent
    return None


def rollback(name: str, uri: Optional[str] = None, reason: str = "", expected: Optional[str] = None,
             by: Optional[str] = None) -> Promotion:
    """Return ``champion`` to the previous champion; refuses (changing nothing) if there is none,
    or, with ``expected``, if the champion is no longer that version (an automatic rollback of a
    version that another run already replaced). ``reason`` goes into the champion log, a version
    tag and the audit trail with who did it (``by``, default :func:`kubeseg.audit.actor`)."""
    uri = tracking_uri(uri)
    c = client(uri)
    with registry_lock(name, uri, "rollback"):
        rm = _registered(c, name)
        history = _history(rm)
        current = _aliases(rm).get(CHAMPION)
        if current is None:
            raise KubesegError(f"{name} has no champion to roll back")
        if expected is not None and str(expected) != current:
            raise KubesegError(f"{name}: the champion is version {current}, not {expected}; nothing rolled back")
        if len(history) < 2:
            raise KubesegError(f"{name} has no previous champion to roll back to (champion history: {history}); "
                               f"champion stays version {current}")
        previous = history[-2]
        c.set_registered_model_alias(name, CHAMPION, previous)
        c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
        who = by or audit.actor()
        why = reason or "not given"
        _append_log(c, rm, {"event": "rollback", "version": previous, "previous": current, "at": _now(),
                            "by": who, "reason": why[:200]})
        c.set_model_version_tag(name, str(current), "kubeseg.rolled_back_at", _now())
        c.set_model_version_tag(name, str(current), "kubeseg.rolled_back_by", who)
        c.set_model_version_tag(name, str(current), "kubeseg.rollback_reason", why[:500])
        audit.record("rollback", by=who, model=name, version=str(previous), previous=str(current), reason=why)
    log.info("%s champion rolled back from version %s to %s", name, current, previous)
    return Promotion(name, str(previous), str(current), (f"rolled back from version {current}",))


def versions_table(versions: Sequence[ModelVersion]) -> tuple[list[str], list[list[str]]]:
    header = ["version", "semver", "aliases", "gate", "approval", "configurations", "CV fg Dice", "created",
              "source run"]
    rows = [[v.version, semver_of(v) or "-", ",".join(v.aliases), v.tags.get(GATE_TAG, "-"),
             v.tags.get(APPROVAL_TAG, "-"), v.tags.get("configurations", ""), f"{v.cv_foreground_dice:.4f}",
             v.created, v.tags.get("source_pipeline_run", "")] for v in versions]
    return header, rows
