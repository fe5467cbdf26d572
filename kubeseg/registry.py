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

Signatures (:mod:`kubeseg.signing`): with a registration key (``signing_key`` or
``KUBESEG_SIGNING_KEY``) the manifest is signed and the signature logged next to it
(``kubeseg-signature.json``) and tagged (``kubeseg.signature_key_id``). :func:`load_version`
with a public key refuses a version whose signature does not verify, tags the version
``kubeseg.signature_refused`` (where the caller may write tags) and audits the refusal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

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
    name: str
    version: str
    previous: Optional[str]
    reasons: tuple[str, ...]


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


# ---- API ---------------------------------------------------------------------------------------

def register_bundle(bundle_dir: str | Path, name: str, uri: Optional[str] = None,
                    parent_run_id: Optional[str] = None, source_run: str = "",
                    experiment: str = DEFAULT_EXPERIMENT, tags: Optional[dict[str, str]] = None,
                    signing_key: Optional[str | Path] = None) -> ModelVersion:
    """Log ``bundle_dir`` as one new version of ``name`` (created if needed) and point ``challenger`` at it.

    ``signing_key`` (default ``KUBESEG_SIGNING_KEY``): the Ed25519 registration key that signs the
    manifest; without one the version is registered unsigned (and verifying consumers refuse it)."""
    import os

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
        c.create_registered_model(name, description="kubeseg segmentation bundles (nnU-Net v2 layout)")
    if parent_run_id:
        exp_id = c.get_run(parent_run_id).info.experiment_id
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
        **(tags or {}),
    }
    mv = c.create_model_version(name, source=f"runs:/{run_id}/{BUNDLE_PATH}", run_id=run_id, tags=vtags,
                                description=f"{members}: CV foreground Dice {vtags['cv_foreground_dice']}")
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s version %s (%s)", name, mv.version, CHALLENGER)
    audit.record("register", by=who, model=name, version=str(mv.version), run_id=run_id,
                 signature_key_id=vtags["kubeseg.signature_key_id"], source_pipeline_run=source_run or "")
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
            uri: Optional[str] = None, reason: str = "", public_key: Optional[str | Path] = None) -> Promotion:
    """Make ``version`` (default: the ``challenger``) the ``champion`` if it passes the gate;
    otherwise raise :class:`KubesegError` saying why, changing nothing. With ``public_key``
    (default ``KUBESEG_MODEL_PUBLIC_KEY``) an unsigned or badly signed version is refused too.
    ``reason`` (why a person or pipeline promotes) goes into the champion log and the audit trail."""
    import os

    public_key = public_key or os.environ.get(PUBLIC_KEY_ENV) or None
    uri = tracking_uri(uri)
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

    history = _history(rm)
    who = audit.actor()
    why = reason or "; ".join(reasons)
    c.set_registered_model_alias(name, CHAMPION, cand.version)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps([str(h) for h in history] + [cand.version]))
    _append_log(c, rm, {"event": "promote", "version": cand.version, "previous": champ_v, "at": _now(),
                        "by": who, "reason": why[:200]})
    c.set_model_version_tag(name, cand.version, "kubeseg.promoted_at", _now())
    c.set_model_version_tag(name, cand.version, "kubeseg.promoted_by", who)
    c.set_model_version_tag(name, cand.version, "kubeseg.promotion_reason", why[:500])
    audit.record("promote", by=who, model=name, version=cand.version, previous=champ_v, reason=why,
                 gate=list(reasons))
    if _aliases(rm).get(CHALLENGER) == cand.version:
        c.delete_registered_model_alias(name, CHALLENGER)
    log.info("%s version %s is the champion (was %s)", name, cand.version, champ_v)
    return Promotion(name, cand.version, None if champ_v is None else str(champ_v), tuple(reasons))


def rollback(name: str, uri: Optional[str] = None, reason: str = "") -> Promotion:
    """Return ``champion`` to the previous champion; refuses (changing nothing) if there is none.
    ``reason`` goes into the champion log, a version tag and the audit trail with who did it."""
    uri = tracking_uri(uri)
    c = client(uri)
    rm = _registered(c, name)
    history = _history(rm)
    current = _aliases(rm).get(CHAMPION)
    if current is None:
        raise KubesegError(f"{name} has no champion to roll back")
    if len(history) < 2:
        raise KubesegError(f"{name} has no previous champion to roll back to (champion history: {history}); "
                           f"champion stays version {current}")
    previous = history[-2]
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    who = audit.actor()
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
    header = ["version", "aliases", "configurations", "CV fg Dice", "created", "source run"]
    rows = [[v.version, ",".join(v.aliases), v.tags.get("configurations", ""), f"{v.cv_foreground_dice:.4f}",
             v.created, v.tags.get("source_pipeline_run", "")] for v in versions]
    return header, rows
