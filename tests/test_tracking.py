"""MLflow plumbing: the embedded SQLite default, the team server override, run tags and params."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException

from skin_lesion.files import repo_root
from skin_lesion.runner import mlflow_failure, run_cli
from skin_lesion.tracking import (
    configure_mlflow,
    flatten_params,
    loggable_metrics,
    stage_run,
    tracking_uri,
    upstream_data_hashes,
)
from tests.conftest import MLFLOW_URI_VARIABLES, as_params, mlflow_pointed_at, small_params


def test_default_store_is_sqlite_at_dvc_root(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(in_tmp / "parent"))
    assert repo_root() == in_tmp / "parent"
    assert tracking_uri() == f"sqlite:///{in_tmp / 'parent' / 'mlflow.db'}"


def test_team_server_overrides_default(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_params_uses_dotted_keys() -> None:
    nested = {"train": {"epochs": 3, "opt": {"lr": 0.1}}, "base": {"classes": ["a"]}}
    assert flatten_params(nested) == {"train.epochs": 3, "train.opt.lr": 0.1, "base.classes": ["a"]}


def test_stage_run_tags_and_logs_params(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        check=True,
    )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    params = as_params(small_params())

    with stage_run("split", params.base, params.split) as run:
        run_id = run.info.run_id

    logged = mlflow.get_run(run_id)
    assert logged.data.tags["stage"] == "split"
    assert logged.data.tags["DVC_EXP_NAME"] == "brisk-exp"
    assert logged.data.tags["DVC_EXP_BASELINE_REV"] == "abc123"
    assert logged.data.tags["mlflow.source.git.commit"] == commit.strip()
    assert logged.data.params["split.val_fraction"] == str(params.split.val_fraction)
    assert logged.data.params["base.seed"] == str(params.base.seed)
    experiment = mlflow.get_experiment(logged.info.experiment_id)
    assert experiment.name == params.base.experiment_name
    assert experiment.artifact_location == (in_tmp / "mlartifacts").as_uri()


def test_failed_stage_marks_run_failed(in_tmp: Path) -> None:
    params = as_params(small_params())
    run_ids = []

    def fail_inside_run() -> None:
        with stage_run("train", params.base, params.train) as run:
            run_ids.append(run.info.run_id)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail_inside_run()
    assert mlflow.get_run(run_ids[0]).info.status == "FAILED"


def test_experiment_is_marked_as_model_training_for_the_ui(in_tmp: Path) -> None:
    params = as_params(small_params())
    # An experiment made before the tag existed gets it on the next stage run.
    configure_mlflow()
    mlflow.create_experiment(params.base.experiment_name, artifact_location=(in_tmp / "a").as_uri())
    with stage_run("split", params.base, params.split) as run:
        experiment_id = run.info.experiment_id
    tags = mlflow.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_left_running_by_a_killed_stage_is_marked_killed(in_tmp: Path) -> None:
    params = as_params(small_params())
    dead = subprocess.Popen(["true"])
    dead.wait()
    configure_mlflow()
    with stage_run("train", params.base, params.train) as run:
        killed_id = run.info.run_id
    client = mlflow.MlflowClient()
    # As a kill -9 leaves it: still RUNNING, from a process that is gone.
    client.update_run(killed_id, status="RUNNING")
    client.set_tag(killed_id, "pid", str(dead.pid))
    with stage_run("train", params.base, params.train) as run:
        live_id = run.info.run_id
        assert client.get_run(live_id).info.status == "RUNNING"
    assert client.get_run(killed_id).info.status == "KILLED"
    assert client.get_run(live_id).info.status == "FINISHED"


def test_a_stage_is_tagged_with_the_dvc_hashes_of_the_outputs_before_it(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages:\n  prepare: {cmd: a}\n  fit: {cmd: b}\n  score: {cmd: c}\n")
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {"outs": [{"path": "data/split", "hash": "md5", "md5": "aaa.dir"}]},
            "fit": {"outs": [{"path": "models/m.keras", "hash": "md5", "md5": "bbb"}]},
            "score": {"outs": [{"path": "metrics/s.json", "hash": "md5", "md5": "ccc"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert upstream_data_hashes("fit", tmp_path) == {"data/split": "aaa.dir"}
    assert upstream_data_hashes("score", tmp_path) == {"data/split": "aaa.dir", "models/m.keras": "bbb"}
    assert upstream_data_hashes("prepare", tmp_path) == {}
    (tmp_path / "dvc.lock").unlink()
    assert upstream_data_hashes("fit", tmp_path) == {}  # a first run has no lock yet


def test_an_mlflow_failure_during_a_stage_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = "http://user:secret@127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setattr("skin_lesion.runner.check_tracking_server", lambda: None)  # it was up at the start

    def stage() -> None:  # the server went away while the stage was logging
        raise MlflowException(f"API request to {server}/api/2.0/mlflow/runs/log-batch failed\nmore detail")

    assert run_cli(stage) == 1
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert errors == [
        "MLflow at http://user:***@127.0.0.1:9 failed:"
        " API request to http://user:***@127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed"
    ]


def test_an_artifact_store_failure_says_what_failed() -> None:
    endpoint = "http://127.0.0.1:9/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.keras"
    error = MlflowException(f"API request to {endpoint} failed with exception too many 500 error responses")
    assert mlflow_failure(error).endswith(
        "(the server could not store an artifact: is its object store up, with its bucket?)"
    )
    assert "could not store" not in mlflow_failure(MlflowException("API request to /runs/log-batch failed"))


def test_a_failure_while_ending_the_failed_run_does_not_hide_the_cause(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("skin_lesion.runner.check_tracking_server", lambda: None)
    endpoint = "http://127.0.0.1:9/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/plots/roc.csv"

    def stage() -> None:
        try:
            raise MlflowException(f"API request to {endpoint} failed with exception 500 error responses")
        except MlflowException as err:  # as mlflow.start_run's exit ends the run on a broken connection
            try:
                raise ConnectionResetError(104, "Connection reset by peer") from err
            except ConnectionResetError as reset:
                raise MlflowException(
                    "API request to http://127.0.0.1:9/api/2.0/mlflow/runs/get failed"
                ) from reset

    assert run_cli(stage) == 1
    (error,) = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert "mlflow-artifacts" in error
    assert error.endswith(
        "(the server could not store an artifact: is its object store up, with its bucket?)"
    )


def test_a_tensorflow_warning_in_a_stage_is_printed_once(in_tmp: Path) -> None:
    # As in a stage: TensorFlow is imported before run_cli sets logging up.
    stage = (
        "import tensorflow\n"
        "from skin_lesion.runner import run_cli\n"
        "run_cli(lambda: tensorflow.get_logger().warning('tracing is expensive'))\n"
    )
    result = subprocess.run([sys.executable, "-c", stage], check=True, capture_output=True, text=True)
    assert result.stderr.count("tracing is expensive") == 1
    assert "WARNING tensorflow: tracing is expensive" in result.stderr  # in the stages' own format


def _mlflow_uris() -> tuple[str, str, dict[str, str | None]]:
    variables = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    return mlflow.get_tracking_uri(), mlflow.get_registry_uri(), variables


def test_mlflow_is_pointed_back_where_it_was_after_a_block_of_a_test(tmp_path: Path) -> None:
    before = _mlflow_uris()
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with mlflow_pointed_at(elsewhere):
        assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == elsewhere
        mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'moved.db'}")  # as code under test may
    assert _mlflow_uris() == before


def test_loggable_metrics_are_the_numbers_of_a_report_not_its_flags() -> None:
    report = {
        "melanoma": {"auc": 0.9, "images": 12},
        "external": {"isic2017": {"chose_recipe": True}},
        "name": "x",
    }
    assert loggable_metrics(report) == {"melanoma.auc": 0.9, "melanoma.images": 12}
