"""What the retraining pipeline decides, as plain functions (registry-glue layer: it reads the MLflow
registry through :mod:`kubeseg.registry`; it knows nothing of Kubeflow).

* :func:`fetch_champion` downloads the champion bundle (checksums verified) into a folder.
* :func:`finetune_plan` keeps the champion's plans and turns its members (and their cascade
  first stages) into the training fan-out on the merged dataset; every fold starts from the
  champion's weights of the same configuration (:func:`kubeseg.workflow.pretrained_checkpoint`).
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
from typing import Optional, Sequence

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json

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


def finetune_plan(champion_dir: str | Path, raw_dir: str | Path, configurations: Sequence[str] = (),
                  folds: Sequence = ()) -> RetrainingPlan:
    """Fine-tuning keeps the champion's plans. Default configurations: the champion's members
    (a cascade member brings its first stage, as in training); default folds: the champion's."""
    from kubeseg.dataset import load_dataset_json
    from kubeseg.inference.run import SELECTION_FILENAME
    from kubeseg.workflow import preprocess_configurations, training_items

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
    return RetrainingPlan("finetune", plans, first, cascade, preprocess_configurations(plans, configurations),
                          list(dict.fromkeys(configurations)),
                          notes=[f"plans {plans.get('plans_name')} of the champion, its weights for every fold"])


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
                    folds: Sequence = ()) -> RetrainingPlan:
    """Either mode's plan. ``finetune`` downloads the champion into ``champion_dir`` (refusing if
    there is none); ``retrain`` leaves ``champion_dir`` empty (every fold starts from scratch)."""
    if mode not in MODES:
        raise KubesegError(f"mode must be one of {MODES}, got {mode!r}")
    Path(champion_dir).mkdir(parents=True, exist_ok=True)
    if mode == "finetune":
        try:
            v = fetch_champion(model_name, uri, champion_dir)
        except KubesegError as e:
            raise KubesegError(f"fine-tuning needs a champion of {model_name}: {e}; run the training pipeline "
                               "first or retrain") from None
        plan = finetune_plan(champion_dir, raw_dir, configurations, folds)
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

    def to_json(self) -> dict:
        return asdict(self)


def gated_promotion(name: str, version: str, uri: str, holdout: Optional[str], tolerance: float = 0.02,
                    holdout_labels: Optional[str] = None, min_dice: float = 0.0,
                    device: str = "auto", label_floor: Optional[float] = None,
                    require_approval: bool = False) -> PromotionOutcome:
    """Promote ``version`` through the gate (:func:`kubeseg.registry.promote`). A refusal (CV Dice
    below the champion's beyond the tolerance, a failed sanity prediction) is returned as
    ``promoted=False`` with the reason; the champion is then unchanged."""
    from kubeseg.registry import GateSettings, get_version, promote

    def champion() -> Optional[str]:
        try:
            return get_version(name, "champion", uri).version
        except KubesegError:
            return None

    before = champion()
    gate = GateSettings(tolerance=tolerance, holdout=holdout or None, holdout_labels=holdout_labels,
                        min_dice=min_dice, device=device,
                        **({"label_floor": label_floor} if label_floor is not None else {}))
    try:
        p = promote(name, str(version), gate, uri, require_approval=require_approval)
    except KubesegError as e:
        log.warning("version %s of %s not promoted: %s", version, name, e)
        return PromotionOutcome(str(version), False, champion(), before, [str(e)])
    if p.awaiting_approval:
        return PromotionOutcome(str(version), False, p.previous, before, list(p.reasons), awaiting_approval=True)
    return PromotionOutcome(str(version), True, p.version, p.previous, list(p.reasons))
