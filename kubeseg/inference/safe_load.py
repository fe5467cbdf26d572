"""Loading checkpoints from outside as data, never as code.

nnU-Net v2 checkpoints are torch pickles of a dict. Their weights are tensors, but the dict
also holds numpy scalars (in ``logging``) and a ``torch.device`` (in ``init_args``), which
``torch.load(weights_only=True)`` refuses on its own. We load with torch's weights-only
unpickler and allow exactly the numpy *reconstructors* of scalars and arrays in addition:
they rebuild a value from bytes and a dtype and call nothing else. Any other global
(``os.system``, a trainer class, ``functools.partial`` ...) is refused before it runs, and the
refusal names the file and the global.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from kubeseg.errors import KubesegError


class UnsafeCheckpointError(KubesegError):
    """A checkpoint needs something other than tensors and plain values to be read."""


def _numpy_allowlist() -> list:
    """numpy's scalar/array/dtype reconstructors, under both the numpy 1 and numpy 2 module names."""
    allowed: list = [np.dtype, np.ndarray]
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        for name in ("scalar", "_reconstruct"):
            fn = getattr(module, name, None)
            if fn is not None:
                allowed.append((fn, f"{module_name}.{name}"))
    # dtype classes such as numpy.dtypes.Float64DType are pickled by reference in numpy >= 1.25
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_checkpoint_safe(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a kubeseg or nnU-Net v2 checkpoint without executing anything it contains.

    Raises :class:`UnsafeCheckpointError` (naming the file and what was refused) if the file
    holds anything but tensors, containers, numbers, strings, ``torch.device`` and numpy
    scalars/arrays; :class:`KubesegError` if it is missing, unreadable or has no weights.
    """
    path = Path(path)
    if not path.is_file():
        raise KubesegError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split("\n\n")[0].strip()
        for line in str(e).splitlines():
            if "Unsupported global" in line or "GLOBAL" in line:
                first = line.strip()
                break
        raise UnsafeCheckpointError(
            f"checkpoint {path} cannot be loaded safely: it contains pickled objects other than tensors "
            f"and plain values ({first}); kubeseg does not execute code from model files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise KubesegError(f"checkpoint {path} is not a readable torch checkpoint: {e}") from None
    weights = ckpt.get("network_weights") if isinstance(ckpt, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise KubesegError(f"checkpoint {path} has no 'network_weights' dict of tensors")
    return ckpt


def weights_only_checkpoint(ckpt: Mapping[str, Any], configuration: str) -> dict:
    """The part of a checkpoint that prediction needs, as plain values (what a bundle ships).

    ``init_args`` keeps only the configuration and fold; ``device`` and the training state
    (optimizer, logs) are dropped.
    """
    init_args = ckpt.get("init_args") or {}
    axes = ckpt.get("inference_allowed_mirroring_axes")
    return {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in ckpt["network_weights"].items()},
        "init_args": {"configuration": str(init_args.get("configuration", configuration)),
                      "fold": _plain(init_args.get("fold"))},
        "trainer_name": str(ckpt.get("trainer_name", "nnUNetTrainer")),
        "inference_allowed_mirroring_axes": None if axes is None else tuple(int(a) for a in axes),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    return value if value is None or isinstance(value, (int, str)) else str(value)
