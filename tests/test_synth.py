"""Tests for kubeseg.synth: nnU-Net v2 raw layout, geometry, determinism and data realism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.synth import SynthSettings, generate_case, synthesize

SHAPE = (16, 32, 32)
NUM_CASES = 6
NUM_TEST = 2
CHANNELS = {"ct": 1, "mri": 2}


def _settings(kind: str, **overrides) -> SynthSettings:
    values = dict(kind=kind, num_cases=NUM_CASES, num_test_cases=NUM_TEST, shape=SHAPE, seed=7)
    values.update(overrides)
    return SynthSettings(**values)


@pytest.fixture(scope="module", params=["ct", "mri"])
def dataset(request, tmp_path_factory) -> tuple[str, Path]:
    kind = request.param
    out = tmp_path_factory.mktemp(f"synth_{kind}") / "raw" / "Dataset"
    assert synthesize(out, _settings(kind)) == out
    return kind, out


def _read(path: Path) -> sitk.Image:
    assert path.is_file(), path
    return sitk.ReadImage(str(path))


def _train_cases(out: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (out / "labelsTr").iterdir())


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _arrays(out: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(out)): sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        for p in sorted(out.rglob("*.nii.gz"))
    }


def test_layout_and_dataset_json(dataset):
    kind, out = dataset
    meta = json.loads((out / "dataset.json").read_text())
    expected_channels = {"ct": {"0": "CT"}, "mri": {"0": "T1", "1": "T2"}}[kind]
    expected_labels = {
        "ct": {"background": 0, "body": 1, "organ": 2, "lesion": 3},
        "mri": {"background": 0, "edema": 1, "core": 2},
    }[kind]
    assert meta["channel_names"] == expected_channels
    assert meta["labels"] == expected_labels
    assert meta["numTraining"] == NUM_CASES
    assert meta["file_ending"] == ".nii.gz"
    assert meta["name"] == ("Dataset001_SynthCT" if kind == "ct" else "Dataset002_SynthMRI")

    train_ids = [f"synth_{i:03d}" for i in range(NUM_CASES)]
    test_ids = [f"synth_{i:03d}" for i in range(NUM_CASES, NUM_CASES + NUM_TEST)]
    n_ch = CHANNELS[kind]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(
        f"{c}_{ch:04d}.nii.gz" for c in train_ids for ch in range(n_ch)
    )
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train_ids]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == sorted(
        f"{c}_{ch:04d}.nii.gz" for c in test_ids for ch in range(n_ch)
    )
    # nothing temporary left behind, neither inside the dataset nor next to it
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_image_and_label_geometry_match(dataset):
    kind, out = dataset
    for case in _train_cases(out):
        label = _read(out / "labelsTr" / f"{case}.nii.gz")
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label.GetDimension() == 3
        for ch in range(CHANNELS[kind]):
            image = _read(out / "imagesTr" / f"{case}_{ch:04d}.nii.gz")
            assert image.GetNumberOfComponentsPerPixel() == 1
            assert image.GetPixelID() == (sitk.sitkInt16 if kind == "ct" else sitk.sitkFloat32)
            assert _geometry(image) == _geometry(label)
        assert all(o != 0.0 for o in label.GetOrigin())
        np.testing.assert_allclose(label.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    assert not (out / "imagesTr" / f"synth_{NUM_CASES:03d}_0000.nii.gz").exists()
    assert not (out / "imagesTs" / f"synth_{NUM_CASES:03d}_{CHANNELS[kind]:04d}.nii.gz").exists()


def test_cases_differ_in_spacing_and_shape(dataset):
    kind, out = dataset
    spacings, sizes = [], []
    for case in _train_cases(out):
        label = _read(out / "labelsTr" / f"{case}.nii.gz")
        spacings.append(label.GetSpacing())  # x, y, z
        sizes.append(label.GetSize())
    assert len(set(spacings)) == len(spacings)
    assert len(set(sizes)) > 1
    for (sx, sy, sz), size in zip(spacings, sizes):
        # shape jitter is about +-15 % of the median shape (numpy z, y, x -> sitk x, y, z)
        assert all(0.8 * m <= s <= 1.2 * m for s, m in zip(size, SHAPE[::-1]))
        if kind == "ct":
            assert sx == sy
            assert 0.6 <= sx <= 0.95 and 2.0 <= sz <= 5.0
            assert sz / sx > 2.0
        else:
            assert all(0.9 <= s <= 1.2 for s in (sx, sy, sz))
            assert max(sx, sy, sz) / min(sx, sy, sz) < 1.4


def test_label_values_are_declared_and_nontrivial(dataset):
    kind, out = dataset
    declared = set(json.loads((out / "dataset.json").read_text())["labels"].values())
    present_per_case = []
    for case in _train_cases(out):
        values = set(np.unique(sitk.GetArrayFromImage(_read(out / "labelsTr" / f"{case}.nii.gz"))).tolist())
        assert values <= declared
        present_per_case.append(values)
    if kind == "ct":
        assert all({0, 1, 2} <= v for v in present_per_case), "body and organ in every CT case"
        assert sum(3 in v for v in present_per_case) > len(present_per_case) / 2, "lesion in most CT cases"
    else:
        assert all({0, 1} <= v for v in present_per_case), "edema in every MRI case"
        assert sum(2 in v for v in present_per_case) > len(present_per_case) / 2, "core in most MRI cases"


def test_ct_intensities_are_hounsfield_like():
    case = generate_case(_settings("ct"), 0)
    image, label = case.images[0].astype(np.float64), case.label
    assert case.images[0].dtype == np.int16 and label.dtype == np.uint8
    assert -1050 < np.median(image[label == 0]) < -950, "air outside the body"
    assert -60 < np.median(image[label == 1]) < 80, "soft tissue / fat inside the body"
    assert 40 < np.median(image[label == 2]) < 140, "organ"
    assert image.max() > 300, "bone-like structure"
    assert np.std(image[label == 0]) > 5, "noise everywhere, as in CT"


def test_mri_background_exactly_zero_and_object_smaller_than_fov(tmp_path):
    settings = _settings("mri", num_test_cases=0)
    out = synthesize(tmp_path / "mri", settings)
    scales = []
    for case in _train_cases(out):
        channels = [
            sitk.GetArrayFromImage(_read(out / "imagesTr" / f"{case}_{ch:04d}.nii.gz")) for ch in range(2)
        ]
        label = sitk.GetArrayFromImage(_read(out / "labelsTr" / f"{case}.nii.gz"))
        nonzero = channels[0] != 0
        np.testing.assert_array_equal(nonzero, channels[1] != 0)
        assert (channels[0] >= 0).all() and (channels[1] >= 0).all()
        assert not label[~nonzero].any(), "labels only inside the object"
        for corner in np.ndindex(2, 2, 2):
            index = tuple(c * (n - 1) for c, n in zip(corner, nonzero.shape))
            assert channels[0][index] == 0.0
        coords = np.argwhere(nonzero)
        box = coords.max(axis=0) - coords.min(axis=0) + 1
        assert np.prod(box) / nonzero.size < 0.8, "cropping to nonzero must shrink the volume"
        assert 0.1 < nonzero.mean() < 0.6
        # lesion and core differ in contrast between channels (T1 vs T2)
        edema, core = label == 1, label == 2
        if core.any():
            ratio = [np.median(c[core]) / np.median(c[edema]) for c in channels]
            assert (ratio[0] - 1) * (ratio[1] - 1) < 0, "core brighter in one channel, darker in the other"
        scales.append(np.median(channels[0][nonzero]))
    assert max(scales) / min(scales) > 2, "intensity scale is arbitrary per case"


def test_deterministic_by_seed(tmp_path):
    settings = _settings("ct", num_cases=3, num_test_cases=1)
    first = _arrays(synthesize(tmp_path / "a", settings))
    second = _arrays(synthesize(tmp_path / "b", settings))
    assert first.keys() == second.keys() and len(first) == 7
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert first[key].tobytes() == second[key].tobytes(), key
    other = _arrays(synthesize(tmp_path / "c", _settings("ct", num_cases=3, num_test_cases=1, seed=8)))
    assert all(
        first[k].shape != other[k].shape or not np.array_equal(first[k], other[k]) for k in first
    )


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_case_does_not_depend_on_number_of_cases(kind):
    few = generate_case(_settings(kind, num_cases=2), 1)
    many = generate_case(_settings(kind, num_cases=9), 1)
    assert few.spacing == many.spacing and few.origin == many.origin
    for a, b in zip(few.images + (few.label,), many.images + (many.label,)):
        np.testing.assert_array_equal(a, b)
    other = generate_case(_settings(kind, num_cases=9), 2)
    assert other.spacing != many.spacing


def test_oblique_direction_is_rotated_and_shared(tmp_path):
    out = synthesize(tmp_path / "oblique", _settings("mri", num_cases=2, num_test_cases=0, oblique=True))
    for case in _train_cases(out):
        label = _read(out / "labelsTr" / f"{case}.nii.gz")
        direction = np.asarray(label.GetDirection()).reshape(3, 3)
        assert not np.allclose(direction, np.eye(3), atol=1e-3)
        np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(direction) == pytest.approx(1.0, abs=1e-5)
        for ch in range(2):
            assert _geometry(_read(out / "imagesTr" / f"{case}_{ch:04d}.nii.gz")) == _geometry(label)


def test_rewrite_existing_folder_removes_stale_cases(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, _settings("ct", num_cases=4, num_test_cases=1))
    (out / "notes.txt").write_text("keep me")
    synthesize(out, _settings("ct", num_cases=2, num_test_cases=0))
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["synth_000.nii.gz", "synth_001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["synth_000_0000.nii.gz", "synth_001_0000.nii.gz"]
    assert list((out / "imagesTs").iterdir()) == []
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert (out / "notes.txt").read_text() == "keep me"
    assert not [p for p in out.rglob(".*")], "no hidden staging files left"


@pytest.mark.parametrize(
    "overrides",
    [dict(kind="pet"), dict(shape=(4, 32, 32)), dict(shape=(16, 32)), dict(num_cases=0), dict(seed=-1)],
)
def test_invalid_settings_are_rejected(overrides):
    with pytest.raises(ValueError):
        SynthSettings(**{"kind": "ct", "shape": SHAPE, **overrides})


def test_custom_dataset_name(tmp_path):
    out = synthesize(tmp_path / "named", _settings("ct", num_cases=1, num_test_cases=0, dataset_name="Dataset123_X"))
    assert json.loads((out / "dataset.json").read_text())["name"] == "Dataset123_X"
