"""Durable copies of a fold's resume point, for pods that lose their disk.

On a cluster a retried training task is a fresh pod with an empty output folder: the
``checkpoint_latest.pth`` that :mod:`kubeseg.training.trainer` resumes from died with the old
pod. This module keeps a copy in durable storage:

* :class:`CheckpointStore`: ``put``/``get``/``delete`` of files under keys; a local (or mounted)
  folder (:class:`FolderStore`) or an S3-compatible bucket through boto3 (:class:`S3Store`),
  chosen by :func:`open_store` from a URI (``s3://bucket/prefix``, ``file:///path`` or a path).
* :class:`CheckpointUploader`: a trainer callback that uploads the resume point
  (:data:`RESUME_FILES` plus :data:`STATE_FILE`) at most every ``interval_s`` seconds, at an
  epoch end, and the final checkpoint when training ends. A failing store is logged and counted,
  never fatal: losing the durable copy costs a retry's progress, not the training.
* :func:`restore_fold`: before training, fill an empty fold folder from the store; the trainer
  then resumes as it does on one machine.
* :func:`fold_key`: where a fold's files live: ``<prefix>/<run key>/<configuration>/fold_<f>``.

Credentials and endpoint follow boto3 (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, else MLflow's ``MLFLOW_S3_ENDPOINT_URL``). Checkpoints are loaded with the
safe loader after download, like any other checkpoint: the store is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from kubeseg.atomic import atomic_path
from kubeseg.errors import KubesegError
from kubeseg.store_location import parse_store_location

log = logging.getLogger(__name__)

LATEST, BEST, FINAL = "checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth"
RESUME_FILES = (BEST, LATEST)  # best first: a reader that sees the new latest also sees its best
STATE_FILE = "checkpoint_state.json"  # written last: names the epoch the stored files belong to
DEFAULT_INTERVAL_S = 300.0


@dataclass(frozen=True)
class CheckpointSettings:
    """Where and how often a training task keeps its resume point.

    uri: ``s3://bucket/prefix``, ``file:///path`` or a folder; empty: off.
    interval_s: least seconds between two uploads (checked at epoch ends; 0: every epoch).
    run_key: the part of the key that names this run (see :func:`fold_key`).
    endpoint_url: S3 endpoint (MinIO, Ceph, ...); default from the environment."""

    uri: str = ""
    interval_s: float = DEFAULT_INTERVAL_S
    run_key: str = ""
    endpoint_url: Optional[str] = None


class CheckpointStore(ABC):
    """Files under string keys (``a/b/c``)."""

    @abstractmethod
    def put(self, local: Path, key: str) -> None: ...

    @abstractmethod
    def get(self, key: str, local: Path) -> bool:
        """Download ``key`` to ``local`` (atomically); False when there is no such key."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def describe(self, key: str) -> str: ...

    def get_json(self, key: str, tmp_dir: Path) -> Optional[dict]:
        path = tmp_dir / f".{Path(key).name}.download"
        try:
            if not self.get(key, path):
                return None
            return json.loads(path.read_text())
        finally:
            path.unlink(missing_ok=True)


class FolderStore(CheckpointStore):
    """A folder (a mounted volume on a cluster)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, local: Path, key: str) -> None:
        with atomic_path(self._path(key)) as tmp:
            shutil.copyfile(local, tmp)

    def get(self, key: str, local: Path) -> bool:
        src = self._path(key)
        if not src.is_file():
            return False
        with atomic_path(local) as tmp:
            shutil.copyfile(src, tmp)
        return True

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def describe(self, key: str) -> str:
        return str(self._path(key))


def s3_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint: the argument, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (boto3's own),
    else ``MLFLOW_S3_ENDPOINT_URL`` (what the chart gives MLflow); None: AWS."""
    for v in (explicit, os.environ.get("AWS_ENDPOINT_URL_S3"), os.environ.get("AWS_ENDPOINT_URL"),
              os.environ.get("MLFLOW_S3_ENDPOINT_URL")):
        if v:
            return v
    return None


class S3Store(CheckpointStore):
    """An S3-compatible bucket (boto3; multipart uploads for large checkpoints)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: Optional[str] = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:  # pragma: no cover - declared in the pipelines extra
            raise KubesegError("an s3:// checkpoint store needs boto3 (pip install 'kubeseg[pipelines]')") from e
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = s3_endpoint(endpoint_url)
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url,
                                   config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                 connect_timeout=10, read_timeout=60))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

    def get(self, key: str, local: Path) -> bool:
        from botocore.exceptions import ClientError

        try:
            with atomic_path(local) as tmp:
                self.client.download_file(self.bucket, self._key(key), str(tmp))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def open_store(uri: str, endpoint_url: Optional[str] = None) -> CheckpointStore:
    """``s3://bucket[/prefix]`` → :class:`S3Store`; ``file:///path`` or a plain path → :class:`FolderStore`."""
    where = parse_store_location(uri, "checkpoint store")
    return S3Store(where.bucket, where.path, endpoint_url) if where.bucket else FolderStore(where.path)


_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def fold_key(run_key: str, configuration: str, fold: Any) -> str:
    """``<run key>/<configuration>/fold_<f>``, each part reduced to safe characters."""
    parts = [_SAFE.sub("_", str(p)).strip("_.") or "_" for p in (run_key, configuration, f"fold_{fold}")]
    return "/".join(parts)


def inputs_run_key(*files: Optional[Path], extra: Mapping[str, Any] = ()) -> str:
    """A run key from what a training task's result depends on: the contents of ``files`` (plans,
    fingerprint, dataset hash, pretrained weights; missing ones count as absent) and ``extra``
    values (schedule, ...). Identical inputs give the same key, so a retried task *and* a re-run of
    the same pipeline resume where the last attempt stopped, while KFP can still cache the step
    (the pipeline run's name would make every run's cache key unique)."""
    h = hashlib.sha256()
    for f in files:
        h.update(b"\0file\0")
        if f is not None and Path(f).is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    h.update(json.dumps(dict(extra), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def restore_fold(store: CheckpointStore, key: str, fold_dir: Path) -> Optional[int]:
    """Fill ``fold_dir`` from the store when it holds no checkpoint of its own; returns the stored
    epoch (finished epochs) or None when nothing was restored. A local checkpoint always wins."""
    fold_dir = Path(fold_dir)
    if (fold_dir / LATEST).is_file() or (fold_dir / FINAL).is_file():
        return None
    fold_dir.mkdir(parents=True, exist_ok=True)
    state = store.get_json(f"{key}/{STATE_FILE}", fold_dir)
    if not state:
        return None
    names = [FINAL, BEST] if state.get("finished") else list(RESUME_FILES)
    for name in names:
        if not store.get(f"{key}/{name}", fold_dir / name) and name != BEST:
            raise KubesegError(f"checkpoint store {store.describe(key)}: {STATE_FILE} names epoch "
                               f"{state.get('epoch')} but {name} is missing")
    log.info("restored %s at epoch %s from %s", ", ".join(names), state.get("epoch"), store.describe(key))
    return int(state.get("epoch", 0))


class CheckpointUploader:
    """Trainer callback: keep the fold's resume point in a :class:`CheckpointStore`.

    At an epoch end (the checkpoint is written by then) it uploads ``checkpoint_best.pth`` when it
    changed, ``checkpoint_latest.pth`` and then :data:`STATE_FILE`, if ``interval_s`` passed since
    the last upload; when the final checkpoint appears it uploads that (a retry then only
    validates). Upload failures are logged and counted (``failures``), never raised."""

    def __init__(self, store: CheckpointStore, key: str, interval_s: float = DEFAULT_INTERVAL_S,
                 clock=time.monotonic):
        self.store, self.key, self.interval_s, self.clock = store, key, float(interval_s), clock
        self.fold_dir: Optional[Path] = None
        self.last_upload: Optional[float] = None
        self.uploaded_epoch: Optional[int] = None
        self.failures = 0
        self.num_epochs: Optional[int] = None
        self._best_mtime: Optional[float] = None

    def on_train_start(self, info: Mapping[str, Any]) -> None:
        self.fold_dir = Path(info["fold_dir"])
        self.num_epochs = info.get("num_epochs")
        self.last_upload = self.clock()  # the first upload after one interval of training

    def _put(self, name: str) -> None:
        self.store.put(self.fold_dir / name, f"{self.key}/{name}")

    def _put_state(self, epoch: int, finished: bool) -> None:
        tmp = self.fold_dir / f".{STATE_FILE}.upload"
        tmp.write_text(json.dumps({"epoch": epoch, "finished": finished, "time": time.time()}))
        try:
            self.store.put(tmp, f"{self.key}/{STATE_FILE}")
        finally:
            tmp.unlink(missing_ok=True)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if self.fold_dir is None or self.clock() - self.last_upload < self.interval_s:
            return
        try:
            best = self.fold_dir / BEST
            if best.is_file() and best.stat().st_mtime != self._best_mtime:
                self._put(BEST)
                self._best_mtime = best.stat().st_mtime
            self._put(LATEST)
            self._put_state(epoch + 1, finished=False)
            self.uploaded_epoch = epoch + 1
            log.info("checkpoint of epoch %d stored at %s", epoch + 1, self.store.describe(self.key))
        except Exception as e:  # noqa: BLE001 - a store outage must not stop training
            self.failures += 1
            log.warning("could not store the checkpoint of epoch %d at %s (%d failure(s)): %s",
                        epoch + 1, self.store.describe(self.key), self.failures, e)
        self.last_upload = self.clock()

    def on_artifact(self, path: Path) -> None:
        path = Path(path)
        if path.name != FINAL or self.fold_dir is None or path.parent != self.fold_dir:
            return
        try:
            if (self.fold_dir / BEST).is_file():
                self._put(BEST)
            self._put(FINAL)
            self._put_state(int(self.num_epochs or 0), finished=True)
            self.store.delete(f"{self.key}/{LATEST}")
        except Exception as e:  # noqa: BLE001
            self.failures += 1
            log.warning("could not store the final checkpoint at %s: %s", self.store.describe(self.key), e)


def checkpoint_callback(settings: CheckpointSettings, configuration: str, fold: Any,
                        fold_dir: Path) -> Optional[CheckpointUploader]:
    """For a training task: restore ``fold_dir`` from the store named by ``settings`` (if it is
    empty) and return the uploader callback; None when ``settings.uri`` is empty."""
    if not settings.uri:
        return None
    store = open_store(settings.uri, settings.endpoint_url)
    key = fold_key(settings.run_key or "default", configuration, fold)
    try:
        epoch = restore_fold(store, key, fold_dir)
    except KubesegError:
        raise
    except Exception as e:  # noqa: BLE001 - a wrong bucket or credentials: fail at the start, naming the store
        raise KubesegError(f"checkpoint store {store.describe(key)} cannot be read: {type(e).__name__}: {e}") from e
    if epoch is not None:
        log.info("fold %s of %s: resuming from the stored checkpoint (epoch %d, %s)", fold, configuration, epoch,
                 store.describe(key))
    return CheckpointUploader(store, key, settings.interval_s)
