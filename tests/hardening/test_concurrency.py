"""Four experiments queued and run two at a time: on the embedded SQLite store, then on a real server.

Each must leave one MLflow run per stage that ran, one registered, loadable version, and no
"database is locked" anywhere in its log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import mlflow_server, repo_params
from tests.isic_standin import serve
from tests.pipeline_project import (
    command_env,
    make_project,
    mlflow_client,
    mlflow_runs,
    model_name,
    run,
    sqlite_uri,
    synthetic_archive,
    wait_for_queue,
)

pytestmark = pytest.mark.slow

EXPERIMENTS = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project after one full `dvc repro`, committed, with the stand-in archive still serving."""
    archive, manifest = synthetic_archive(tmp_path_factory.mktemp("synthetic"), images_per_class=12)
    with serve(archive) as api_url:
        root = make_project(tmp_path_factory.mktemp("project"), api_url, manifest, train={"epochs": 2})
        run(root, "dvc", "repro")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-q", "-m", "first run")
        yield root


def _queue_and_run(project: Path, rates: list[float], env: dict[str, str]) -> pd.DataFrame:
    """Queue one experiment per learning rate, run them two at a time; return their queue status rows."""
    for rate in rates:
        run(project, "dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}", env=env)
    run(project, "dvc", "queue", "start", "-j", "2", env=env)
    status = wait_for_queue(project, env=env)
    rows = [line.split() for line in status.splitlines() if line.strip().endswith(("Success", "Failed"))]
    finished = pd.DataFrame({"name": [row[1] for row in rows], "status": [row[-1] for row in rows]})
    for name in finished["name"]:
        log = run(project, "dvc", "queue", "logs", name, env=env)
        assert "database is locked" not in log, log[-3000:]
    return finished


def _check_store(uri: str, rates: list[float], versions_before: int) -> None:
    client = mlflow_client(uri)
    versions = client.search_model_versions(f"name='{model_name()}'")
    assert len(versions) == versions_before + EXPERIMENTS
    for version in versions:
        mlflow.pyfunc.load_model(f"models:/{model_name()}/{version.version}")
    runs = mlflow_runs(uri)
    ours = runs[runs["params.train.learning_rate"].isin([str(rate) for rate in rates])]
    names = set(ours["tags.DVC_EXP_NAME"])
    assert len(names) == EXPERIMENTS
    for stage in ("train", "evaluate"):
        stage_runs = runs[(runs["tags.stage"] == stage) & runs["tags.DVC_EXP_NAME"].isin(names)]
        assert len(stage_runs) == EXPERIMENTS, stage
        assert (stage_runs["status"] == "FINISHED").all()


def test_four_queued_experiments_on_sqlite(project: Path) -> None:
    default = repo_params()["train"]["learning_rate"]
    rates = [default * factor for factor in (2, 0.5, 3, 0.25)]
    uri = sqlite_uri(project)
    before = len(mlflow_client(uri).search_model_versions(f"name='{model_name()}'"))
    finished = _queue_and_run(project, rates, command_env())
    assert (finished["status"] == "Success").sum() >= EXPERIMENTS, finished
    _check_store(uri, rates, before)


def test_four_queued_experiments_on_a_tracking_server(project: Path, tmp_path: Path) -> None:
    default = repo_params()["train"]["learning_rate"]
    rates = [default * factor for factor in (4, 0.125, 5, 0.2)]  # new values, so DVC cannot reuse runs
    with mlflow_server(tmp_path) as uri:
        finished = _queue_and_run(project, rates, command_env(MLFLOW_TRACKING_URI=uri))
        assert (finished["status"] == "Success").sum() >= EXPERIMENTS, finished
        _check_store(uri, rates, versions_before=0)
