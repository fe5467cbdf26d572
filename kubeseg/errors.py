"""Errors that name the case, the file and the problem."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: which case, which file, what."""

    case: str | None
    file: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(p for p in (f"case {self.case}" if self.case else "", self.file or "") if p)
        return f"{where}: {self.message}" if where else self.message


class DatasetError(Exception):
    """A dataset fails the checks a step relies on. Carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], dataset: str = ""):
        self.problems = list(problems)
        head = f"dataset {dataset} has {len(self.problems)} problem(s)" if dataset else f"{len(self.problems)} problem(s)"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class KubesegError(Exception):
    """A user-facing error with a clear message (bad arguments, missing files, inconsistent inputs)."""
