"""A content hash of a raw dataset folder, so that caches see a dataset changed in place.

A pipeline names its dataset by URI; the URI stays the same when someone fixes a label file in
place, so a cache keyed by the URI would serve the old fingerprint, plans and trained folds.
:func:`dataset_content_hash` reads every file (sizes and modification times are not enough: a
copy tool may keep them, a file system may have coarse ones) and hashes the sorted list of
``(relative path, sha256 of contents)``. Files are read in 1 MiB chunks on a few threads (hashlib
releases the GIL), and a file's digest is remembered for the life of the process under its
``(path, size, mtime, ctime, inode)``, so hashing the same folder twice in one run reads it once.

Hidden files and folders (``.name``) are left out: no step reads them.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from kubeseg.errors import KubesegError

DATASET_HASH_FILE = "dataset_hash.json"  # written beside the preprocessed arrays (the run key of checkpoints)
CHUNK = 1 << 20

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of one file's contents, remembered per (path, size, mtime, ctime, inode) in this process
    (the ctime moves on every write and cannot be set back, unlike the mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
    return digest


def dataset_files(root: str | Path) -> list[Path]:
    """Every regular file under ``root`` (links followed), hidden ones left out, sorted."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted((p for p in out if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def dataset_content_hash(root: str | Path, num_threads: Optional[int] = None) -> str:
    """``sha256:<hex>`` over the sorted ``(relative path, content sha256)`` of every file in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise KubesegError(f"dataset {root} is not a folder")
    files = dataset_files(root)
    if not files:
        raise KubesegError(f"dataset {root} holds no files")
    threads = num_threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(file_sha256, files))
    h = hashlib.sha256()
    for p, d in zip(files, digests):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + d.encode() + b"\n")
    return "sha256:" + h.hexdigest()
