"""A throw-away git + DVC project of this pipeline, fed by a stand-in ISIC Archive, for the slow tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml

from skin_lesion.data.sources.synthetic import generate_synthetic
from tests.conftest import OFFLINE_TRAIN, REPO, repo_params, tiny_backbone_weights
from tests.isic_standin import StandinArchive

STAGES = ["download", "split", "rebalance", "train", "site", "site_curve", "evaluate"]
QUEUE_TIMEOUT_S = 600
# Where the README's offline setup puts the dataset and the backbone's weights, both DVC-tracked.
LOCAL_DATASET = "data/local/dataset"
TINY_WEIGHTS = "weights/tiny_mobilenet.weights.h5"
DEFAULT_RECIPE = {"recipe": "linear_probe", "arch": "mobilenet", "weights": TINY_WEIGHTS}


def synthetic_archive(folder: Path, images_per_class: int = 20) -> tuple[StandinArchive, pd.DataFrame]:
    """A stand-in archive serving the synthetic set (learnable shapes) under ISIC ids, and its manifest."""
    rows = generate_synthetic(
        folder, repo_params()["base"]["classes"], images_per_class=images_per_class, size=32, seed=3
    )
    ids = [f"ISIC_{number:07d}" for number in range(1, len(rows) + 1)]
    images = {isic_id: (folder / row[0]).read_bytes() for isic_id, row in zip(ids, rows, strict=True)}
    manifest = pd.DataFrame({"isic_id": ids, "label": [row[1] for row in rows], "split": "train"})
    return StandinArchive(images=images), manifest


def make_project(root: Path, api_url: str, manifest: pd.DataFrame, **sections: dict[str, Any]) -> Path:
    """Copy the pipeline into a fresh git + DVC repo at `root`, set to a small run against `api_url`."""
    for package in ("stages", "skin_lesion"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "requirements.lock", root / "requirements.lock")
    shutil.copytree(REPO / "weights", root / "weights", ignore=shutil.ignore_patterns("*.h5"))
    shutil.copytree(REPO / "data" / "local", root / "data" / "local")
    shutil.copytree(REPO / "data" / "external", root / "data" / "external")
    shutil.copytree(REPO / "data" / "sites", root / "data" / "sites")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    params = repo_params()
    params["base"]["image_size"] = 32
    params["download"]["isic"].update(api_url=api_url, workers=4, backoff_s=0.05)
    (root / params["download"]["isic"]["manifest"]).parent.mkdir(parents=True)
    manifest.to_csv(root / params["download"]["isic"]["manifest"], index=False)
    # 20 images per class leave 11 to 16 in train: some below the sparse-class warning's threshold.
    params["rebalance"].update(samples_per_class=16, min_source_images=14)
    params["train"].update(OFFLINE_TRAIN, epochs=6, batch_size=16)
    for name, values in sections.items():
        params[name].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # dvc.yaml's custom chart template
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the team remote, analytics off
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "pipeline")
    return root


def make_offline_project(root: Path, images_per_class: int, **sections: dict[str, Any]) -> Path:
    """A project set up as the README's offline block says: a local dataset and the default recipe's
    weights file, both `dvc add`ed and committed, so that queued experiments and clones get them."""
    params = repo_params()
    local = {**params["download"]["local"], "path": LOCAL_DATASET, "metadata": ""}
    no_manifest = pd.DataFrame(columns=["isic_id", "label", "split"])
    never_fetched = params["download"]["isic"]["api_url"]
    root = make_project(
        root, never_fetched, no_manifest, download={"source": "local", "local": local}, train=DEFAULT_RECIPE,
        **sections,
    )  # fmt: skip
    scratch = root.parent / f"{root.name}-images"
    for path, label, *_ in generate_synthetic(
        scratch, params["base"]["classes"], images_per_class=images_per_class, size=32, seed=3
    ):
        target = root / LOCAL_DATASET / "Train" / label / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scratch / path, target)
    tiny_backbone_weights(root / TINY_WEIGHTS, size=32)
    run(root, "dvc", "add", "-q", LOCAL_DATASET, TINY_WEIGHTS)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "a local dataset and weights, tracked by DVC")
    return root


def readme_comparison(project: Path) -> str:
    """The README's `dvc exp show` command, run in `project` in a 120-column terminal."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = next(line.removeprefix("$ ") for line in readme.splitlines() if line.startswith("$ dvc exp show"))
    command = shown.replace("dvc exp show", "dvc exp show --no-pager", 1)
    output = run(project, "bash", "-c", command, env={**command_env(), "COLUMNS": "120"})
    assert "…" not in output  # rich's mark for a cell cut short
    assert max(len(line.rstrip()) for line in output.splitlines()) <= 120, output
    return output


def command_env(**extra: str) -> dict[str, str]:
    """The environment for dvc and git in a project: this venv first, no inherited MLflow or DVC state."""
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
    return {**env, **extra}


def run(cwd: Path, *command: str, env: dict[str, str] | None = None) -> str:
    """Run a command in the project, failing the test with its output if it fails."""
    result = subprocess.run(
        command, cwd=cwd, env=env or command_env(), capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def model_name() -> str:
    """The registered model's name."""
    return repo_params()["base"]["model_name"]


def wait_for_queue(project: Path, env: dict[str, str] | None = None) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        status = run(project, "dvc", "queue", "status", env=env)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    pytest.fail(f"queued experiments still running after {QUEUE_TIMEOUT_S} s:\n{status}")


def mlflow_client(uri: str) -> mlflow.MlflowClient:
    """A client of the tracking and registry store at `uri`."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient()


def mlflow_runs(uri: str) -> pd.DataFrame:
    """Every run in the store at `uri`."""
    mlflow_client(uri)
    return mlflow.search_runs(search_all_experiments=True)


def sqlite_uri(project: Path) -> str:
    """The embedded store of a project."""
    return f"sqlite:///{project / 'mlflow.db'}"
