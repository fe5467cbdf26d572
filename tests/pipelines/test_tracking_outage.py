"""Tracking outages do not kill training: a real ``mlflow server`` is stopped after epoch 1 and
started again (same port, same store) after epoch 3 of a real training; the fold finishes, every
epoch's metrics arrive late with their epoch, and the run's tags report the gap. A server that
stays down: the values are logged as lost with a count, registration fails clearly."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("mlflow")

from kubeseg.errors import KubesegError  # noqa: E402
from kubeseg.tracking import MlflowTrainingCallback, client, wait_for_tracking  # noqa: E402
from tests.pipelines.helpers import MlflowServer, free_port, tiny_preprocessed  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def fast_failing_client(monkeypatch):
    """MLflow's client retries a refused call for minutes by default; the sender retries on its own."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


class Outage:
    """Stops the server at the end of epoch ``down`` and starts it again at the end of epoch ``up``."""

    def __init__(self, server: MlflowServer, down: int, up: int):
        self.server, self.down, self.up = server, down, up
        self.epochs_while_down = []

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.down:
            self.server.__exit__()
        elif self.down < epoch < self.up:
            self.epochs_while_down.append(epoch)
        elif epoch == self.up:
            self.server.__enter__()


def test_training_survives_a_stopped_server(tmp_path, fast_failing_client):
    from kubeseg.jsonio import read_json
    from kubeseg.training.schedule import Schedule
    from kubeseg.training.trainer import TrainSettings, train_fold

    pre = tiny_preprocessed(tmp_path)
    with MlflowServer(tmp_path / "mlflow") as server:
        cb = MlflowTrainingCallback(server.uri, experiment="outage", plans=read_json(pre / "plans.json"),
                                    flush_timeout_s=120, max_backoff_s=2)
        outage = Outage(server, down=1, up=4)
        fold = train_fold(pre, pre / "plans.json", "2d", 0, tmp_path / "model",
                          TrainSettings(device="cpu", schedule=Schedule(6, 4, 1, "test"), num_workers=0,
                                        torch_threads=1, callbacks=[cb, outage], validation_mirroring=False,
                                        progress_bar=False, log_to_console=False))
        assert (fold / "checkpoint_final.pth").is_file() and outage.epochs_while_down == [2, 3]
        r = cb.report
        assert r["complete"] and r["lost_metrics"] == 0 and r["failed_calls"] >= 1 and r["outage_seconds"] > 0
        c = client(server.uri)
        run = c.get_run(cb.run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(cb.run_id, "train_loss")] == list(range(6))
        assert int(run.data.tags["kubeseg.tracking.failed_calls"]) == r["failed_calls"]
        assert float(run.data.tags["kubeseg.tracking.outage_seconds"]) > 0
        assert run.data.tags["kubeseg.tracking.lost_metrics"] == "0"
        assert "val_fg_dice" in run.data.metrics


def test_a_server_that_stays_down(tmp_path, fast_failing_client, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cb = MlflowTrainingCallback(uri, experiment="down", flush_timeout_s=2, max_pending=10)
    started = time.perf_counter()
    cb.on_train_start({"fold": 0, "configuration": "2d"})
    for epoch in range(4):  # 4 x 4 values, at most 10 wait: 2 batches dropped while training
        cb.on_epoch_end(epoch, {"train_loss": 1.0, "val_loss": 1.0, "lr": 0.01, "mean_fg_dice": 0.5})
    assert cb.sender.lost_metrics == 8 and time.perf_counter() - started < 1  # training did not wait
    cb.on_train_end({"fold": 0, "fold_dir": str(tmp_path)})
    assert cb.report["complete"] is False and cb.report["lost_metrics"] == 16 and cb.run_id is None
    assert "16 metric value(s) lost" in caplog.text

    slept = []
    with pytest.raises(KubesegError, match=rf"{uri} unreachable for .* the model was not registered"):
        wait_for_tracking(uri, timeout_s=30, sleep=slept.append, clock=lambda: sum(slept))
    assert slept == [2.0, 4.0, 8.0, 16.0]  # backoff, then a clear failure
