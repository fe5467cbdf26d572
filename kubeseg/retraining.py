"""What the retraining pipeline decides, as plain functions (registry-glue layer: it reads the MLflow
registry through :mod:`kubeseg.registry`; it knows nothing of Kubeflow).

* :func:`fetch_champion` downloads the champion bundle (checksums verified) into a folder.
* :func:`finetune_plan` (mode ``finetune``: *incremental* fine-tuning) keeps the champion's plans
  and its ``splits_final.json`` with the new cases added to every fold's training set only
  (:mod:`kubeseg.training.finetune`), and turns its members (and their cascade first stages) into
  the training fan-out on the merged dataset; every fold starts from the champion's weights of the
  same configuration and fold (:func:`kubeseg.workflow.pretrained_checkpoint`) and trains at most
  ``FinetuneSettings.epochs`` epochs at ``FinetuneSettings.lr`` with layer-wise rates. The plan
  writes its spec (settings, splits) into the champion folder the training tasks receive.
* :func:`retrain_plan` plans the merged dataset from scratch, as the training pipeline does.
* :func:`gated_promotion` tries to promote the new version and returns the outcome: a refused
  gate is a result to record, not a failure.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json

if TYPE_CHECKING:
    from kubeseg.training.finetune import FinetuneSettings

log = logging.getLogger(__name__)

MODES = ("finetune", "retrain")
DEFAULT_CONFIGURATIONS = ("2d", "3d_fullres")


@dataclass
class RetrainingPlan:
    """The training fan-out of a retraining run (the plan step's outputs)."""

    mode: str
    plans: dict
    first_wave: list
    cascade_wave: list
    preprocess_configurations: list
    candidates: list  # configurations selection may pick from
    champion_version: Optional[str] = None
    notes: list = field(default_factory=list)


def fetch_champion(name: str, uri: str, dst: str | Path, ref: str = "champion"):
    """Download ``name@ref`` into ``dst`` (the bundle's files directly in it, checksums verified);
    returns its :class:`~kubeseg.registry.ModelVersion`."""
    from kubeseg.registry import get_version, load_version

    dst = Path(dst)
    version = get_version(name, ref, uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        bundle = load_version(name, version.version, tmp, uri)
        if dst.exists():
            shutil.rmtree(dst)
        bundle.rename(dst)
    return version


def _folds(values: Sequence) -> list:
    return [f if str(f) == "all" else int(float(f)) for f in values]


def champion_splits(bundle: str | Path) -> Optional[list]:
    """The champion's ``splits_final.json`` (every member folder of the bundle carries the one its
    folds were trained with); None when the bundle has none (older bundles, nnU-Net imports).
    Members trained with different splits are refused: no single carry-over would be leak-free."""
    from kubeseg.training.splits import SPLITS_FILENAME

    found = {}
    for f in sorted(Path(bundle).glob(f"*/{SPLITS_FILENAME}")):
        found[f.parent.name] = read_json(f)
    if not found:
        return None
    first = next(iter(found.values()))
    other = [k for k, v in found.items() if v != first]
    if other:
        raise KubesegError(f"the champion's members were trained on different splits ({sorted(found)}): "
                           "incremental fine-tuning cannot carry them over; retrain instead")
    return first


def new_case_ids(raw_dir: str | Path) -> list[str]:
    """The cases the last ``dataset merge`` added to ``raw_dir`` (its merge record; [] without one)."""
    from kubeseg.dataset_merge import RECORD

    record = Path(raw_dir) / RECORD
    return [str(c) for c in read_json(record).get("added", [])] if record.is_file() else []


def new_case_confidence(raw_dir: str | Path) -> dict[str, float]:
    """case -> confidence of the last merge's added cases, where the merge recorded one (cases that
    came from the review feedback store); {} otherwise."""
    from kubeseg.dataset_merge import RECORD

    record = Path(raw_dir) / RECORD
    values = read_json(record).get("confidence", {}) if record.is_file() else {}
    return {str(k): float(v) for k, v in values.items()}


def training_case_ids(raw_dir: str | Path) -> list[str]:
    from kubeseg.dataset import load_dataset_json, list_training_cases

    problems: list = []
    cases = list_training_cases(raw_dir, load_dataset_json(raw_dir), problems)
    return sorted(c.case_id for c in cases)


def incremental_split_plan(bundle: str | Path, raw_dir: str | Path, settings: FinetuneSettings,
                           confidence: Optional[dict] = None) -> tuple[list, list, list, str]:
    """``(splits, champion_splits, new_cases_used, source)`` of an incremental fine-tune: the
    champion's splits (regenerated the nnU-Net way over the dataset's earlier cases when the
    champion carries none) with the chosen new cases in every fold's training set."""
    from kubeseg.training.finetune import choose_new_cases, incremental_splits
    from kubeseg.training.splits import SPLITS_FILENAME, generate_crossval_split

    ids = training_case_ids(raw_dir)
    added = [c for c in new_case_ids(raw_dir) if c in set(ids)]
    old = champion_splits(bundle)
    source = f"{SPLITS_FILENAME} of the champion"
    if old is None:
        earlier = [c for c in ids if c not in set(added)]
        old = generate_crossval_split(sorted(earlier))
        source = (f"nnU-Net's default 5-fold split of the {len(earlier)} earlier cases (the champion carries no "
                  f"{SPLITS_FILENAME})")
        log.warning("fine-tuning: %s", source)
    used = choose_new_cases(added, settings.max_new_cases, confidence or new_case_confidence(raw_dir))
    left_out = set(added) - set(used)
    splits = incremental_splits(old, [c for c in ids if c not in left_out], used)
    return splits, old, used, source


def finetune_plan(champion_dir: str | Path, raw_dir: str | Path, configurations: Sequence[str] = (),
                  folds: Sequence = (), settings: Optional[FinetuneSettings] = None,
                  confidence: Optional[dict] = None) -> RetrainingPlan:
    """Incremental fine-tuning keeps the champion's plans and splits. Default configurations: the
    champion's members (a cascade member brings its first stage, as in training); default folds:
    the champion's. Writes the fine-tune spec (:func:`kubeseg.training.finetune.write_finetune_spec`)
    into ``champion_dir``."""
    from kubeseg.dataset import load_dataset_json
    from kubeseg.inference.run import SELECTION_FILENAME
    from kubeseg.training.finetune import FinetuneSettings, write_finetune_spec
    from kubeseg.workflow import preprocess_configurations, training_items

    settings = settings or FinetuneSettings()

    bundle = Path(champion_dir)
    if not (bundle / SELECTION_FILENAME).is_file() or not (bundle / "plans.json").is_file():
        raise KubesegError(f"{bundle} is not a kubeseg bundle (selection.json, plans.json)")
    sel, plans = read_json(bundle / SELECTION_FILENAME), read_json(bundle / "plans.json")
    trained = read_json(bundle / "dataset.json")
    spec = load_dataset_json(raw_dir)
    if {str(k): v for k, v in trained.get("labels", {}).items()} != spec.labels or \
            {int(k): v for k, v in trained.get("channel_names", trained.get("modality", {})).items()} \
            != spec.channel_names:
        raise KubesegError(f"the champion was trained on other channels or labels than {raw_dir} "
                           f"({trained.get('channel_names')}, {trained.get('labels')}): retrain instead of fine-tuning")
    members = [m["configuration"] for m in sel.get("members", [])]
    configurations = list(configurations) or members
    folds = _folds(folds) or sorted({f for m in sel.get("members", []) for f in _folds(m.get("folds") or [])},
                                    key=lambda f: (f == "all", f if f != "all" else 0))
    if not folds:
        raise KubesegError(f"{bundle}/selection.json names no folds; pass the folds to fine-tune")
    first, cascade = training_items(plans, configurations, folds)
    if any(i["fold"] == "all" for i in first + cascade):
        raise KubesegError("fold 'all' validates on its own training cases: incremental fine-tuning needs the "
                           "champion's cross-validation folds")
    splits, old, used, source = incremental_split_plan(bundle, raw_dir, settings, confidence)
    if cascade and used:
        raise KubesegError(f"incremental fine-tuning of the cascade {sorted({i['configuration'] for i in cascade})} "
                           "is not supported: the new cases join every first-stage fold's training set, so none has "
                           "an out-of-fold first-stage prediction to train the cascade on; fine-tune the other "
                           "configurations (--configurations) or retrain")
    write_finetune_spec(bundle, settings, splits, old, used, source)
    return RetrainingPlan("finetune", plans, first, cascade, preprocess_configurations(plans, configurations),
                          list(dict.fromkeys(configurations)),
                          notes=[f"plans {plans.get('plans_name')} of the champion, its weights for every fold",
                                 f"splits: {source}; {len(used)} new case(s) in every fold's training set only"
                                 + (f" (the {settings.max_new_cases} least confident)" if settings.max_new_cases
                                    else ""),
                                 f"at most {settings.epochs} epochs, lr {settings.lr:g}, encoder x"
                                 f"{settings.encoder_lr_scale:g}, decoder x{settings.decoder_lr_scale:g}"])


def retrain_plan(raw_dir: str | Path, fingerprint: str | Path, preset: str, configurations: Sequence[str] = (),
                 folds: Sequence = (), champion_configurations: Sequence[str] = ()) -> RetrainingPlan:
    """Plan the merged dataset from scratch. Default configurations: the champion's (if any), else
    ``2d`` and ``3d_fullres``; default folds: all five."""
    from kubeseg.dataset import load_dataset_json
    from kubeseg.dataset_merge import dataset_name
    from kubeseg.fingerprint import read_fingerprint
    from kubeseg.planning.planner import plan_experiment, planner_settings
    from kubeseg.workflow import ALL_FOLDS, preprocess_configurations, training_items

    plans = plan_experiment(load_dataset_json(raw_dir), read_fingerprint(fingerprint), planner_settings(preset),
                            dataset_name=dataset_name(raw_dir))
    configurations = list(configurations) or list(champion_configurations) or list(DEFAULT_CONFIGURATIONS)
    first, cascade = training_items(plans, configurations, _folds(folds) or list(ALL_FOLDS))
    return RetrainingPlan("retrain", plans, first, cascade, preprocess_configurations(plans, configurations),
                          list(dict.fromkeys(configurations)), notes=[f"new plans ({preset} preset)"])


def champion_configurations(name: str, uri: str) -> list[str]:
    """The champion's member configurations (from its registry tags), or [] without a champion."""
    from kubeseg.registry import get_version

    try:
        v = get_version(name, "champion", uri)
    except KubesegError:
        return []
    return [c.strip() for c in v.tags.get("configurations", "").split("+") if c.strip()]


def plan_retraining(mode: str, raw_dir: str | Path, fingerprint: str | Path, model_name: str, uri: str,
                    champion_dir: str | Path, preset: str = "default", configurations: Sequence[str] = (),
                    folds: Sequence = (), finetune: Optional[FinetuneSettings] = None,
                    confidence: Optional[dict] = None) -> RetrainingPlan:
    """Either mode's plan. ``finetune`` downloads the champion into ``champion_dir`` (refusing if
    there is none) and writes the incremental fine-tune's spec there (``finetune``: its settings,
    default :class:`FinetuneSettings`; ``confidence``: case -> confidence, to choose
    ``max_new_cases``); ``retrain`` leaves ``champion_dir`` empty (every fold starts from scratch)."""
    if mode not in MODES:
        raise KubesegError(f"mode must be one of {MODES}, got {mode!r}")
    Path(champion_dir).mkdir(parents=True, exist_ok=True)
    if mode == "finetune":
        try:
            v = fetch_champion(model_name, uri, champion_dir)
        except KubesegError as e:
            raise KubesegError(f"fine-tuning needs a champion of {model_name}: {e}; run the training pipeline "
                               "first or retrain") from None
        plan = finetune_plan(champion_dir, raw_dir, configurations, folds, finetune, confidence)
        plan.champion_version = v.version
        return plan
    return retrain_plan(raw_dir, fingerprint, preset, configurations, folds,
                        champion_configurations(model_name, uri))


@dataclass
class PromotionOutcome:
    version: str
    promoted: bool
    champion: Optional[str]
    previous_champion: Optional[str]
    reasons: list
    awaiting_approval: bool = False  # the gate passed; `kubeseg models approve` makes it the champion
    holdout: Optional[dict] = None  # the holdout gate's record: holdout version, both models' Dice per label

    def to_json(self) -> dict:
        return asdict(self)


def resolve_holdout_set(name: str, uri: str, holdout_set: str = "") -> Optional[str]:
    """Which registered holdout the gate uses: ``""`` = ``<name>-holdout`` when one is registered
    (else none: the CV comparison and the sanity prediction decide, as before); ``"none"``: none;
    anything else (``X`` or ``X@version``) as given (refused later if it does not exist)."""
    from kubeseg.holdout import holdout_exists, holdout_name

    text = (holdout_set or "").strip()
    if text.lower() == "none":
        return None
    if text in ("", "auto"):
        return holdout_name(name) if holdout_exists(holdout_name(name), uri) else None
    return text


def gated_promotion(name: str, version: str, uri: str, holdout: Optional[str], tolerance: float = 0.02,
                    holdout_labels: Optional[str] = None, min_dice: float = 0.0,
                    device: str = "auto", label_floor: Optional[float] = None, holdout_set: str = "",
                    label_tolerance: float = 0.02, require_approval: bool = False) -> PromotionOutcome:
    """Promote ``version`` through the gate (:func:`kubeseg.registry.promote`). A refusal (CV Dice
    below the champion's beyond the tolerance, a failed sanity prediction, a label that regressed
    on the registered holdout) is returned as ``promoted=False`` with the reason; the champion is
    then unchanged. ``holdout_set`` (:func:`resolve_holdout_set`): the registered holdout that
    decides; the outcome carries its record (``holdout``: version, hash, both models' Dice per label)."""
    from kubeseg.holdout import result_of
    from kubeseg.registry import GateSettings, get_version, promote

    def champion() -> Optional[str]:
        try:
            return get_version(name, "champion", uri).version
        except KubesegError:
            return None

    before = champion()
    chosen = resolve_holdout_set(name, uri, holdout_set)
    gate = GateSettings(tolerance=tolerance, holdout=holdout or None, holdout_labels=holdout_labels,
                        min_dice=min_dice, device=device, holdout_set=chosen, label_tolerance=label_tolerance,
                        **({"label_floor": label_floor} if label_floor is not None else {}))
    try:
        p = promote(name, str(version), gate, uri, require_approval=require_approval)
    except KubesegError as e:
        log.warning("version %s of %s not promoted: %s", version, name, e)
        return PromotionOutcome(str(version), False, champion(), before, [str(e)],
                                holdout=result_of(name, str(version), uri) if chosen else None)
    record = result_of(name, str(version), uri) if chosen else None
    if p.awaiting_approval:
        return PromotionOutcome(str(version), False, p.previous, before, list(p.reasons), awaiting_approval=True,
                                holdout=record)
    return PromotionOutcome(str(version), True, p.version, p.previous, list(p.reasons), holdout=record)
