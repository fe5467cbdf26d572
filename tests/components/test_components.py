"""The components are thin typed wrappers around engine functions, and they run under kfp.local."""


import inspect
import json

import pytest

pytest.importorskip("kfp")

import components  # noqa: E402
from components import steps  # noqa: E402

STEPS = ("open_run", "close_run", "fingerprint", "plan", "preprocess", "train", "gather", "cascade_inputs", "select",
         "bundle", "register", "merge_cases", "plan_retraining", "promote", "training_groups", "gather_group")


@pytest.mark.parametrize("name", STEPS)
def test_thin_and_typed(name):
    comp = getattr(components, name)
    func = comp.python_func
    body = [line for line in inspect.getsource(func).split('"""')[-1].splitlines()
            if line.strip() and not line.strip().startswith(("from ", "import ", "#"))]
    assert len(body) <= 20, f"{name} holds logic; move it to the engine"
    assert "kubeseg." in inspect.getsource(func)
    spec = comp.component_spec
    assert spec.implementation.container.image == steps.IMAGE
    assert "pip install" not in " ".join(spec.implementation.container.command)
    assert func.__doc__ and len(func.__doc__) > 40


def test_artifact_types():
    train = components.train.component_spec
    assert train.inputs["preprocessed"].type.startswith("system.Dataset")
    assert train.outputs["model"].type.startswith("system.Model")
    assert train.outputs["metrics"].type.startswith("system.Metrics")
    assert train.inputs["previous_stage"].optional and train.inputs["pretrained"].optional
    assert components.gather.component_spec.inputs["models"].is_artifact_list
    assert components.cascade_inputs.component_spec.outputs["previous_stage"].type.startswith("system.Dataset")
    sel = components.select.component_spec
    assert not sel.inputs["models"].is_artifact_list  # the gathered first wave
    assert sel.inputs["cascade_models"].is_artifact_list and sel.inputs["cascade_models"].optional
    # selection reads the array-free references of the waves, never the preprocessed arrays
    assert "preprocessed" not in sel.inputs and sel.inputs["reference"].type.startswith("system.Dataset")
    assert sel.inputs["cascade_references"].is_artifact_list and sel.inputs["cascade_references"].optional
    assert components.gather.component_spec.inputs["references"].is_artifact_list
    pre = components.preprocess.component_spec
    assert set(pre.outputs) == {"preprocessed", "reference"} and pre.inputs["configuration"].type == "String"
    assert sel.outputs["summary"].type.startswith("system.HTML")
    assert components.plan.component_spec.outputs["summary"].type.startswith("system.Markdown")
    assert components.bundle.component_spec.outputs["bundle"].type.startswith("system.Model")


def test_fingerprint_and_plan_run_locally(tmp_path):
    from kfp import dsl, local

    from tests.pipelines.helpers import tiny_raw

    raw = tiny_raw(tmp_path)

    @dsl.pipeline(name="fingerprint-plan")
    def fp_plan(dataset_uri: str) -> list:
        imp = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        fp = components.fingerprint(raw=imp.output, num_workers=1)
        planned = components.plan(raw=imp.output, fingerprint=fp.outputs["fingerprint"], preset="small",
                                  configurations=["3d_fullres", "2d"], folds=[0, 2])
        return planned.outputs["Output"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               workspace_root=str(tmp_path / "ws"))
    task = fp_plan(dataset_uri=str(raw))
    assert task.output == [{"configuration": "3d_fullres", "fold": 0}, {"configuration": "3d_fullres", "fold": 2},
                           {"configuration": "2d", "fold": 0}, {"configuration": "2d", "fold": 2}]
    run_dir = next((tmp_path / "root").glob("fingerprint-plan-*"))
    # output parameters beside the return value (OutputPath): files in the task folder
    assert json.loads((run_dir / "plan" / "cascade_wave").read_text()) == []
    assert json.loads((run_dir / "plan" / "preprocess_configurations").read_text()) == ["3d_fullres", "2d"]
    plans = json.loads((run_dir / "plan" / "plans").read_text())
    assert plans["plans_name"] == "kubesegSmallPlans"
    assert "| 2d |" in (run_dir / "plan" / "summary").read_text()
    assert json.loads((run_dir / "fingerprint" / "fingerprint").read_text())["spacings"]
