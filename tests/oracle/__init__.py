"""The nnunetv2 reference oracle, which lives in its own virtual environment.

kubeseg's project venv (``.venv``) holds only kubeseg's declared dependencies; nnunetv2 would
bring packages along (acvl-utils, ...) that could hide a missing declaration. So nnunetv2 is
installed in ``.venv-oracle`` (``make oracle``; ``make test`` creates it) and every comparison
runs it in a subprocess of that interpreter, exchanging files (JSON, .npy/.npz, NIfTI).

``KUBESEG_ORACLE_PYTHON`` names another interpreter. Without an oracle, the parity tests fail
with that reason under CI (``CI`` set) and are skipped, loudly, elsewhere.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ORACLE = REPO / ".venv-oracle" / "bin" / "python"


def oracle_python() -> Path:
    """The interpreter that has nnunetv2, or skip/fail (under CI) saying how to get one."""
    import pytest  # lazily: the oracle's interpreter imports this package too, and has no pytest

    path = Path(os.environ.get("KUBESEG_ORACLE_PYTHON") or DEFAULT_ORACLE)
    if not path.exists():
        msg = (f"nnunetv2 oracle interpreter {path} is missing: run `make oracle` "
               f"(or set KUBESEG_ORACLE_PYTHON)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_oracle(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``oracle_python() *args`` from the repository root (so ``-m tests.…`` modules resolve)
    and fail the test with the oracle's stderr when it exits non-zero."""
    import pytest

    run_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    done = subprocess.run([str(oracle_python()), *args], cwd=REPO, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=run_env)
    if done.returncode != 0:
        pytest.fail(f"nnunetv2 oracle {' '.join(args[:3])} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done
