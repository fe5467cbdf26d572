"""The one rule turning a device setting into a ``torch.device`` (training and prediction), and the
one rule for how many CPU threads prediction uses."""

from __future__ import annotations

import torch

from kubeseg.errors import KubesegError
from kubeseg.parallel import usable_cpus


def resolve_device(device: str) -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; ``"cpu"``, ``"cuda"`` (device 0)
    or ``"cuda:N"``. Asking for CUDA where there is none is refused (:class:`KubesegError`)."""
    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KubesegError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KubesegError("device 'cuda' requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def cpu_threads(requested: int | None = None) -> int:
    """``requested``, else torch's thread count capped by the cores this process may use (a pod's
    CPU limit included: torch sees the node's cores); OpenVINO runs one stream per thread."""
    return int(requested) if requested else min(torch.get_num_threads(), usable_cpus())
