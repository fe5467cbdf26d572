import json

import numpy as np
import pytest

from kubeseg.dataset import list_training_cases, load_dataset_json
from kubeseg.fingerprint import (CaseFingerprint, dataset_intensity_statistics, extract_fingerprint, fingerprint_case,
                                 read_fingerprint, write_fingerprint)
from kubeseg.synth import SynthSettings, synthesize


def case(values):
    v = np.asarray(values, np.float32)
    return CaseFingerprint("c", [1, 1, 1], [1, 1, 1], [1, 1, 1], v.size, [], [v])


def test_every_case_weighs_the_same_whatever_its_foreground_size():
    small, large = case([10.0] * 10), case([0.0] * 1000)
    stats = dataset_intensity_statistics([small, large], 1)["0"]
    assert stats["mean"] == pytest.approx(5.0)
    assert stats["std"] == pytest.approx(5.0)
    assert stats["min"] == 0.0 and stats["max"] == 10.0


def test_percentiles_of_one_case_match_numpy_closely():
    values = np.random.default_rng(0).normal(size=20000)
    stats = dataset_intensity_statistics([case(values)], 1)["0"]
    lo, med, hi = np.percentile(values.astype(np.float32), (0.5, 50, 99.5))
    assert stats["percentile_00_5"] == pytest.approx(lo, abs=0.01)
    assert stats["median"] == pytest.approx(med, abs=0.01)
    assert stats["percentile_99_5"] == pytest.approx(hi, abs=0.01)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("ct") / "raw",
                      SynthSettings(kind="ct", num_cases=3, shape=(16, 40, 40), seed=7))


def test_sampling_is_capped_and_deterministic(ct):
    spec = load_dataset_json(ct)
    c = list_training_cases(ct, spec, [])[0]
    a, b = fingerprint_case(c, spec, max_samples=500), fingerprint_case(c, spec, max_samples=500)
    assert a.num_foreground_voxels > 500 and a.samples[0].size == 500
    assert np.array_equal(a.samples[0], b.samples[0])


def test_fingerprint_file_is_nnunet_schema_with_cases_beside_it(ct, tmp_path):
    fp = extract_fingerprint(ct, num_workers=1, progress=False)
    path = write_fingerprint(fp, tmp_path / "fingerprint.json")
    d = json.loads(path.read_text())
    assert set(d) == {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                      "median_relative_size_after_cropping"}
    assert len(d["spacings"]) == 3 and all(len(s) == 3 for s in d["spacings"])
    stats = d["foreground_intensity_properties_per_channel"]["0"]
    assert stats["percentile_00_5"] < stats["median"] < stats["percentile_99_5"]
    assert -200 < stats["median"] < 300  # HU of soft tissue, organ, lesion and spine
    again = read_fingerprint(path)
    assert set(again.cases) == {"synth_000", "synth_001", "synth_002"}
    assert again.spacings == fp.spacings
