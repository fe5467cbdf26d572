"""Merging new labelled cases into a copy of a raw dataset (kubeseg.dataset_merge)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from kubeseg.cli import main
from kubeseg.dataset_check import check_dataset
from kubeseg.dataset_merge import RECORD, dataset_name, merge_cases
from kubeseg.errors import DatasetError, KubesegError
from tests.pipelines.helpers import new_cases, tiny_raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    raw = tiny_raw(root, cases=3, test_cases=1)
    return {"root": root, "raw": raw, "new": new_cases(root), "loose": new_cases(root, loose=True, prefix="loose")}


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["new", "loose"])
def test_merge_nnunet_folder_and_loose_files(data, tmp_path, kind):
    before = _snapshot(data["raw"])
    res = merge_cases(data["raw"], data[kind], tmp_path / "merged")
    out = tmp_path / "merged"
    assert res.dataset == out and res.num_training == 5 and res.added == (f"{kind}_000", f"{kind}_001")
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 5 and ds["labels"] == json.loads((data["raw"] / "dataset.json").read_text())["labels"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [
        f"{kind}_000.nii.gz", f"{kind}_001.nii.gz", "synth_000.nii.gz", "synth_001.nii.gz", "synth_002.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["synth_003_0000.nii.gz"]  # the holdout stays
    assert check_dataset(out, 1, progress=False) == []
    record = json.loads((out / RECORD).read_text())
    assert record["added"] == list(res.added) and record["dataset_name"] == "Dataset001_SynthCT"
    assert dataset_name(out) == "Dataset001_SynthCT"
    assert _snapshot(data["raw"]) == before  # the original is untouched
    # a merged dataset can be extended again; the original name and the history carry on
    more = new_cases(tmp_path, cases=1, prefix="more", seed=9)
    again = merge_cases(out, more, tmp_path / "merged2")
    assert again.num_training == 6 and dataset_name(tmp_path / "merged2") == "Dataset001_SynthCT"
    assert len(json.loads((tmp_path / "merged2" / RECORD).read_text())["history"]) == 2


def test_name_clashes_are_refused(data, tmp_path):
    clash = tmp_path / "clash"
    shutil.copytree(data["new"], clash)
    for f in sorted(clash.rglob("new_000*")):  # a training case's name and the test case's name
        f.rename(f.with_name(f.name.replace("new_000", "synth_001")))
    for f in sorted(clash.rglob("new_001*")):
        f.rename(f.with_name(f.name.replace("new_001", "synth_003")))
    with pytest.raises(KubesegError, match=r"2 new case name\(s\) already exist.*synth_001 is a training case"
                                           r".*synth_003 is a test case"):
        merge_cases(data["raw"], clash, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and [p.name for p in tmp_path.iterdir()] == ["clash"]


def test_broken_new_cases_are_refused_naming_the_file(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data["new"], bad)
    label = bad / "labelsTr" / "new_001.nii.gz"
    img = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 7  # a label value dataset.json does not name
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(label))
    (bad / "imagesTr" / "new_000_0000.nii.gz").unlink()
    with pytest.raises(DatasetError) as e:
        merge_cases(data["raw"], bad, tmp_path / "merged")
    assert "case new_000" in str(e.value) and "channel 0 (CT) is missing" in str(e.value)
    (bad / "labelsTr" / "new_000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case new_001 .*new_001.nii.gz: label values \[7\] are not in"):
        merge_cases(data["raw"], bad, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no staging folder left behind


def test_refusals(data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data["new"], other)
    ds = json.loads((data["raw"] / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**ds, "labels": {"background": 0, "organ": 1}}))
    with pytest.raises(DatasetError, match="labels .* differ from the dataset's"):
        merge_cases(data["raw"], other, tmp_path / "m")
    with pytest.raises(KubesegError, match="must be a new folder"):
        merge_cases(data["raw"], data["new"], data["raw"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(KubesegError, match="exists and is not empty"):
        merge_cases(data["raw"], data["new"], tmp_path / "full")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KubesegError, match="holds no labelled case"):
        merge_cases(data["raw"], tmp_path / "empty", tmp_path / "m")


def test_cli(data, tmp_path, capsys):
    assert main(["dataset", "merge", str(data["raw"]), str(data["new"]), "-o", str(tmp_path / "m")]) == 0
    assert "2 new case(s)" in capsys.readouterr().out
    assert main(["dataset", "merge", str(data["raw"]), str(data["new"]), "-o", str(tmp_path / "m")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["dataset", "merge", str(data["raw"]), str(data["new"]), "-o", str(tmp_path / "m"),
                 "--overwrite"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m" / "labelsTr" / "new_000.nii.gz"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(data["new"] / "labelsTr" / "new_000.nii.gz"))))
    assert os.stat(tmp_path / "m" / "labelsTr" / "new_000.nii.gz").st_ino != os.stat(
        data["new"] / "labelsTr" / "new_000.nii.gz").st_ino  # new cases are copied, never linked
