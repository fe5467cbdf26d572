"""Cross-validation splits in nnU-Net v2's ``splits_final.json`` format.

nnU-Net splits the *sorted* case identifiers with scikit-learn's
``KFold(n_splits=5, shuffle=True, random_state=12345)``.  That is reproduced here with
numpy alone: KFold shuffles ``arange(n)`` with ``RandomState(seed).shuffle``, cuts the
shuffled order into consecutive folds (the first ``n % k`` folds one case larger), and
returns train and validation indices each in ascending order.

Fold selection follows nnU-Net: ``"all"`` trains and validates on every case; a fold
beyond the number of stored splits gets a seeded random 80:20 split.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from kubeseg.jsonio import write_json

log = logging.getLogger(__name__)

DEFAULT_SEED = 12345
DEFAULT_N_SPLITS = 5
SPLITS_FILENAME = "splits_final.json"

Fold = Union[int, str]


def generate_crossval_split(identifiers: Sequence[str], seed: int = DEFAULT_SEED,
                            n_splits: int = DEFAULT_N_SPLITS) -> list[dict[str, list[str]]]:
    """K-fold split of ``identifiers`` (in the order given), identical to nnU-Net's."""
    ids = list(identifiers)
    n = len(ids)
    if n < n_splits:
        raise ValueError(f"cannot make {n_splits} folds from {n} cases")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    splits = []
    start = 0
    for size in sizes:
        val_idx = np.sort(order[start:start + size])
        start += size
        val_mask = np.zeros(n, dtype=bool)
        val_mask[val_idx] = True
        splits.append({
            "train": [ids[i] for i in np.flatnonzero(~val_mask)],
            "val": [ids[i] for i in np.flatnonzero(val_mask)],
        })
    return splits


def load_or_create_splits(identifiers: Sequence[str], splits_file: Path,
                          fallback_dir: Optional[Path] = None) -> tuple[list[dict], Path]:
    """Read ``splits_file`` if it exists (user-supplied splits are honoured as they are),
    else create nnU-Net's default 5-fold split over the sorted identifiers and save it.

    If ``splits_file``'s folder is not writable (read-only preprocessed volume) the new
    file goes to ``fallback_dir`` instead.  Returns (splits, path actually used).
    """
    splits_file = Path(splits_file)
    if splits_file.is_file():
        with open(splits_file, encoding="utf-8") as f:
            return json.load(f), splits_file
    if fallback_dir is not None and (Path(fallback_dir) / SPLITS_FILENAME).is_file():
        p = Path(fallback_dir) / SPLITS_FILENAME
        with open(p, encoding="utf-8") as f:
            return json.load(f), p
    splits = generate_crossval_split(sorted(identifiers))
    try:
        write_json(splits, splits_file)
        return splits, splits_file
    except OSError:
        if fallback_dir is None:
            raise
        p = Path(fallback_dir) / SPLITS_FILENAME
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json(splits, p)
        return splits, p


def select_fold(identifiers: Sequence[str], fold: Fold, splits: Optional[list[dict]] = None,
                seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """Training and validation case ids for ``fold``.

    ``fold == "all"``: every case in both lists.  A fold index not present in ``splits``
    gets nnU-Net's seeded random 80:20 split (``RandomState(seed + fold)``).
    """
    if fold == "all":
        ids = sorted(identifiers)
        return list(ids), list(ids)
    fold = int(fold)
    if splits is not None and fold < len(splits):
        tr, val = list(splits[fold]["train"]), list(splits[fold]["val"])
    else:
        log.warning("fold %d not in splits (%d folds): using a seeded random 80:20 split", fold,
                    0 if splits is None else len(splits))
        rnd = np.random.RandomState(seed=seed + fold)
        keys = np.sort(list(identifiers))
        idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
        tr = [str(keys[i]) for i in idx_tr]
        val = [str(keys[i]) for i in range(len(keys)) if i not in idx_tr]
    missing = [k for k in tr + val if k not in set(identifiers)]
    if missing:
        raise ValueError(f"splits name cases that are not in the preprocessed data: {missing[:5]}...")
    if set(tr) & set(val):
        log.warning("some validation cases are also training cases in fold %s", fold)
    return tr, val
