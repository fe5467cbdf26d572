"""The audit trail: who did what to which model, and why, as one JSON object per event.

Every event goes to the ``kubeseg.audit`` logger (one JSON line; the cluster's log collector
keeps it) and, when ``KUBESEG_AUDIT_LOG`` names a file, is appended to it. ``actor()`` is who is
acting: ``KUBESEG_ACTOR`` (set by the pipeline or an operator), else the registry user
(``MLFLOW_TRACKING_USERNAME``), else the OS user. No patient data goes into an event.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("kubeseg.audit")
AUDIT_LOG_ENV = "KUBESEG_AUDIT_LOG"


def actor() -> str:
    for name in ("KUBESEG_ACTOR", "MLFLOW_TRACKING_USERNAME"):
        if os.environ.get(name):
            return os.environ[name][:128]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return f"uid:{os.getuid()}"


def record(event: str, **fields) -> dict:
    """Write one audit event; returns it (with ``time``, ``event`` and ``by`` filled in)."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event,
             "by": fields.pop("by", None) or actor(), **fields}
    line = json.dumps(entry, sort_keys=True, default=str)
    log.info("%s", line)
    path = os.environ.get(AUDIT_LOG_ENV)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:
            f.write(line + "\n")
    return entry
