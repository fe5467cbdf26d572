"""Fixtures shared by the pipeline integration tests."""
import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite, local artifacts) on a free port, one per test module."""
    from tests.pipelines.helpers import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as s:
        yield s
