"""Decoding uploads: every kind of bad request gets its status and a message that names the problem;
good NIfTI, NRRD, MHA and DICOM-zip inputs decode to the same voxels and geometry."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.dataset import DatasetSpec
from kubeseg.synth import SynthSettings, synthesize
from services.decode import BadInput, Limits, decode, sniff

from tests.services.bad_inputs import MAX_REQUEST_BYTES, MAX_VOXELS, bad_requests, dicom_zip, grid_stages

SPEC = DatasetSpec({0: "CT"}, {"background": 0, "body": 1}, 1, ".nii.gz")
LIMITS = Limits(MAX_VOXELS, 2, MAX_REQUEST_BYTES)


@pytest.fixture(scope="module")
def good_case(tmp_path_factory) -> Path:
    raw = synthesize(tmp_path_factory.mktemp("raw") / "ds", SynthSettings(kind="ct", num_cases=1, shape=(12, 24, 24),
                                                                           num_test_cases=0, seed=1))
    return next((raw / "imagesTr").iterdir())


def _write(tmp_path: Path, files) -> list[tuple[str, Path]]:
    out = []
    for i, (name, data) in enumerate(files):
        p = tmp_path / f"upload{i}_{name}"
        p.write_bytes(data)
        out.append((name, p))
    return out


def test_bad_inputs_are_refused_with_status_and_message(good_case, tmp_path):
    cases = [b for b in bad_requests(good_case) if not b.fields]
    assert len(cases) >= 12
    for i, bad in enumerate(cases):
        work = tmp_path / f"w{i}"
        work.mkdir()
        with pytest.raises(BadInput) as e:
            decode(_write(work, bad.files), SPEC, LIMITS, work, grid_stages())
        assert int(e.value.status) == bad.status, (bad.kind, e.value.message)
        assert bad.message.lower() in e.value.message.lower(), (bad.kind, e.value.message)
        # the message names the file the client sent
        assert any(name in e.value.message for name, _ in bad.files) or bad.kind == "wrong channel count", bad.kind


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", "dicom"])
def test_formats_decode_to_the_same_image(good_case, tmp_path, suffix):
    image = sitk.ReadImage(str(good_case))
    if suffix == "dicom":
        path = tmp_path / "upload.zip"
        path.write_bytes(dicom_zip(image))
    else:
        path = tmp_path / f"upload{suffix}"
        sitk.WriteImage(image, str(path))
    work = tmp_path / "w"
    work.mkdir()
    decoded = decode([(path.name, path)], SPEC, LIMITS, work)
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    assert decoded.data.shape == (1, *expected.shape)
    np.testing.assert_allclose(decoded.geometry.spacing, image.GetSpacing()[::-1], rtol=1e-5)
    if suffix == "dicom":  # rescaled to int16 for DICOM: same structure, other values
        assert decoded.ending == ".nii.gz"
        assert np.corrcoef(decoded.data.ravel(), expected.ravel())[0, 1] > 0.999
    else:
        assert decoded.ending == suffix
        np.testing.assert_array_equal(decoded.data[0], expected)


def test_sniff_ignores_the_file_name(good_case, tmp_path):
    p = tmp_path / "scan.dat"
    p.write_bytes(good_case.read_bytes())
    assert sniff(p) == "nifti_gz"
