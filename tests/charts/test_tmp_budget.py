"""The chart's /tmp emptyDir holds what the service's limits let requests write there at once
(services.settings.tmp_bytes_needed: concurrency x (2 x request + zip budget + 5 x voxels) + 1 GiB)."""
from __future__ import annotations

import os
import re
from unittest import mock

import pytest

pytest.importorskip("helm_python")

from tests.charts.helpers import GPU_VALUES, env_of, load_values, manifests, one, render  # noqa: E402

UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}


def _quantity(q) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * UNITS[m.group(2)]


@pytest.mark.parametrize("values", [lambda: {}, lambda: load_values(GPU_VALUES),
                                    lambda: {"segmentation": {"settings": {"maxConcurrency": 4}}}])
def test_tmp_size_limit_covers_the_request_budget(values):
    from services.settings import ServiceSettings, tmp_bytes_needed

    docs = manifests(render(values()))
    deployment = one(docs, "Deployment", "kubeseg-segmentation")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "segmentation") if any(
        c["name"] == "segmentation" for c in pod["containers"]) else pod["containers"][0]
    env = {k: str(v) for k, v in env_of(container).items() if isinstance(v, (str, int, float))}
    # the Secret files auth and signatures name are mounted in the pod only (test_chart checks both
    # are on by default); the request and /tmp budget is what this test reads
    env.update(KUBESEG_AUTH="disabled", KUBESEG_MODEL_SIGNATURES="disabled")
    with mock.patch.dict(os.environ, {**env, "KUBESEG_MODEL_NAME": "m"}, clear=True):
        settings = ServiceSettings.from_env()  # the chart's values parse (no 2.1e+09 renderings)
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert _quantity(tmp["emptyDir"]["sizeLimit"]) >= tmp_bytes_needed(settings), (
        tmp["emptyDir"]["sizeLimit"], tmp_bytes_needed(settings) / 2 ** 30)
    assert settings.max_expanded_bytes <= 8 * settings.max_request_bytes
