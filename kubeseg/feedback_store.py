"""Reviewed cases as labelled training cases, and the rule that sends them to the next refresh.

A person reviews a served case (``POST /feedback`` of the service): *approve* (the prediction is
right), *correct* (here is the right label map) or *reject* (with a reason; nothing is stored as a
label). Approved and corrected cases become labelled cases in the nnU-Net v2 raw layout, at a
location that is a setting: a folder (a mounted volume) or ``s3://bucket/prefix``::

    dataset.json                     channels, labels, file ending (.nii.gz) of the model under review
    imagesTr/<case>_0000.nii.gz …    the input channels, in the input's geometry
    labelsTr/<case>.nii.gz           the approved prediction or the corrected label map
    feedback/<seq:08d>.json          one review each: who, when, model version, decision, reason, batch

Review records are numbered objects created only if absent (``O_EXCL`` link on a folder,
``If-None-Match: *`` on S3), so concurrent writers never overwrite one another; a writer that
loses a number reads the new record and takes the next. :meth:`FeedbackStore.log_lines` gives the
log as JSON lines (``export`` writes it as ``feedback.jsonl``).

**The refresh rule** (:class:`RefreshRule`, the one owner; the design's "30 %"): labelled reviews
(approved and corrected; rejects are logged but have no label) are grouped in review order into
batches of ``batch_size`` (20; the size in force when a batch starts is recorded with each of its
records, so a changed setting never reshuffles old batches). A complete batch in which at least
``min_corrected_fraction`` (0.30) of the cases needed correction is *marked*: the model missed
often enough there that those cases go into the next fine-tune. A batch below the fraction is
kept (the cases stay in the store) but not exported; the last, incomplete batch waits.
:meth:`FeedbackStore.export` writes the cases of marked batches as a raw dataset (``imagesTr``,
``labelsTr``, ``dataset.json``, ``feedback.jsonl``) that ``kubeseg dataset merge`` accepts.

Engine layer: numpy, SimpleITK and (for S3 only) boto3; no web framework.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from kubeseg.atomic import atomic_path, default_mode, replace_folder
from kubeseg.errors import KubesegError
from kubeseg.store_location import parse_store_location
from kubeseg.training.checkpoint_store import s3_endpoint

log = logging.getLogger(__name__)

DECISIONS = ("approve", "reject", "correct")
STATUS = {"approve": "approved", "reject": "rejected", "correct": "corrected"}  # decision -> queue status
ENDING = ".nii.gz"
RECORDS = "feedback"
EXPORT_RECORD = "kubeseg_review_export.json"
EXPORT_LOG = "feedback.jsonl"  # an export's review records, one JSON object a line
MAX_EXPORT_LOG_BYTES = 64 * 2 ** 20  # ~300 bytes a record: far more reviews than a refresh holds


class FeedbackConflict(KubesegError):
    """The store cannot take this case as asked (another label set, a case already stored)."""


@dataclass(frozen=True)
class RefreshRule:
    """Which reviewed cases go into the next refresh (module doc). Environment:
    ``KUBESEG_FEEDBACK_BATCH_SIZE`` (20), ``KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION`` (0.30)."""

    batch_size: int = 20
    min_corrected_fraction: float = 0.30

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"KUBESEG_FEEDBACK_BATCH_SIZE={self.batch_size} must be at least 1")
        if not 0.0 <= self.min_corrected_fraction <= 1.0:
            raise ValueError(f"KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION={self.min_corrected_fraction} must be in [0, 1]")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RefreshRule":
        d = cls()
        size = env.get("KUBESEG_FEEDBACK_BATCH_SIZE") or str(d.batch_size)
        frac = env.get("KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION") or str(d.min_corrected_fraction)
        try:
            return cls(int(size), float(frac))
        except ValueError as e:
            if "must" in str(e):
                raise
            raise ValueError(f"KUBESEG_FEEDBACK_BATCH_SIZE={size!r} / KUBESEG_FEEDBACK_MIN_CORRECTED_FRACTION="
                             f"{frac!r}: an integer and a number") from None

    def marked(self, decisions: Sequence[str], size: int) -> bool:
        """A batch of ``size`` labelled reviews with these decisions: complete and corrected often enough."""
        if len(decisions) < size or not decisions:
            return False
        return sum(d == "correct" for d in decisions) / len(decisions) >= self.min_corrected_fraction - 1e-12


@dataclass
class Batch:
    number: int
    size: int
    records: list = field(default_factory=list)

    @property
    def corrected(self) -> int:
        return sum(r["decision"] == "correct" for r in self.records)

    @property
    def complete(self) -> bool:
        return len(self.records) >= self.size

    def to_json(self, rule: RefreshRule) -> dict:
        return {"batch": self.number, "size": self.size, "reviewed": len(self.records), "corrected": self.corrected,
                "complete": self.complete, "marked": rule.marked([r["decision"] for r in self.records], self.size),
                "cases": [r["stored_as"] for r in self.records]}


# -- where the files live -------------------------------------------------------------------------------
class Backend(ABC):
    """Bytes under string keys (``a/b/c``)."""

    @abstractmethod
    def read(self, key: str) -> Optional[bytes]: ...

    @abstractmethod
    def write_file(self, key: str, path: Path) -> None:
        """Put a local file under ``key`` (replacing it); readers see the old or the whole new one."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Put ``data`` under ``key`` only if the key is absent; False if it exists."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def describe(self, key: str = "") -> str: ...

    def write(self, key: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="kubeseg-feedback-") as tmp:
            path = Path(tmp) / Path(key).name
            path.write_bytes(data)
            self.write_file(key, path)

    def download(self, key: str, target: Path) -> None:
        data = self.read(key)
        if data is None:
            raise KubesegError(f"{self.describe(key)} is missing")
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)


class FolderBackend(Backend):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise KubesegError(f"unsafe key {key!r}")
        return self.root / key

    def read(self, key: str) -> Optional[bytes]:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def write_file(self, key: str, path: Path) -> None:
        with atomic_path(self._path(key)) as tmp:
            shutil.copyfile(path, tmp)

    def create(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            try:
                os.link(tmp, target)  # atomic, and fails if the target exists
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def describe(self, key: str = "") -> str:
        return str(self.root / key)


class S3Backend(Backend):
    """An S3-compatible bucket. Credentials and endpoint as boto3 finds them (``AWS_*``,
    ``AWS_ENDPOINT_URL``, else ``MLFLOW_S3_ENDPOINT_URL``)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - declared in the serving and pipelines extras
            raise KubesegError("an s3:// feedback store needs boto3 (pip install 'kubeseg[serving]')") from e
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=s3_endpoint(endpoint_url),
                                   config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                 connect_timeout=10, read_timeout=60))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _missing(e) -> bool:
        return str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")

    def read(self, key: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as e:
            if self._missing(e):
                return None
            raise

    def write_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))  # an object appears whole or not at all

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "412",
                                                                "ConditionalRequestConflict", "409"):
                return False
            raise
        return True

    def keys(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            out += [o["Key"][len(self.prefix) + 1 if self.prefix else 0:] for o in page.get("Contents", [])]
        return sorted(out)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_backend(location: str) -> Backend:
    """``s3://bucket[/prefix]`` → S3; ``file:///path`` or a plain path → a folder."""
    where = parse_store_location(location, "feedback store (KUBESEG_FEEDBACK_STORE)")
    return S3Backend(where.bucket, where.path) if where.bucket else FolderBackend(where.path)


# -- the store ------------------------------------------------------------------------------------------
def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def dataset_case_id(review_id: str) -> str:
    """The raw-dataset case name of a reviewed queue case (one owner of the name format)."""
    return f"review_{review_id}"


class FeedbackStore:
    """Labelled cases and the review log at one location (module doc)."""

    def __init__(self, location: str | Backend, rule: RefreshRule = RefreshRule()):
        self.backend = location if isinstance(location, Backend) else open_backend(location)
        self.rule = rule
        self._records: dict[int, dict] = {}  # records never change once written: cache them

    def describe(self) -> str:
        return self.backend.describe()

    # dataset.json --------------------------------------------------------------------------------------
    def dataset_json(self) -> Optional[dict]:
        raw = self.backend.read("dataset.json")
        return json.loads(raw) if raw else None

    def ensure_dataset(self, channel_names: Mapping, labels: Mapping) -> dict:
        """Write ``dataset.json`` on first use; refuse a case of another channel or label set."""
        wanted = {"channel_names": {str(k): v for k, v in channel_names.items()},
                  "labels": dict(labels), "file_ending": ENDING}
        have = self.dataset_json()
        if have is None:
            self.backend.create("dataset.json", json.dumps({**wanted, "numTraining": 1}, indent=2).encode())
            have = self.dataset_json()
        for k in ("channel_names", "labels"):
            if have.get(k) != wanted[k]:
                raise FeedbackConflict(f"the feedback store {self.describe()} holds cases with {k} {have.get(k)}, "
                                       f"this model has {wanted[k]}: point KUBESEG_FEEDBACK_STORE at a new location "
                                       "for a model with another label or channel set")
        return have

    # cases ---------------------------------------------------------------------------------------------
    def case_keys(self, case: str, channels: int) -> list[str]:
        return [f"imagesTr/{case}_{c:04d}{ENDING}" for c in range(channels)] + [f"labelsTr/{case}{ENDING}"]

    def store_case(self, case: str, channel_files: Sequence[Path], label_file: Path) -> None:
        """Images first, the label last: a label file means the case is whole."""
        keys = self.case_keys(case, len(channel_files))
        try:
            for key, path in zip(keys, [*channel_files, label_file]):
                self.backend.write_file(key, Path(path))
        except BaseException:
            self.remove_case(case, len(channel_files))
            raise

    def remove_case(self, case: str, channels: int) -> None:
        for key in self.case_keys(case, channels)[::-1]:
            try:
                self.backend.delete(key)
            except Exception:  # noqa: BLE001 - best effort; the record, not the files, says what counts
                log.warning("could not delete %s", self.backend.describe(key))

    # the review log ------------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        for key in self.backend.keys(RECORDS + "/"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not name[:-5].isdigit():
                continue
            seq = int(name[:-5])
            if seq not in self._records:
                raw = self.backend.read(key)
                if raw is not None:
                    self._records[seq] = json.loads(raw)
        return [self._records[k] for k in sorted(self._records)]

    def reviewed(self, review_id: str) -> Optional[dict]:
        return next((r for r in self.records() if r.get("case_id") == review_id), None)

    def append(self, record: dict, attempts: int = 50) -> dict:
        """Add one review (``decision``, ``case_id``, ``by`` …); assigns ``seq``, ``at`` and, for a
        labelled review, its ``batch``. Raises :class:`FeedbackConflict` if the case was reviewed."""
        if record.get("decision") not in DECISIONS:
            raise ValueError(f"decision {record.get('decision')!r} is not one of {', '.join(DECISIONS)}")
        for _ in range(attempts):
            existing = self.records()
            if any(r.get("case_id") == record.get("case_id") for r in existing):
                raise FeedbackConflict(f"case {record.get('case_id')} was already reviewed")
            seq = (max((r["seq"] for r in existing), default=0)) + 1
            full = {**record, "seq": seq, "at": record.get("at") or utc_now()}
            if record["decision"] in ("approve", "correct"):
                full["batch"], full["batch_size"] = self._next_batch(existing)
            else:
                full["batch"], full["batch_size"] = None, None
            if self.backend.create(f"{RECORDS}/{seq:08d}.json", json.dumps(full, sort_keys=True).encode()):
                self._records[seq] = full
                return full
            time.sleep(0.01)  # another writer took this number: read it and try the next
        raise KubesegError(f"could not append to the review log at {self.describe()} after {attempts} attempts")

    def _next_batch(self, existing: list[dict]) -> tuple[int, int]:
        labelled = [r for r in existing if r.get("batch") is not None]
        if not labelled:
            return 1, self.rule.batch_size
        last = labelled[-1]
        count = sum(r["batch"] == last["batch"] for r in labelled)
        if count < last["batch_size"]:
            return last["batch"], last["batch_size"]
        return last["batch"] + 1, self.rule.batch_size

    def log_lines(self) -> str:
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records())

    def batches(self) -> list[Batch]:
        out: dict[int, Batch] = {}
        for r in self.records():
            if r.get("batch") is not None:
                out.setdefault(r["batch"], Batch(r["batch"], r["batch_size"])).records.append(r)
        return [out[k] for k in sorted(out)]

    def marked_batches(self) -> list[Batch]:
        return [b for b in self.batches() if self.rule.marked([r["decision"] for r in b.records], b.size)]

    # export --------------------------------------------------------------------------------------------
    def export(self, out_dir: str | Path, file_ending: str = ENDING, all_labelled: bool = False,
               overwrite: bool = False) -> dict:
        """Write the cases of marked batches (``all_labelled``: of every batch) as a raw dataset at
        ``out_dir`` (assembled beside it, then renamed). Returns what was written."""
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
            raise KubesegError(f"{out_dir} exists and is not empty; remove it or pass overwrite")
        ds = self.dataset_json()
        batches = self.batches() if all_labelled else self.marked_batches()
        records = [r for b in batches for r in b.records]
        if ds is None or not records:
            summary = [b.to_json(self.rule) for b in self.batches()]
            raise KubesegError(f"nothing to export from {self.describe()}: no batch is marked for refresh "
                               f"(rule: {self.rule.batch_size} labelled reviews a batch, at least "
                               f"{self.rule.min_corrected_fraction:.0%} corrected); batches: "
                               + (json.dumps([{k: b[k] for k in ('batch', 'reviewed', 'corrected', 'marked')}
                                              for b in summary]) if summary else "none"))
        channels = len(ds["channel_names"])
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            for r in records:
                for key in self.case_keys(r["stored_as"], channels):
                    target = staging / key
                    if file_ending == ENDING:
                        self.backend.download(key, target)
                    else:
                        tmp = staging / ".tmp" / Path(key).name
                        self.backend.download(key, tmp)
                        target = target.with_name(target.name[: -len(ENDING)] + file_ending)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        sitk.WriteImage(sitk.ReadImage(str(tmp)), str(target), useCompression=True)
                        tmp.unlink()
            shutil.rmtree(staging / ".tmp", ignore_errors=True)
            (staging / "dataset.json").write_text(json.dumps(
                {**ds, "file_ending": file_ending, "numTraining": len(records)}, indent=2))
            (staging / EXPORT_LOG).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            result = {"source": self.describe(), "rule": {"batch_size": self.rule.batch_size,
                                                          "min_corrected_fraction": self.rule.min_corrected_fraction},
                      "batches": [b.to_json(self.rule) for b in batches], "cases": [r["stored_as"] for r in records],
                      "exported_at": utc_now()}
            (staging / EXPORT_RECORD).write_text(json.dumps(result, indent=2))
            for d in [staging, *[p for p in staging.rglob("*") if p.is_dir()]]:
                os.chmod(d, default_mode(directory=True))
            replace_folder(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {**result, "dataset": str(out_dir)}

def exported_confidence(folder: Path, cases: Sequence[str]) -> dict[str, float]:
    """case -> the served model's confidence, for those of ``cases`` that the review log of an
    export (``EXPORT_LOG`` in ``folder``) scored; {} for a folder without one. A fine-tune's
    ``max_new_cases`` keeps the least confident of them. The log is judged by its size first."""
    log_file = Path(folder) / EXPORT_LOG
    if not log_file.is_file():
        return {}
    size = log_file.stat().st_size
    if size > MAX_EXPORT_LOG_BYTES:
        log.warning("%s is %d bytes (more than %d): its confidences are not used", log_file, size,
                    MAX_EXPORT_LOG_BYTES)
        return {}
    wanted, out = set(cases), {}
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
            case, value = str(r.get("stored_as", "")), r.get("confidence")
            if case in wanted and value is not None:
                out[case] = float(value)
        except (ValueError, TypeError, AttributeError):
            continue  # a line that is not a record of a scored case says nothing about confidence
    return out


def is_store_copy(folder: Path) -> bool:
    """A folder holding a feedback store (or a copy of one): ``dataset.json`` and the review log."""
    return folder.is_dir() and (folder / "dataset.json").is_file() and (folder / RECORDS).is_dir()


@contextmanager
def reviewed_cases(store_folder: Path, work_dir: Path) -> Iterator[Path]:
    """The cases of the marked batches of the store at ``store_folder``, exported to a temporary
    raw-dataset folder under ``work_dir`` (removed afterwards); refuses, naming the batches, when
    no batch is marked."""
    tmp = Path(tempfile.mkdtemp(prefix=".reviewed-cases.", dir=work_dir))
    try:
        FeedbackStore(str(store_folder), RefreshRule.from_env()).export(tmp / "cases")
        yield tmp / "cases"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- checks of a corrected label map -------------------------------------------------------------------
class CorrectionError(ValueError):
    """A corrected label map that cannot be taken; ``kind`` is geometry, labels or format."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _same(a, b, atol: float) -> bool:
    return len(a) == len(b) and np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-4, atol=atol)


def check_correction(path: Path, name: str, reference: Path, allowed: Sequence[int]) -> np.ndarray:
    """Read a corrected label map (already checked to be a NIfTI file) if its header's geometry is
    the reference's (the queued prediction, on the input's grid) and every value is one of
    ``allowed``; returns the (z, y, x) labels. The header is judged before any voxel is read."""
    ref, new = sitk.ImageFileReader(), sitk.ImageFileReader()
    ref.SetFileName(str(reference))
    ref.ReadImageInformation()
    new.SetFileName(str(path))
    try:
        new.ReadImageInformation()
    except RuntimeError as e:
        raise CorrectionError("format", f"{name}: the header cannot be read ({str(e).strip().splitlines()[-1]})") \
            from None
    if new.GetDimension() != ref.GetDimension() or new.GetNumberOfComponents() != 1:
        raise CorrectionError("geometry", f"{name}: a {new.GetDimension()}D image with {new.GetNumberOfComponents()} "
                                          f"component(s); the case is {ref.GetDimension()}D, one component")
    problems = []
    if tuple(new.GetSize()) != tuple(ref.GetSize()):
        problems.append(f"size {tuple(new.GetSize())} != {tuple(ref.GetSize())}")
    if not _same(new.GetSpacing(), ref.GetSpacing(), 1e-4):
        problems.append(f"spacing {tuple(round(s, 5) for s in new.GetSpacing())} != "
                        f"{tuple(round(s, 5) for s in ref.GetSpacing())}")
    if not _same(new.GetOrigin(), ref.GetOrigin(), 1e-3):
        problems.append(f"origin {tuple(round(s, 3) for s in new.GetOrigin())} != "
                        f"{tuple(round(s, 3) for s in ref.GetOrigin())}")
    if not _same(new.GetDirection(), ref.GetDirection(), 1e-4):
        problems.append("direction differs")
    if problems:
        raise CorrectionError("geometry", f"{name}: not on the case's grid: " + "; ".join(problems))
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(np.rint(array), array):
            raise CorrectionError("labels", f"{name}: holds non-integer values; a label map holds label numbers")
    values = set(np.unique(array).astype(np.int64).tolist())
    unknown = sorted(values - set(int(v) for v in allowed))
    if unknown:
        raise CorrectionError("labels", f"{name}: label values {unknown[:10]} are not in the model's labels "
                                        f"{sorted(set(int(v) for v in allowed))}")
    return array.astype(np.uint8 if max(values, default=0) < 256 else np.int16)


def changed_labels(predicted: np.ndarray, corrected: np.ndarray, labels: Mapping[str, int]) -> dict[str, float]:
    """Dice between the prediction and the correction for each label that changed."""
    out = {}
    for name, value in labels.items():
        if isinstance(value, list) or int(value) == 0:
            continue
        a, b = predicted == int(value), corrected == int(value)
        if np.array_equal(a, b):
            continue
        denom = int(a.sum()) + int(b.sum())
        out[name] = round(2.0 * int(np.logical_and(a, b).sum()) / denom, 4) if denom else 1.0
    return out
