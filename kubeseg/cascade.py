"""The cascade's extra input: the low-res stage's out-of-fold segmentations on the full-res grid.

nnU-Net v2 trains ``3d_cascade_fullres`` on the image plus the segmentation that ``3d_lowres``
predicted for the same case, one-hot encoded as extra input channels. At training time that
segmentation must come from a low-res model that never saw the case, or the cascade learns to
trust a prediction that is better than it will ever be at test time. nnU-Net therefore uses
each low-res fold's *validation* predictions (``predicted_next_stage/<configuration>``): every
case is predicted by the one fold that held it out.

kubeseg's trainer stores those validation predictions as ``fold_<k>/validation/<case>.npz``
(``probabilities`` and ``segmentation`` on the low-res network's grid). :func:`export_cascade_inputs`
turns them into ``OUT/<case>.npy``: the low-res probabilities, as log-probabilities, resampled
to the shape of the case's full-res preprocessed array (the two share the crop box and the axis
order, so only the grid differs) with the low-res configuration's probability resampling, then
the most probable label. Without probabilities the segmentation itself is resampled (per-label
indicators). Like nnU-Net, the anisotropy decision uses the low-res spacing. The trainer reads
the folder through ``TrainSettings.previous_stage_dir`` / ``kubeseg train --previous-stage``.

Because every case's prediction comes from the fold that held it out, cascade fold ``k`` needs
predictions for all its training and validation cases, i.e. normally all five low-res folds:
:func:`check_cascade_inputs` says which cases and folds are missing before training starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from kubeseg.atomic import default_mode, replace_folder
from kubeseg.errors import DatasetError, KubesegError
from kubeseg.jsonio import read_json, write_json
from kubeseg.labels import LabelScheme, label_scheme
from kubeseg.model_folder import configuration_of
from kubeseg.parallel import map_cases
from kubeseg.planning.plans import configuration as resolve_configuration
from kubeseg.preprocessing.resampling_functions import probabilities_resampler, seg_resampler

log = logging.getLogger(__name__)

MANIFEST = "cascade_inputs.json"
FOLDER = "predicted_next_stage"  # nnU-Net's name, inside the low-res model folder


@dataclass(frozen=True)
class CascadeInputs:
    """Where the exported segmentations are, and which low-res fold predicted each case."""

    folder: Path
    configuration: str
    previous_stage: str
    source_fold: dict[str, str]  # case -> low-res fold that held it out


def previous_stage(plans: dict, configuration: str) -> Optional[str]:
    """The configuration's first stage (``previous_stage`` in the plans), or None."""
    return resolve_configuration(plans, configuration).get("previous_stage")


def _fold_name(fold_dir: Path) -> str:
    return fold_dir.name.removeprefix("fold_")


def out_of_fold_predictions(model_dir: str | Path) -> dict[str, tuple[str, Path]]:
    """``{case: (fold, validation npz)}`` over the numbered folds of a training output folder.

    A case held out by two folds (overlapping user splits) is refused: its prediction would be
    ambiguous. ``fold_all`` is ignored: it saw every case."""
    model_dir = Path(model_dir)
    found: dict[str, tuple[str, Path]] = {}
    for fold_dir in sorted(model_dir.glob("fold_*")):
        fold = _fold_name(fold_dir)
        if not fold.isdigit():
            continue
        for npz in sorted((fold_dir / "validation").glob("*.npz")):
            if npz.name.startswith("."):
                continue
            case = npz.stem
            if case in found:
                raise KubesegError(f"case {case} was held out by folds {found[case][0]} and {fold} of "
                                   f"{model_dir.name}: the splits overlap, so its out-of-fold prediction is ambiguous")
            found[case] = (fold, npz)
    return found


def _export_case(item: tuple[str, Path, Path], prev_config: dict, scheme: LabelScheme, out: Path) -> str:
    case, npz, target_array = item
    target = tuple(np.load(target_array, mmap_mode="r").shape[1:])
    spacing = [float(s) for s in prev_config["spacing"]]
    with np.load(npz) as z:
        if "probabilities" in z:
            probs = z["probabilities"].astype(np.float32)
            if len(target) != probs.ndim - 1:
                raise KubesegError(f"{npz}: probabilities of shape {probs.shape} do not fit the "
                                   f"{len(target)}D full-res arrays")
            tiny = np.finfo(np.float32).tiny
            if scheme.has_regions:  # sigmoid outputs: resample log-odds, paint the regions
                logodds = np.log(np.maximum(probs, tiny)) - np.log(np.maximum(1 - probs, tiny))
                resampled = probabilities_resampler(prev_config)(logodds, target, spacing, spacing)
                seg = scheme.to_segmentation(1 / (1 + np.exp(-resampled)))
            else:
                logp = np.log(np.maximum(probs, tiny))
                resampled = probabilities_resampler(prev_config)(logp, target, spacing, spacing)
                seg = np.asarray(scheme.all_labels)[np.argmax(resampled, axis=0)]
        elif "segmentation" in z:
            seg = seg_resampler(prev_config)(z["segmentation"][None].astype(np.int16), target, spacing, spacing)[0]
        else:
            raise KubesegError(f"{npz} has neither 'probabilities' nor 'segmentation'")
    if tuple(seg.shape) != tuple(target):  # e.g. no-resampling plans: the low-res grid is not the full-res one
        raise KubesegError(f"{npz}: the previous stage's prediction ({tuple(seg.shape)}) cannot be brought to the "
                           f"full-res grid {tuple(target)} with its plans' resampling functions")
    dtype = np.int8 if max(scheme.all_labels) < 128 else np.int16
    np.save(out / f"{case}.npy", seg.astype(dtype)[None])
    return case


def export_cascade_inputs(previous_model_dir: str | Path, preprocessed_dir: str | Path, configuration: str,
                          out_dir: str | Path | None = None, num_workers: Optional[int] = None,
                          progress: bool = False) -> CascadeInputs:
    """Write the cascade input of every case the low-res folds held out to ``out_dir``
    (default ``PREVIOUS/predicted_next_stage/<configuration>``, nnU-Net's place).

    ``previous_model_dir``: the first stage's training output (``<Trainer>__<Plans>__3d_lowres``
    with ``fold_*/validation/*.npz``); ``preprocessed_dir``: the preprocessed dataset holding
    ``configuration``'s arrays (their shapes are the target grid). All-or-nothing: the folder
    is assembled beside ``out_dir`` and renamed into place.
    """
    prev_dir, pre = Path(previous_model_dir), Path(preprocessed_dir)
    plans_file = pre / "plans.json"
    if not plans_file.is_file():
        raise KubesegError(f"{pre} has no plans.json; is it a preprocessed dataset folder?")
    plans = read_json(plans_file)
    prev = previous_stage(plans, configuration)
    if prev is None:
        raise KubesegError(f"{configuration!r} is not a cascade stage (no previous_stage in the plans)")
    if not (prev_dir / "plans.json").is_file():
        raise KubesegError(f"{prev_dir} is not a training output folder (no plans.json)")
    trained = read_json(prev_dir / "plans.json")
    named = configuration_of(prev_dir)
    if named is not None and named != prev:
        raise KubesegError(f"{prev_dir.name} holds {named!r}, but {configuration!r} cascades from {prev!r}")
    if resolve_configuration(trained, prev) != resolve_configuration(plans, prev):
        raise KubesegError(f"{prev_dir} was trained with other {prev!r} plans than {plans_file}")
    prev_config = resolve_configuration(plans, prev)
    data_dir = pre / resolve_configuration(plans, configuration)["data_identifier"]
    if not data_dir.is_dir():
        raise KubesegError(f"{data_dir} does not exist: preprocess {configuration!r} first")
    predictions = out_of_fold_predictions(prev_dir)
    if not predictions:
        raise KubesegError(f"{prev_dir} has no out-of-fold predictions (fold_<k>/validation/*.npz): train its "
                           "numbered folds with validation")
    missing = sorted(c for c in predictions if not (data_dir / f"{c}.npy").is_file())
    if missing:
        raise KubesegError(f"case(s) {missing[:5]} predicted by {prev_dir.name} have no preprocessed "
                           f"{configuration} array in {data_dir}")
    dataset_json = read_json(prev_dir / "dataset.json") if (prev_dir / "dataset.json").is_file() \
        else read_json(pre / "dataset.json")
    scheme = label_scheme(dataset_json)

    out_dir = Path(out_dir) if out_dir is not None else prev_dir / FOLDER / configuration
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        items = [(case, npz, data_dir / f"{case}.npy") for case, (_, npz) in sorted(predictions.items())]
        _, problems = map_cases(partial(_export_case, prev_config=prev_config, scheme=scheme, out=staging),
                                items, [i[0] for i in items], num_workers,
                                desc=f"Cascade inputs for {configuration}" if progress else "")
        if problems:
            raise DatasetError(problems, str(prev_dir))
        source = {case: fold for case, (fold, _) in sorted(predictions.items())}
        write_json({"configuration": configuration, "previous_stage": prev, "previous_model": prev_dir.name,
                    "data_identifier": data_dir.name, "source_fold": source}, staging / MANIFEST)
        os.chmod(staging, default_mode(directory=True))
        replace_folder(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("cascade inputs for %s: %d case(s) from %s into %s", configuration, len(source), prev_dir.name, out_dir)
    return CascadeInputs(out_dir, configuration, prev, source)


def _splits(pre: Path, configuration: str, splits_file) -> tuple[list[str], list[dict]]:
    from kubeseg.training.data import list_case_identifiers
    from kubeseg.training.splits import SPLITS_FILENAME, generate_crossval_split

    plans = read_json(pre / "plans.json")
    ids = list_case_identifiers(pre / resolve_configuration(plans, configuration)["data_identifier"])
    splits_file = Path(splits_file) if splits_file else pre / SPLITS_FILENAME
    return ids, read_json(splits_file) if splits_file.is_file() else generate_crossval_split(sorted(ids))


def fold_cases(preprocessed_dir: str | Path, configuration: str, fold: int | str,
               splits_file: str | Path | None = None) -> list[str]:
    """The cases fold ``fold`` of ``configuration`` trains and validates on (the trainer's split:
    ``splits_file``, else ``PRE/splits_final.json``, else nnU-Net's seeded 5-fold split)."""
    from kubeseg.training.splits import select_fold

    ids, splits = _splits(Path(preprocessed_dir), configuration, splits_file)
    if str(fold) == "all":
        return sorted(ids)
    tr, val = select_fold(ids, int(fold), splits)
    return sorted(set(tr) | set(val))


def check_cascade_inputs(previous_stage_dir: str | Path, preprocessed_dir: str | Path, configuration: str,
                         fold: int | str, splits_file: str | Path | None = None) -> list[str]:
    """Refuse (naming the cases and the low-res folds that would predict them) unless every case
    of cascade fold ``fold`` has its previous-stage segmentation; returns those cases."""
    folder = Path(previous_stage_dir)
    if not folder.is_dir():
        raise KubesegError(f"previous-stage folder {folder} does not exist: run 'kubeseg cascade-inputs' first")
    cases = fold_cases(preprocessed_dir, configuration, fold, splits_file)
    missing = [c for c in cases if not (folder / f"{c}.npy").is_file() and not (folder / f"{c}.npz").is_file()]
    if missing:
        _, splits = _splits(Path(preprocessed_dir), configuration, splits_file)
        need = sorted({str(k) for k, s in enumerate(splits) for c in missing if c in s.get("val", [])})
        raise KubesegError(
            f"{configuration} fold {fold} needs the previous stage's out-of-fold segmentation of {len(missing)} "
            f"case(s) missing from {folder} ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
            f"train the previous stage's fold(s) {', '.join(need) or '?'} (a cascade fold needs all five) "
            "and export again")
    return cases
