"""Nothing hangs: a training stops when its parent or an augmentation worker dies, and workers
never outlive the training.

On a cluster a hung training task holds a GPU until someone notices. Three ways it used to hang:

- its parent (the pipeline task's launcher, a detached retraining run) is killed: the training
  was reparented and went on for nobody;
- an augmentation worker dies (OOM killer, a segfault in a transform): the batch it was writing
  can leave the queue's pipe half-written, and batchgenerators' reader blocks on it forever;
- the training is killed: its workers, forked with the trainer's signal dispositions, loop on
  a full queue forever.

:class:`TrainingWatchdog` runs in the trainer process and looks once a second; on either death
it names the cause in the log and raises ``SIGTERM`` in the trainer, whose handler
(``trainer._sigterm_raises``) turns it into ``SystemExit`` with that cause, so the augmenters
are shut down and the process exits non-zero. :func:`init_worker` runs first thing in every
augmentation worker: default ``SIGTERM``/``SIGINT`` handling, and the kernel kills the worker
when the trainer dies (Linux ``PR_SET_PDEATHSIG``; elsewhere the worker checks its parent).
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from typing import Callable, Iterable, Optional

log = logging.getLogger(__name__)

CHECK_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def init_worker(trainer_pid: int) -> None:
    """Called in an augmentation worker before it produces anything (see module docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != trainer_pid:  # the trainer died before prctl took effect
        os._exit(3)


def describe_exit(code: Optional[int]) -> str:
    """``multiprocessing`` exit code in words (negative: killed by that signal)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class TrainingWatchdog:
    """Watch the trainer's parent and the augmentation workers (``workers()`` returns the
    ``multiprocessing.Process`` objects of the running augmenters). Use as a context manager;
    :attr:`reason` holds what stopped the training, if anything did. ``on_fault`` (default:
    ``SIGTERM`` to this process) is called once, from the watchdog's thread."""

    def __init__(self, workers: Callable[[], Iterable], on_fault: Optional[Callable[[str], None]] = None,
                 interval: float = CHECK_SECONDS):
        self._workers = workers
        self._on_fault = on_fault or _interrupt_this_process
        self._interval = interval
        self._parent = os.getppid()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reason: Optional[str] = None

    def check(self) -> Optional[str]:
        """One look: the fault as a sentence, or None."""
        parent = os.getppid()
        if self._parent != 1 and parent != self._parent:
            return (f"the parent process (pid {self._parent}) of this training (pid {os.getpid()}) died; "
                    f"stopping instead of training for nobody")
        for p in list(self._workers()):
            code = p.exitcode
            if code is not None:
                return (f"augmentation worker pid {p.pid} died ({describe_exit(code)}); stopping the training "
                        f"(the log above the worker's death, or the kernel log for the OOM killer, says why)")
        return None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            reason = self.check()
            if reason:
                self.reason = reason
                log.error(reason)
                self._on_fault(reason)
                return

    def __enter__(self) -> "TrainingWatchdog":
        self._thread = threading.Thread(target=self._run, name="kubeseg-training-watchdog", daemon=True)
        self._thread.start()
        return self

    def pause_workers(self) -> None:
        """Workers are being shut down on purpose: stop judging them (the parent is still watched)."""
        self._workers = lambda: ()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _interrupt_this_process(reason: str) -> None:
    """SIGTERM to ourselves: the trainer's handler raises SystemExit with the watchdog's reason."""
    os.kill(os.getpid(), signal.SIGTERM)
