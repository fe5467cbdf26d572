"""A fixed, versioned holdout for the promotion gate (registry glue: MLflow through
:mod:`kubeseg.tracking`'s client, no Kubeflow or BentoML).

Why: cross-validation Dice of two models trained on different datasets (a champion and the
challenger fine-tuned on more cases) measures two different things; comparing them lets a model
through that is worse where it matters. The gate instead scores the champion and the challenger
on the same labelled cases, in the same run, label by label.

The holdout of a model ``NAME`` is the registered model ``NAME-holdout`` (:func:`holdout_name`):
each version is one labelled set, logged as plain artifacts of its own run (``holdout/images/``,
``holdout/labels/``, ``holdout/dataset.json`` when known) and tagged with its content hash
(``kubeseg.holdout_sha256``, :func:`kubeseg.dataset_hash.dataset_content_hash` of those files),
its number of cases and labels. The alias ``current`` points at the newest; registering the same
contents again returns the existing version. A downloaded holdout is checked against its hash.

Scores (:func:`score_bundle`): every holdout image predicted by the bundle (no mirroring); per
case and foreground label, Dice = 2|P∩R| / (|P|+|R|), undefined when the label is in neither
(then left out); a label's score is the mean over the cases where it is defined. Problems that
fail a model outright: a prediction that fails, an output geometry that differs from its input,
a label value the dataset does not know.

Decision (:func:`compare_scores`): for every foreground label of the challenger, its holdout
Dice must reach ``GateSettings.label_floor`` and, when the champion has a score for it, must not
fall below the champion's by more than ``GateSettings.label_tolerance``; each failure names the
label and both scores. :func:`holdout_gate` is the hook :func:`kubeseg.registry.promote` calls;
it tags the challenger version with the holdout version and both models' scores (``kubeseg.holdout``,
JSON), whether it passes or not.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from kubeseg.errors import KubesegError

log = logging.getLogger(__name__)

SUFFIX = "-holdout"
CURRENT = "current"
HASH_TAG = "kubeseg.holdout_sha256"
RESULT_TAG = "kubeseg.holdout"
ARTIFACT_PATH = "holdout"
EXPERIMENT = "kubeseg-holdouts"


def holdout_name(model_name: str) -> str:
    """The registered name of ``model_name``'s holdout (one owner of the name format)."""
    return f"{model_name}{SUFFIX}"


def parse_ref(text: str, model_name: str) -> tuple[str, str]:
    """``"auto"``/``""`` → (NAME-holdout, current); ``"X"`` → (X, current); ``"X@3"`` → (X, "3")."""
    text = (text or "").strip()
    if text in ("", "auto"):
        return holdout_name(model_name), CURRENT
    name, _, ref = text.partition("@")
    return name, ref or CURRENT


@dataclass(frozen=True)
class HoldoutVersion:
    name: str
    version: str
    sha256: str
    cases: int
    labels: dict  # value (str) -> name, when the set carries a dataset.json


@dataclass
class LocalHoldout:
    """A holdout on disk: ``images/<case>_0000.ext``…, ``labels/<case>.ext``."""

    version: HoldoutVersion
    images: Path
    labels: Path


@dataclass
class Scores:
    """One model's holdout scores: mean Dice per label value (``None``: undefined), per case,
    and the problems that fail the model whatever its Dice."""

    per_label: dict = field(default_factory=dict)
    per_case: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)


# ---- the labelled set ---------------------------------------------------------------------------

def find_cases(folder: str | Path) -> tuple[Path, Path, Optional[Path]]:
    """``(images, labels, dataset.json or None)`` of a labelled set: ``images/`` + ``labels/``, or an
    nnU-Net dataset folder (``imagesTs`` + ``labelsTs``, else ``imagesTr`` + ``labelsTr``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KubesegError(f"holdout {folder} is not a folder")
    ds = folder / "dataset.json"
    for img, lab in (("images", "labels"), ("imagesTs", "labelsTs"), ("imagesTr", "labelsTr")):
        if (folder / img).is_dir() and (folder / lab).is_dir():
            return folder / img, folder / lab, ds if ds.is_file() else None
    raise KubesegError(f"holdout {folder} needs images/ + labels/, imagesTs/ + labelsTs/ or imagesTr/ + labelsTr/")


def _case_of(image: Path) -> str:
    stem = image.name.split(".")[0]
    return stem.rsplit("_", 1)[0] if "_" in stem and stem.rsplit("_", 1)[1].isdigit() else stem


def _pairs(images: Path, labels: Path) -> dict[str, Path]:
    """case -> reference label file; every image needs one, every reference an image."""
    cases = {_case_of(p) for p in images.iterdir() if p.is_file() and not p.name.startswith(".")}
    refs = {p.name.split(".")[0]: p for p in labels.iterdir() if p.is_file() and not p.name.startswith(".")}
    missing, orphans = sorted(cases - set(refs)), sorted(set(refs) - cases)
    if missing or orphans:
        raise KubesegError(f"holdout: images without a reference in {labels}: {missing[:5]}; references without "
                           f"an image in {images}: {orphans[:5]}")
    if not cases:
        raise KubesegError(f"holdout {images} holds no case")
    return {c: refs[c] for c in sorted(cases)}


def stage(folder: str | Path, dst: str | Path) -> tuple[Path, dict, int]:
    """Copy a labelled set into ``dst`` in the registered layout; returns (dst, labels, cases)."""
    from kubeseg.jsonio import read_json

    images, labels, ds = find_cases(folder)
    pairs = _pairs(images, labels)
    dst = Path(dst)
    (dst / "images").mkdir(parents=True)
    (dst / "labels").mkdir()
    for p in sorted(images.iterdir()):
        if p.is_file() and _case_of(p) in pairs:
            shutil.copy2(p, dst / "images" / p.name)
    for ref in pairs.values():
        shutil.copy2(ref, dst / "labels" / ref.name)
    names = {}
    if ds is not None:
        shutil.copy2(ds, dst / "dataset.json")
        names = {str(v): str(k) for k, v in read_json(ds).get("labels", {}).items()
                 if not isinstance(v, list) and int(v) != 0}
    return dst, names, len(pairs)


def _version_of(mv, name: str) -> HoldoutVersion:
    tags = dict(mv.tags or {})
    return HoldoutVersion(name, str(mv.version), tags.get(HASH_TAG, ""), int(tags.get("cases", "0")),
                          json.loads(tags.get("labels", "{}")))


def register_holdout(folder: str | Path, model_name: str, uri: Optional[str] = None,
                     name: Optional[str] = None) -> tuple[HoldoutVersion, bool]:
    """Register the labelled set in ``folder`` as a new version of ``name`` (default
    ``<model_name>-holdout``) and point ``current`` at it; returns ``(version, created)``. The same
    contents as an existing version: that version, ``created`` False (``current`` moves to it)."""
    from kubeseg.audit import actor, record
    from kubeseg.dataset_hash import dataset_content_hash
    from kubeseg.tracking import client, ensure_experiment, tracking_uri

    uri = tracking_uri(uri)
    name = name or holdout_name(model_name)
    c = client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        staged, labels, cases = stage(folder, Path(tmp) / ARTIFACT_PATH)
        digest = dataset_content_hash(staged)
        try:
            c.get_registered_model(name)
        except Exception:  # noqa: BLE001 - MlflowException: not registered yet
            c.create_registered_model(name, description=f"fixed labelled holdout for the promotion gate of "
                                                        f"{model_name} (kubeseg)", tags={"kubeseg.kind": "holdout"})
        for mv in c.search_model_versions(f"name='{name}'"):
            if (mv.tags or {}).get(HASH_TAG) == digest:
                c.set_registered_model_alias(name, CURRENT, mv.version)
                log.info("holdout %s: same contents as version %s", name, mv.version)
                return _version_of(c.get_model_version(name, mv.version), name), False
        run = c.create_run(ensure_experiment(uri, EXPERIMENT), run_name=f"holdout {name}",
                           tags={"kubeseg.kind": "holdout", "kubeseg.model_name": model_name})
        c.log_artifacts(run.info.run_id, str(staged), ARTIFACT_PATH)
        c.set_terminated(run.info.run_id, "FINISHED")
        tags = {HASH_TAG: digest, "cases": str(cases), "labels": json.dumps(labels, sort_keys=True),
                "source": str(Path(folder).resolve()), "kubeseg.registered_by": actor()}
        mv = c.create_model_version(name, source=f"runs:/{run.info.run_id}/{ARTIFACT_PATH}", run_id=run.info.run_id,
                                    tags=tags, description=f"{cases} labelled case(s), {digest}")
        c.set_registered_model_alias(name, CURRENT, mv.version)
        record("holdout_register", by=actor(), model=name, version=str(mv.version), sha256=digest, cases=cases)
        return _version_of(c.get_model_version(name, mv.version), name), True


def holdout_exists(name: str, uri: Optional[str] = None) -> bool:
    from kubeseg.tracking import client

    try:
        client(uri).get_registered_model(name)
        return True
    except Exception:  # noqa: BLE001 - MlflowException: not registered
        return False


def get_holdout(name: str, ref: str = CURRENT, uri: Optional[str] = None) -> HoldoutVersion:
    from kubeseg.tracking import client

    c = client(uri)
    try:
        mv = c.get_model_version(name, ref) if str(ref).isdigit() else c.get_model_version_by_alias(name, ref)
    except Exception:  # noqa: BLE001 - MlflowException
        raise KubesegError(f"no holdout {name}@{ref} in this registry (register one: kubeseg holdout register DIR "
                           "--model-name NAME)") from None
    return _version_of(mv, name)


def load_holdout(name: str, ref: str, dst: str | Path, uri: Optional[str] = None) -> LocalHoldout:
    """Download holdout ``name@ref`` into ``dst`` and check its content hash."""
    from kubeseg.dataset_hash import dataset_content_hash
    from kubeseg.tracking import client, tracking_uri

    uri = tracking_uri(uri)
    v = get_holdout(name, ref, uri)
    c = client(uri)
    mv = c.get_model_version(name, v.version)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(c.download_artifacts(mv.run_id, ARTIFACT_PATH, str(dst)))
    got = dataset_content_hash(local)
    if got != v.sha256:
        raise KubesegError(f"holdout {name} version {v.version}: contents {got} differ from the registered {v.sha256}")
    return LocalHoldout(v, local / "images", local / "labels")


# ---- scores and decision ------------------------------------------------------------------------

def _dice(a, b) -> Optional[float]:
    sa, sb = int(a.sum()), int(b.sum())
    return None if sa + sb == 0 else float(2 * int((a & b).sum()) / (sa + sb))


def score_bundle(bundle: str | Path, holdout: LocalHoldout, device: str = "auto") -> Scores:
    """Predict the holdout with ``bundle`` and score it per label (see the module doc)."""
    import numpy as np
    import SimpleITK as sitk

    from kubeseg.inference import PredictSettings, predict
    from kubeseg.jsonio import read_json
    from kubeseg.registry import label_names

    names = label_names(read_json(Path(bundle) / "dataset.json"))
    refs = _pairs(holdout.images, holdout.labels)
    out = Scores()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            written = predict(holdout.images, Path(tmp) / "pred", bundle,
                              PredictSettings(device=device, use_mirroring=False, progress=False))
        except Exception as e:  # noqa: BLE001 - any failure fails the model
            out.problems.append(f"prediction failed: {type(e).__name__}: {e}")
            return out
        by_case = {p.name.split(".")[0]: p for p in written}
        sums: dict[int, list[float]] = {lab: [] for lab in names}
        for case, ref_file in refs.items():
            if case not in by_case:
                out.problems.append(f"{case}: not predicted")
                continue
            seg_img, ref_img = sitk.ReadImage(str(by_case[case])), sitk.ReadImage(str(ref_file))
            if seg_img.GetSize() != ref_img.GetSize() or not np.allclose(seg_img.GetSpacing(), ref_img.GetSpacing()):
                out.problems.append(f"{case}: output geometry {seg_img.GetSize()} differs from the reference's "
                                    f"{ref_img.GetSize()}")
                continue
            seg, ref = sitk.GetArrayFromImage(seg_img), sitk.GetArrayFromImage(ref_img)
            unknown = sorted(set(np.unique(seg).tolist()) - {0, *names})
            if unknown:
                out.problems.append(f"{case}: unknown label(s) {unknown} predicted")
            case_scores = {}
            for lab in names:
                d = _dice(seg == lab, ref == lab)
                case_scores[str(lab)] = d
                if d is not None:
                    sums[lab].append(d)
            out.per_case[case] = case_scores
    out.per_label = {str(lab): (float(np.mean(v)) if v else None) for lab, v in sums.items()}
    return out


def compare_scores(challenger: Scores, champion: Optional[Scores], names: Mapping[int, str], floor: float,
                   tolerance: float) -> list[str]:
    """Why the challenger fails on the holdout (empty: it passes); every reason names its label."""
    problems = [f"challenger: {p}" for p in challenger.problems]
    for lab, name in sorted(names.items()):
        mine = challenger.per_label.get(str(lab))
        if mine is None:
            continue  # neither in the references nor predicted: nothing to judge
        if not mine >= floor:
            problems.append(f"label {name!r} ({lab}): holdout Dice {mine:.3f} under the floor {floor}")
        theirs = champion.per_label.get(str(lab)) if champion is not None else None
        if theirs is not None and not mine >= theirs - tolerance:
            problems.append(f"label {name!r} ({lab}): holdout Dice {mine:.3f} is below the champion's {theirs:.3f} "
                            f"by more than the tolerance {tolerance}")
    return problems


@dataclass
class HoldoutResult:
    """What the gate found: the holdout's version, both models' per-label Dice (by label name),
    the reasons (pass) or problems (refusal)."""

    holdout: str
    version: str
    sha256: str
    challenger: dict
    champion: Optional[dict]
    champion_version: Optional[str]
    passed: bool
    reasons: list

    def to_json(self) -> dict:
        return asdict(self)


def _named(scores: Scores, names: Mapping[int, str]) -> dict:
    return {names[int(k)]: (None if v is None or math.isnan(v) else round(v, 4)) for k, v in scores.per_label.items()
            if int(k) in names}


def holdout_gate(model_name: str, candidate_version: str, candidate_bundle: str | Path,
                 champion_version: Optional[str], holdout_ref: str, floor: float, tolerance: float,
                 uri: Optional[str] = None, device: str = "auto",
                 public_key: Optional[str | Path] = None) -> HoldoutResult:
    """Score the candidate and the champion on the holdout in this run and decide; tags the candidate
    version (``kubeseg.holdout``) with the result either way; raises :class:`HoldoutRefused` on a
    refusal (the champion unchanged), returns the result when the candidate passes."""
    from kubeseg.jsonio import read_json
    from kubeseg.registry import label_names, load_version
    from kubeseg.tracking import client, tracking_uri

    uri = tracking_uri(uri)
    name, ref = parse_ref(holdout_ref, model_name)
    names = label_names(read_json(Path(candidate_bundle) / "dataset.json"))
    with tempfile.TemporaryDirectory() as tmp:
        hold = load_holdout(name, ref, Path(tmp) / "holdout", uri)
        mine = score_bundle(candidate_bundle, hold, device)
        theirs = None
        if champion_version is not None:
            champ_bundle = load_version(model_name, champion_version, Path(tmp) / "champion", uri, public_key)
            theirs = score_bundle(champ_bundle, hold, device)
            if theirs.problems:
                log.warning("the champion (version %s) has problems on the holdout: %s", champion_version,
                            theirs.problems)
    problems = compare_scores(mine, theirs, names, floor, tolerance)
    v = hold.version
    scores = ", ".join(f"{k} {_fmt(x)}" + (f" (champion {_fmt((_named(theirs, names)).get(k))})" if theirs else "")
                       for k, x in _named(mine, names).items())
    reasons = problems or [f"holdout {v.name} version {v.version} ({v.cases} case(s), {v.sha256[:19]}...): every "
                           f"label's Dice reaches {floor} and the champion's within {tolerance}: {scores}"]
    result = HoldoutResult(v.name, v.version, v.sha256, _named(mine, names),
                           _named(theirs, names) if theirs else None, champion_version, not problems, reasons)
    try:
        client(uri).set_model_version_tag(model_name, str(candidate_version), RESULT_TAG,
                                          json.dumps({k: val for k, val in result.to_json().items() if k != "reasons"},
                                                     separators=(",", ":"))[:4900])
    except Exception as e:  # noqa: BLE001 - a read-only caller: the outcome still says it
        log.warning("could not tag %s version %s with its holdout scores: %s", model_name, candidate_version, e)
    if problems:
        raise HoldoutRefused(result, f"refusing to promote {model_name} version {candidate_version}: on holdout "
                                     f"{v.name} version {v.version}: " + "; ".join(problems) + "; champion unchanged")
    return result


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


class HoldoutRefused(KubesegError):
    """The holdout gate refused; ``result`` holds both models' scores."""

    def __init__(self, result: HoldoutResult, message: str):
        super().__init__(message)
        self.result = result


def result_of(model_name: str, version: str, uri: Optional[str] = None) -> Optional[dict]:
    """The holdout result recorded on a version (``kubeseg.holdout`` tag), or None."""
    from kubeseg.tracking import client

    try:
        mv = client(uri).get_model_version(model_name, str(version))
    except Exception:  # noqa: BLE001
        return None
    raw = (mv.tags or {}).get(RESULT_TAG)
    try:
        return json.loads(raw) if raw else None
    except ValueError:  # cut at MLflow's tag length (hundreds of labels): say so rather than fail
        return {"truncated": raw}
