"""Fixtures for the training tests (helpers live in tiny_dataset.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_dataset import make_tiny_preprocessed

# 2 cores here: one torch thread so augmentation workers and the main process do not fight
torch.set_num_threads(1)


@pytest.fixture
def tiny_pre(tmp_path) -> Path:
    """A fresh tiny preprocessed dataset (10 cases, 3d_fullres) under tmp_path/PRE."""
    return make_tiny_preprocessed(tmp_path)
