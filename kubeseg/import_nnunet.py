"""``kubeseg import-nnunet``: a model exported by nnU-Net v2 → a kubeseg bundle.

Accepts what ``nnUNetv2_install_pretrained_model_from_zip`` accepts (a zip holding
``[nnUNet_results/]DatasetXXX/<Trainer>__<Plans>__<configuration>/...``, such as the published
AIMI models) or such a results folder. Safety, before anything is written:

* every zip entry is checked first: absolute names, ``..`` components, drive letters, symbolic
  links and names that resolve outside the target are refused, naming the entry; nothing is
  extracted unless every entry is clean;
* checkpoints are read as data (:func:`~kubeseg.inference.safe_load.load_checkpoint_safe`); a
  checkpoint needing any other pickled object is refused, naming the file;
* ``postprocessing.pkl`` is never unpickled. nnU-Net writes the same rule as
  ``postprocessing.json`` beside it, which is read instead; without it the model is imported
  without postprocessing, with a warning;
* missing files (plans.json, dataset.json, checkpoints) and weights that do not fit the network
  of the plans are named.

The zip is extracted to a temporary folder that is removed afterwards; the bundle appears only
when complete (see :mod:`kubeseg.bundle`).
"""

from __future__ import annotations

import logging
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from kubeseg.bundle import BundleMember, _configuration_of, write_bundle
from kubeseg.errors import KubesegError
from kubeseg.inference.model import CHECKPOINT_NAME, available_folds
from kubeseg.postprocessing import PostprocessingRule, folder_postprocessing

log = logging.getLogger(__name__)

PREFERENCE = ("3d_fullres", "3d_cascade_fullres", "2d", "3d_lowres")


def _check_zip_entries(zf: zipfile.ZipFile, target: Path) -> None:
    root = target.resolve()
    for info in zf.infolist():
        name = info.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        mode = info.external_attr >> 16
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise KubesegError(f"refusing zip entry {name!r}: it would be written outside the target folder")
        if stat.S_ISLNK(mode):
            raise KubesegError(f"refusing zip entry {name!r}: symbolic links are not extracted")
        resolved = (root / name).resolve()
        if resolved != root and root not in resolved.parents:
            raise KubesegError(f"refusing zip entry {name!r}: it resolves outside the target folder")


def safe_extract(zip_path: str | Path, target: Path) -> None:
    """Extract ``zip_path`` into ``target`` after checking every entry (see module docstring)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            _check_zip_entries(zf, target)
            zf.extractall(target)
    except zipfile.BadZipFile as e:
        raise KubesegError(f"{zip_path} is not a readable zip file: {e}") from None


def find_model_folders(root: Path) -> list[Path]:
    """Trained-model folders under ``root``: plans.json and dataset.json beside fold_*/ folders."""
    found = []
    for plans in sorted(root.rglob("plans.json")):
        folder = plans.parent
        if any(p.is_dir() for p in folder.glob("fold_*")):
            found.append(folder)
    return found


def _validate(folder: Path) -> list[str]:
    for name in ("plans.json", "dataset.json"):
        if not (folder / name).is_file():
            raise KubesegError(f"{folder / name} is missing")
    fold_dirs = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    missing = [str(p / CHECKPOINT_NAME) for p in fold_dirs if not (p / CHECKPOINT_NAME).is_file()]
    if missing:
        raise KubesegError(f"{len(missing)} fold(s) have no {CHECKPOINT_NAME}: {', '.join(missing)}")
    return available_folds(folder)


def import_nnunet(source: str | Path, out_dir: str | Path, configurations: Optional[Sequence[str]] = None,
                  folds: Optional[Sequence[str]] = None, overwrite: bool = False) -> Path:
    """Import an nnU-Net v2 zip or results folder as a kubeseg bundle at ``out_dir``."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise KubesegError(f"{source} does not exist")
    with tempfile.TemporaryDirectory(prefix=".kubeseg-import-") as tmp:
        root = source
        if source.is_file():
            root = Path(tmp) / "extracted"
            root.mkdir()
            safe_extract(source, root)
        folders = find_model_folders(root)
        if not folders:
            raise KubesegError(f"{source} holds no trained-model folder (plans.json, dataset.json, "
                               f"fold_*/{CHECKPOINT_NAME})")
        by_conf: dict[str, Path] = {}
        for folder in folders:
            fold_list = _validate(folder)
            if not fold_list:
                raise KubesegError(f"{folder} has no fold with {CHECKPOINT_NAME}")
            conf = _configuration_of(folder, fold_list)
            by_conf.setdefault(conf, folder)
        wanted = list(configurations) if configurations else \
            [next((c for c in PREFERENCE if c in by_conf), sorted(by_conf)[0])]
        members = []
        for conf in wanted:
            if conf not in by_conf:
                raise KubesegError(f"{source} has no model for configuration {conf!r}; it has {sorted(by_conf)}")
            members.append(BundleMember(by_conf[conf], conf, list(folds) if folds else None))
        for m in list(members):
            prev = _previous(m)
            if prev and not any(o.configuration == prev for o in members):
                if prev not in by_conf:
                    raise KubesegError(f"{m.folder.name} is a cascade stage but {source} has no {prev!r} model")
                members.append(BundleMember(by_conf[prev], prev, m.folds, role="previous_stage"))
        for m in members:
            _check_plans(m)
        rule = folder_postprocessing(members[0].folder) if len(wanted) == 1 else PostprocessingRule()
        selection = {"source": f"imported from nnU-Net v2: {source.name}", "ensemble": len(wanted) > 1,
                     "available_configurations": sorted(by_conf)}
        log.info("importing %s from %s", " + ".join(wanted), source)
        return write_bundle(members, out_dir, rule, selection, overwrite)


def _previous(member: BundleMember) -> Optional[str]:
    from kubeseg.jsonio import read_json
    plans = read_json(member.folder / "plans.json")
    return plans["configurations"].get(member.configuration, {}).get("previous_stage")


def _check_plans(member: BundleMember) -> None:
    """Refuse a model whose preprocessor or resampling functions kubeseg cannot reproduce, naming the file."""
    from kubeseg.jsonio import read_json
    from kubeseg.planning.plans import configuration
    path = member.folder / "plans.json"
    try:
        configuration(read_json(path), member.configuration)
    except KubesegError as e:
        raise KubesegError(f"{path}: {e}") from None
