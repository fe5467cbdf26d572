"""A small persistent review queue: flagged cases wait here for a person (and for continual learning).

One JSON object per line in ``<folder>/queue.jsonl``; ``put`` appends under an exclusive file lock
(several service workers may share the folder); when the file holds more than ``max_items`` it is
rewritten with the newest ``max_items`` (temp file, then rename), so it stays bounded. ``items``
reads it back (newest last); ``take`` removes and returns the oldest entries (the consumer's side).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FILENAME = "queue.jsonl"


class ReviewQueue:
    def __init__(self, folder: str | Path, max_items: int = 10000):
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.folder = Path(folder)
        self.max_items = max_items
        self.path = self.folder / FILENAME

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
                f.write(json.dumps(item, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def put(self, entry: dict) -> str:
        """Append one case; returns its id."""
        item = {"id": entry.get("id") or uuid.uuid4().hex, "queued_at": time.time(), **entry}
        line = json.dumps(item, sort_keys=True, default=str) + "\n"
        with self._locked():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
            items = self._read()
            if len(items) > self.max_items:
                self._rewrite(items[-self.max_items:])
        return item["id"]

    def items(self) -> list[dict]:
        with self._locked():
            return self._read()

    def take(self, n: int) -> list[dict]:
        """Remove and return the ``n`` oldest entries."""
        with self._locked():
            items = self._read()
            self._rewrite(items[n:])
            return items[:n]

    def __len__(self) -> int:
        return len(self.items())
