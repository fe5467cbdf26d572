"""``kubeseg predict`` judges every input from its header before reading voxels: the issue's
400 mm repro and a MetaImage that points at a server file are refused, naming the file, before
any case is predicted; a normal input of the same model still works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubeseg.image_guard import UnsafeImageError
from kubeseg.inference import PredictSettings, predict
from kubeseg.input_budget import InputRefused

from tests.inference.helpers import make_model_folder, make_plans, make_raw
from tests.services.bad_inputs import raw_nifti

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cascade_models(tmp_path_factory) -> dict:
    """A cascade (3d_lowres → 3d_cascade_fullres) with random weights, no training."""
    root = tmp_path_factory.mktemp("cascade")
    raw = make_raw(root, cases=2, tests=1, shape=(12, 24, 24))
    plans, fp = make_plans(raw, root / "pre", cascade=True)
    dataset_json = json.loads((raw / "dataset.json").read_text())
    results = root / "results"
    for c in ("3d_lowres", "3d_cascade_fullres"):
        make_model_folder(plans, dataset_json, c, results / f"nnUNetTrainer__{plans['plans_name']}__{c}")
    return {"raw": raw, "results": results, "plans": plans}


def test_engine_predict_refuses_before_predicting(cascade_models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "giant_0000.nii.gz").write_bytes(raw_nifti(pixdim=(400.0, 400.0, 400.0)))
    settings = PredictSettings(device="cpu", progress=False, use_mirroring=False)
    started = time.perf_counter()
    with pytest.raises(InputRefused, match=r"giant_0000\.nii\.gz.*3d_(lowres|cascade_fullres)"):
        predict(inputs, tmp_path / "out", cascade_models["results"], settings, ["3d_cascade_fullres"])
    assert time.perf_counter() - started < 60
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # the first stage's grid is refused too: a limit between the two stages' grids
    low = cascade_models["plans"]["configurations"]["3d_lowres"]["spacing"]
    assert low[0] > cascade_models["plans"]["configurations"]["3d_fullres"]["spacing"][0]

    mha = tmp_path / "in2" / "scan.mha"
    mha.parent.mkdir()
    mha.write_text("ObjectType = Image\nNDims = 3\nDimSize = 24 24 12\nElementType = MET_SHORT\n"
                   "ElementDataFile = /etc/passwd\n")
    with pytest.raises(UnsafeImageError, match="scan.mha.*ElementDataFile"):
        predict(mha, tmp_path / "out2", cascade_models["results"], settings, ["3d_cascade_fullres"])

    test_case = next((cascade_models["raw"] / "imagesTs").iterdir())
    written = predict(test_case, tmp_path / "out3", cascade_models["results"], settings, ["3d_cascade_fullres"])
    assert len(written) == 1 and written[0].is_file()


@pytest.mark.integration
def test_cli_names_the_file_and_the_setting(cascade_models, tmp_path):
    giant = tmp_path / "giant.nii.gz"
    giant.write_bytes(raw_nifti(pixdim=(400.0, 400.0, 400.0)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kubeseg.cli", "predict", "-i", str(giant), "-o", str(tmp_path / "o"),
                        "-m", str(cascade_models["results"]), "-c", "3d_cascade_fullres", "--device", "cpu"],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "giant.nii.gz" in r.stderr and "resamples to" in r.stderr and "limit" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kubeseg.cli", "predict", "-i", str(giant), "-o", str(tmp_path / "o"),
                        "-m", str(cascade_models["results"]), "-c", "3d_cascade_fullres", "--device", "cpu",
                        "--max-resampled-voxels", "1"], capture_output=True, text=True, encoding="utf-8",
                       errors="replace", env=env, timeout=300)
    assert r.returncode == 2 and "limit of 1 resampled voxels" in r.stderr, r.stderr[-2000:]
