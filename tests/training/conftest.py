"""Fixtures for the training tests (helpers live in tiny_dataset.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_dataset import make_tiny_preprocessed


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """2 cores here: one torch thread so augmentation workers and the main process do not
    fight; restored afterwards so other test folders are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_pre(tmp_path) -> Path:
    """A fresh tiny preprocessed dataset (10 cases, 3d_fullres) under tmp_path/PRE."""
    return make_tiny_preprocessed(tmp_path)
