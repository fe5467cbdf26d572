"""kfp.local with caching on: a dataset changed in place under the same URI is read again by the
steps that depend on it (its content hash is their input), an unchanged one is served from the
cache. The pipeline is the training pipeline's own data steps (``pipelines.training.data_steps``)."""

import json

import pytest

pytest.importorskip("kfp")

from pipelines.run import task_dir  # noqa: E402
from tests.pipelines.helpers import tiny_raw  # noqa: E402

pytestmark = pytest.mark.integration
STEPS = ("fingerprint", "plan", "preprocess")


def _run(root, raw) -> dict:
    from kfp import dsl, local

    from pipelines.training import RunKnobs, data_steps, preprocess_step

    @dsl.pipeline(name="data-steps")
    def data(dataset_uri: str):
        imported = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
        knobs = RunKnobs(*([None] * 14))
        knobs.num_workers = 1
        digest, fp, planned = data_steps(imported.output, "small", ["2d"], [0], knobs)
        preprocess_step(imported.output, planned.outputs["plans"], fp.outputs["fingerprint"], "2d", 1, digest.output)

    before = {p.name for p in root.iterdir()} if root.exists() else set()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=True)
    data(dataset_uri=str(raw))
    run_dir = next(p for p in root.iterdir() if p.name not in before and p.name.startswith("data-steps"))
    ran = {s: task_dir(run_dir, s) is not None for s in STEPS}
    digest = json.loads((task_dir(run_dir, "dataset-hash") / "executor_output.json").read_text())
    return {"ran": ran, "hash": digest["parameterValues"]["Output"], "run_dir": run_dir}


def test_dataset_changed_in_place_is_not_served_from_cache(tmp_path):
    import SimpleITK as sitk

    raw = tiny_raw(tmp_path)
    root = tmp_path / "pipeline_root"
    first = _run(root, raw)
    assert all(first["ran"].values())
    pre = task_dir(first["run_dir"], "preprocess") / "preprocessed"
    assert json.loads((pre / "dataset_hash.json").read_text())["dataset_hash"] == first["hash"]

    same = _run(root, raw)  # nothing changed: all three from the cache
    assert same["hash"] == first["hash"] and not any(same["ran"].values())

    label = sorted((raw / "labelsTr").iterdir())[0]  # fix one label in place: same URI, same file names
    img = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(img)
    arr[arr.shape[0] // 2, :4, :4] = 1
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(img)
    sitk.WriteImage(fixed, str(label))
    changed = _run(root, raw)
    assert changed["hash"] != first["hash"] and all(changed["ran"].values()), changed
