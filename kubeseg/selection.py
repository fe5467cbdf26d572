"""``kubeseg select``: which configuration (or pair of them) to ship, by cross-validation.

Every trained configuration and every pairwise ensemble of them (probabilities averaged) is
scored on the out-of-fold predictions by mean foreground Dice (per label the mean over cases,
then the mean over labels) in the *original* image geometry, against the reference labels of
the preprocessed dataset (``PRE/gt_segmentations``); region models are scored per region, and an
ignore label's voxels count nowhere. The best candidate wins (ties: the simpler one, listed
first); its postprocessing is decided on the same predictions and the same scores
(:mod:`kubeseg.postprocessing`, per region for region models). Writes ``selection.json`` and ``postprocessing.json``.

Out-of-fold predictions are read from ``MODEL/fold_*/validation/<case>.npz`` (``probabilities``).
kubeseg's trainer stores them on the network's grid; they are brought back to the image grid
with the case's preprocessing properties (``PRE/<data_identifier>/<case>.json``), as at
prediction time. Predictions already on the image grid (nnU-Net's) are used as they are.
``selection.json`` also keeps each label's volume range over the reference labels
(``label_volumes_ml``), which the QA flags of later predictions compare with (:mod:`kubeseg.clinical.qa`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from kubeseg.clinical.qa import VOLUME_RANGES_KEY, label_volume_ranges
from kubeseg.errors import KubesegError
from kubeseg.imageio import read_label
from kubeseg.inference.export import log_probabilities_to_original
from kubeseg.inference.model import available_folds
from kubeseg.inference.run import SELECTION_FILENAME
from kubeseg.inference.safe_load import load_checkpoint_safe
from kubeseg.jsonio import read_json, write_json
from kubeseg.labels import label_scheme
from kubeseg.model_folder import configuration_of
from kubeseg.planning.plans import configuration as resolve_configuration
from kubeseg.postprocessing import FILENAME as PP_FILENAME, class_dice, decide_postprocessing, foreground_mean, \
    save_postprocessing

log = logging.getLogger(__name__)


@dataclass
class TrainedConfiguration:
    """One configuration's training output folder and what selection needs from it."""

    folder: Path
    configuration: str
    plans: dict
    dataset_json: dict
    folds: list[str]
    validation: dict[str, Path]  # case -> npz

    @property
    def config(self) -> dict:
        return resolve_configuration(self.plans, self.configuration)

    @classmethod
    def read(cls, folder: str | Path) -> "TrainedConfiguration":
        folder = Path(folder)
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).is_file():
                raise KubesegError(f"{folder} has no {name}; is it a training output folder?")
        folds = available_folds(folder)
        if not folds:
            raise KubesegError(f"{folder} has no finished fold (fold_*/checkpoint_final.pth)")
        ckpt = load_checkpoint_safe(folder / f"fold_{folds[0]}" / "checkpoint_final.pth")
        configuration = (ckpt.get("init_args") or {}).get("configuration")
        if configuration is None:
            configuration = configuration_of(folder)
        if configuration is None:
            raise KubesegError(f"cannot tell the configuration of {folder}")
        validation = {}
        for fold in folds:
            for f in sorted((folder / f"fold_{fold}" / "validation").glob("*.npz")):
                validation[f.stem] = f
        if not validation:
            raise KubesegError(f"{folder} has no out-of-fold predictions (fold_*/validation/*.npz); "
                               "train with validation and probabilities saved")
        return cls(folder, configuration, read_json(folder / "plans.json"), read_json(folder / "dataset.json"),
                   folds, validation)

    def probabilities(self, case: str, reference_shape: tuple[int, ...], preprocessed_dir: Path) -> np.ndarray:
        """This configuration's out-of-fold probabilities of ``case`` on the image grid."""
        with np.load(self.validation[case]) as z:
            if "probabilities" not in z:
                raise KubesegError(f"{self.validation[case]} has no 'probabilities'")
            probs = z["probabilities"].astype(np.float32)
        if tuple(probs.shape[1:]) == tuple(reference_shape):
            return probs
        props_file = preprocessed_dir / self.config["data_identifier"] / f"{case}.json"
        if not props_file.is_file():
            raise KubesegError(f"{self.validation[case]} is on the network's grid, and {props_file} (the case's "
                               "preprocessing properties) is missing to bring it back")
        tiny = np.finfo(np.float32).tiny
        if label_scheme(self.dataset_json).has_regions:  # sigmoid outputs: resample their log-odds
            log_odds = np.log(np.maximum(probs, tiny)) - np.log(np.maximum(1 - probs, tiny))
            return log_probabilities_to_original(log_odds, read_json(props_file), self.plans, self.config,
                                                 sigmoid=True)
        log_probs = np.log(np.maximum(probs, tiny))
        return log_probabilities_to_original(log_probs, read_json(props_file), self.plans, self.config)


@dataclass(frozen=True)
class SelectSettings:
    allow_ensembles: bool = True
    progress: bool = True


def _candidates(models: Sequence[TrainedConfiguration], allow_ensembles: bool) -> list[tuple[int, ...]]:
    singles = [(i,) for i in range(len(models))]
    pairs = list(itertools.combinations(range(len(models)), 2)) if allow_ensembles else []
    return singles + pairs


def select_model(model_dirs: Sequence[str | Path], preprocessed_dir: str | Path, out_dir: str | Path,
                 settings: SelectSettings = SelectSettings()) -> dict:
    """Score every configuration and pair, pick the best, decide its postprocessing; returns the selection."""
    models = [TrainedConfiguration.read(d) for d in model_dirs]
    pre = Path(preprocessed_dir)
    labels_json = models[0].dataset_json["labels"]
    for m in models[1:]:
        if m.dataset_json["labels"] != labels_json:
            raise KubesegError(f"{m.folder} and {models[0].folder} were trained on different labels")
    scheme = label_scheme(models[0].dataset_json)
    # scored per foreground label, or per region; an ignore label's voxels count nowhere
    classes = dict(zip(scheme.class_keys, scheme.classes))
    ending = models[0].dataset_json["file_ending"]
    cases = sorted(set.intersection(*[set(m.validation) for m in models]))
    if not cases:
        raise KubesegError("the configurations have no out-of-fold case in common")
    for m in models:
        if len(m.validation) != len(cases):
            log.warning("%s has %d out-of-fold cases; selecting on the %d all configurations share",
                        m.folder.name, len(m.validation), len(cases))
    candidates = _candidates(models, settings.allow_ensembles)
    names = [" + ".join(models[i].configuration for i in c) for c in candidates]
    per_case: dict[tuple[int, ...], list[dict[int, float]]] = {c: [] for c in candidates}

    def reference(case: str) -> np.ndarray:
        path = pre / "gt_segmentations" / f"{case}{ending}"
        if not path.is_file():
            raise KubesegError(f"reference segmentation {path} is missing")
        return read_label(path)[0][0]

    for case in tqdm(cases, desc="Scoring configurations", disable=not settings.progress, leave=False):
        ref = reference(case)
        probs = [m.probabilities(case, ref.shape, pre) for m in models]
        for c in candidates:
            avg = probs[c[0]] if len(c) == 1 else sum(probs[i] for i in c) / len(c)
            seg = scheme.to_segmentation(avg)
            per_case[c].append({key: class_dice(seg, ref, cls, scheme.ignore_label) for key, cls in classes.items()})

    scores = []
    for c, name in zip(candidates, names):
        per_label = {key: _nanmean([d[key] for d in per_case[c]]) for key in classes}
        scores.append({"name": name, "configurations": [models[i].configuration for i in c],
                       "foreground_dice": foreground_mean(per_label), "dice": {str(k): v for k, v in per_label.items()}})
        log.info("%-30s mean foreground Dice %.4f", name, scores[-1]["foreground_dice"])
    best = max(range(len(candidates)), key=lambda i: (np.nan_to_num(scores[i]["foreground_dice"], nan=-1.0), -i))
    winner = candidates[best]
    log.info("selected %s (mean foreground Dice %.4f)", names[best], scores[best]["foreground_dice"])

    segs, refs = [], []
    for case in cases:
        ref = reference(case)
        probs = [models[i].probabilities(case, ref.shape, pre) for i in winner]
        segs.append(scheme.to_segmentation(sum(probs) / len(probs)))
        refs.append(ref)
    # per region for region models, ignored voxels left out: the same scores as above
    rule, report = decide_postprocessing(segs, refs, list(scheme.foreground_labels), scheme.classes,
                                         scheme.ignore_label)
    out_dir = Path(out_dir)
    save_postprocessing(rule, out_dir / PP_FILENAME, report)
    selection = {
        "members": [{"configuration": models[i].configuration, "folder": str(models[i].folder.resolve()),
                     "folds": models[i].folds} for i in winner],
        "ensemble": len(winner) > 1,
        "postprocessing": PP_FILENAME,
        "expected_dice": scores[best]["dice"],
        "expected_foreground_dice": scores[best]["foreground_dice"],
        "expected_dice_after_postprocessing": report["dice_after"],
        "expected_foreground_dice_after_postprocessing": report["foreground_dice_after"],
        "num_cases": len(cases),
        "candidates": scores,
        # training volume range per label, for the QA flags of every later prediction
        VOLUME_RANGES_KEY: _volume_ranges(pre, cases, ending, models[0].dataset_json["labels"]),
    }
    write_json(selection, out_dir / SELECTION_FILENAME)
    log.info("selection written to %s", out_dir / SELECTION_FILENAME)
    return selection


def _volume_ranges(pre: Path, cases: list[str], ending: str, labels: dict) -> dict:
    refs = []
    for case in cases:
        array, geometry = read_label(pre / "gt_segmentations" / f"{case}{ending}")
        refs.append((array[0], geometry.spacing))
    return label_volume_ranges(refs, {n: v for n, v in labels.items() if isinstance(v, (int, list, tuple))})


def _nanmean(values: list[float]) -> float:
    v = [x for x in values if not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")

