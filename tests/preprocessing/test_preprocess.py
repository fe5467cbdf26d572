import hashlib
import json

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from kubeseg.atomic import default_mode
from kubeseg.dataset import load_dataset_json
from kubeseg.errors import DatasetError
from kubeseg.fingerprint import extract_fingerprint, write_fingerprint
from kubeseg.planning.planner import plan_experiment, planner_settings
from kubeseg.preprocessing.preprocess import preprocess_dataset
from kubeseg.synth import SynthSettings, synthesize


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri")
    raw = synthesize(root / "raw", SynthSettings(kind="mri", num_cases=3, shape=(20, 40, 36), seed=5))
    fp = extract_fingerprint(raw, num_workers=1, progress=False)
    fp_path = write_fingerprint(fp, root / "fingerprint.json")
    plans = plan_experiment(load_dataset_json(raw), fp, planner_settings("small"))
    return raw, plans, fp_path


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_layout_contents_and_properties(mri, tmp_path):
    raw, plans, fp_path = mri
    folder = preprocess_dataset(raw, plans, "3d_fullres", tmp_path, fp_path, num_workers=1, progress=False)
    assert folder == tmp_path / plans["configurations"]["3d_fullres"]["data_identifier"]
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        assert (tmp_path / name).is_file()
    assert sorted(p.name for p in (tmp_path / "gt_segmentations").iterdir()) == [
        f"synth_00{i}.nii.gz" for i in range(3)]
    data = np.load(folder / "synth_000.npy", mmap_mode="r")
    seg = np.load(folder / "synth_000_seg.npy", mmap_mode="r")
    props = json.loads((folder / "synth_000.json").read_text())
    assert data.dtype == np.float32 and data.shape[0] == 2 and seg.shape == (1, *data.shape[1:])
    assert seg.dtype == np.int8 and set(np.unique(seg)) <= {-1, 0, 1, 2}
    assert (seg == -1).any()  # MRI background was cropped/masked
    # masked z-score leaves the outside at zero (away from the spline's reach across the mask's edge)
    far_outside = binary_erosion(seg[0] == -1, iterations=3)
    assert far_outside.any() and np.abs(data[:, far_outside]).max() < 0.05  # unmasked: about -1
    assert props["shape_before_cropping"] != props["shape_after_cropping_and_before_resampling"]
    for label, locations in props["class_locations"].items():
        assert locations, f"label {label} has no sampled locations"
        for loc in locations[:50]:
            assert seg[tuple(loc)] == int(label)
    assert len(props["sitk_stuff"]["direction"]) == 9
    # shared storage: not the private modes of mkstemp/mkdtemp
    assert folder.stat().st_mode & 0o777 == default_mode(directory=True)
    assert (folder / "synth_000.json").stat().st_mode & 0o777 == default_mode()


def test_rerun_gives_identical_files(mri, tmp_path):
    raw, plans, fp_path = mri
    first = digest(preprocess_dataset(raw, plans, "2d", tmp_path / "a", fp_path, num_workers=2, progress=False))
    second = digest(preprocess_dataset(raw, plans, "2d", tmp_path / "b", fp_path, num_workers=1, progress=False))
    assert first == second and len(first) == 9


def test_a_failing_case_leaves_nothing_behind(mri, tmp_path):
    raw, plans, fp_path = mri
    broken = tmp_path / "raw"
    import shutil

    shutil.copytree(raw, broken)
    (broken / "imagesTr" / "synth_001_0001.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="synth_001"):
        preprocess_dataset(broken, plans, "3d_fullres", out, fp_path, num_workers=1, progress=False)
    assert not (out / plans["configurations"]["3d_fullres"]["data_identifier"]).exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_saved_properties_read_back_as_written(tmp_path):
    """The fast properties writer gives the same JSON values as write_json (numpy values converted)."""
    import json

    from kubeseg.jsonio import to_jsonable
    from kubeseg.preprocessing.preprocess import PreprocessedCase, _save, sample_class_locations

    seg = np.zeros((1, 6, 7, 8), dtype=np.int8)
    seg[0, 2:5, 1:6, 3:7] = 1
    seg[0, 3, 3, 4] = 2
    props = {"spacing": [np.float64(1.5), 1.0, 2.0], "bbox_used_for_cropping": [[np.int64(0), 6]],
             "class_locations": sample_class_locations(seg, [1, 2])}
    _save("c", PreprocessedCase(np.zeros((1, 6, 7, 8), np.float32), seg, props), tmp_path)
    read = json.loads((tmp_path / "c.json").read_text())
    assert read == to_jsonable(props)
    assert len(read["class_locations"]["1"]) == int((seg == 1).sum()) and read["class_locations"]["2"] == [[0, 3, 3, 4]]
