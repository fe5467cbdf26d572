"""The checkpoint store's rules, on a folder store (the S3 store is exercised against a real moto
server in tests/pipelines/test_checkpoint_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeseg.errors import KubesegError
from kubeseg.training.checkpoint_store import (BEST, FINAL, LATEST, STATE_FILE, CheckpointUploader, FolderStore,
                                               fold_key, inputs_run_key, open_store, restore_fold)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fold(tmp_path: Path) -> Path:
    d = tmp_path / "out" / "fold_0"
    d.mkdir(parents=True)
    return d


def test_uploads_at_the_interval_and_restores(tmp_path):
    store, clock, fold = FolderStore(tmp_path / "store"), Clock(), _fold(tmp_path)
    up = CheckpointUploader(store, "run/3d/fold_0", interval_s=60, clock=clock)
    up.on_train_start({"fold_dir": str(fold), "num_epochs": 10})
    for epoch in range(5):
        (fold / LATEST).write_bytes(f"latest {epoch + 1}".encode())
        if epoch == 1:
            (fold / BEST).write_bytes(b"best 2")
        clock.t += 25
        up.on_epoch_end(epoch, {})
    # 25 s epochs, 60 s interval: stored after epoch 3 (75 s); the next is due at 135 s (epoch 6)
    state = json.loads((tmp_path / "store/run/3d/fold_0" / STATE_FILE).read_text())
    assert state == {**state, "epoch": 3, "finished": False}
    assert (tmp_path / "store/run/3d/fold_0" / LATEST).read_bytes() == b"latest 3"

    fresh = tmp_path / "retry" / "fold_0"
    assert restore_fold(store, "run/3d/fold_0", fresh) == 3
    assert (fresh / LATEST).read_bytes() == b"latest 3" and (fresh / BEST).read_bytes() == b"best 2"
    assert restore_fold(store, "run/3d/fold_0", fresh) is None  # a local checkpoint wins
    assert restore_fold(store, "other/3d/fold_0", tmp_path / "none") is None


def test_final_replaces_latest_and_a_failing_store_is_not_fatal(tmp_path):
    store, clock, fold = FolderStore(tmp_path / "store"), Clock(), _fold(tmp_path)
    up = CheckpointUploader(store, "k", interval_s=0, clock=clock)
    up.on_train_start({"fold_dir": str(fold), "num_epochs": 2})
    (fold / LATEST).write_bytes(b"l")
    up.on_epoch_end(0, {})
    (fold / FINAL).write_bytes(b"f")
    up.on_artifact(fold / FINAL)
    assert not (tmp_path / "store/k" / LATEST).exists() and (tmp_path / "store/k" / FINAL).read_bytes() == b"f"
    fresh = tmp_path / "retry"
    assert restore_fold(store, "k", fresh) == 2 and (fresh / FINAL).is_file() and not (fresh / LATEST).exists()

    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    broken = CheckpointUploader(FolderStore(tmp_path / "blocked"), "k", interval_s=0, clock=clock)
    broken.on_train_start({"fold_dir": str(fold), "num_epochs": 2})
    broken.on_epoch_end(0, {})
    broken.on_epoch_end(1, {})
    assert broken.failures == 2 and broken.uploaded_epoch is None


def test_state_without_its_checkpoint_is_refused(tmp_path):
    store = FolderStore(tmp_path / "s")
    (tmp_path / "s/k").mkdir(parents=True)
    (tmp_path / "s/k" / STATE_FILE).write_text(json.dumps({"epoch": 4, "finished": False}))
    with pytest.raises(KubesegError, match="checkpoint_latest.pth is missing"):
        restore_fold(store, "k", tmp_path / "f")


def test_keys_and_uris(tmp_path):
    assert fold_key("ab/../c d", "3d_fullres", 0) == "ab_.._c_d/3d_fullres/fold_0"
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("2")
    k = inputs_run_key(a, None, extra={"schedule": "tiny"})
    assert k == inputs_run_key(a, None, extra={"schedule": "tiny"})
    assert k != inputs_run_key(b, None, extra={"schedule": "tiny"}) != inputs_run_key(a, None, extra={"s": "x"})
    assert isinstance(open_store(str(tmp_path)), FolderStore)
    assert isinstance(open_store(f"file://{tmp_path}"), FolderStore)
    for bad in ("", "gs://bucket/x", "s3://"):
        with pytest.raises(KubesegError):
            open_store(bad)
