"""The plans' resampling functions and preprocessor, honoured or refused.

An nnU-Net v2 configuration names how its data, label maps and exported probabilities are
resampled (``resampling_fn_data`` / ``_seg`` / ``_probabilities``, each with ``..._kwargs``) and
which preprocessor made its arrays (``preprocessor_name``). A model only works on data
prepared the way it was trained, so kubeseg maps every function nnunetv2 2.8.1 can actually run
from plans to its own implementation, with the keyword arguments honoured, and refuses
anything else with a message naming the plans key:

=============================== ==================================================================
``resample_data_or_seg_to_shape`` kubeseg's spline resampler (``resampling.py``): ``order``,
                                  ``order_z``, ``is_seg``, ``force_separate_z``,
                                  ``separate_z_anisotropy_threshold``
``resample_torch_fornnunet``      torch interpolation (``torch_resampling.py``): ``is_seg``,
                                  ``force_separate_z``, ``separate_z_anisotropy_threshold``,
                                  ``memefficient_seg_resampling``, ``mode``, ``aniso_axis_mode``
                                  (``num_threads`` / ``device`` only say where it runs)
``no_resampling_hack``            the array as it is (nnU-Net's no-resampling planners)
=============================== ==================================================================

Refused: ``resample_torch_simple``, ``resample_data_or_seg_to_spacing`` and
``resample_data_or_seg`` exist in nnunetv2's resampling package but do not take the
``(data, new_shape, current_spacing, new_spacing)`` call nnunetv2 makes with plans functions
(nnunetv2 itself fails or misreads the spacings as flags with them), so no model can have been
trained with them; any other name is unknown. The only preprocessor nnunetv2 2.8.1 ships is
``DefaultPreprocessor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubeseg.errors import KubesegError
from kubeseg.preprocessing import resampling
from kubeseg.preprocessing.torch_resampling import MODES, resample_torch

PREPROCESSORS = ("DefaultPreprocessor",)
DATA, SEG, PROBABILITIES = "resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"
KEYS = (DATA, SEG, PROBABILITIES)
DEFAULT_FUNCTION = "resample_data_or_seg_to_shape"
TORCH_FUNCTION = "resample_torch_fornnunet"
NO_RESAMPLING = "no_resampling_hack"
# What a plans file without the entries means (nnU-Net's default planner writes these).
DEFAULT_KWARGS = {
    DATA: {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    SEG: {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    PROBABILITIES: {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}
ALLOWED_KWARGS = {
    DEFAULT_FUNCTION: {"is_seg", "order", "order_z", "force_separate_z", "separate_z_anisotropy_threshold"},
    TORCH_FUNCTION: {"is_seg", "num_threads", "device", "memefficient_seg_resampling", "force_separate_z",
                     "separate_z_anisotropy_threshold", "mode", "aniso_axis_mode"},
    NO_RESAMPLING: set(),
}
UNCALLABLE = {
    "resample_torch_simple": "takes (data, new_shape, is_seg, ...), not the spacings nnunetv2 passes to plans "
                             "functions",
    "resample_data_or_seg_to_spacing": "takes (data, current_spacing, new_spacing, ...), not the target shape",
    "resample_data_or_seg": "is the internal worker of resample_data_or_seg_to_shape (takes an axis and flags)",
}


def _lowres_axis(spacing) -> int | None:
    """The single coarsest axis of ``spacing``; None when two or three axes tie."""
    spacing = np.asarray(spacing, dtype=float)
    coarse = np.flatnonzero(spacing == spacing.max())
    return int(coarse[0]) if len(coarse) == 1 else None


def separate_axis(force_separate_z: bool | None, current_spacing, new_spacing,
                  threshold: float = resampling.ANISOTROPY_THRESHOLD) -> int | None:
    """The axis resampled on its own: forced on (the current spacing's coarsest), forced off, or automatic."""
    if force_separate_z is None:
        return resampling.separate_axis(current_spacing, new_spacing, threshold)
    return _lowres_axis(current_spacing) if force_separate_z else None


@dataclass(frozen=True)
class Resampler:
    """One plans resampling entry, checked; call it as nnunetv2 calls plans functions."""

    key: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_seg(self) -> bool:
        return bool(self.kwargs.get("is_seg", False))

    @property
    def resamples(self) -> bool:
        return self.name != NO_RESAMPLING

    def axis_for(self, current_spacing, new_spacing) -> int | None:
        """The axis this entry resamples on its own (None: all axes together)."""
        kw = self.kwargs
        threshold = float(kw.get("separate_z_anisotropy_threshold", resampling.ANISOTROPY_THRESHOLD))
        # the functions' own defaults differ: resample_data_or_seg_to_shape never separates unless told
        force = kw.get("force_separate_z", False if self.name == DEFAULT_FUNCTION else None)
        return separate_axis(force, current_spacing, new_spacing, threshold)

    def __call__(self, array: np.ndarray, shape, current_spacing, new_spacing) -> np.ndarray:
        """Resample ``array`` (C, *spatial) to ``shape``; spacings in the same (transposed) axis order."""
        if self.name == NO_RESAMPLING:
            return array
        kw = self.kwargs
        axis = self.axis_for(current_spacing, new_spacing)
        shape = tuple(int(s) for s in shape)
        if self.name == TORCH_FUNCTION:
            return resample_torch(array, shape, axis, is_seg=self.is_seg, mode=kw.get("mode", "linear"),
                                  aniso_axis_mode=kw.get("aniso_axis_mode", "nearest-exact"),
                                  memory_efficient=bool(kw.get("memefficient_seg_resampling", False)))
        order, order_z = int(kw.get("order", 3)), int(kw.get("order_z", 0))
        if self.is_seg:
            return resampling.resample_seg(array, shape, current_spacing, new_spacing, order, order_z, axis=axis)
        return resampling.resample_image(array, shape, current_spacing, new_spacing, order, order_z, axis=axis)


def _refuse(where: str, key: str, message: str) -> KubesegError:
    return KubesegError(f"{where}plans key {key!r}: {message}")


def resampler(config: dict, key: str, where: str = "") -> Resampler:
    """The checked resampler of ``config[key]`` (``key`` one of :data:`KEYS`)."""
    name = config.get(key, DEFAULT_FUNCTION)
    kwargs = config.get(f"{key}_kwargs")
    if kwargs is None:
        kwargs = DEFAULT_KWARGS[key] if key not in config else {}
    if not isinstance(name, str):
        raise _refuse(where, key, f"expected a function name, got {name!r}")
    if name in UNCALLABLE:
        raise _refuse(where, key, f"{name!r} is not supported: it {UNCALLABLE[name]}, so nnunetv2 2.8.1 cannot "
                                  f"run these plans either")
    if name not in ALLOWED_KWARGS:
        raise _refuse(where, key, f"unknown resampling function {name!r}; kubeseg supports "
                                  f"{', '.join(sorted(ALLOWED_KWARGS))}")
    if not isinstance(kwargs, dict):
        raise _refuse(where, f"{key}_kwargs", f"expected an object, got {kwargs!r}")
    unknown = sorted(set(kwargs) - ALLOWED_KWARGS[name])
    if unknown:
        raise _refuse(where, f"{key}_kwargs", f"{name} does not take {', '.join(unknown)}")
    out = Resampler(key, name, dict(kwargs))
    _check_kwargs(out, where)
    return out


def _check_kwargs(r: Resampler, where: str) -> None:
    kw, key = r.kwargs, f"{r.key}_kwargs"
    if r.name == NO_RESAMPLING:
        return
    if r.is_seg != (r.key == SEG):
        role = "label maps" if r.key == SEG else "images and probabilities"
        raise _refuse(where, key, f"is_seg={kw.get('is_seg')!r} does not fit {r.key}, which resamples {role}")
    if kw.get("force_separate_z") not in (None, True, False):
        raise _refuse(where, key, f"force_separate_z must be true, false or null, not {kw['force_separate_z']!r}")
    threshold = kw.get("separate_z_anisotropy_threshold", resampling.ANISOTROPY_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 1:
        raise _refuse(where, key, f"separate_z_anisotropy_threshold must be a number above 1, not {threshold!r}")
    if r.name == DEFAULT_FUNCTION:
        for name in ("order", "order_z"):
            value = kw.get(name, 3 if name == "order" else 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
                raise _refuse(where, key, f"{name} must be a spline order 0-5, not {value!r}")
        if r.is_seg and kw.get("order_z", 0) != 0:
            raise _refuse(where, key, "label maps are resampled along a separate axis with nearest neighbour only "
                                      "(order_z 0); other orders are not supported")
    else:
        for name in ("mode", "aniso_axis_mode"):
            if name in kw and kw[name] not in MODES:
                raise _refuse(where, key, f"{name} {kw[name]!r} is not supported; choose one of {', '.join(MODES)}")
        if kw.get("device") is not None and not isinstance(kw["device"], str):
            raise _refuse(where, key, f"device must be a torch device name, not {kw['device']!r}")


def check_configuration(config: dict, where: str = "") -> None:
    """Refuse a configuration whose preprocessor or resampling kubeseg cannot reproduce."""
    name = config.get("preprocessor_name", PREPROCESSORS[0])
    if name not in PREPROCESSORS:
        raise KubesegError(f"{where}plans key 'preprocessor_name': {name!r} is not supported; nnunetv2 2.8.1 ships "
                           f"only {', '.join(PREPROCESSORS)}, which kubeseg reimplements")
    for key in KEYS:
        resampler(config, key, where)


def data_resampler(config: dict) -> Resampler:
    return resampler(config, DATA)


def seg_resampler(config: dict) -> Resampler:
    return resampler(config, SEG)


def probabilities_resampler(config: dict) -> Resampler:
    return resampler(config, PROBABILITIES)
