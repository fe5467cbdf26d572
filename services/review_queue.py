"""The review queue: recent cases a person should look at, with their images, persistent and bounded.

Which cases (:class:`QueueRule`, the one owner of the active-learning rule): every QA-flagged case,
and every case whose confidence is among the lowest ``lowest_percent`` % of the last ``window``
cases the service saw (the recent confidences are kept in ``recent.json`` so the rule survives a
restart; before ``min_window`` cases have been seen only the flags and the absolute threshold
apply), and, if set, every case below the absolute threshold ``below``. Environment:
``KUBESEG_REVIEW_LOWEST_PERCENT`` (10), ``KUBESEG_REVIEW_WINDOW`` (200), ``KUBESEG_REVIEW_MIN_WINDOW``
(20), ``KUBESEG_REVIEW_CONFIDENCE_BELOW`` (unset).

Layout of the folder (``KUBESEG_REVIEW_QUEUE_DIR``)::

    queue.jsonl              one JSON object per queued case (newest last)
    recent.json              the confidences of the last ``window`` cases
    cases/<id>/image_0000.nii.gz …, segmentation.nii.gz, summary.json [, saliency.nii.gz]

A case's files are written into ``cases/.tmp-<id>`` and renamed into place before its line is
appended, so a listed case always has its files. Everything that changes ``queue.jsonl`` holds an
exclusive file lock (several service workers share the folder); rewrites go to a temporary file
that is renamed over it. Bounds: ``max_items`` entries and ``max_bytes`` of case files
(``KUBESEG_REVIEW_QUEUE_MAX``, 1000; ``KUBESEG_REVIEW_QUEUE_MAX_BYTES``, 1 GiB). Over a bound,
entries are evicted, their files deleted: reviewed ones first (oldest first), then pending ones from
the end of the review order (not flagged before flagged, highest confidence first, oldest first).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

FILENAME = "queue.jsonl"
RECENT = "recent.json"
CASES = "cases"
STATUSES = ("pending", "approved", "rejected", "corrected")
_STALE_TMP_S = 3600.0


@dataclass(frozen=True)
class QueueRule:
    """When a case goes on the review queue (module doc)."""

    lowest_percent: float = 10.0
    window: int = 200
    min_window: int = 20
    below: Optional[float] = None

    def __post_init__(self):
        if not 0.0 <= self.lowest_percent <= 100.0:
            raise ValueError(f"KUBESEG_REVIEW_LOWEST_PERCENT={self.lowest_percent} must be in [0, 100]")
        if self.window < 1 or self.min_window < 1 or self.min_window > self.window:
            raise ValueError(f"KUBESEG_REVIEW_WINDOW={self.window} and KUBESEG_REVIEW_MIN_WINDOW={self.min_window}: "
                             "positive, and the minimum not above the window")
        if self.below is not None and not 0.0 <= self.below <= 1.0:
            raise ValueError(f"KUBESEG_REVIEW_CONFIDENCE_BELOW={self.below} must be in [0, 1]")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "QueueRule":
        d = cls()

        def get(name, default, cast):
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return cast(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None

        return cls(get("KUBESEG_REVIEW_LOWEST_PERCENT", d.lowest_percent, float),
                   get("KUBESEG_REVIEW_WINDOW", d.window, int), get("KUBESEG_REVIEW_MIN_WINDOW", d.min_window, int),
                   get("KUBESEG_REVIEW_CONFIDENCE_BELOW", d.below, float))

    def reasons(self, confidence: Optional[float], flagged: bool, recent: list[float]) -> list[str]:
        """Why a case with this confidence (and QA result) is queued, given the confidences of the
        cases seen before it (oldest first); empty: not queued. ``recent`` excludes the case itself."""
        out = ["qa_flagged"] if flagged else []
        if confidence is None or confidence != confidence:
            return out
        if self.below is not None and confidence < self.below:
            out.append("below_threshold")
        window = recent[-self.window:]
        if len(window) >= self.min_window and self.lowest_percent > 0:
            # the share of recent cases at or below this confidence; ties (e.g. all 1.0) never qualify
            at_or_below = sum(c <= confidence for c in window) / len(window)
            if at_or_below < self.lowest_percent / 100.0:
                out.append("lowest_confidence")
        return out


def review_order(item: dict) -> tuple:
    """Sort key of the listing: pending first; then QA-flagged; then lowest confidence; then oldest."""
    conf = item.get("confidence")
    return (item.get("status", "pending") != "pending", not item.get("qa_flags"),
            conf if isinstance(conf, (int, float)) else 2.0, item.get("queued_at", 0))


def _eviction_order(item: dict) -> tuple:
    """Evicted first: reviewed (oldest first), then pending from the end of the review order."""
    conf = item.get("confidence")
    conf = conf if isinstance(conf, (int, float)) else 2.0
    if item.get("status", "pending") != "pending":
        return (0, item.get("queued_at", 0), 0.0)
    return (1 if not item.get("qa_flags") else 2, -conf, item.get("queued_at", 0))


class ReviewQueue:
    def __init__(self, folder: str | Path, max_items: int = 1000, max_bytes: int = 2 ** 30):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be at least 1")
        self.folder = Path(folder)
        self.max_items, self.max_bytes = max_items, max_bytes
        self.path = self.folder / FILENAME
        self.cases = self.folder / CASES

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash is skipped, not fatal
        return out

    def _rewrite(self, items: list[dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".queue.", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, sort_keys=True, default=str) + "\n")
        os.replace(tmp, self.path)

    # -- the active-learning window --------------------------------------------------------------------
    def observe(self, confidence: Optional[float], window: int) -> list[float]:
        """Record one case's confidence in ``recent.json``; returns the confidences seen before it."""
        with self._locked():
            path = self.folder / RECENT
            try:
                recent = [float(c) for c in json.loads(path.read_text())]
            except (OSError, ValueError, TypeError):
                recent = []
            if confidence is not None and confidence == confidence:
                fd, tmp = tempfile.mkstemp(prefix=".recent.", dir=self.folder)
                with os.fdopen(fd, "w") as f:
                    json.dump((recent + [float(confidence)])[-window:], f)
                os.replace(tmp, path)
            return recent

    # -- adding ----------------------------------------------------------------------------------------
    def put(self, entry: dict, files: Optional[Mapping[str, Path]] = None) -> str:
        """Queue one case (``files``: name → local file, moved into ``cases/<id>/``); returns its id."""
        item = {"queued_at": time.time(), "status": "pending", **entry}
        item["id"] = entry.get("id") or uuid.uuid4().hex
        staged = None
        if files:
            self.cases.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f".tmp-{item['id']}.", dir=self.cases))
            try:
                for name, src in files.items():
                    shutil.move(str(src), staged / name)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            item["files"] = sorted(files)
            item["bytes"] = sum((staged / n).stat().st_size for n in files)
        line = json.dumps(item, sort_keys=True, default=str) + "\n"
        with self._locked():
            if staged is not None:
                os.replace(staged, self.cases / item["id"])
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            self._bound(self._read())
        return item["id"]

    def _bound(self, items: list[dict]) -> None:
        """Evict over the bounds (module doc); delete evicted and orphaned case folders."""
        total = sum(int(i.get("bytes") or 0) for i in items)
        keep = list(items)
        if len(keep) > self.max_items or total > self.max_bytes:
            for victim in sorted(items, key=_eviction_order):
                if len(keep) <= self.max_items and total <= self.max_bytes:
                    break
                keep.remove(victim)
                total -= int(victim.get("bytes") or 0)
            self._rewrite(keep)
        if self.cases.is_dir():
            ids = {i["id"] for i in keep}
            now = time.time()
            for d in self.cases.iterdir():
                if d.name.startswith(".tmp-"):
                    if now - d.stat().st_mtime > _STALE_TMP_S:  # a writer that died mid-copy
                        shutil.rmtree(d, ignore_errors=True)
                elif d.name not in ids:
                    shutil.rmtree(d, ignore_errors=True)

    def attach(self, item_id: str, name: str, src: Path) -> bool:
        """Add a file (e.g. the saliency map) to a queued case; False if the case is gone."""
        with self._locked():
            items = self._read()
            item = next((i for i in items if i["id"] == item_id), None)
            folder = self.cases / item_id
            if item is None or not folder.is_dir():
                return False
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, folder / name)
            item["files"] = sorted(set(item.get("files", [])) | {name})
            item["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))
            self._rewrite(items)
            self._bound(items)
            return True

    # -- reading ---------------------------------------------------------------------------------------
    def items(self) -> list[dict]:
        with self._locked():
            return self._read()

    def get(self, item_id: str) -> Optional[dict]:
        return next((i for i in self.items() if i.get("id") == item_id), None)

    def file(self, item_id: str, name: str) -> Optional[Path]:
        """A queued case's file, or None (unknown case or file). ``name`` must be one it was queued with."""
        item = self.get(item_id)
        if item is None or name not in item.get("files", []):
            return None
        path = self.cases / item_id / name
        return path if path.is_file() else None

    def pending(self) -> int:
        return sum(i.get("status", "pending") == "pending" for i in self.items())

    # -- changing --------------------------------------------------------------------------------------
    def set_status(self, item_id: str, status: str, **extra) -> Optional[dict]:
        """Mark a case reviewed (its files stay until evicted); the updated item, or None if unknown."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        with self._locked():
            items = self._read()
            for item in items:
                if item["id"] == item_id:
                    item.update(status=status, **extra)
                    self._rewrite(items)
                    return item
            return None

    def take(self, n: int) -> list[dict]:
        """Remove and return the ``n`` oldest entries (their files are deleted)."""
        with self._locked():
            items = self._read()
            self._rewrite(items[n:])
            for item in items[:n]:
                shutil.rmtree(self.cases / item["id"], ignore_errors=True)
            return items[:n]

    def __len__(self) -> int:
        return len(self.items())
