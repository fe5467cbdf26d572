"""Where an object store lives: ``s3://bucket[/prefix]``, ``file:///path`` or a plain folder path.

One parser for every store kubeseg writes to (training checkpoints, the review feedback store),
so they accept and refuse the same locations with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kubeseg.errors import KubesegError


@dataclass(frozen=True)
class StoreLocation:
    bucket: Optional[str]  # None: a folder
    path: str  # the key prefix in the bucket, or the folder


def parse_store_location(uri: str, what: str) -> StoreLocation:
    """``what`` names the store in refusals (e.g. "checkpoint store")."""
    uri = str(uri).strip()
    if not uri:
        raise KubesegError(f"no {what} location")
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise KubesegError(f"{what} {uri!r}: no bucket name")
        return StoreLocation(bucket, prefix)
    if uri.startswith("file://"):
        return StoreLocation(None, uri[len("file://"):])
    if "://" in uri:
        raise KubesegError(f"{what} {uri!r}: use s3://bucket/prefix, file:///path or a folder")
    return StoreLocation(None, uri)
