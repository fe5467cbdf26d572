"""nnU-Net v2 raw datasets: ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``.

A raw dataset is the only input kubeseg needs from a user, and it must be the very same folder
that nnU-Net v2 accepts, so that datasets prepared for nnU-Net work unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kubeseg.errors import DatasetError, Problem
from kubeseg.labels import LabelScheme, label_scheme, parse_labels

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class DatasetSpec:
    """What ``dataset.json`` says, validated. ``raw`` keeps the file as it was, to copy it on unchanged."""

    channel_names: dict[int, str]
    labels: dict[str, int | list[int]]  # a list is a region (kubeseg.labels)
    num_training: int
    file_ending: str
    name: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    regions_class_order: list[int] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @cached_property
    def scheme(self) -> LabelScheme:
        """Plain labels, regions, ignore label: what the labels mean."""
        return label_scheme({"labels": self.labels, "regions_class_order": self.regions_class_order})

    @property
    def label_values(self) -> list[int]:
        """Values a label file may hold (the ignore label included)."""
        return sorted(self.scheme.file_values)

    @property
    def foreground_labels(self) -> list[int]:
        return list(self.scheme.foreground_labels)


@dataclass(frozen=True)
class RawCase:
    """The files of one case. ``images[i]`` is channel ``i``; ``None`` where a channel file is missing."""

    case_id: str
    images: tuple[Path | None, ...]
    label: Path | None


def load_dataset_json(raw_dir: str | Path) -> DatasetSpec:
    """Read and validate ``RAW_DIR/dataset.json``; every problem with it is reported at once."""
    path = Path(raw_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError([Problem(None, str(path), "dataset.json is missing")], str(raw_dir))
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError([Problem(None, str(path), f"cannot be parsed as JSON: {e}")], str(raw_dir)) from e
    if not isinstance(d, dict):
        raise DatasetError([Problem(None, str(path), f"must be a JSON object, got {type(d).__name__}")], str(raw_dir))
    problems: list[Problem] = []

    def bad(msg: str) -> None:
        problems.append(Problem(None, str(path), msg))

    channels = d.get("channel_names", d.get("modality"))
    if not isinstance(channels, dict) or not channels:
        bad("'channel_names' is missing or empty (expected e.g. {\"0\": \"CT\"})")
        channels = {}
    try:
        channel_names = {int(k): str(v) for k, v in channels.items()}
        if sorted(channel_names) != list(range(len(channel_names))):
            bad(f"'channel_names' keys must be 0..{len(channel_names) - 1}, got {sorted(channel_names)}")
    except ValueError:
        bad(f"'channel_names' keys must be integers, got {list(channels)}")
        channel_names = {}

    labels = d.get("labels")
    scheme, label_problems = parse_labels(labels, d.get("regions_class_order"))
    for msg in label_problems:
        bad(msg)
    label_map = dict(labels) if scheme is not None else {}

    num_training = d.get("numTraining")
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 1:
        bad(f"'numTraining' must be a positive integer, got {num_training!r}")
        num_training = 0
    file_ending = d.get("file_ending")
    if not isinstance(file_ending, str) or not file_ending.startswith("."):
        bad(f"'file_ending' must be a string like '.nii.gz', got {file_ending!r}")
        file_ending = ""
    if "dataset" in d:
        bad("an explicit 'dataset' file list in dataset.json is not supported yet; use imagesTr/labelsTr")
    if problems:
        raise DatasetError(problems, str(raw_dir))
    return DatasetSpec(channel_names, label_map, num_training, file_ending, str(d.get("name", "")), d,
                       d.get("regions_class_order"))


def _cases_in(folder: Path, file_ending: str, num_channels: int, problems: list[Problem]) -> dict[str, list[Path | None]]:
    """Group ``<case>_<channel:04d><ending>`` files by case; odd names and channels are problems."""
    cases: dict[str, list[Path | None]] = {}
    extra: list[tuple[str, Path]] = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        if f.name.startswith(".") or not f.name.endswith(file_ending):
            continue
        m = _CHANNEL_SUFFIX.match(f.name[: -len(file_ending)])
        if not m:
            problems.append(Problem(None, str(f), f"name does not follow <case>_<channel:04d>{file_ending}"))
            continue
        case, channel = m["case"], int(m["channel"])
        slots = cases.setdefault(case, [None] * num_channels)
        if channel >= num_channels:
            extra.append((case, f))
        else:
            slots[channel] = f
    for case, f in extra:
        problems.append(Problem(case, str(f), f"channel file beyond the {num_channels} channel(s) dataset.json names"))
    return cases


def list_training_cases(raw_dir: str | Path, spec: DatasetSpec, problems: list[Problem]) -> list[RawCase]:
    """Every case found in imagesTr or labelsTr; file-level problems are appended to ``problems``."""
    raw_dir = Path(raw_dir)
    images_dir, labels_dir = raw_dir / "imagesTr", raw_dir / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            problems.append(Problem(None, str(d), "folder is missing"))
    by_case = _cases_in(images_dir, spec.file_ending, spec.num_channels, problems)
    labels = {
        f.name[: -len(spec.file_ending)]: f
        for f in (sorted(labels_dir.iterdir()) if labels_dir.is_dir() else [])
        if f.name.endswith(spec.file_ending) and not f.name.startswith(".")
    }
    cases = []
    for case_id in sorted(set(by_case) | set(labels)):
        images = tuple(by_case.get(case_id, [None] * spec.num_channels))
        for c, f in enumerate(images):
            if f is None:
                expected = images_dir / f"{case_id}_{c:04d}{spec.file_ending}"
                problems.append(Problem(case_id, str(expected), f"channel {c} ({spec.channel_names[c]}) is missing"))
        label = labels.get(case_id)
        if label is None:
            problems.append(Problem(case_id, str(labels_dir / f"{case_id}{spec.file_ending}"), "label file is missing"))
        cases.append(RawCase(case_id, images, label))
    if cases and len(cases) != spec.num_training:
        problems.append(Problem(None, str(raw_dir / "dataset.json"),
                                f"numTraining is {spec.num_training} but {len(cases)} training cases were found"))
    if not cases:
        problems.append(Problem(None, str(images_dir), "no training cases found"))
    return cases


def list_test_cases(raw_dir: str | Path, spec: DatasetSpec, problems: list[Problem]) -> list[RawCase]:
    """Cases in imagesTs (no labels); missing channels are appended to ``problems``."""
    folder = Path(raw_dir) / "imagesTs"
    by_case = _cases_in(folder, spec.file_ending, spec.num_channels, problems)
    cases = [RawCase(c, tuple(files), None) for c, files in sorted(by_case.items())]
    for case in cases:
        for c, f in enumerate(case.images):
            if f is None:
                expected = folder / f"{case.case_id}_{c:04d}{spec.file_ending}"
                problems.append(Problem(case.case_id, str(expected), f"channel {c} ({spec.channel_names[c]}) is missing"))
    return cases
