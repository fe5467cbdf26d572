"""JSON files written atomically, with numpy values converted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kubeseg.atomic import atomic_path


def to_jsonable(obj: Any) -> Any:
    """Plain Python values for numpy scalars/arrays and tuples, recursively."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def write_json(obj: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write JSON to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(to_jsonable(obj), f, indent=indent, sort_keys=False)
            f.write("\n")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
