"""Suite-wide rule: tests leave nothing running.

Every process the tests start inherits ``KUBESEG_TEST_SESSION`` (a fresh token per run) from
this process's environment. When the session ends, any process still carrying the token (a
server a fixture forgot, a detached retraining run, augmentation workers of a killed training)
is listed, killed, and the run fails: a leak here is a GPU held forever on a cluster.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARK = "KUBESEG_TEST_SESSION"
GRACE_S = 15.0  # teardown may still be reaping its servers when the session ends


def pytest_configure(config):
    os.environ.setdefault(MARK, uuid.uuid4().hex)


def _marked_processes(token: str) -> dict[int, str]:
    needle = f"{MARK}={token}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == os.getpid() and "from multiprocessing." in cmd:
            continue  # this process's own resource tracker / forkserver: they end with it, by design
        found[pid] = cmd[:200]
    return found


def pytest_sessionfinish(session, exitstatus):
    token = os.environ.get(MARK)
    if not token or not Path("/proc").is_dir() or hasattr(session.config, "workerinput"):
        return
    deadline = time.time() + GRACE_S
    left = _marked_processes(token)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = _marked_processes(token)
    if not left:
        return
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"tests left {len(left)} process(es) running (now killed):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
