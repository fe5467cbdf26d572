"""Validation of a raw dataset: everything a later step relies on, every problem at once.

``load_case`` is the one door through which fingerprinting and preprocessing read a training
case, so each step refuses a broken dataset with the same message that ``kubeseg dataset check``
prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kubeseg.dataset import DatasetSpec, RawCase, list_test_cases, list_training_cases, load_dataset_json
from kubeseg.errors import DatasetError, Problem
from kubeseg.imageio import Geometry, itk_error_reason, read_sitk
from kubeseg.nifti_integrity import check_nifti
from kubeseg.parallel import map_cases

# Tolerances for "same geometry": spacing relative, origin in mm, direction cosines absolute.
SPACING_RTOL = 1e-4
ORIGIN_ATOL = 1e-3
DIRECTION_ATOL = 1e-4


@dataclass
class LoadedCase:
    """One training case in memory: ``data`` (C, z, y, x) float32, ``seg`` (1, z, y, x) or None."""

    case_id: str
    data: np.ndarray
    seg: np.ndarray | None
    geometry: Geometry


def _read(path: Path, case: str, what: str, problems: list[Problem],
          non_finite: dict[Path, tuple[int, int]] | None = None) -> sitk.Image | None:
    try:
        image = read_sitk(path)
    except Exception as e:  # noqa: BLE001 - SimpleITK raises RuntimeError with ITK's text
        why = itk_error_reason(e)
        problems.append(Problem(case, str(path), f"{what} cannot be read: {why or type(e).__name__}"))
        return None
    broken, n_nan, n_inf = check_nifti(path)
    if broken:
        problems.append(Problem(case, str(path), f"{what} cannot be read: {broken}"))
        return None
    if non_finite is not None:
        non_finite[Path(path)] = (n_nan, n_inf)
    if image.GetDimension() != 3:
        problems.append(Problem(case, str(path), f"{what} is {image.GetDimension()}D; kubeseg expects 3D volumes"))
        return None
    if image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(Problem(case, str(path),
                                f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                                "store each channel as its own _XXXX file"))
        return None
    return image


def _geometry_problems(ref: sitk.Image, other: sitk.Image, case: str, file: Path, what: str) -> list[Problem]:
    out = []
    if ref.GetSize() != other.GetSize():
        out.append(f"shape (x, y, z) {other.GetSize()} differs from the first channel's {ref.GetSize()}")
    else:
        if not np.allclose(other.GetSpacing(), ref.GetSpacing(), rtol=SPACING_RTOL, atol=0):
            out.append(f"spacing (x, y, z) {other.GetSpacing()} differs from the first channel's {ref.GetSpacing()}")
        if not np.allclose(other.GetOrigin(), ref.GetOrigin(), rtol=0, atol=ORIGIN_ATOL):
            out.append(f"origin (x, y, z) {other.GetOrigin()} differs from the first channel's {ref.GetOrigin()}")
        if not np.allclose(other.GetDirection(), ref.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
            out.append(f"direction {other.GetDirection()} differs from the first channel's {ref.GetDirection()}")
    return [Problem(case, str(file), f"{what}: {m}") for m in out]


def load_case(case: RawCase, spec: DatasetSpec, with_label: bool = True) -> LoadedCase:
    """Read one case and check it; raises :class:`DatasetError` naming every problem in it."""
    problems: list[Problem] = []
    cid = case.case_id
    if any(f is None for f in case.images) or (with_label and case.label is None):
        missing = [Problem(cid, None, f"channel {c} is missing") for c, f in enumerate(case.images) if f is None]
        if with_label and case.label is None:
            missing.append(Problem(cid, None, "label file is missing"))
        raise DatasetError(missing)
    stored_non_finite: dict[Path, tuple[int, int]] = {}
    images = [_read(f, cid, f"channel {c} image", problems, stored_non_finite) for c, f in enumerate(case.images)]
    label = _read(case.label, cid, "label", problems, stored_non_finite) if with_label and case.label else None
    ref = images[0]
    if ref is not None:
        for c, (f, im) in enumerate(zip(case.images[1:], images[1:]), start=1):
            if im is not None:
                problems += _geometry_problems(ref, im, cid, f, f"channel {c} image")
        if label is not None:
            problems += _geometry_problems(ref, label, cid, case.label, "label")
    if problems:
        raise DatasetError(problems)

    arrays = []
    for c, (f, im) in enumerate(zip(case.images, images)):
        a = sitk.GetArrayFromImage(im).astype(np.float32, copy=False)
        stored_nan, stored_inf = stored_non_finite.get(Path(f), (0, 0))
        if not np.all(np.isfinite(a)) or stored_nan or stored_inf:
            n_nan = max(int(np.isnan(a).sum()), stored_nan)
            n_inf = max(int(np.isinf(a).sum()), stored_inf)
            problems.append(Problem(cid, str(f), f"channel {c} image has {n_nan} NaN and {n_inf} infinite voxel(s)"))
        arrays.append(a)
    seg = None
    if label is not None:
        seg = sitk.GetArrayFromImage(label)
        if not np.issubdtype(seg.dtype, np.integer):
            if (not np.all(np.isfinite(seg)) or not np.array_equal(np.rint(seg), seg)
                    or any(stored_non_finite.get(Path(case.label), (0, 0)))):
                problems.append(Problem(cid, str(case.label), "label has non-integer values"))
            seg = np.rint(np.nan_to_num(seg)).astype(np.int16)
        values = np.unique(seg)
        unknown = sorted(set(values.tolist()) - set(spec.label_values))
        if unknown:
            problems.append(Problem(cid, str(case.label),
                                    f"label values {unknown} are not in dataset.json labels {spec.label_values}"))
        seg = seg.astype(np.int16 if values.max(initial=0) > 127 or values.min(initial=0) < -128 else np.int8)[None]
    if problems:
        raise DatasetError(problems)
    return LoadedCase(cid, np.stack(arrays), seg, Geometry.of(ref))


def _check_one(case: RawCase, spec: DatasetSpec) -> None:
    load_case(case, spec, with_label=case.label is not None)


def check_dataset(raw_dir: str | Path, num_workers: int | None = None, progress: bool = True) -> list[Problem]:
    """Every problem in a raw dataset: layout, dataset.json, each case's files and contents.

    Test cases (imagesTs) are checked too, as images without labels.
    """
    try:
        spec = load_dataset_json(raw_dir)
    except DatasetError as e:
        return e.problems
    problems: list[Problem] = []
    cases = list_training_cases(raw_dir, spec, problems)
    complete = [c for c in cases if c.label is not None and all(f is not None for f in c.images)]
    complete += [c for c in list_test_cases(raw_dir, spec, problems) if all(f is not None for f in c.images)]
    _, case_problems = map_cases(partial(_check_one, spec=spec), complete, [c.case_id for c in complete],
                                 num_workers, desc="Checking cases" if progress else "")
    return problems + case_problems


def require_valid_layout(raw_dir: str | Path) -> tuple[DatasetSpec, list[RawCase]]:
    """dataset.json and file layout, or a :class:`DatasetError` with every layout problem."""
    spec = load_dataset_json(raw_dir)
    problems: list[Problem] = []
    cases = list_training_cases(raw_dir, spec, problems)
    if problems:
        raise DatasetError(problems, str(raw_dir))
    return spec, cases
