"""Run one function over many cases in worker processes, with a progress bar.

Failures are collected per case rather than aborting on the first, so that a user sees every
broken case of a dataset in one run.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

from kubeseg.errors import DatasetError, Problem

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per available core (at least one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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
