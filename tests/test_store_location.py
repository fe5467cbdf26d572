"""The one parser of object-store locations (kubeseg/store_location.py)."""

import pytest

from kubeseg.errors import KubesegError
from kubeseg.store_location import StoreLocation, parse_store_location


def test_locations_and_refusals():
    assert parse_store_location("s3://bucket/a/b", "x") == StoreLocation("bucket", "a/b")
    assert parse_store_location(" s3://bucket ", "x") == StoreLocation("bucket", "")
    assert parse_store_location("file:///data/ckpt", "x") == StoreLocation(None, "/data/ckpt")
    assert parse_store_location("rel/folder", "x") == StoreLocation(None, "rel/folder")
    for bad, why in (("", "no checkpoint store location"), ("s3:///prefix", "no bucket name"),
                     ("gs://bucket", "use s3://bucket/prefix")):
        with pytest.raises(KubesegError, match=why):
            parse_store_location(bad, "checkpoint store")
