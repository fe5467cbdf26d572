"""Run one function over many cases in worker processes, with a progress bar.

Failures are collected per case rather than aborting on the first, so that a user sees every
broken case of a dataset in one run.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

from kubeseg.errors import DatasetError, Problem

T = TypeVar("T")
R = TypeVar("R")


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_cpu_limit(root: Path) -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``, else v1 CFS), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU limit (rounded up).

    torch and ``os.cpu_count()`` see the node's cores; in a pod limited to 4 CPUs on a 64-core
    node, 64 threads (or 64 OpenVINO streams, each with its own buffers) would only contend.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def default_workers() -> int:
    """One worker per usable core (at least one)."""
    return usable_cpus()


def _guarded(fn: Callable[[T], R], item: T, name: str) -> tuple[R | None, list[Problem]]:
    try:
        return fn(item), []
    except DatasetError as e:
        return None, e.problems
    except Exception as e:  # noqa: BLE001 - any failure is reported against its case
        return None, [Problem(name, None, f"{type(e).__name__}: {e}")]


def map_cases(
    fn: Callable[[T], R],
    items: Sequence[T],
    names: Sequence[str],
    num_workers: int | None = None,
    desc: str = "",
) -> tuple[list[R | None], list[Problem]]:
    """``fn`` over ``items`` in order; returns the results and every problem that was raised.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). Workers
    are spawned, not forked, so that no thread state of the parent (torch, BLAS) is inherited.
    """
    workers = default_workers() if num_workers is None else num_workers
    results: list[R | None] = [None] * len(items)
    problems: list[Problem] = []
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not desc, leave=False)
    try:
        if workers <= 1 or len(items) <= 1:
            for i, (item, name) in enumerate(zip(items, names)):
                results[i], p = _guarded(fn, item, name)
                problems += p
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx) as pool:
                futures = {pool.submit(_guarded, fn, item, name): i for i, (item, name) in enumerate(zip(items, names))}
                per_item: dict[int, list[Problem]] = {}
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i], per_item[i] = fut.result()
                    bar.update()
                problems = [p for i in sorted(per_item) for p in per_item[i]]
    finally:
        bar.close()
    return results, problems
