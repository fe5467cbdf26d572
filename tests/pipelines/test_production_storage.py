"""The chart's production storage, for real: ``mlflow server`` on PostgreSQL (Debian's binaries,
a throwaway cluster) with its artifacts in S3 (a real moto server); the training pipeline
(kfp.local, tiny schedule) registers into it and the service's model holder downloads the
version from it. The pipeline tasks and the service hold no S3 credentials: MLflow proxies the
artifacts, as in the chart."""

from __future__ import annotations

import pytest

pytest.importorskip("kfp")
pytest.importorskip("mlflow")
pytest.importorskip("boto3")
pytest.importorskip("psycopg2")

from tests.pipelines.helpers import MlflowServer, MotoS3, Postgres, tiny_raw  # noqa: E402

pytestmark = pytest.mark.integration
NAME = "pg-s3-model"


def test_pipeline_registers_into_postgres_and_s3_and_the_service_downloads(tmp_path, monkeypatch):
    if Postgres.bindir() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)")
    from pipelines.run import run_local
    from services.model_source import ModelHolder
    from services.settings import ServiceSettings

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)  # only the server holds S3 credentials
    with MotoS3(tmp_path / "s3") as s3, Postgres() as pg:
        backend = pg.uri("mlflow")
        with MlflowServer(tmp_path / "mlflow", backend=backend, artifacts=f"s3://{s3.bucket}/mlartifacts",
                          env=s3.env) as server:
            raw = tiny_raw(tmp_path)
            args = {"dataset_uri": str(raw), "configurations": ["2d"], "folds": [0], "schedule": "1x2x1",
                    "planner_preset": "small", "device": "cpu", "num_workers": 0, "torch_threads": 1,
                    "validation_tta": False, "mlflow_uri": server.uri, "experiment": "pg-s3", "model_name": NAME}
            result = run_local(args, tmp_path / "pipeline_root", parallelism=1)
            assert result["version"] == "1"

            # the registry lives in PostgreSQL, the bundle in the bucket
            assert pg.query("mlflow", "SELECT name, version FROM model_versions") == [(NAME, 1)]
            runs = pg.query("mlflow", "SELECT count(*) FROM runs")[0][0]
            assert runs >= 3  # pipeline, fold, registration
            keys = s3.keys("mlartifacts/")
            assert any(k.endswith("/artifacts/bundle.sha256.json") for k in keys)
            assert any(k.endswith("/artifacts/bundle/selection.json") for k in keys)
            assert any(k.endswith("/progress.png") for k in keys)  # the fold run's curves

            swaps = []
            holder = ModelHolder(ServiceSettings(model_name=NAME, model_alias="challenger", tracking_uri=server.uri,
                                                 device="cpu", registry_poll_seconds=0,
                                                 cache_dir=tmp_path / "service-cache"),
                                 on_swap=lambda old, new: swaps.append(new.version), on_failure=swaps.append)
            assert holder.refresh() and swaps == ["1"]
            served = holder.current
            assert served.version == "1" and [p.model.configuration for p in served.predictors] == ["2d"]
            assert (served.bundle / "selection.json").is_file()
