"""The preprocessed-size estimate against the arrays preprocessing really writes."""

from pathlib import Path

from kubeseg.jsonio import read_json
from kubeseg.planning.storage import human_bytes, preprocessed_bytes


def test_estimate_matches_written_arrays(tmp_path):
    from tests.pipelines.helpers import tiny_preprocessed

    pre = tiny_preprocessed(tmp_path, configurations=("2d", "3d_fullres"))
    plans, fp = read_json(pre / "plans.json"), read_json(pre / "dataset_fingerprint.json")
    est = preprocessed_bytes(plans, fp, num_channels=1)
    for conf in ("2d", "3d_fullres"):
        folder: Path = pre / plans["configurations"][conf]["data_identifier"]
        written = sum(p.stat().st_size for p in folder.glob("*.npy"))
        assert abs(est[conf] - written) / written < 0.05, (conf, est[conf], written)
    assert human_bytes(1_500_000) == "1.5 MB" and human_bytes(12) == "12 B"
