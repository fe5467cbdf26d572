"""The raw dataset's content hash: contents count, sizes and times do not fool it."""

import os

import pytest

from kubeseg.dataset_hash import dataset_content_hash
from kubeseg.errors import KubesegError


def test_content_not_metadata(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    label = tmp_path / "labelsTr" / "case_000.nii.gz"
    label.write_bytes(b"\x00\x01" * 5000)
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / ".hidden").write_text("editor state")
    h = dataset_content_hash(tmp_path)
    assert h.startswith("sha256:") and dataset_content_hash(tmp_path) == h
    st = label.stat()
    label.write_bytes(b"\x00\x02" * 5000)  # same size, then the old modification time back
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = dataset_content_hash(tmp_path)
    assert changed != h
    (tmp_path / ".hidden").write_text("other editor state")
    assert dataset_content_hash(tmp_path) == changed
    label.rename(tmp_path / "labelsTr" / "case_001.nii.gz")  # a renamed case is another dataset
    assert dataset_content_hash(tmp_path) != changed


def test_refusals(tmp_path):
    with pytest.raises(KubesegError, match="not a folder"):
        dataset_content_hash(tmp_path / "missing")
    with pytest.raises(KubesegError, match="no files"):
        dataset_content_hash(tmp_path)
