"""``check_dataset``: one test per error class, each naming the case, the file and what is wrong.

A valid synthetic dataset is built once per kind and copied for every test; each test breaks one
thing by rewriting files with SimpleITK (or raw bytes) and asserts on the problem it gets back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.dataset import list_training_cases, load_dataset_json
from kubeseg.dataset_check import check_dataset, load_case, require_valid_layout
from kubeseg.errors import DatasetError, Problem
from kubeseg.fingerprint import extract_fingerprint
from kubeseg.synth import SynthSettings, synthesize

SHAPE = (12, 32, 32)
NUM_CASES = 3
CASE = "synth_001"  # the case a test breaks, unless it says otherwise
OTHER = "synth_002"


# ---- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("valid")
    return {kind: synthesize(root / kind, SynthSettings(kind=kind, num_cases=NUM_CASES, shape=SHAPE, seed=3))
            for kind in ("ct", "mri")}


@pytest.fixture
def ct(templates, tmp_path) -> Path:
    """A fresh, valid one-channel CT dataset (labels 0..3) this test may break."""
    return Path(shutil.copytree(templates["ct"], tmp_path / "Dataset001_SynthCT"))


@pytest.fixture
def mri(templates, tmp_path) -> Path:
    """A fresh, valid two-channel (T1, T2) MRI dataset (labels 0..2) this test may break."""
    return Path(shutil.copytree(templates["mri"], tmp_path / "Dataset002_SynthMRI"))


def image_file(raw: Path, case: str = CASE, channel: int = 0) -> Path:
    return raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def label_file(raw: Path, case: str = CASE) -> Path:
    return raw / "labelsTr" / f"{case}.nii.gz"


def problems_of(raw: Path, num_workers: int = 1) -> list[Problem]:
    return check_dataset(raw, num_workers=num_workers, progress=False)


def the_problem(raw: Path) -> Problem:
    """The single problem of a dataset that has exactly one thing broken."""
    problems = problems_of(raw)
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


def assert_names(problem: Problem, case: str | None, file: Path, *words: str) -> None:
    """The problem names the case and the file, and its text says what is wrong (``words``)."""
    text = str(problem)
    assert problem.case == case, text
    assert problem.file is not None and Path(problem.file) == file, text
    if case is not None:
        assert f"case {case}" in text
    assert str(file) in text
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {text!r}"


def rewrite(path: Path, change: Callable[[sitk.Image], sitk.Image]) -> None:
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(change(image), str(path), useCompression=True)


def with_array(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[sitk.Image], sitk.Image]:
    """An image change that edits the voxels and keeps the geometry."""
    def apply(image: sitk.Image) -> sitk.Image:
        out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(image)))
        out.CopyInformation(image)
        return out
    return apply


def edit_json(raw: Path, change: Callable[[dict], None]) -> Path:
    path = raw / "dataset.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d, indent=2))
    return path


def _scaled_spacing(image: sitk.Image) -> sitk.Image:
    image.SetSpacing([s * 1.25 for s in image.GetSpacing()])
    return image


def _shifted_origin(image: sitk.Image) -> sitk.Image:
    image.SetOrigin([o + 4.0 for o in image.GetOrigin()])
    return image


def _swapped_axes(image: sitk.Image) -> sitk.Image:
    image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _cropped(image: sitk.Image) -> sitk.Image:
    return image[:, :-2, :]  # SimpleITK indexes (x, y, z): two rows fewer


GEOMETRY_BREAKS = {
    "shape": _cropped,
    "spacing": _scaled_spacing,
    "origin": _shifted_origin,
    "direction": _swapped_axes,
}


# ---- valid datasets ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_valid_dataset_has_no_problems(templates, kind):
    raw = templates[kind]
    assert problems_of(raw) == []
    spec, cases = require_valid_layout(raw)
    assert [c.case_id for c in cases] == [f"synth_{i:03d}" for i in range(NUM_CASES)]
    loaded = load_case(cases[0], spec)
    assert loaded.data.shape[0] == spec.num_channels and loaded.seg.shape[1:] == loaded.data.shape[1:]


def test_rounding_level_geometry_differences_are_tolerated(ct):
    """Headers store float32; a label whose geometry differs by rounding noise is the same geometry."""
    def nudge(image: sitk.Image) -> sitk.Image:
        image.SetSpacing([s * (1 + 1e-6) for s in image.GetSpacing()])
        image.SetOrigin([o + 1e-5 for o in image.GetOrigin()])
        return image
    rewrite(label_file(ct), nudge)
    assert problems_of(ct) == []


# ---- files missing or extra --------------------------------------------------------------------

def test_missing_channel_file(mri):
    image_file(mri, channel=1).unlink()
    assert_names(the_problem(mri), CASE, image_file(mri, channel=1), "channel 1", "T2", "missing")


def test_extra_channel_file_beyond_channel_names(mri):
    extra = image_file(mri, channel=2)
    shutil.copyfile(image_file(mri, channel=1), extra)
    assert_names(the_problem(mri), CASE, extra, "beyond", "2 channel")


def test_missing_label_file(ct):
    label_file(ct).unlink()
    assert_names(the_problem(ct), CASE, label_file(ct), "label", "missing")


def test_num_training_mismatch(ct):
    path = edit_json(ct, lambda d: d.update(numTraining=NUM_CASES + 2))
    assert_names(the_problem(ct), None, path, "numTraining", str(NUM_CASES + 2), f"{NUM_CASES} training cases")


# ---- geometry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("what", sorted(GEOMETRY_BREAKS))
def test_label_geometry_mismatch(ct, what):
    image_size = sitk.ReadImage(str(image_file(ct))).GetSize()
    rewrite(label_file(ct), GEOMETRY_BREAKS[what])
    problem = the_problem(ct)
    assert_names(problem, CASE, label_file(ct), "label", what, "differs")
    if what == "shape":  # both shapes, in SimpleITK's (x, y, z) order, as spacing and origin
        x, y, z = image_size
        assert f"({x}, {y - 2}, {z})" in problem.message and f"({x}, {y}, {z})" in problem.message


@pytest.mark.parametrize("what", sorted(GEOMETRY_BREAKS))
def test_channel_vs_channel_geometry_mismatch(mri, what):
    rewrite(image_file(mri, OTHER, channel=1), GEOMETRY_BREAKS[what])
    assert_names(the_problem(mri), OTHER, image_file(mri, OTHER, channel=1), "channel 1", what, "differs")


# ---- contents ----------------------------------------------------------------------------------

def test_label_value_not_in_dataset_json(ct):
    def add_seven(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, 0, :3] = 7
        return a
    rewrite(label_file(ct), with_array(add_seven))
    assert_names(the_problem(ct), CASE, label_file(ct), "label values [7]", "not in dataset.json", "[0, 1, 2, 3]")


def test_non_integer_label(ct):
    def halves(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[0, 0, 0] = 0.5
        return a
    rewrite(label_file(ct), with_array(halves))
    assert_names(the_problem(ct), CASE, label_file(ct), "label", "non-integer")


def _float_with(values: dict[tuple[int, int, int], float]) -> Callable[[sitk.Image], sitk.Image]:
    def change(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        for index, value in values.items():
            a[index] = value
        return a
    return with_array(change)


def test_nan_in_image(ct):
    # .nii.gz as users store it: ITK's NIfTI reader silently turns NaN into 0, the check must not
    rewrite(image_file(ct), _float_with({(1, 2, 3): np.nan, (2, 3, 4): np.nan}))
    assert_names(the_problem(ct), CASE, image_file(ct), "channel 0", "2 NaN")


def test_inf_in_image(mri):
    rewrite(image_file(mri, channel=1), _float_with({(1, 2, 3): np.inf, (4, 5, 6): -np.inf}))
    assert_names(the_problem(mri), CASE, image_file(mri, channel=1), "channel 1", "0 NaN and 2 infinite")


def test_nan_in_label(ct):
    # a float label whose NaN ITK's NIfTI reader would silently turn into background
    rewrite(label_file(ct), _float_with({(0, 0, 0): np.nan}))
    assert_names(the_problem(ct), CASE, label_file(ct), "label", "non-integer")


def test_nan_in_image_of_another_format(ct):
    """The same check on a format whose reader keeps NaN (.nrrd), to cover the in-memory test too."""
    edit_json(ct, lambda d: d.update(file_ending=".nrrd"))
    for f in sorted(ct.rglob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(f)), str(f).removesuffix(".nii.gz") + ".nrrd", useCompression=True)
        f.unlink()
    target = ct / "imagesTr" / f"{CASE}_0000.nrrd"
    rewrite(target, _float_with({(1, 2, 3): np.nan}))
    assert_names(the_problem(ct), CASE, target, "1 NaN")


def test_2d_image(ct):
    rewrite(image_file(ct), lambda image: image[:, :, 0])
    assert_names(the_problem(ct), CASE, image_file(ct), "channel 0", "2D", "3D")


def test_4d_image(ct):
    rewrite(image_file(ct), lambda image: sitk.JoinSeries([image, image]))
    assert_names(the_problem(ct), CASE, image_file(ct), "channel 0", "4D", "3D")


def test_4d_label(ct):
    rewrite(label_file(ct), lambda image: sitk.JoinSeries([image, image]))
    assert_names(the_problem(ct), CASE, label_file(ct), "label", "4D")


def test_truncated_image(ct):
    # ITK reads a truncated .nii.gz without complaint, padding it with zeros; the check must not
    f = image_file(ct)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_names(the_problem(ct), CASE, f, "channel 0", "cannot be read", "truncated")


def test_garbage_label_file(ct):
    f = label_file(ct)
    f.write_bytes(b"this is not an image\n" * 20)
    problem = the_problem(ct)
    assert_names(problem, CASE, f, "label", "cannot be read")
    # the reason, not only where in ITK's sources the exception was thrown
    assert ".cxx" not in problem.message and not problem.message.rstrip().endswith(":"), problem.message


def test_empty_image_file(mri):
    image_file(mri, channel=1).write_bytes(b"")
    assert_names(the_problem(mri), CASE, image_file(mri, channel=1), "channel 1", "cannot be read")


# ---- dataset.json ------------------------------------------------------------------------------

def test_dataset_json_missing(ct):
    (ct / "dataset.json").unlink()
    assert_names(the_problem(ct), None, ct / "dataset.json", "missing")


def test_dataset_json_invalid_json(ct):
    (ct / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {')
    assert_names(the_problem(ct), None, ct / "dataset.json", "JSON")


def test_dataset_json_not_an_object(ct):
    (ct / "dataset.json").write_text("[1, 2, 3]")
    assert_names(the_problem(ct), None, ct / "dataset.json", "JSON object")


def test_dataset_json_missing_keys_are_all_reported(ct):
    def drop(d: dict) -> None:
        for key in ("channel_names", "labels", "numTraining", "file_ending"):
            del d[key]
    path = edit_json(ct, drop)
    problems = problems_of(ct)
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        matching = [p for p in problems if f"'{key}'" in p.message]
        assert len(matching) == 1, (key, problems)
        assert_names(matching[0], None, path, "missing" if key in ("channel_names", "labels") else "must be")
    assert len(problems) == 4


def test_region_based_labels_are_checked(ct):
    def regions(d: dict) -> None:
        d["labels"] = {"background": 0, "body": [1, 2, 3], "organ": [2, 3], "lesion": 3}
        d["regions_class_order"] = [1, 2, 3]
    edit_json(ct, regions)
    assert problems_of(ct) == []  # accepted: label files hold 0-3
    path = edit_json(ct, lambda d: d.pop("regions_class_order"))
    assert_names(the_problem(ct), None, path, "regions_class_order")
    path = edit_json(ct, lambda d: d.update(regions_class_order=[1, 2]))
    assert_names(the_problem(ct), None, path, "regions_class_order", "2 entries", "3 foreground regions")


def test_ignore_label_must_be_highest(ct):
    edit_json(ct, lambda d: d["labels"].update(ignore=4))
    assert problems_of(ct) == []
    path = edit_json(ct, lambda d: d["labels"].update(ignore=7))
    assert_names(the_problem(ct), None, path, "ignore", "highest", "got 7")


def test_non_consecutive_labels(ct):
    path = edit_json(ct, lambda d: d.update(labels={"background": 0, "body": 1, "lesion": 3}))
    assert_names(the_problem(ct), None, path, "consecutive", "[0, 1, 3]")


def test_non_integer_channel_names(ct):
    path = edit_json(ct, lambda d: d.update(channel_names={"CT": "0"}))
    assert_names(the_problem(ct), None, path, "channel_names", "integers")


# ---- every problem, not just the first ---------------------------------------------------------

@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_problem_of_every_case_is_reported(mri, num_workers):
    image_file(mri, "synth_000", channel=0).unlink()
    rewrite(label_file(mri, OTHER), _scaled_spacing)
    rewrite(image_file(mri, CASE, channel=1), _float_with({(0, 0, 0): np.nan}))
    problems = problems_of(mri, num_workers)
    assert len(problems) == 3, "\n".join(map(str, problems))
    by_case = {p.case: p for p in problems}
    assert_names(by_case["synth_000"], "synth_000", image_file(mri, "synth_000", 0), "channel 0", "missing")
    assert_names(by_case[OTHER], OTHER, label_file(mri, OTHER), "label", "spacing")
    assert_names(by_case[CASE], CASE, image_file(mri, CASE, 1), "channel 1", "1 NaN")
    assert problems_of(mri, num_workers) == problems  # stable order, whatever the workers


def test_problem_text_names_case_and_file(ct):
    p = Problem(CASE, "/raw/labelsTr/synth_001.nii.gz", "label: spacing differs")
    assert str(p) == "case synth_001 /raw/labelsTr/synth_001.nii.gz: label: spacing differs"
    err = DatasetError([p, Problem(None, "/raw/dataset.json", "numTraining is 5")], "/raw")
    assert str(err).splitlines() == ["dataset /raw has 2 problem(s):", f"  - {p}",
                                     "  - /raw/dataset.json: numTraining is 5"]


# ---- the later steps refuse the same problems --------------------------------------------------

@pytest.mark.parametrize("breakage", ["label spacing", "missing label", "NaN"])
def test_fingerprint_refuses_with_the_problems_of_the_check(ct, breakage):
    if breakage == "label spacing":
        rewrite(label_file(ct), _scaled_spacing)
    elif breakage == "missing label":
        label_file(ct).unlink()
    else:
        rewrite(image_file(ct, OTHER), _float_with({(0, 0, 0): np.nan}))
    expected = problems_of(ct)
    assert len(expected) == 1
    with pytest.raises(DatasetError) as err:
        extract_fingerprint(ct, num_workers=1, progress=False)
    assert err.value.problems == expected
    assert str(expected[0]) in str(err.value)


def test_load_case_refuses_a_broken_case(ct):
    rewrite(label_file(ct), _shifted_origin)
    spec = load_dataset_json(ct)
    cases = {c.case_id: c for c in list_training_cases(ct, spec, [])}
    load_case(cases[OTHER], spec)  # the others still load
    with pytest.raises(DatasetError) as err:
        load_case(cases[CASE], spec)
    assert err.value.problems == problems_of(ct)


def test_test_cases_are_checked_as_images_without_labels(tmp_path):
    raw = synthesize(tmp_path / "raw", SynthSettings(kind="mri", num_cases=2, num_test_cases=2,
                                                      shape=(10, 24, 24), seed=3))
    assert check_dataset(raw, num_workers=1, progress=False) == []
    test_case = sorted((raw / "imagesTs").glob("*_0001.nii.gz"))[0]
    test_case.unlink()
    problems = check_dataset(raw, num_workers=1, progress=False)
    assert len(problems) == 1
    assert problems[0].case == test_case.name[: -len("_0001.nii.gz")]
    assert problems[0].file == str(test_case) and "channel 1" in problems[0].message
