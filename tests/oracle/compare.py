"""Comparing kubeseg's outputs with the oracle's (pytest side only)."""
from __future__ import annotations

import pytest


def assert_same(ours, ref, path: str = "") -> None:
    """Assert recursive equality; numbers compared with a tight relative tolerance."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and set(ours) == set(ref), f"{path}: keys {sorted(ours)} != {sorted(ref)}"
        for k in ref:
            assert_same(ours[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(ref), f"{path}: {ours} != {ref}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) or isinstance(ours, float):
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9), f"{path}: {ours} != {ref}"
    else:
        assert ours == ref, f"{path}: {ours!r} != {ref!r}"
