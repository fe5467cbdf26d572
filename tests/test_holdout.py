"""The holdout gate's pure parts (kubeseg.holdout): the per-label decision, the name format and the
labelled-set layout. Registration, scoring and the gate itself run against a real MLflow server in
tests/pipelines/test_local_retraining.py."""
import pytest

from kubeseg.errors import KubesegError
from kubeseg.holdout import Scores, compare_scores, holdout_name, parse_ref, stage

NAMES = {1: "body", 2: "organ", 3: "lesion"}


def test_each_failing_label_is_named_with_both_scores():
    champ = Scores(per_label={"1": 0.95, "2": 0.80, "3": 0.40})
    good = Scores(per_label={"1": 0.94, "2": 0.81, "3": None})  # lesion in no reference and not predicted
    assert compare_scores(good, champ, NAMES, floor=0.1, tolerance=0.02) == []
    worse = Scores(per_label={"1": 0.96, "2": 0.70, "3": 0.05})
    problems = compare_scores(worse, champ, NAMES, floor=0.1, tolerance=0.02)
    assert problems == ["label 'organ' (2): holdout Dice 0.700 is below the champion's 0.800 by more than the "
                        "tolerance 0.02",
                        "label 'lesion' (3): holdout Dice 0.050 under the floor 0.1",
                        "label 'lesion' (3): holdout Dice 0.050 is below the champion's 0.400 by more than the "
                        "tolerance 0.02"]
    # no champion yet: the floors alone; a broken prediction fails whatever the Dice
    assert compare_scores(worse, None, NAMES, 0.1, 0.02) == [problems[1]]
    broken = Scores(per_label={"1": 0.99}, problems=["c1: unknown label(s) [7] predicted"])
    assert compare_scores(broken, champ, NAMES, 0.0, 1.0) == ["challenger: c1: unknown label(s) [7] predicted"]


def test_names_and_refs():
    assert holdout_name("liver") == "liver-holdout"
    assert parse_ref("", "liver") == ("liver-holdout", "current") == parse_ref("auto", "liver")
    assert parse_ref("other@3", "liver") == ("other", "3") and parse_ref("other", "liver") == ("other", "current")


def test_stage_pairs_images_and_references(tmp_path):
    src = tmp_path / "set"
    for sub, files in (("imagesTs", ["a_0000.nii.gz", "b_0000.nii.gz"]), ("labelsTs", ["a.nii.gz", "b.nii.gz"])):
        (src / sub).mkdir(parents=True)
        for f in files:
            (src / sub / f).write_text(f)
    out, labels, cases = stage(src, tmp_path / "staged")
    assert cases == 2 and labels == {} and sorted(p.name for p in (out / "labels").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    (src / "labelsTs" / "b.nii.gz").unlink()
    with pytest.raises(KubesegError, match=r"images without a reference .*\['b'\]"):
        stage(src, tmp_path / "again")
    with pytest.raises(KubesegError, match="needs images/"):
        stage(tmp_path / "staged" / "images", tmp_path / "x")
