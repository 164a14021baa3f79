"""End to end: `dvc repro` in a temporary git repo from a stand-in ISIC Archive, then experiments.

The stand-in serves the synthetic image set (learnable shapes) under ISIC ids, so the default
`download.source: isic` runs as it would against the real archive.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from stages.download import generate_synthetic
from tests.conftest import REPO, repo_params
from tests.isic_standin import StandinArchive, serve

pytestmark = pytest.mark.slow

STAGES = ["download", "split", "rebalance", "train", "evaluate"]
QUEUE_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, StandinArchive, pd.DataFrame]]:
    """A stand-in ISIC Archive serving 20 synthetic images per class; yields its URL, itself, a manifest."""
    folder = tmp_path_factory.mktemp("synthetic")
    rows = generate_synthetic(folder, repo_params()["base"]["classes"], images_per_class=20, size=32, seed=3)
    ids = [f"ISIC_{number:07d}" for number in range(1, len(rows) + 1)]
    images = {isic_id: (folder / row[0]).read_bytes() for isic_id, row in zip(ids, rows, strict=True)}
    manifest = pd.DataFrame({"isic_id": ids, "label": [row[1] for row in rows], "split": "train"})
    archive = StandinArchive(images=images)
    with serve(archive) as api_url:
        yield api_url, archive, manifest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, standin: tuple) -> Path:
    """A git + DVC repo holding this project's pipeline, set to a small run against the stand-in."""
    api_url, _, manifest = standin
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    params = repo_params()
    params["base"]["image_size"] = 32
    params["download"].update(api_url=api_url, workers=4, backoff_s=0.05)
    (root / params["download"]["manifest"]).parent.mkdir(parents=True)
    manifest.to_csv(root / params["download"]["manifest"], index=False)
    params["rebalance"]["samples_per_class"] = 16
    params["train"].update(epochs=6, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "config", "core.analytics", "false")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "pipeline")
    return root


@pytest.fixture(scope="module")
def first_repro(project: Path) -> str:
    """Output of the first full `dvc repro`."""
    output = _run(project, "dvc", "repro")
    _run(project, "git", "add", "-A")
    _run(project, "git", "commit", "-q", "-m", "first run")
    return output


def test_repro_runs_every_stage_in_order(first_repro: str) -> None:
    positions = [first_repro.index(f"Running stage '{stage}'") for stage in STAGES]
    assert positions == sorted(positions)


def test_repro_writes_metrics_that_beat_chance(project: Path, first_repro: str) -> None:
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    chance = 1 / len(repo_params()["base"]["classes"])
    assert metrics["accuracy"] > 4 * chance
    assert metrics["balanced_accuracy"] > 4 * chance
    assert {"sensitivity", "specificity", "auc"} <= metrics["melanoma"].keys()
    assert metrics["model_version"] == 1
    data = json.loads((project / "metrics" / "data.json").read_text())
    assert data["images_in"] == 9 * 20
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert train["device"] == "cpu"
    assert (project / "data" / "raw" / "attribution.txt").is_file()


def test_dvc_knows_the_metrics_and_plots(project: Path, first_repro: str) -> None:
    metrics = json.loads(_run(project, "dvc", "metrics", "show", "--json"))
    files = metrics[""]["data"]
    assert {"metrics/evaluate.json", "metrics/data.json", "metrics/train.json"} <= files.keys()
    plots = json.loads(_run(project, "dvc", "plots", "show", "--json"))["data"]
    assert {
        "metrics/evaluate/confusion.csv",
        "metrics/evaluate/confusion_normalized.csv",
        "metrics/evaluate/roc/melanoma.csv",
        "metrics/evaluate/pr_melanoma.csv",
        "metrics/evaluate/reliability.csv",
        "metrics/evaluate/worst_misclassified.png",
        "metrics/train/plots/metrics/val_accuracy.tsv",
        "metrics/class_counts/train.csv",
    } <= plots.keys()


def test_every_stage_logged_an_mlflow_run(project: Path, first_repro: str) -> None:
    runs = _mlflow_runs(project)
    assert sorted(runs["tags.stage"]) == sorted(STAGES)
    assert (runs["status"] == "FINISHED").all()
    commit = _run(project, "git", "rev-parse", "HEAD~1").strip()
    assert set(runs["tags.mlflow.source.git.commit"]) == {commit}
    train = runs[runs["tags.stage"] == "train"].iloc[0]
    assert train["params.train.epochs"] == "6"
    assert train["metrics.val_accuracy"] > 0


def test_model_is_registered_as_challenger(project: Path, first_repro: str) -> None:
    client = _mlflow_client(project)
    version = client.get_model_version_by_alias(_model_name(), "challenger")
    assert str(version.version) == "1"
    assert version.description.startswith(f"# Model card: {_model_name()}")
    assert float(version.tags["melanoma_threshold"]) > 0
    assert "manual" in version.tags["promotion"]
    model = mlflow.pyfunc.load_model(f"models:/{_model_name()}@challenger")
    image = next((project / "data" / "raw" / "train" / "melanoma").iterdir())
    encoded = base64.b64encode(image.read_bytes()).decode()
    predictions = model.predict(pd.DataFrame({"image": [encoded, encoded]}))
    assert len(predictions) == 2
    assert {"predicted_label", "p_melanoma", "melanoma_alert"} <= set(predictions.columns)
    assert (project / "metrics" / "model_card.md").read_text().startswith("# Model card")


def test_second_repro_runs_nothing(project: Path, first_repro: str) -> None:
    output = _run(project, "dvc", "repro")
    assert "Running stage" not in output
    assert "Data and pipelines are up to date." in output


def test_changing_train_params_reruns_only_train_and_evaluate(project: Path, first_repro: str) -> None:
    output = _run(project, "dvc", "exp", "run", "-S", "train.epochs=2", "--name", "two-epochs")
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in output]
    assert ran == ["train", "evaluate"]
    shown = json.loads(_run(project, "dvc", "exp", "show", "--json"))
    experiments = [exp for entry in shown for exp in entry.get("experiments") or []]
    names = {exp["name"]: exp for exp in experiments}
    assert "two-epochs" in names
    revision = names["two-epochs"]["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "accuracy" in revision["metrics"]["metrics/evaluate.json"]["data"]


def test_queued_experiments_land_in_mlflow(project: Path, first_repro: str) -> None:
    default = repo_params()["train"]["learning_rate"]
    rates = [str(default * 2), str(default / 2)]  # both differ from the baseline, so both must run
    for rate in rates:
        _run(project, "dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}")
    before = len(_mlflow_client(project).search_model_versions(f"name='{_model_name()}'"))
    _run(project, "dvc", "queue", "start", "-j", "2")
    status = _wait_for_queue(project)
    assert status.count("Success") >= 2, status

    client = _mlflow_client(project)
    versions = client.search_model_versions(f"name='{_model_name()}'")
    assert len(versions) == before + 2
    for version in versions:
        mlflow.pyfunc.load_model(f"models:/{_model_name()}/{version.version}")
    runs = _mlflow_runs(project)
    queued_train = runs[runs["params.train.learning_rate"].isin(rates)]
    assert len(queued_train) == 2
    names = set(queued_train["tags.DVC_EXP_NAME"])
    assert len(names) == 2
    queued_evaluate = runs[(runs["tags.stage"] == "evaluate") & runs["tags.DVC_EXP_NAME"].isin(names)]
    assert len(queued_evaluate) == 2
    assert (queued_evaluate["status"] == "FINISHED").all()


def _model_name() -> str:
    return repo_params()["base"]["model_name"]


def _wait_for_queue(project: Path) -> str:
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _run(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    pytest.fail(f"queued experiments still running after {QUEUE_TIMEOUT_S} s:\n{status}")


def _mlflow_client(project: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


def _mlflow_runs(project: Path):
    _mlflow_client(project)
    return mlflow.search_runs(search_all_experiments=True)


def _run(cwd: Path, *command: str) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    for variable in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(variable, None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output
