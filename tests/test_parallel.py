"""kubeseg.parallel.usable_cpus: affinity capped by the container's CPU limit (cgroup v2 and v1)."""
from __future__ import annotations

import os

import pytest

from kubeseg.parallel import usable_cpus


@pytest.fixture
def affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))


def test_no_cgroup_files_means_the_affinity(tmp_path, affinity):
    assert usable_cpus(tmp_path) == 64


@pytest.mark.parametrize("cpu_max, expected", [("400000 100000\n", 4), ("150000 100000\n", 2),
                                               ("max 100000\n", 64), ("20000 100000\n", 1)])
def test_cgroup_v2_quota_caps_and_rounds_up(tmp_path, affinity, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert usable_cpus(tmp_path) == expected


@pytest.mark.parametrize("quota, expected", [("300000", 3), ("-1", 64)])
def test_cgroup_v1_quota(tmp_path, affinity, quota, expected):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota)
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert usable_cpus(tmp_path) == expected


def test_unreadable_quota_is_ignored(tmp_path, affinity):
    (tmp_path / "cpu.max").write_text("garbage")
    assert usable_cpus(tmp_path) == 64


def test_a_small_affinity_wins_over_a_large_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "cpu.max").write_text("800000 100000")
    assert usable_cpus(tmp_path) == 2
