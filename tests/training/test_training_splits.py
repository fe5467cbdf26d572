"""Cross-validation splits (nnunetv2's generate_crossval_split as oracle)."""
import json

import numpy as np
import pytest

from kubeseg.training.splits import generate_crossval_split, load_or_create_splits, select_fold
from tests.oracle import run_oracle


@pytest.mark.integration
@pytest.mark.parametrize("n", [5, 6, 9, 10, 23, 101])
def test_matches_nnunet(n, tmp_path):
    keys = sorted(f"case_{i:04d}" for i in range(n))
    ours = generate_crossval_split(keys, seed=12345, n_splits=5)
    run_oracle("-m", "tests.oracle.nnunet_calls", "splits", str(n), str(tmp_path / "ref.json"))
    assert ours == json.loads((tmp_path / "ref.json").read_text())
    # every case validated exactly once
    assert sorted(k for s in ours for k in s["val"]) == keys


def test_file_created_sorted_and_user_file_honoured(tmp_path):
    keys = [f"c{i}" for i in range(12)]
    splits, path = load_or_create_splits(list(reversed(keys)), tmp_path / "splits_final.json")
    assert path.is_file() and json.loads(path.read_text()) == splits
    assert splits == generate_crossval_split(sorted(keys))
    custom = [{"train": keys[:10], "val": keys[10:]}]
    path.write_text(json.dumps(custom))
    again, _ = load_or_create_splits(keys, path)
    assert again == custom
    assert select_fold(keys, 0, again) == (keys[:10], keys[10:])


def test_fold_all_and_fold_beyond_splits():
    keys = [f"c{i:02d}" for i in range(10)]
    tr, val = select_fold(keys, "all")
    assert tr == val == keys
    tr, val = select_fold(keys, 7, generate_crossval_split(keys))
    # nnU-Net's rule for folds without a split: seeded random 80:20
    rnd = np.random.RandomState(12345 + 7)
    idx = rnd.choice(10, 8, replace=False)
    assert tr == [keys[i] for i in idx] and val == [k for i, k in enumerate(keys) if i not in idx]


def test_unknown_case_in_splits_rejected():
    with pytest.raises(ValueError):
        select_fold(["a", "b"], 0, [{"train": ["a", "zzz"], "val": ["b"]}])
