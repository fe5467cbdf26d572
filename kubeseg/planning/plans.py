"""Reading nnU-Net v2 plans: resolve a configuration (with ``inherits_from``) into one dict."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

from kubeseg.errors import KubesegError
from kubeseg.jsonio import read_json
from kubeseg.preprocessing.resampling_functions import check_configuration


def load_plans(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KubesegError(f"plans file {path} does not exist")
    try:
        plans = read_json(path)
    except ValueError as e:
        raise KubesegError(f"plans file {path} is not valid JSON: {e}") from e
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise KubesegError(f"plans file {path} has no 'configurations'; is it an nnU-Net v2 plans.json?")
    return plans


def configuration(plans: dict, name: str) -> dict:
    """The named configuration with everything it inherits filled in.

    Refused when its preprocessor or resampling functions are ones kubeseg cannot reproduce:
    every step (preprocess, train, predict, import) resolves configurations here.
    """
    configs = plans["configurations"]
    if name not in configs:
        raise KubesegError(f"configuration {name!r} is not in the plans; they have {sorted(configs)}")
    seen = [name]
    merged = dict(configs[name])
    while "inherits_from" in merged:
        parent = merged.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise KubesegError(f"configuration {name!r} inherits from {parent!r}, which is missing or circular ({' -> '.join(seen)})")
        seen.append(parent)
        merged = {**configs[parent], **merged}
    check_configuration(merged, f"configuration {name!r}: ")
    return deepcopy(merged)  # callers may change it without touching the plans
