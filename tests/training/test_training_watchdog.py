"""A training never hangs: it stops (non-zero, with a message) when its parent or an augmentation
worker dies, and its workers die with it."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubeseg.training.watchdog import TrainingWatchdog, describe_exit

from tiny_dataset import make_tiny_preprocessed

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 60  # the bound: a hung task must end within a minute


def test_watchdog_names_a_dead_worker_once():
    faults = []
    workers = [SimpleNamespace(pid=11, exitcode=None), SimpleNamespace(pid=12, exitcode=None)]
    with TrainingWatchdog(lambda: workers, on_fault=faults.append, interval=0.02) as dog:
        time.sleep(0.1)
        assert faults == [] and dog.reason is None
        workers[1].exitcode = -signal.SIGKILL
        deadline = time.time() + 2
        while not faults and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    assert len(faults) == 1 and "pid 12" in faults[0] and "SIGKILL" in faults[0]
    assert dog.reason == faults[0]


def test_paused_watchdog_ignores_workers_being_shut_down():
    faults = []
    workers = [SimpleNamespace(pid=11, exitcode=None)]
    with TrainingWatchdog(lambda: workers, on_fault=faults.append, interval=0.02) as dog:
        dog.pause_workers()
        workers[0].exitcode = 0
        time.sleep(0.15)
    assert faults == []


def test_describe_exit():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(1) == "exit code 1"


# ---- real trainings in subprocesses ---------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def training_cmd(tmp_path):
    pre = make_tiny_preprocessed(tmp_path / "data")
    return [sys.executable, "-m", "kubeseg.cli", "train", str(pre), "--plans", str(pre / "plans.json"),
            "-c", "3d_fullres", "-f", "0", "-o", str(tmp_path / "model"), "--schedule", "500x20",
            "--device", "cpu", "--num-workers", "2"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _interrupt_training(cmd, log_path, interrupt) -> tuple[int, list[int]]:
    """Start a training, wait for its augmentation workers, ``interrupt(proc, workers)``, and return
    its exit code (within :data:`LIMIT_S`) and the workers' pids; never leaves it running."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        workers = _wait_for(lambda: len(_children(proc.pid)) >= 2 and _children(proc.pid), 120,
                            "the augmentation workers")
        time.sleep(1.0)
        interrupt(proc, workers)
        return proc.wait(timeout=LIMIT_S), workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_dead_worker_stops_the_training(training_cmd, tmp_path):
    code, workers = _interrupt_training(training_cmd, tmp_path / "train.log",
                                        lambda proc, workers: os.kill(workers[0], signal.SIGKILL))
    text = (tmp_path / "train.log").read_text(errors="replace")
    assert code != 0
    assert "augmentation worker" in text and "SIGKILL" in text, text[-2000:]
    assert not [w for w in workers if _alive(w)], "workers outlived the training"


@pytest.mark.integration
def test_orphaned_training_stops_and_its_workers_die(training_cmd, tmp_path):
    """The parent (a shell standing in for the pipeline task's launcher) is SIGKILLed."""
    cmd = " ".join(f"'{c}'" for c in training_cmd)
    shell = subprocess.Popen(["bash", "-c", f"{cmd} > '{tmp_path / 'train.log'}' 2>&1 & echo $!; wait"],
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    trainer = int(shell.stdout.readline())
    try:
        workers = _wait_for(lambda: len(_children(trainer)) >= 2 and _children(trainer), 120,
                            "the augmentation workers")
        shell.kill()
        shell.wait()
        _wait_for(lambda: not _alive(trainer), LIMIT_S, "the orphaned training to exit")
        _wait_for(lambda: not [w for w in workers if _alive(w)], 10, "its workers to exit")
    finally:
        for pid in [trainer, *_children(trainer)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = (tmp_path / "train.log").read_text(errors="replace")
    assert "parent process" in text and "died" in text, text[-2000:]


@pytest.mark.integration
def test_sigterm_ends_the_training_and_its_workers(training_cmd, tmp_path):
    code, workers = _interrupt_training(training_cmd, tmp_path / "train.log",
                                        lambda proc, workers: proc.send_signal(signal.SIGTERM))
    assert code != 0
    _wait_for(lambda: not [w for w in workers if _alive(w)], 10, "the workers to exit")
    assert "SIGTERM" in (tmp_path / "train.log").read_text(errors="replace")
