"""``kubeseg bundle``: one folder with everything prediction needs, and nothing else.

Layout (nnU-Net v2's ``<results>/<DatasetXXX>`` folder, so ``kubeseg predict -m BUNDLE`` and
nnU-Net's tools both find their way)::

    BUNDLE/selection.json            what to run (members, folds), expected Dice per class
    BUNDLE/postprocessing.json       largest-component rule (JSON, never a pickle)
    BUNDLE/label_codes.json          coded concept per label (DICOM-SEG, FHIR; kubeseg.clinical.label_codes)
    BUNDLE/dataset.json  plans.json  [dataset_fingerprint.json]
    BUNDLE/<Trainer>__<Plans>__<configuration>/
        dataset.json  plans.json  [dataset_fingerprint.json]  [splits_final.json: the folds' cases]
        fold_<N>/checkpoint_final.pth    weights only: network_weights, init_args (configuration,
                                         fold), trainer_name, inference_allowed_mirroring_axes

A cascade stage brings its first stage along. Every checkpoint is read safely and loaded into
the network its plans describe before it is written, so a bundle that is written is one that
predicts. The bundle is assembled in a hidden sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from kubeseg.atomic import replace_folder
from kubeseg.clinical.label_codes import FILENAME as LABEL_CODES_FILENAME, label_codes_json
from kubeseg.errors import KubesegError
from kubeseg.inference.model import CHECKPOINT_NAME, available_folds
from kubeseg.inference.run import SELECTION_FILENAME
from kubeseg.inference.safe_load import load_checkpoint_safe, weights_only_checkpoint
from kubeseg.jsonio import read_json, write_json
from kubeseg.model_folder import configuration_of, model_folder_name, parse_model_folder_name
from kubeseg.network import build_network
from kubeseg.postprocessing import FILENAME as PP_FILENAME, PostprocessingRule, save_postprocessing
from kubeseg.training.plans import ConfigurationView, LabelInfo, num_input_channels
from kubeseg.training.splits import SPLITS_FILENAME

log = logging.getLogger(__name__)

FINGERPRINT = "dataset_fingerprint.json"


@dataclass
class BundleMember:
    """One trained configuration to ship: its folder, which folds, and its role."""

    folder: Path
    configuration: str
    folds: Optional[list[str]] = None
    role: str = "member"  # or "previous_stage" (a cascade's first stage)
    extra_files: dict[str, Path] = field(default_factory=dict)


def _configuration_of(folder: Path, folds: list[str]) -> str:
    ckpt = load_checkpoint_safe(folder / f"fold_{folds[0]}" / CHECKPOINT_NAME)
    conf = (ckpt.get("init_args") or {}).get("configuration")
    conf = conf or configuration_of(folder)
    if conf is None:
        raise KubesegError(f"cannot tell the configuration of {folder}")
    return conf


def _check_loads(ckpt: dict, plans: dict, dataset_json: dict, configuration: str, source: Path) -> None:
    """The weights must fit the network the plans describe (names and shapes), or the file is inconsistent."""
    try:
        view = ConfigurationView.from_plans(plans, configuration)
        labels = LabelInfo.from_dataset_json(dataset_json)
        net = build_network(view.network_class_name, view.arch_kwargs, view.kw_requires_import,
                            num_input_channels(view, labels), labels.num_segmentation_heads,
                            deep_supervision=False, initialize=False)
        net.load_state_dict(ckpt["network_weights"])
    except (RuntimeError, KeyError, ValueError, TypeError, ImportError) as e:
        raise KubesegError(f"{source} does not fit the network of plans.json/dataset.json "
                           f"({configuration}): {str(e).splitlines()[0]}") from None


def _write_member(member: BundleMember, target: Path) -> list[str]:
    plans_file, ds_file = member.folder / "plans.json", member.folder / "dataset.json"
    for f in (plans_file, ds_file):
        if not f.is_file():
            raise KubesegError(f"{f} is missing")
    plans, dataset_json = read_json(plans_file), read_json(ds_file)
    if member.configuration not in plans.get("configurations", {}):
        raise KubesegError(f"{plans_file} has no configuration {member.configuration!r}")
    folds = member.folds or available_folds(member.folder)
    if not folds:
        raise KubesegError(f"{member.folder} has no fold_*/{CHECKPOINT_NAME}")
    target.mkdir(parents=True)
    write_json(plans, target / "plans.json")
    write_json(dataset_json, target / "dataset.json")
    fingerprint = member.extra_files.get(FINGERPRINT, member.folder / FINGERPRINT)
    if fingerprint.is_file():
        shutil.copyfile(fingerprint, target / FINGERPRINT)
    if (member.folder / SPLITS_FILENAME).is_file():  # the folds' cases: what incremental fine-tuning keeps
        write_json(read_json(member.folder / SPLITS_FILENAME), target / SPLITS_FILENAME)
    for fold in folds:
        source = member.folder / f"fold_{fold}" / CHECKPOINT_NAME
        ckpt = load_checkpoint_safe(source)
        conf = (ckpt.get("init_args") or {}).get("configuration")
        if conf is not None and conf != member.configuration:
            raise KubesegError(f"{source} was trained for {conf!r}, not {member.configuration!r}")
        _check_loads(ckpt, plans, dataset_json, member.configuration, source)
        (target / f"fold_{fold}").mkdir()
        torch.save(weights_only_checkpoint(ckpt, member.configuration), target / f"fold_{fold}" / CHECKPOINT_NAME)
    log.info("bundled %s (%s, folds %s)", member.folder, member.configuration, ",".join(folds))
    return folds


def _folder_name(member: BundleMember) -> str:
    if parse_model_folder_name(member.folder):
        return member.folder.name
    return model_folder_name(read_json(member.folder / "plans.json"), member.configuration)


def write_bundle(members: Sequence[BundleMember], out_dir: str | Path, postprocessing: PostprocessingRule,
                 selection: dict, overwrite: bool = False) -> Path:
    """Assemble the bundle in a staging folder, then rename it to ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise KubesegError(f"{out_dir} exists and is not empty; remove it or pass overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        entries = []
        for m in members:
            name = _folder_name(m)
            folds = _write_member(m, staging / name)
            entries.append((m, name, folds))
        first = staging / entries[0][1]
        for f in ("plans.json", "dataset.json", FINGERPRINT):
            if (first / f).is_file():
                shutil.copyfile(first / f, staging / f)
        save_postprocessing(postprocessing, staging / PP_FILENAME)
        # coded concept per label for DICOM-SEG and FHIR (defaults; a person may edit the file)
        labels = read_json(first / "dataset.json")["labels"]
        write_json(label_codes_json(labels), staging / LABEL_CODES_FILENAME)
        sel = dict(selection)
        sel["members"] = [{"configuration": m.configuration, "folder": name, "folds": folds}
                          for m, name, folds in entries if m.role == "member"]
        sel["previous_stages"] = [{"configuration": m.configuration, "folder": name, "folds": folds}
                                  for m, name, folds in entries if m.role == "previous_stage"]
        sel["folds"] = None
        sel["postprocessing"] = PP_FILENAME
        write_json(sel, staging / SELECTION_FILENAME)
        replace_folder(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("bundle written to %s", out_dir)
    return out_dir


def _with_previous_stages(members: list[BundleMember]) -> list[BundleMember]:
    """Add a cascade member's first stage (a sibling training folder) to the bundle."""
    out = list(members)
    for m in members:
        plans = read_json(m.folder / "plans.json")
        prev = plans["configurations"][m.configuration].get("previous_stage")
        if prev is None or any(o.configuration == prev for o in out):
            continue
        from kubeseg.inference.run import previous_stage_folder
        folder = previous_stage_folder(m.folder, prev)
        out.append(BundleMember(folder, prev, m.folds, role="previous_stage"))
    return out


def make_bundle(selection_file: str | Path, out_dir: str | Path, fingerprint: Optional[str | Path] = None,
                overwrite: bool = False) -> Path:
    """The bundle for a ``selection.json`` written by ``kubeseg select`` (its postprocessing beside it)."""
    selection_file = Path(selection_file)
    if selection_file.is_dir():
        selection_file = selection_file / SELECTION_FILENAME
    if not selection_file.is_file():
        raise KubesegError(f"selection file {selection_file} does not exist")
    sel = read_json(selection_file)
    pp_file = selection_file.parent / sel.get("postprocessing", PP_FILENAME)
    from kubeseg.postprocessing import load_postprocessing
    rule = load_postprocessing(pp_file) if pp_file.is_file() else PostprocessingRule()
    members = []
    for m in sel.get("members", []):
        folder = Path(m["folder"])
        folder = folder if folder.is_absolute() else selection_file.parent / folder
        extra = {FINGERPRINT: Path(fingerprint)} if fingerprint else {}
        members.append(BundleMember(folder, m["configuration"], m.get("folds"), extra_files=extra))
    if not members:
        raise KubesegError(f"{selection_file} names no members")
    kept = {k: v for k, v in sel.items() if k not in ("members", "previous_stages")}
    return write_bundle(_with_previous_stages(members), out_dir, rule, kept, overwrite)
