"""Predictor: geometry round trip (anisotropic + oblique CT, cropped two-channel MRI), the
cascade, ensembles of folds, file formats, and the errors a user can meet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.errors import DatasetError, KubesegError
from kubeseg.inference.predictor import PredictSettings
from kubeseg.inference.run import predict

from tests.inference.helpers import build_trained_dataset

FAST = PredictSettings(device="cpu", progress=False)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return build_trained_dataset(tmp_path_factory.mktemp("ct"), "ct", ("3d_fullres", "2d"))


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    return build_trained_dataset(tmp_path_factory.mktemp("mri"), "mri",
                                 ("3d_fullres", "3d_lowres", "3d_cascade_fullres"), cascade=True)


def _same_geometry(a: sitk.Image, b: sitk.Image, exact: bool) -> None:
    assert a.GetSize() == b.GetSize()
    if exact:
        assert a.GetSpacing() == b.GetSpacing()
        assert a.GetOrigin() == b.GetOrigin()
        assert a.GetDirection() == b.GetDirection()
    else:  # NIfTI stores the geometry in float32
        assert np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
        assert np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
        assert np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


def test_geometry_round_trip_anisotropic_oblique(ct, tmp_path):
    image = sorted((ct["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    src = sitk.ReadImage(str(image))
    spacing = src.GetSpacing()
    assert max(spacing) / min(spacing) > 2  # anisotropic
    assert not np.allclose(src.GetDirection(), np.eye(3).ravel())  # non-identity direction
    # a lossless format: the written geometry must be exactly the input's
    mha = tmp_path / "case.mha"
    sitk.WriteImage(src, str(mha))
    for config in ("3d_fullres", "2d"):
        out = predict(mha, tmp_path / f"{config}.mha", ct["models"][config], FAST)[0]
        _same_geometry(sitk.ReadImage(str(mha)), sitk.ReadImage(str(out)), exact=True)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}
    # the dataset's own format, folder in, folder out
    out = predict(ct["raw"] / "imagesTs", tmp_path / "nii", ct["models"]["3d_fullres"], FAST)[0]
    _same_geometry(src, sitk.ReadImage(str(out)), exact=False)


def test_cropped_two_channel_and_cascade(mri, tmp_path):
    folder = mri["raw"] / "imagesTs"
    ref = sitk.ReadImage(str(sorted(folder.glob("*_0000.nii.gz"))[0]))
    arr = sitk.GetArrayFromImage(ref)
    assert (arr == 0).mean() > 0.2  # there is a zero border for cropping to remove
    for config in ("3d_fullres", "3d_cascade_fullres"):
        out = predict(folder, tmp_path / config, mri["models"][config], FAST, save_probabilities=True)
        assert len(out) == 1
        _same_geometry(ref, sitk.ReadImage(str(out[0])), exact=False)
        probs = np.load(out[0].parent / (out[0].name[:-len(".nii.gz")] + ".npz"))["probabilities"]
        assert probs.shape == (3, *arr.shape)
        assert np.allclose(probs.sum(0), 1, atol=1e-5)
        # outside the crop box the background is certain, as in nnU-Net
        assert probs[0][(arr == 0) & (probs[0] > 0)].min() > 0


def test_folds_are_averaged_as_probabilities_and_tta_switches(ct, tmp_path):
    from kubeseg.inference.model import load_trained_model
    from kubeseg.inference.predictor import Predictor
    from tests.inference.helpers import make_model_folder
    model_dir = make_model_folder(ct["plans"], ct["dataset_json"], "3d_fullres",
                                  tmp_path / "nnUNetTrainer__P__3d_fullres", folds=("0", "1"))
    data = np.random.RandomState(0).normal(size=(1, 16, 36, 32)).astype(np.float32)
    lp = {}
    for name, folds, settings in (("f0", ["0"], FAST), ("f1", ["1"], FAST), ("both", None, FAST),
                                  ("logits", None, PredictSettings(device="cpu", progress=False,
                                                                   fold_average="logits")),
                                  ("notta", ["0"], PredictSettings(device="cpu", progress=False,
                                                                   use_mirroring=False))):
        lp[name] = Predictor(load_trained_model(model_dir, folds), settings).log_probabilities(data).exp()
    assert np.allclose(lp["both"], (lp["f0"] + lp["f1"]) / 2, atol=1e-5)
    assert not np.allclose(lp["both"], lp["logits"], atol=1e-4)
    assert not np.allclose(lp["f0"], lp["notta"], atol=1e-3)


def test_user_errors_are_named(ct, mri, tmp_path):
    image = sorted((mri["raw"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    bare = tmp_path / "bare.nii.gz"
    bare.write_bytes(image.read_bytes())
    with pytest.raises(KubesegError, match="needs 2 channels"):
        predict(bare, tmp_path / "x", mri["models"]["3d_fullres"], FAST)
    with pytest.raises(KubesegError, match="neither a bundle"):
        predict(image, tmp_path / "x", tmp_path, FAST)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "synth_009_0000.nii.gz").write_bytes(image.read_bytes())
    with pytest.raises(DatasetError, match="channel 1 is missing"):
        predict(lonely, tmp_path / "y", mri["models"]["3d_fullres"], FAST)
