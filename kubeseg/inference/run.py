"""``kubeseg predict``: a file or a folder of cases → segmentations, from a bundle or a model folder.

What ``-m MODEL`` may be:

* a kubeseg bundle (``selection.json`` at its root): the selected configuration(s), folds and
  postprocessing;
* a trained-model folder (``plans.json`` + ``fold_*/checkpoint_final.pth``; kubeseg's training
  output or nnU-Net v2's ``<Trainer>__<Plans>__<configuration>``), with its
  ``postprocessing.json`` if there is one;
* a folder of such model folders (nnU-Net v2's ``<results>/<DatasetXXX>``), with ``-c`` naming
  the configuration(s).

Several configurations are an ensemble: their probabilities (on the input grid) are averaged.
A cascade stage finds its first stage in a sibling folder ``<Trainer>__<Plans>__<previous>``.
Outputs: ``<case><ending>`` with the input's geometry, and ``<case>.npz`` (``probabilities``,
classes first, in the image's array order) with ``save_probabilities``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kubeseg.dataset import DatasetSpec, RawCase
from kubeseg.dataset_check import load_case
from kubeseg.errors import KubesegError
from kubeseg.imageio import write_image
from kubeseg.inference.export import probabilities_to_segmentation
from kubeseg.inference.model import load_trained_model
from kubeseg.inference.predictor import PredictSettings, Predictor
from kubeseg.input_budget import DEFAULT_MAX_RESAMPLED_VOXELS, check_file_grid, stages_of
from kubeseg.jsonio import read_json
from kubeseg.model_folder import configuration_of, parse_model_folder_name
from kubeseg.postprocessing import (FILENAME as PP_FILENAME, PostprocessingRule, apply_postprocessing,
                                    folder_postprocessing, load_postprocessing)

log = logging.getLogger(__name__)

SELECTION_FILENAME = "selection.json"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class ModelChoice:
    """What to run: model folders (one per configuration; several = ensemble) and postprocessing."""

    members: list[Path]
    folds: Optional[list[str]] = None
    postprocessing: PostprocessingRule = field(default_factory=PostprocessingRule)


def _is_model_folder(p: Path) -> bool:
    return (p / "plans.json").is_file() and any(p.glob("fold_*/checkpoint_final.pth"))


def _configuration_of(folder: Path) -> str:
    return configuration_of(folder) or folder.name


def resolve_model(model_dir: str | Path, configurations: Optional[Sequence[str]] = None,
                  folds: Optional[Sequence[str]] = None) -> ModelChoice:
    """Turn ``-m``/``-c``/``-f`` into model folders, folds and a postprocessing rule."""
    root = Path(model_dir)
    if not root.is_dir():
        raise KubesegError(f"model {root} is not a folder")
    selection = root / SELECTION_FILENAME
    if selection.is_file() and not configurations:
        sel = read_json(selection)
        members = [root / m["folder"] for m in sel.get("members", [])]
        if not members:
            raise KubesegError(f"{selection} names no model folders ('members')")
        for m in members:
            if not _is_model_folder(m):
                raise KubesegError(f"{selection} names {m.name}, which is missing or has no fold_*/checkpoint_final.pth")
        pp = root / sel.get("postprocessing", PP_FILENAME)
        rule = load_postprocessing(pp) if pp.is_file() else PostprocessingRule()
        return ModelChoice(members, list(folds) if folds else sel.get("folds"), rule)
    if _is_model_folder(root):
        if configurations and _configuration_of(root) not in configurations and parse_model_folder_name(root):
            raise KubesegError(f"{root} holds configuration {_configuration_of(root)!r}, not {list(configurations)}")
        return ModelChoice([root], list(folds) if folds else None, folder_postprocessing(root))
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and _is_model_folder(p))
    if not candidates:
        raise KubesegError(f"{root} is neither a bundle (selection.json), a trained-model folder "
                           "(plans.json + fold_*/checkpoint_final.pth) nor a folder of them")
    if configurations:
        chosen = []
        for c in configurations:
            hits = [p for p in candidates if _configuration_of(p) == c]
            if not hits:
                raise KubesegError(f"no model folder for configuration {c!r} in {root}; there are "
                                   f"{[p.name for p in candidates]}")
            chosen.append(hits[0])
    elif len(candidates) == 1:
        chosen = candidates
    else:
        raise KubesegError(f"{root} holds several models ({[p.name for p in candidates]}); choose with -c")
    rule = folder_postprocessing(chosen[0]) if len(chosen) == 1 else PostprocessingRule()
    return ModelChoice(chosen, list(folds) if folds else None, rule)


def previous_stage_folder(folder: Path, previous: str) -> Path:
    """The model folder of a cascade stage's first stage (a sibling folder)."""
    parsed = parse_model_folder_name(folder)
    if parsed is not None:
        sibling = folder.parent / str(parsed.with_configuration(previous))
        if _is_model_folder(sibling):
            return sibling
    for p in sorted(folder.parent.iterdir()):
        if p != folder and p.is_dir() and _is_model_folder(p) and _configuration_of(p) == previous:
            return p
    raise KubesegError(f"{folder.name} is a cascade stage; its first stage {previous!r} should be a sibling "
                       f"folder <Trainer>__<Plans>__{previous}, which is missing")


def build_predictors(choice: ModelChoice, settings: PredictSettings) -> list[Predictor]:
    predictors = []
    for folder in choice.members:
        model = load_trained_model(folder, choice.folds)
        previous = None
        if model.previous_stage is not None:
            previous = Predictor(load_trained_model(previous_stage_folder(folder, model.previous_stage),
                                                    choice.folds), settings)
        predictors.append(Predictor(model, settings, previous))
    return predictors


def list_input_cases(input_path: str | Path, dataset_json: dict) -> list[RawCase]:
    """Cases of a file or folder: ``<case>_<channel:04d><ending>`` grouped; single-channel files may be bare."""
    path = Path(input_path)
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if path.is_file():
        ending = _ending_of(path)
        name = path.name[:-len(ending)]
        m = _CHANNEL.match(name)
        if m and n_channels > 1:
            files = tuple(path.parent / f"{m['case']}_{c:04d}{ending}" for c in range(n_channels))
            return [RawCase(m["case"], tuple(f if f.is_file() else None for f in files), None)]
        if n_channels > 1:
            raise KubesegError(f"the model needs {n_channels} channels: give the folder with "
                               f"<case>_0000{ending} ... files, or one of those files")
        return [RawCase(m["case"] if m else name, (path,), None)]
    if not path.is_dir():
        raise KubesegError(f"input {path} does not exist")
    groups: dict[str, list[Optional[Path]]] = {}
    for f in sorted(path.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        name = f.name[:-len(ending)]
        m = _CHANNEL.match(name)
        if m and int(m["channel"]) < n_channels:
            groups.setdefault(m["case"], [None] * n_channels)[int(m["channel"])] = f
        elif n_channels == 1 and not m:
            groups.setdefault(name, [f])
    if not groups:
        raise KubesegError(f"no {ending} images in {path}")
    return [RawCase(c, tuple(files), None) for c, files in sorted(groups.items())]


def _ending_of(path: Path) -> str:
    """``.nii.gz`` (two suffixes) or the file's last suffix: any SimpleITK format is accepted."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def dataset_spec(dataset_json: dict) -> DatasetSpec:
    """The :class:`DatasetSpec` of a trained model's ``dataset.json`` (validated when it was trained)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    return DatasetSpec({int(k): v for k, v in channels.items()}, dict(dataset_json["labels"]),
                       int(dataset_json.get("numTraining", 1)), dataset_json["file_ending"],
                       regions_class_order=dataset_json.get("regions_class_order"))


def predict_case_probabilities(predictors: Sequence[Predictor], data: np.ndarray, geometry,
                               case_id: str = "", folds: Optional[Sequence[str]] = None,
                               mirror: Optional[bool] = None,
                               timings: Optional[dict[str, float]] = None) -> np.ndarray:
    """Probabilities on the input grid, averaged over the ensemble members."""
    total = None
    for p in predictors:
        probs = p.probabilities(data, geometry, case_id=case_id, folds=folds, mirror=mirror, timings=timings)
        total = probs if total is None else np.add(total, probs, out=total)
    return total / len(predictors) if len(predictors) > 1 else total


@dataclass
class CaseResult:
    """One case's prediction: the postprocessed label map, the probabilities, seconds per stage."""

    segmentation: np.ndarray  # (z, y, x), the input's array order
    probabilities: np.ndarray  # (classes, z, y, x)
    timings: dict[str, float]


def segment_case(predictors: Sequence[Predictor], data: np.ndarray, geometry, rule: PostprocessingRule,
                 case_id: str = "", folds: Optional[Sequence[str]] = None,
                 mirror: Optional[bool] = None) -> CaseResult:
    """Ensemble probabilities, most probable label, postprocessing rule: what ``predict`` does per case.

    ``timings`` of the result: ``preprocess``, ``inference``, ``postprocess`` (resampling back,
    argmax and the postprocessing rule).
    """
    timings: dict[str, float] = {}
    probs = predict_case_probabilities(predictors, data, geometry, case_id, folds, mirror, timings)
    started = time.perf_counter()
    seg = apply_postprocessing(probabilities_to_segmentation(probs, predictors[0].labels), rule)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - started
    return CaseResult(seg, probs, timings)


def predict(input_path: str | Path, output: str | Path, model_dir: str | Path,
            settings: PredictSettings = PredictSettings(), configurations: Optional[Sequence[str]] = None,
            folds: Optional[Sequence[str]] = None, save_probabilities: bool = False,
            postprocess: bool = True, max_resampled_voxels: int = DEFAULT_MAX_RESAMPLED_VOXELS) -> list[Path]:
    """Predict every case of ``input_path`` into ``output``; returns the segmentation files written.

    ``output`` is a folder, or, for one input file, a file name with an image suffix (its format).
    Every input is judged from its header first: files that point at other files, and inputs
    whose resampled grid exceeds ``max_resampled_voxels`` in any configuration, are refused
    (:class:`~kubeseg.input_budget.InputRefused`, naming the file) before their voxels are read.
    """
    choice = resolve_model(model_dir, configurations, folds)
    predictors = build_predictors(choice, settings)
    first = predictors[0].model
    dataset_json = first.dataset_json
    for p in predictors[1:]:
        if p.labels.all_labels != first.labels.all_labels:
            raise KubesegError(f"ensemble members disagree on labels: {first.folder.name} vs {p.model.folder.name}")
    cases = list_input_cases(input_path, dataset_json)
    output = Path(output)
    # outputs are written in the input's format, so that a lossless format stays lossless
    ending = _ending_of(cases[0].images[0]) if Path(input_path).is_file() else dataset_json["file_ending"]
    single_file = Path(input_path).is_file() and bool(output.suffix) and not output.is_dir()
    rule = choice.postprocessing if postprocess else PostprocessingRule()
    log.info("predicting %d case(s) with %s%s", len(cases), " + ".join(m.name for m in choice.members),
             f", postprocessing {list(rule.steps)}" if rule.steps else "")
    written = []
    spec = dataset_spec(dataset_json)
    stages = stages_of(predictors)
    for case in cases:
        for f in case.images:
            if f is not None:
                check_file_grid(f, stages, max_resampled_voxels)
    for case in cases:
        started = time.perf_counter()
        loaded = load_case(case, spec, with_label=False)
        result = segment_case(predictors, loaded.data, loaded.geometry, rule, case.case_id)
        seg, probs = result.segmentation, result.probabilities
        target = output if single_file else output / f"{case.case_id}{ending}"
        write_image(seg, loaded.geometry, target)
        if save_probabilities:
            _save_npz(target.parent / f"{case.case_id}.npz", probs)
        written.append(target)
        log.info("%s -> %s (%.1f s)", case.case_id, target, time.perf_counter() - started)
    return written


def _save_npz(path: Path, probs: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, probabilities=probs.astype(np.float32))
    tmp.replace(path)
