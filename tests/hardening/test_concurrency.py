"""Queued experiments run side by side: on the embedded SQLite store, then on a team's stack.

Each must leave one MLflow run per stage that ran, one registered, loadable version, and no
"database is locked" anywhere in its log. The team's stack (scripts/team_stack.py) is MLflow's server
on PostgreSQL with artifacts proxied to an S3-compatible store, which also holds the DVC remote. Its
queue is the one queue of this module's team tests: its server is killed while two experiments run,
restarted, and the two rerun; the reruns' versions are what promotion, serving and a teammate use.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus

from scripts.team_stack import (
    ARTIFACT_BUCKET,
    DVC_BUCKET,
    PG_BIN,
    S3_KEY,
    S3_SECRET,
    Stack,
    running_stack,
    s3_client,
    start_mlflow,
    stop_server,
)
from tests.conftest import free_port, http_request, repo_params, run_skin_lesion, running_server
from tests.pipeline_project import (
    command_env,
    make_offline_project,
    mlflow_client,
    mlflow_runs,
    model_name,
    readme_comparison,
    run,
    sqlite_uri,
    wait_for_queue,
)

pytestmark = pytest.mark.slow

EXPERIMENTS = 2  # queued at once and run side by side (`dvc queue start -j 2`)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default recipe set up offline as the README says (a DVC-tracked local dataset and weights
    file), after one full `dvc repro`, committed: queued experiments must find both in their copy."""
    root = make_offline_project(tmp_path_factory.mktemp("project"), images_per_class=12)
    run(root, "dvc", "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "first run")
    return root


def _outcomes(status: str) -> dict[str, str]:
    """Each finished experiment's name and outcome (Success or Failed) in `dvc queue status` output."""
    rows = [line.split() for line in status.splitlines() if line.strip().endswith(("Success", "Failed"))]
    return {row[1]: row[-1] for row in rows}


def _start_queue(project: Path, env: dict[str, str]) -> None:
    """`dvc queue start -j 2`, returning once the workers are started (follow with wait_for_queue).

    Not `run`: its captured output would wait for the workers, which inherit the pipes, to exit.
    """
    command = ["dvc", "queue", "start", "-j", "2"]
    subprocess.run(
        command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )


def _queue_and_run(project: Path, strengths: list[float], env: dict[str, str]) -> pd.DataFrame:
    """Queue one experiment per probe strength, run them two at a time; return their queue status rows."""
    for strength in strengths:
        run(project, "dvc", "exp", "run", "--queue", "-S", f"train.probe_c={strength}", env=env)
    _start_queue(project, env)
    outcomes = _outcomes(wait_for_queue(project, env=env))
    finished = pd.DataFrame({"name": list(outcomes), "status": list(outcomes.values())})
    for name in finished["name"]:
        log = run(project, "dvc", "queue", "logs", name, env=env)
        assert "database is locked" not in log, log[-3000:]
    # Each is in the comparison table, with its metrics (the README's `dvc exp show`).
    table = json.loads(run(project, "dvc", "exp", "show", "--json", env=env))
    assert set(finished["name"]) <= _experiment_names(table), table
    return finished


def _experiment_names(table: list[dict]) -> set[str]:
    """The names of the experiments in `dvc exp show --json` output."""
    return {exp["name"] for commit in table for exp in commit.get("experiments") or [] if exp.get("name")}


def _check_store(uri: str, names: set[str], versions_before: int) -> None:
    """One loadable version per experiment, and its train and evaluate runs finished."""
    assert len(names) == EXPERIMENTS, names
    client = mlflow_client(uri)
    versions = client.search_model_versions(f"name='{model_name()}'")
    assert len(versions) == versions_before + EXPERIMENTS
    for version in versions:
        mlflow.pyfunc.load_model(f"models:/{model_name()}/{version.version}")
    runs = mlflow_runs(uri)
    for stage in ("train", "evaluate"):
        stage_runs = runs[(runs["tags.stage"] == stage) & runs["tags.DVC_EXP_NAME"].isin(names)]
        assert len(stage_runs) == EXPERIMENTS, stage
        assert (stage_runs["status"] == "FINISHED").all()


def test_queued_experiments_side_by_side_on_sqlite(project: Path) -> None:
    default = repo_params()["train"]["probe_c"]
    strengths = [default * factor for factor in (2, 0.5)]
    uri = sqlite_uri(project)
    before = len(mlflow_client(uri).search_model_versions(f"name='{model_name()}'"))
    finished = _queue_and_run(project, strengths, command_env())
    assert len(finished) == EXPERIMENTS, finished
    assert (finished["status"] == "Success").all(), finished
    _check_store(uri, set(finished["name"]), before)
    # The README's comparison fits 120 columns here too, with a DVC-tracked dataset and weights file.
    compared = readme_comparison(project)
    assert all(f"[{name}]" in compared for name in finished["name"]), compared
    assert "train.probe_c" in compared


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL, the S3 stand-in and MLflow's server on 127.0.0.1, as scripts/team_stack.py starts them."""
    with running_stack(tmp_path_factory.mktemp("team")) as stack:
        yield stack


def _bucket_keys(stack: Stack, bucket: str) -> list[str]:
    pages = s3_client(stack.s3_endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@dataclasses.dataclass(frozen=True)
class KilledQueue:
    """Two experiments queued on the team's stack, its MLflow server killed while they ran, then rerun."""

    were_logging: set[str]  # the experiments whose train stage was logging when the server died
    failed_logs: dict[str, str]  # each failed experiment's `dvc queue logs`
    logged_before: set[str]  # the run ids on the server just before the kill
    reruns: dict[str, str]  # the reruns' names and outcomes


def _running_trains(uri: str, experiments: list[str]) -> set[str]:
    """The experiments among `experiments` whose train stage is logging to the server now."""
    client = mlflow_client(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.stage = 'train' and attributes.status = 'RUNNING'",
    )
    return {run.data.tags.get("DVC_EXP_NAME") for run in runs} & set(experiments)


def _kill_server_while_training(
    project: Path, team: Stack, experiments: list[str], env: dict[str, str]
) -> tuple[set[str], set[str]]:
    """Kill the server once one of the queued `experiments` logs its train stage to it, restart it when
    the queue is done; return the experiments that were logging and the run ids the server held."""
    deadline = time.monotonic() + 300
    try:
        while not (were_logging := _running_trains(team.tracking_uri, experiments)):
            assert time.monotonic() < deadline, run(project, "dvc", "queue", "status", env=env)
            time.sleep(0.2)
        logged = set(mlflow_runs(team.tracking_uri)["run_id"])
        stop_server(team, "mlflow")
        wait_for_queue(project, env=env)
    finally:
        if "mlflow" not in team.pids:
            team.pids["mlflow"] = start_mlflow(team)
    return were_logging, logged


@pytest.fixture(scope="module")
def killed_queue(project: Path, team: Stack) -> KilledQueue:
    """The team tests' one queue: two experiments, the server killed mid-run and restarted, two reruns."""
    env = _team_env(team)
    default = repo_params()["train"]["probe_c"]
    rates = {f"killed-{n}": str(default * factor) for n, factor in ((1, 7), (2, 9))}  # new: stages must run
    for name, rate in rates.items():
        run(project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.probe_c={rate}", env=env)
    _start_queue(project, env)
    were_logging, logged_before = _kill_server_while_training(project, team, list(rates), env)
    status = run(project, "dvc", "queue", "status", env=env)
    failed = [name for name, outcome in _outcomes(status).items() if name in rates and outcome == "Failed"]
    failed_logs = {name: run(project, "dvc", "queue", "logs", name, env=env) for name in failed}
    # Every experiment is rerun after the restart, on the same database and bucket.
    reruns = {name.replace("killed", "rerun"): rate for name, rate in rates.items()}
    for name, rate in reruns.items():
        run(project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.probe_c={rate}", env=env)
    _start_queue(project, env)
    outcomes = _outcomes(wait_for_queue(project, env=env))
    return KilledQueue(
        were_logging, failed_logs, logged_before, {name: outcomes.get(name, "") for name in reruns}
    )


def _team_env(team: Stack) -> dict[str, str]:
    # MLflow's client retries a dead server for minutes by default; the test does not wait that long.
    return command_env(
        MLFLOW_TRACKING_URI=team.tracking_uri,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )


def test_a_server_killed_in_a_queue_fails_its_stages_with_one_line(
    team: Stack, killed_queue: KilledQueue
) -> None:
    assert killed_queue.were_logging <= set(killed_queue.failed_logs), killed_queue
    mid_run = f"ERROR skin_lesion: MLflow at {team.tracking_uri} failed: "
    pre_flight = f"ERROR skin_lesion: MLFLOW_TRACKING_URI={team.tracking_uri}: tracking server not reachable"
    for name, log in killed_queue.failed_logs.items():
        errors = [line for line in log.splitlines() if line.startswith("ERROR skin_lesion: ")]
        assert len(errors) == 1, log[-3000:]
        # A stage that was logging says MLflow failed; one that started after the kill never starts.
        expected = mid_run if name in killed_queue.were_logging else (mid_run, pre_flight)
        assert errors[0].startswith(expected), errors
        assert "Traceback" not in log.split("Running stage 'train'")[-1], log[-3000:]
    runs = mlflow_runs(team.tracking_uri)
    killed = runs[runs["tags.DVC_EXP_NAME"].isin(killed_queue.failed_logs) & (runs["tags.stage"] == "train")]
    assert set(killed["status"]) <= {"RUNNING", "KILLED", "FAILED"}


def test_after_the_restart_nothing_is_lost_and_reruns_complete(
    team: Stack, killed_queue: KilledQueue
) -> None:
    assert killed_queue.logged_before <= set(mlflow_runs(team.tracking_uri)["run_id"])
    assert set(killed_queue.reruns.values()) == {"Success"}, killed_queue.reruns


def test_queued_experiments_on_postgresql_and_s3(team: Stack, killed_queue: KilledQueue) -> None:
    _check_store(team.tracking_uri, set(killed_queue.reruns), versions_before=0)
    # The artifacts are in the bucket, through the server: the runs point at it, not at a local folder.
    runs = mlflow_runs(team.tracking_uri)
    assert runs["artifact_uri"].str.startswith("mlflow-artifacts:/").all()
    models = [key for key in _bucket_keys(team, ARTIFACT_BUCKET) if key.endswith("/MLmodel")]
    assert len(models) >= 2 * EXPERIMENTS  # per experiment: train's Keras model and the served pyfunc
    # Each version loads in a fresh process that has no object-store credentials at all.
    loader = (
        "import mlflow, sys; name = sys.argv[1]\n"
        "for version in mlflow.MlflowClient().search_model_versions(f\"name='{name}'\"):\n"
        "    mlflow.pyfunc.load_model(f'models:/{name}/{version.version}')\n"
    )
    env = command_env(MLFLOW_TRACKING_URI=team.tracking_uri)
    command = [sys.executable, "-c", loader, model_name()]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_promote_predict_and_serving_work_against_the_team_server(
    project: Path, team: Stack, killed_queue: KilledQueue, tmp_path: Path
) -> None:
    promoted = run_skin_lesion(project, "promote", "2", MLFLOW_TRACKING_URI=team.tracking_uri)
    assert promoted.returncode == 0, promoted.stderr
    image = next((project / "data" / "raw" / "train" / "melanoma").iterdir())
    predicted = run_skin_lesion(project, "predict", str(image), MLFLOW_TRACKING_URI=team.tracking_uri)
    assert predicted.returncode == 0, predicted.stderr
    assert f"model models:/{model_name()}@champion" in predicted.stderr
    assert "1 image," in predicted.stdout
    # Both servers fetch the champion through the tracking server's artifact proxy.
    env = command_env(MLFLOW_TRACKING_URI=team.tracking_uri)
    encoded = base64.b64encode(image.read_bytes()).decode("ascii")
    serve_port, review_port = free_port(), free_port()
    serve = [
        "mlflow", "models", "serve", "-m", f"models:/{model_name()}@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(serve_port),
    ]  # fmt: skip
    review = [
        sys.executable, "-m", "skin_lesion.app.cli", "review",
        "--port", str(review_port), "--db", str(tmp_path / "review.db"),
    ]  # fmt: skip
    with (
        running_server(serve, f"http://127.0.0.1:{serve_port}/ping", env),
        running_server(review, f"http://127.0.0.1:{review_port}/health", env),
    ):
        rows = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}}
        status, body = http_request(f"http://127.0.0.1:{serve_port}/invocations", json.dumps(rows).encode())
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["predicted_label"]
        status, page = http_request(f"http://127.0.0.1:{review_port}/")
        assert f"<strong>{model_name()}</strong> version <strong>2</strong>" in page
        upload = {"images": [{"name": image.name, "data": encoded}]}
        status, body = http_request(f"http://127.0.0.1:{review_port}/api/score", json.dumps(upload).encode())
        assert status == 200, body
        card = json.loads(body)["cards"][0]
        assert "error" not in card, card
        assert sum(card["probabilities"].values()) > 0.99


def test_a_teammate_pulls_the_data_model_and_experiments_that_were_pushed(
    project: Path, team: Stack, killed_queue: KilledQueue, tmp_path: Path
) -> None:
    """The team workflow: `git push`, `dvc push`, `dvc exp push`; a fresh clone pulls and runs nothing."""
    env = command_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    origin = tmp_path / "origin.git"  # the team's git server
    run(tmp_path, "git", "init", "-q", "--bare", str(origin))
    run(project, "git", "remote", "add", "origin", str(origin))
    run(project, "git", "push", "-q", "origin", "HEAD")
    run(project, "dvc", "remote", "modify", "--local", "team", "endpointurl", team.s3_endpoint)
    run(project, "dvc", "push", env=env)
    run(project, "dvc", "exp", "push", "--all-commits", "origin", env=env)
    assert _bucket_keys(team, DVC_BUCKET)

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    run(clone, "dvc", "remote", "modify", "--local", "team", "endpointurl", team.s3_endpoint)
    run(clone, "dvc", "pull", env=env)
    model = (clone / "models" / "model.keras").read_bytes()
    assert model == (project / "models" / "model.keras").read_bytes()
    assert "up to date" in run(clone, "dvc", "status", env=env)
    repro = run(clone, "dvc", "repro", env=command_env(MLFLOW_TRACKING_URI=team.tracking_uri))
    assert "Running stage" not in repro, repro
    run(clone, "dvc", "exp", "pull", "--all-commits", "origin", env=env)
    shared = set(run(clone, "dvc", "exp", "list", "--name-only", env=env).split())
    assert shared == set(run(project, "dvc", "exp", "list", "--name-only", env=env).split())
    assert len(shared) >= EXPERIMENTS
    assert "train.probe_c" in run(clone, "dvc", "exp", "diff", "HEAD", sorted(shared)[0], env=env)
    # The teammate takes one experiment into their workspace and compares it with main.
    run(clone, "dvc", "exp", "apply", sorted(shared)[0], env=env)
    assert "train.probe_c" in run(clone, "dvc", "params", "diff", "HEAD", env=env)
    assert "bal_acc" in run(clone, "dvc", "metrics", "diff", "--all", "HEAD", env=env)


def test_a_stage_stops_at_once_when_postgresql_is_down(project: Path, team: Stack) -> None:
    cluster = Path(team.pgdata) / "cluster"
    command = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run(
        [*command, str(PG_BIN / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "stop"], check=True
    )
    try:
        result = run_skin_lesion(project, "promote", "1", MLFLOW_TRACKING_URI=team.tracking_uri)
    finally:
        options = f"-h 127.0.0.1 -p {team.postgres_port} -k {team.pgdata}"
        start = [str(PG_BIN / "pg_ctl"), "-D", str(cluster), "-l", str(Path(team.pgdata) / "postgres.log")]
        subprocess.run(
            [*command, *start, "-o", options, "-w", "start"], check=True, stdout=subprocess.DEVNULL
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    # The server answers 503, or hangs on its database until the check's timeout: one line either way.
    assert lines[-1].startswith(
        f"ERROR skin_lesion: MLFLOW_TRACKING_URI={team.tracking_uri}: tracking server"
    )
    assert lines[-1].endswith(("(the server failed: is its database or artifact store up?)", "(timed out)"))
    assert team.postgres_password not in result.stderr + result.stdout


def test_an_object_store_that_refuses_a_write_leaves_no_version(project: Path, team: Stack) -> None:
    # A second server on the same database, whose bucket does not exist: every artifact write fails.
    refusing = dataclasses.replace(team, mlflow_port=free_port(), pids={})
    refusing.pids["mlflow"] = start_mlflow(refusing, "s3://no-such-bucket/mlflow")
    client = mlflow_client(team.tracking_uri)
    versions = len(client.search_model_versions(f"name='{model_name()}'"))
    # One retry, not MLflow's seven: the server answers the refused upload and drops the connection,
    # and ending the run on that connection needs the retry (a fresh one) that every user has.
    env = command_env(MLFLOW_TRACKING_URI=refusing.tracking_uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    try:
        command = ["dvc", "repro", "--force", "--single-item", "evaluate"]
        result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, check=False)
    finally:
        stop_server(refusing, "mlflow")
        run(project, "dvc", "checkout", "--force")  # the failed stage's outputs, back from the cache
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"ERROR skin_lesion: MLflow at {refusing.tracking_uri} failed: " in output, output[-3000:]
    assert "(the server could not store an artifact: is its object store up, with its bucket?)" in output
    assert "Traceback" not in output.split("Running stage 'evaluate'")[-1], output[-3000:]
    assert len(client.search_model_versions(f"name='{model_name()}'")) == versions
    runs = mlflow_runs(team.tracking_uri)
    failed = runs[runs["tags.stage"] == "evaluate"].sort_values("start_time").iloc[-1]
    assert failed["status"] == "FAILED"
    logged = client.search_logged_models([failed["experiment_id"]], f"source_run_id = '{failed['run_id']}'")
    assert all(model.status != LoggedModelStatus.READY for model in logged)
