"""Models trained (randomly initialised) and checkpointed by nnunetv2, through kubeseg's doors:

* a region model (body ⊃ organ ⊃ lesion, sigmoid outputs, ``regions_class_order``) with nnU-Net's
  per-region ``postprocessing.json``: ``kubeseg import-nnunet``, then a real ``bentoml serve``: its
  ``/segment`` label map agrees with nnunetv2's own prediction (>= 99.9 % of voxels, the same rule
  applied), ``/segment_summary`` gives one volume per region, and a DICOM input gets a DICOM-SEG
  with one (overlapping) segment per region;
* a ResEnc model (``ResidualEncoderUNet``): ``kubeseg import-nnunet``, then the service's ``/segment``
  agrees with nnunetv2's prediction (``kubeseg predict`` on nnunetv2's folder: tests/test_parity_regions.py).

nnunetv2's models and predictions come from tests/oracle/nnunet_models.py (one oracle process per
session, shared with tests/test_parity_regions.py).
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.clinical.dicom_io import read_dicom_input
from kubeseg.clinical.dicom_seg import read_segment_masks
from kubeseg.clinical.synth_dicom import SeriesInfo, write_series
from kubeseg.imageio import read_image
from kubeseg.postprocessing import apply_postprocessing, load_postprocessing
from tests.oracle.nnunet_models import nnunet_models

pytestmark = pytest.mark.integration

AGREEMENT = 0.999
PP_FN = "remove_all_but_largest_component_from_segmentation"
REGIONS = {"body": [1, 2, 3], "organ": [2, 3], "lesion": [3]}


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _import(model: Path, out: Path) -> Path:
    from kubeseg.cli import main as cli

    assert cli(["import-nnunet", str(model), "-o", str(out)]) == 0
    return out


def test_region_model_from_nnunet_served(tmp_path_factory, tmp_path):
    import requests

    from services.auth import new_key
    from tests.services.servers import bentoml_server

    made, _ = nnunet_models(tmp_path_factory)
    _, raw, root, model, image = made["regions"]
    case = image.name[: -len("_0000.nii.gz")]
    # nnU-Net's model folder as determine_postprocessing leaves it: a rule per region in postprocessing.json
    folder = tmp_path / "nnunet" / model.name
    shutil.copytree(model, folder)
    (folder / "postprocessing.json").write_text(json.dumps({
        "input_folder": {}, "postprocessed": {}, "postprocessing_fns": [PP_FN, PP_FN],
        "postprocessing_kwargs": [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": [2, 3]}]}))
    bundle = _import(folder, tmp_path / "bundle")
    rule = load_postprocessing(bundle / "postprocessing.json")
    assert rule.steps == ((1, 2, 3), (2, 3))
    expected = apply_postprocessing(_labels(root / "nnunet_pred" / f"{case}.nii.gz"), rule)
    assert set(np.unique(expected)) >= {0, 1, 2}

    data, geometry = read_image([image])
    study = tmp_path / "study"
    write_series(data[0], geometry, study, SeriesInfo(patient_id="PAT-7", description="CT regions"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(study.glob("*.dcm")):
            zf.write(f, f"study/{f.name}")
    key, key_line = new_key("regions-test")
    env = {"KUBESEG_MODEL_BUNDLE": str(bundle), "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false",
           "OMP_NUM_THREADS": "1", "KUBESEG_API_KEYS": key_line, "KUBESEG_MODEL_SIGNATURES": "disabled",
           "KUBESEG_REVIEW_QUEUE_DIR": str(tmp_path / "queue"), "PYTHONPATH": str(Path.cwd())}
    headers = {"Authorization": f"Bearer {key}"}
    nifti = [("images", (image.name, image.read_bytes()))]
    dicom = [("images", ("study.zip", buf.getvalue()))]
    with bentoml_server(tmp_path, env) as service:
        r = requests.post(f"{service.url}/segment", files=nifti, headers=headers, timeout=300)
        assert r.status_code == 200, r.text[:300]
        (tmp_path / "answer.nii.gz").write_bytes(r.content)
        summary = requests.post(f"{service.url}/segment_summary", files=nifti, headers=headers, timeout=300)
        assert summary.status_code == 200, summary.text[:300]
        seg_nifti = requests.post(f"{service.url}/segment", files=dicom, headers=headers, timeout=300)
        seg_dicom = requests.post(f"{service.url}/segment", files=dicom, timeout=300,
                                  headers={**headers, "Accept": "application/dicom"})
        assert seg_nifti.status_code == 200 and seg_dicom.status_code == 200, (seg_nifti.text[:300],
                                                                               seg_dicom.text[:300])
    served = _labels(tmp_path / "answer.nii.gz")
    assert served.shape == expected.shape
    agreement = float((served == expected).mean())
    print(f"region model served: agreement with nnunetv2 {agreement:.6f}, labels {np.unique(served).tolist()}")
    assert agreement >= AGREEMENT

    # one volume per region: every voxel holding one of the region's values
    volumes = summary.json()["volumes_ml"]
    voxel_ml = float(np.prod(geometry.spacing)) / 1000
    assert set(volumes) == set(REGIONS)
    for name, values in REGIONS.items():
        assert volumes[name] == pytest.approx(np.isin(served, values).sum() * voxel_ml, rel=1e-3, abs=1e-4), name
    assert volumes["body"] >= volumes["organ"] >= volumes["lesion"] and volumes["organ"] > 0

    # DICOM-SEG: one segment per region, each the region's mask of the label map answered for the same input
    (tmp_path / "seg.dcm").write_bytes(seg_dicom.content)
    (tmp_path / "dicom_answer.nii.gz").write_bytes(seg_nifti.content)
    label_map = _labels(tmp_path / "dicom_answer.nii.gz")
    masks = read_segment_masks(tmp_path / "seg.dcm", read_dicom_input(study, {0: "CT"}).reference)
    assert list(masks) == list(REGIONS)
    for name, values in REGIONS.items():
        np.testing.assert_array_equal(masks[name], np.isin(label_map, values), err_msg=name)
    assert masks["organ"].any() and (masks["organ"] & ~masks["body"]).sum() == 0  # overlapping, nested


def test_resenc_model_from_nnunet_imported_and_served(tmp_path_factory, tmp_path):
    import requests

    from services.auth import new_key
    from tests.services.servers import bentoml_server

    made, _ = nnunet_models(tmp_path_factory)
    _, raw, root, model, image = made["resenc"]
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(
        "ResidualEncoderUNet")
    bundle = _import(model, tmp_path / "bundle")
    key, key_line = new_key("resenc-test")
    env = {"KUBESEG_MODEL_BUNDLE": str(bundle), "KUBESEG_DEVICE": "cpu", "KUBESEG_TTA": "false",
           "OMP_NUM_THREADS": "1", "KUBESEG_API_KEYS": key_line, "KUBESEG_MODEL_SIGNATURES": "disabled",
           "KUBESEG_REVIEW_QUEUE_DIR": str(tmp_path / "queue"), "PYTHONPATH": str(Path.cwd())}
    with bentoml_server(tmp_path, env) as service:
        r = requests.post(f"{service.url}/segment", files=[("images", (image.name, image.read_bytes()))],
                          headers={"Authorization": f"Bearer {key}"}, timeout=300)
        assert r.status_code == 200, r.text[:300]
    (tmp_path / "answer.nii.gz").write_bytes(r.content)
    case = image.name[: -len("_0000.nii.gz")]
    ours, ref = _labels(tmp_path / "answer.nii.gz"), _labels(root / "nnunet_pred" / f"{case}.nii.gz")
    agreement = float((ours == ref).mean())
    print(f"ResEnc model through import-nnunet + the service: agreement with nnunetv2 {agreement:.6f}")
    assert len(np.unique(ref)) > 1 and agreement >= AGREEMENT
