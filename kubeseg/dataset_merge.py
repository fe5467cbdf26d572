"""New labelled cases + a raw dataset → a new raw dataset (retraining's first step).

``merge_cases(RAW, NEW, OUT)`` writes ``OUT``: a copy of the nnU-Net v2 raw dataset ``RAW`` (its
training and test cases, ``dataset.json`` with ``numTraining`` raised) plus every case of ``NEW``
in ``imagesTr``/``labelsTr``. ``NEW`` is either

* an nnU-Net-format folder: ``imagesTr/<case>_<channel:04d><ending>`` and ``labelsTr/<case><ending>``
  (a ``dataset.json`` there, if any, must agree with ``RAW``'s channels, labels and file ending), or
* loose files in one folder: ``<case>_<channel:04d><ending>`` images beside ``<case><ending>`` labels.

Refused, naming the cases and files, before anything is written: a new case whose name is
already a training or test case of ``RAW`` (a re-labelled test case would leak into training),
missing channels or labels, names that do not fit, and every problem ``kubeseg dataset check``
finds in the new cases (geometry, channels, unknown labels, NaNs, unreadable files). ``RAW``'s own
layout must be valid. All-or-nothing: ``OUT`` is assembled in a hidden sibling folder and renamed
into place. Files of ``RAW`` are hard-linked where the file system allows it (kubeseg never
rewrites a file in place) and copied otherwise; new cases are always copied.

kubeseg's own record of the merge (sources, added cases, the original dataset name) goes to
``OUT/kubeseg_merge.json``, not into ``dataset.json``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

from kubeseg.atomic import default_mode, replace_folder
from kubeseg.dataset import DatasetSpec, RawCase, list_test_cases, list_training_cases, load_dataset_json
from kubeseg.dataset_check import load_case, require_valid_layout
from kubeseg.errors import DatasetError, KubesegError, Problem
from kubeseg.jsonio import read_json, write_json
from kubeseg.parallel import map_cases

log = logging.getLogger(__name__)

RECORD = "kubeseg_merge.json"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class MergeResult:
    dataset: Path
    added: tuple[str, ...]
    num_training: int


def dataset_name(raw_dir: str | Path) -> str:
    """The dataset's name (``DatasetXXX_Name``): the folder's, or the original's for a merged copy
    (whose folder may be a pipeline artifact called anything)."""
    raw_dir = Path(raw_dir)
    record = raw_dir / RECORD
    if record.is_file():
        name = read_json(record).get("dataset_name")
        if name:
            return str(name)
    return raw_dir.resolve().name


def _loose_cases(folder: Path, spec: DatasetSpec, problems: list[Problem]) -> list[RawCase]:
    ending = spec.file_ending
    images: dict[str, list[Optional[Path]]] = {}
    labels: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if not f.name.endswith(ending):
            problems.append(Problem(None, str(f), f"not a {ending} file (the dataset's file ending)"))
            continue
        stem = f.name[: -len(ending)]
        m = _CHANNEL.match(stem)
        if m:
            channel = int(m["channel"])
            if channel >= spec.num_channels:
                problems.append(Problem(m["case"], str(f), f"channel file beyond the {spec.num_channels} "
                                                           "channel(s) of the dataset"))
                continue
            images.setdefault(m["case"], [None] * spec.num_channels)[channel] = f
        else:
            labels[stem] = f
    cases = []
    for case_id in sorted(set(images) | set(labels)):
        files = tuple(images.get(case_id, [None] * spec.num_channels))
        for c, f in enumerate(files):
            if f is None:
                problems.append(Problem(case_id, str(folder / f"{case_id}_{c:04d}{ending}"),
                                        f"channel {c} ({spec.channel_names[c]}) is missing"))
        if case_id not in labels:
            problems.append(Problem(case_id, str(folder / f"{case_id}{ending}"), "label file is missing"))
        cases.append(RawCase(case_id, files, labels.get(case_id)))
    return cases


def list_new_cases(new_cases: str | Path, spec: DatasetSpec) -> list[RawCase]:
    """The labelled cases in ``new_cases`` (nnU-Net layout or loose files), checked for layout only;
    raises :class:`DatasetError` with every layout problem."""
    folder = Path(new_cases)
    if not folder.is_dir():
        raise KubesegError(f"new cases {folder} is not a folder")
    problems: list[Problem] = []
    if (folder / "imagesTr").is_dir() or (folder / "labelsTr").is_dir():
        if (folder / "dataset.json").is_file():
            other = load_dataset_json(folder)
            for what, a, b in (("channel_names", other.channel_names, spec.channel_names),
                               ("labels", other.labels, spec.labels), ("file_ending", other.file_ending,
                                                                       spec.file_ending)):
                if a != b:
                    problems.append(Problem(None, str(folder / "dataset.json"),
                                            f"{what} {a} differ from the dataset's {b}"))
        found: list[Problem] = []
        cases = list_training_cases(folder, spec, found)
        # numTraining belongs to the dataset being extended, not to the new cases
        problems += [p for p in found if "numTraining" not in p.message]
    else:
        cases = _loose_cases(folder, spec, problems)
    if problems:
        raise DatasetError(problems, str(folder))
    if not cases:
        raise KubesegError(f"{folder} holds no labelled case: expected imagesTr/<case>_0000{spec.file_ending} with "
                           f"labelsTr/<case>{spec.file_ending}, or <case>_0000{spec.file_ending} beside "
                           f"<case>{spec.file_ending}")
    return cases


def _check_new(case: RawCase, spec: DatasetSpec) -> None:
    load_case(case, spec, with_label=True)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def merge_cases(raw_dir: str | Path, new_cases: str | Path, out_dir: str | Path, num_workers: Optional[int] = None,
                overwrite: bool = False, progress: bool = False) -> MergeResult:
    """Write ``out_dir`` = ``raw_dir`` + the labelled cases of ``new_cases`` (see the module doc).

    ``new_cases`` may also be a copy of the review feedback store (:mod:`kubeseg.feedback_store`:
    its ``feedback/`` review log beside ``imagesTr``/``labelsTr``; the retraining pipeline imports
    the store's location as its new cases): then only the cases of the batches its refresh rule
    marks (``KUBESEG_FEEDBACK_*`` settings) are merged, exported first to a folder beside ``out_dir``."""
    from kubeseg.feedback_store import is_store_copy, reviewed_cases

    if is_store_copy(Path(new_cases)):
        Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
        with reviewed_cases(Path(new_cases), Path(out_dir).parent) as exported:
            log.info("%s is a review feedback store: merging the cases of its marked batches", new_cases)
            return _merge(Path(raw_dir), exported, Path(out_dir), num_workers, overwrite, progress)
    return _merge(Path(raw_dir), Path(new_cases), Path(out_dir), num_workers, overwrite, progress)


def _merge(raw_dir: Path, new_dir: Path, out_dir: Path, num_workers: Optional[int], overwrite: bool,
           progress: bool) -> MergeResult:
    from kubeseg.feedback_store import exported_confidence

    if out_dir.resolve() == raw_dir.resolve():
        raise KubesegError(f"the merged dataset must be a new folder, not {raw_dir} itself")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise KubesegError(f"{out_dir} exists and is not empty; remove it or pass overwrite")
    spec, old = require_valid_layout(raw_dir)
    test_problems: list[Problem] = []
    tests = list_test_cases(raw_dir, spec, test_problems)
    new = list_new_cases(new_dir, spec)

    taken = {c.case_id: f"training case ({c.label})" for c in old}
    taken.update({c.case_id: f"test case ({c.images[0]})" for c in tests if c.case_id not in taken})
    clashes = [c.case_id for c in new if c.case_id in taken]
    if clashes:
        raise KubesegError(f"{len(clashes)} new case name(s) already exist in {raw_dir}: "
                           + "; ".join(f"{c} is a {taken[c]}" for c in clashes[:10])
                           + (" ..." if len(clashes) > 10 else "")
                           + ". Rename the new cases (a labelled test case must not become a training case "
                             "under the same name)")
    _, problems = map_cases(partial(_check_new, spec=spec), new, [c.case_id for c in new], num_workers,
                            desc="Checking new cases" if progress else "")
    if problems:
        raise DatasetError(problems, str(new_dir))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        target = staging / "d"
        shutil.copytree(raw_dir, target, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(".*", "dataset.json", RECORD))
        for case in new:
            for c, f in enumerate(case.images):
                shutil.copy2(f, target / "imagesTr" / f"{case.case_id}_{c:04d}{spec.file_ending}")
            shutil.copy2(case.label, target / "labelsTr" / f"{case.case_id}{spec.file_ending}")
        ds = read_json(raw_dir / "dataset.json")
        ds["numTraining"] = len(old) + len(new)
        write_json(ds, target / "dataset.json")
        previous = read_json(raw_dir / RECORD) if (raw_dir / RECORD).is_file() else {}
        added = [c.case_id for c in new]
        confidence = exported_confidence(new_dir, added)  # cases from the review feedback store
        write_json({"dataset_name": dataset_name(raw_dir), "base": str(raw_dir.resolve()),
                    "new_cases": str(new_dir.resolve()), "added": added, "num_training": ds["numTraining"],
                    **({"confidence": confidence} if confidence else {}),
                    "history": previous.get("history", []) + [{"new_cases": str(new_dir.resolve()), "added": added}]},
                   target / RECORD)
        require_valid_layout(target)
        for d in [target, *[p for p in target.rglob("*") if p.is_dir()]]:
            os.chmod(d, default_mode(directory=True))
        replace_folder(target, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("merged %d new case(s) into %s (%d training cases)", len(new), out_dir, len(old) + len(new))
    return MergeResult(out_dir, tuple(c.case_id for c in new), len(old) + len(new))
