"""A console a person can read while a pipeline runs on this machine (``kfp.local``).

``kfp.local`` streams every task's executor input/output JSON and logs to the terminal (about
1,300 lines for the demo). :func:`quiet_console` sends all of that, including what the task
subprocesses write, to a log file, and :class:`RunWatcher` prints one line when a step starts
and one when it ends, from what the run folder shows: task folders appear when tasks start and
hold ``executor_output.json`` when they are done; a training task's fold folder names its
configuration and fold, and its ``metrics.json`` the epochs run and the last pseudo Dice.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

DONE_FILE = "executor_output.json"


@contextlib.contextmanager
def quiet_console(log_path: Path) -> Iterator[TextIO]:
    """Redirect this process's stdout and stderr (file descriptors 1 and 2, so child processes
    too) to ``log_path`` (appended) and yield a stream that still reaches the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


CONTAINERS = ("for-loop-", "condition-")  # kfp.local's folders for ParallelFor iterations and branches


def _tasks(folder: Path, depth: int = 0) -> list[Path]:
    """Task folders of a run folder, looking inside loop-iteration and branch folders."""
    out = []
    for p in sorted(x for x in folder.iterdir() if x.is_dir()):
        if p.name.startswith(CONTAINERS) and depth < 3:
            out += _tasks(p, depth + 1)
        elif depth == 0 or (p / DONE_FILE).exists() or p.name.startswith("train"):
            out.append(p)
    return out


def _fold_folder(task: Path) -> Optional[Path]:
    found = sorted(task.glob("**/fold_*/"))
    return found[0] if found else None


def describe_task(task: Path) -> str:
    """``train 2d fold 0`` for a training task (from its fold folder), else the step's name
    (without the ``-2`` kfp adds to a step's copy in the other branch of a condition)."""
    fold = _fold_folder(task)
    if fold is not None and task.name.startswith("train"):
        configuration = fold.parent.name.split("__")[-1]
        return f"train {configuration} {fold.name.replace('_', ' ')}"
    return re.sub(r"-\d+$", "", task.name)


def training_note(task: Path) -> str:
    """Epochs and the last pseudo Dice of a training task, from its ``metrics.json``."""
    fold = _fold_folder(task)
    metrics = fold / "metrics.json" if fold is not None else None
    if metrics is None or not metrics.is_file():
        return ""
    try:
        epochs = json.loads(metrics.read_text()).get("epochs") or []
    except (OSError, ValueError):
        return ""
    if not epochs:
        return ""
    parts = [f"{len(epochs)} epochs"]
    dice = epochs[-1].get("pseudo_dice")
    if isinstance(dice, list) and dice:
        parts.append("last pseudo Dice " + " / ".join(f"{float(d):.2f}" for d in dice))
    return ", ".join(parts)


class RunWatcher:
    """Watch ``root`` for the run folder that appears after start (name starting with ``prefix``)
    and call ``emit(line)`` for every task that starts or finishes. Use as a context manager."""

    def __init__(self, root: Path, prefix: str, emit: Callable[[str], None], interval: float = 1.0,
                 t0: Optional[float] = None):
        self.root, self.prefix, self.emit, self.interval = Path(root), prefix, emit, interval
        self._before = {p.name for p in self.root.iterdir()} if self.root.is_dir() else set()
        self._started: dict[str, float] = {}
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubeseg-run-watcher", daemon=True)
        self.t0 = time.perf_counter() if t0 is None else t0  # the clock's zero (perf_counter)

    def _run_dir(self) -> Optional[Path]:
        if not self.root.is_dir():
            return None
        new = [p for p in self.root.iterdir()
               if p.is_dir() and p.name not in self._before and p.name.startswith(self.prefix)]
        return max(new, key=lambda p: p.stat().st_mtime) if new else None

    def poll(self) -> None:
        run = self._run_dir()
        if run is None:
            return
        now = time.perf_counter()
        for task in _tasks(run):
            name = str(task.relative_to(run))
            if name not in self._started:
                self._started[name] = now
                if not task.name.startswith("train"):
                    self.emit(f"{self._clock()} ▶ {describe_task(task)}")
            if name not in self._done and (task / DONE_FILE).is_file():
                self._done.add(name)
                took = now - self._started[name]
                note = training_note(task) if task.name.startswith("train") else ""
                self.emit(f"{self._clock()} ✓ {describe_task(task)} ({took:.0f} s{', ' + note if note else ''})")

    def _clock(self) -> str:
        return f"[{time.perf_counter() - self.t0:5.0f} s]"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except OSError:  # a folder renamed under us: look again next time
                pass

    def __enter__(self) -> "RunWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.poll()
