"""A training task killed mid-epoch resumes from the checkpoint it stored in S3 (a real moto
server), the way a retried pod with an empty output folder does on a cluster: the train component
runs through kfp.local (importer → train) in a process group that is SIGKILLed while training,
then the same pipeline runs again with a fresh pipeline root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("kfp")
pytest.importorskip("boto3")

from tests.pipelines.helpers import MotoS3, tiny_preprocessed  # noqa: E402

pytestmark = pytest.mark.integration
EPOCHS = 8
SCRIPT = textwrap.dedent("""
    import sys
    from kfp import dsl, local
    from components import steps

    pre_uri, store, root = sys.argv[1:4]

    @dsl.pipeline(name="resume")
    def resume(pre_uri: str, checkpoint_uri: str):
        pre = dsl.importer(artifact_uri=pre_uri, artifact_class=dsl.Dataset, reimport=False)
        steps.train(preprocessed=pre.output, configuration="2d", fold=0, schedule="%dx8x1", device="cpu",
                    num_workers=0, torch_threads=1, mlflow_uri="", experiment="x", validation_tta=False,
                    checkpoint_uri=checkpoint_uri, checkpoint_interval_s=0.0)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    resume(pre_uri=pre_uri, checkpoint_uri=store)
""" % EPOCHS)


def _state(s3: MotoS3) -> tuple[str, dict] | tuple[None, None]:
    keys = [k for k in s3.keys("ckpt/") if k.endswith("checkpoint_state.json")]
    if not keys:
        return None, None
    body = s3.client().get_object(Bucket=s3.bucket, Key=keys[0])["Body"].read()
    return keys[0], json.loads(body)


def _logs(root: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(root.rglob("fold_0/training_log_*.txt")))


def test_killed_training_task_resumes_from_s3(tmp_path):
    pre = tiny_preprocessed(tmp_path)
    script = tmp_path / "resume_pipeline.py"
    script.write_text(SCRIPT)
    with MotoS3(tmp_path / "s3") as s3:
        env = {**os.environ, **s3.env, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
               "OMP_NUM_THREADS": "1"}
        store = f"s3://{s3.bucket}/ckpt"
        cmd = [sys.executable, str(script), str(pre), store]
        first_root = tmp_path / "attempt1"
        with open(tmp_path / "attempt1.log", "w") as log:
            proc = subprocess.Popen(cmd + [str(first_root)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = time.time() + 240
                state = None
                while time.time() < deadline and proc.poll() is None:
                    _, state = _state(s3)
                    if state and state["epoch"] >= 2:
                        break
                    time.sleep(0.2)
                assert state and state["epoch"] >= 2, (tmp_path / "attempt1.log").read_text()[-3000:]
                time.sleep(0.3)  # into the next epoch
            finally:
                os.killpg(proc.pid, signal.SIGKILL)  # the pod is gone: no handler, no cleanup
                proc.wait()
        key, state = _state(s3)
        stored = state["epoch"]
        assert not state["finished"] and 2 <= stored < EPOCHS
        assert "training done" not in _logs(first_root)
        assert not list(first_root.rglob("checkpoint_final.pth"))

        second_root = tmp_path / "attempt2"  # a retried pod: an empty output folder
        done = subprocess.run(cmd + [str(second_root)], env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        log2 = _logs(second_root)
        assert f"resuming from checkpoint_latest.pth at epoch {stored}" in log2
        assert f"epoch {stored - 1} " not in log2 and f"epoch {EPOCHS - 1} " in log2  # only the rest was trained
        fold = next(second_root.rglob("fold_0/checkpoint_final.pth")).parent
        metrics = json.loads((fold / "metrics.json").read_text())
        assert [e["epoch"] for e in metrics["epochs"]] == list(range(EPOCHS))  # the restored epochs' curve came along
        _, final_state = _state(s3)
        prefix = key.rsplit("/", 1)[0]
        assert final_state["finished"] and final_state["epoch"] == EPOCHS
        assert f"{prefix}/checkpoint_final.pth" in s3.keys(prefix) and f"{prefix}/checkpoint_latest.pth" not in s3.keys(prefix)
        assert prefix.endswith("/2d/fold_0")
