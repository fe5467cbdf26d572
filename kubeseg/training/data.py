"""Preprocessed cases on disk and nnU-Net's patch sampling.

A preprocessed folder ``PRE/<data_identifier>/`` holds, per case, ``<case>.npy`` (float32,
``(C, *spatial)``), ``<case>_seg.npy`` (int8, ``(1, *spatial)``, -1 outside the nonzero
mask) and ``<case>.json`` (properties, including ``class_locations``: label -> list of
``[0, z, y, x]`` voxel coordinates).  Arrays are memory-mapped so that only the sampled
patch is read.

``PatchLoader`` reproduces nnU-Net v2's data loader:

* batch item ``j`` is *forced* to contain foreground iff
  ``j >= round(batch_size * (1 - oversample_foreground_percent))`` (with 0.33 and batch 2,
  the second item; with batch 3 the third...);
* a forced item picks a random label among those present, a random voxel of that label,
  and centres the patch on it (clipped to the allowed range);
* patches are sampled at the *initial* patch size, which is larger than the final patch
  so that rotation/scaling in augmentation does not pull in empty corners; the final
  ``need_to_pad = initial - final`` voxels are split over both sides, so patches may hang
  over the image border; data is padded with 0 and the segmentation with -1 there;
* for 2D configurations a slice is drawn first (a slice containing the chosen label for
  forced items), then a 2D patch is sampled from it;
* for cascade stages the previous stage's segmentation is stacked as a second ``seg``
  channel (the augmentation turns it into one-hot input channels later).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader

from kubeseg.training.watchdog import init_worker
from kubeseg.labels import ANNOTATED_KEY

PathLike = Union[str, Path]


@dataclass
class Case:
    identifier: str
    data: np.ndarray                    # (C, *spatial) float32, maybe memory-mapped
    seg: np.ndarray                     # (1, *spatial) int
    seg_prev: Optional[np.ndarray]      # (*spatial) int or None
    properties: dict


def list_case_identifiers(folder: PathLike) -> list[str]:
    """Case ids in a ``PRE/<data_identifier>`` folder (every ``X.npy`` that is not ``X_seg.npy``)."""
    folder = Path(folder)
    ids = [p.name[:-4] for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy")]
    return sorted(ids)


def _class_locations(raw: dict) -> dict:
    """Keys: a label (int), a region (``"(2, 3)"``) or ``"annotated"`` (ignore-label datasets)."""
    out = {}
    for k, v in (raw or {}).items():
        arr = np.asarray(v, dtype=np.int64)
        key = int(k) if k.lstrip("-").isdigit() else k
        out[key] = arr.reshape(-1, 4) if arr.size else np.zeros((0, 4), dtype=np.int64)
    return out


class PreprocessedDataset:
    """Lazy access to the preprocessed cases of one configuration.

    ``seg_prev_folder``: for cascade stages, folder with the previous stage's segmentation
    of each case as ``<case>.npy`` or ``<case>.npz`` (key ``seg``), in this stage's
    preprocessed geometry (nnU-Net's ``predicted_next_stage/<configuration>``).
    """

    def __init__(self, folder: PathLike, identifiers: Optional[Sequence[str]] = None,
                 seg_prev_folder: Optional[PathLike] = None):
        self.folder = Path(folder)
        self.identifiers = list(identifiers) if identifiers is not None else list_case_identifiers(folder)
        self.seg_prev_folder = Path(seg_prev_folder) if seg_prev_folder is not None else None
        self._props: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.identifiers)

    def properties(self, identifier: str) -> dict:
        if identifier not in self._props:
            with open(self.folder / f"{identifier}.json", encoding="utf-8") as f:
                props = json.load(f)
            props["class_locations"] = _class_locations(props.get("class_locations"))
            self._props[identifier] = props
        return self._props[identifier]

    def load_case(self, identifier: str) -> Case:
        data = np.load(self.folder / f"{identifier}.npy", mmap_mode="r")
        seg = np.load(self.folder / f"{identifier}_seg.npy", mmap_mode="r")
        seg_prev = None
        if self.seg_prev_folder is not None:
            p = self.seg_prev_folder / f"{identifier}.npy"
            if p.is_file():
                seg_prev = np.load(p, mmap_mode="r")
            else:
                with np.load(self.seg_prev_folder / f"{identifier}.npz") as z:
                    seg_prev = z["seg"]
            if seg_prev.ndim == data.ndim:  # stored with a leading channel
                seg_prev = seg_prev[0]
        return Case(identifier, data, seg, seg_prev, self.properties(identifier))


def force_foreground(sample_idx: int, batch_size: int, oversample_foreground_percent: float) -> bool:
    """nnU-Net's rule: the last ``batch_size - round(batch_size * (1 - p))`` items are forced."""
    return not sample_idx < round(batch_size * (1 - oversample_foreground_percent))


def crop_and_pad(arr: np.ndarray, lbs: Sequence[int], ubs: Sequence[int], pad_value: float) -> np.ndarray:
    """Crop ``arr[:, lbs:ubs]`` over the spatial axes; parts outside the array get ``pad_value``."""
    shape = arr.shape[1:]
    valid_lb = [max(0, lb) for lb in lbs]
    valid_ub = [min(s, ub) for s, ub in zip(shape, ubs)]
    sl = (slice(None),) + tuple(slice(a, b) for a, b in zip(valid_lb, valid_ub))
    cropped = np.asarray(arr[sl])
    pad = [(0, 0)] + [(-min(0, lb), max(ub - s, 0)) for lb, ub, s in zip(lbs, ubs, shape)]
    if any(p != (0, 0) for p in pad):
        cropped = np.pad(cropped, pad, mode="constant", constant_values=pad_value)
    return cropped


class PatchLoader(DataLoader):
    """Infinite batchgenerators data loader yielding ``{'data', 'seg', 'keys'}`` numpy batches.

    ``patch_size`` is the size sampled here (the initial, enlarged patch for training, the
    final patch for validation); ``final_patch_size`` the size the network sees.  Both are 2D
    or 3D; 2D means "one slice of the 3D arrays".
    """

    def __init__(self, dataset: PreprocessedDataset, batch_size: int,
                 patch_size: Sequence[int], final_patch_size: Sequence[int],
                 oversample_foreground_percent: float = 0.33,
                 sampling_probabilities: Optional[Sequence[float]] = None):
        # infinite=True: cases are drawn with replacement, which is what nnU-Net does
        super().__init__(dataset, batch_size, 1, None, True, False, True, sampling_probabilities)
        self.indices = list(dataset.identifiers)
        self.patch_size = tuple(int(i) for i in patch_size)
        self.final_patch_size = tuple(int(i) for i in final_patch_size)
        self.need_to_pad = np.array(self.patch_size) - np.array(self.final_patch_size)
        self.oversample_foreground_percent = oversample_foreground_percent
        self._trainer_pid = os.getpid()
        self.is_2d = len(self.patch_size) == 2

    # -- bbox sampling ---------------------------------------------------------------

    def set_thread_id(self, thread_id):
        """batchgenerators calls this first thing in each augmentation worker: the worker dies
        with the trainer and obeys SIGTERM (:func:`kubeseg.training.watchdog.init_worker`)."""
        super().set_thread_id(thread_id)
        if os.getpid() != self._trainer_pid:
            init_worker(self._trainer_pid)
    def get_bbox(self, data_shape: Sequence[int], force_fg: bool,
                 class_locations: Optional[dict[int, np.ndarray]],
                 overwrite_class: Optional[int] = None) -> tuple[list[int], list[int]]:
        """Lower/upper patch corner for one sample (see module docstring)."""
        dim = len(data_shape)
        need_to_pad = self.need_to_pad.copy()
        for d in range(dim):
            if need_to_pad[d] + data_shape[d] < self.patch_size[d]:
                need_to_pad[d] = self.patch_size[d] - data_shape[d]
        lbs = [-int(need_to_pad[d]) // 2 for d in range(dim)]
        ubs = [int(data_shape[d] + need_to_pad[d] // 2 + need_to_pad[d] % 2 - self.patch_size[d])
               for d in range(dim)]

        selected = None
        if not force_fg and class_locations is not None and ANNOTATED_KEY in class_locations:
            # sparse annotation: unforced patches are centred on annotated voxels, as nnU-Net does
            selected = ANNOTATED_KEY if len(class_locations[ANNOTATED_KEY]) else None
        elif force_fg and class_locations is not None:
            eligible = [k for k, v in class_locations.items() if len(v) > 0 and k != ANNOTATED_KEY]
            if overwrite_class is not None and len(class_locations.get(overwrite_class, ())) > 0:
                selected = overwrite_class  # 2D: the class (or the annotated voxels) the slice was picked for
            elif eligible:
                selected = eligible[np.random.choice(len(eligible))]
        if selected is not None:
            voxels = class_locations[selected]
            voxel = voxels[np.random.choice(len(voxels))]
            # voxel[0] is the channel index; the patch is centred on the voxel
            bbox_lbs = [max(lbs[d], int(voxel[d + 1]) - self.patch_size[d] // 2) for d in range(dim)]
        else:
            bbox_lbs = [np.random.randint(lbs[d], ubs[d] + 1) for d in range(dim)]
        bbox_ubs = [bbox_lbs[d] + self.patch_size[d] for d in range(dim)]
        return bbox_lbs, bbox_ubs

    # -- one sample --------------------------------------------------------------------
    def _sample(self, case: Case, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        data, seg = case.data, case.seg
        if case.seg_prev is not None:
            seg = np.concatenate((np.asarray(seg), np.asarray(case.seg_prev)[None].astype(seg.dtype)), 0)
        locs = case.properties["class_locations"]
        if not self.is_2d:
            lbs, ubs = self.get_bbox(data.shape[1:], force_fg, locs)
            return crop_and_pad(data, lbs, ubs, 0), crop_and_pad(seg, lbs, ubs, -1)
        # 2D: pick a slice (one containing the chosen label if forced), then a 2D patch
        selected = None
        if not force_fg and ANNOTATED_KEY in locs:
            selected = ANNOTATED_KEY if len(locs[ANNOTATED_KEY]) else None
        elif force_fg:
            eligible = [k for k, v in locs.items() if len(v) > 0 and k != ANNOTATED_KEY]
            if eligible:
                selected = eligible[np.random.choice(len(eligible))]
        if selected is not None:
            sl = int(np.random.choice(locs[selected][:, 1]))
            in_slice = locs[selected][locs[selected][:, 1] == sl][:, (0, 2, 3)]
            slice_locs = {selected: in_slice}
        else:
            sl = int(np.random.choice(data.shape[1]))
            slice_locs = None
        data2, seg2 = np.asarray(data[:, sl]), np.asarray(seg[:, sl])
        lbs, ubs = self.get_bbox(data2.shape[1:], selected is not None, slice_locs, overwrite_class=selected)
        return crop_and_pad(data2, lbs, ubs, 0), crop_and_pad(seg2, lbs, ubs, -1)

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        n_seg = 2 if self._data.seg_prev_folder is not None else 1
        first = self._data.load_case(keys[0])
        data_all = np.zeros((self.batch_size, first.data.shape[0], *self.patch_size), dtype=np.float32)
        seg_all = np.zeros((self.batch_size, n_seg, *self.patch_size), dtype=np.int16)
        for j, key in enumerate(keys):
            case = first if j == 0 else self._data.load_case(key)
            d, s = self._sample(case, force_foreground(j, self.batch_size, self.oversample_foreground_percent))
            data_all[j] = d
            seg_all[j] = s
        return {"data": data_all, "seg": seg_all, "keys": list(keys)}
