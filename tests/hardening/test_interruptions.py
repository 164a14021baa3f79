"""kill -9 during download, rebalance and train, then `dvc repro`: it completes with the same outputs.

Data outputs must come back byte-identical (same hashes in dvc.lock); train resumes from its last
checkpoint (`train.resume: true`). No half-written file is ever left in an output path. The kills
hit a project's first `dvc repro`: a stage that had completed once would be restored from DVC's cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.isic_standin import StandinArchive, serve
from tests.pipeline_project import STAGES, command_env, make_project, run, synthetic_archive

pytestmark = pytest.mark.slow

KILL_DEADLINE_S = 300
DATA_STAGES = STAGES[: STAGES.index("rebalance") + 1]  # download, split, rebalance: before train


SETTINGS = {
    "rebalance": {"samples_per_class": 80},
    "train": {"epochs": 8, "early_stopping_patience": 0},
}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, StandinArchive, pd.DataFrame]]:
    """A stand-in archive slow enough (0.2 s per file) for a download to be caught mid-way."""
    archive, manifest = synthetic_archive(tmp_path_factory.mktemp("synthetic"), images_per_class=12)
    archive.latency_s = 0.2
    with serve(archive) as api_url:
        yield api_url, archive, manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, standin: tuple) -> Path:
    """The same project after one uninterrupted `dvc repro` of the data stages, whose outputs it compares."""
    api_url, _, manifest = standin
    root = make_project(tmp_path_factory.mktemp("reference"), api_url, manifest, **SETTINGS)
    run(root, "dvc", "repro", DATA_STAGES[-1])  # and the stages before it, but not train or evaluate
    return root


def _out_hash(project: Path, stage: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def _kill_during(project: Path, ready: Callable[[], bool]) -> None:
    """Start `dvc repro`, wait until `ready()`, then kill -9 its whole process group."""
    process = subprocess.Popen(
        ["dvc", "repro"],
        cwd=project,
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + KILL_DEADLINE_S
    while not ready():
        assert process.poll() is None, "dvc repro finished before it could be killed"
        assert time.monotonic() < deadline, "dvc repro never reached the point to kill it"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def test_kill_9_in_each_stage_then_repro_completes_with_identical_outputs(
    tmp_path: Path, standin: tuple, reference: Path
) -> None:
    api_url, archive, manifest = standin
    project = make_project(tmp_path / "project", api_url, manifest, **SETTINGS)
    data = project / "data"
    cache = data / "cache" / "isic"

    # 1. Download, killed after 20 of 108 images reached the cache.
    _kill_during(project, _count_reaches(cache, "ISIC_*.json", 20))
    assert not (data / "raw").exists()
    assert _count(cache, ".*.part-*") <= 4  # at most one partial file per worker, never in data/raw
    cached = {path.stem for path in cache.glob("ISIC_*.json")}
    requests_before = len(archive.files_requested)

    # 2. Rebalance, killed half-way through writing its temp folder; download resumed first.
    _kill_during(project, _count_reaches(data, ".rebalanced.tmp-*/**/*.jpg", 200))
    # Only the missing ones, each once. By id: a request the killed run had in flight may be counted
    # by the stand-in after the kill (it is of a missing image, which the resumed run asks for again).
    requested = archive.files_requested[requests_before:]
    assert set(requested) == set(archive.images) - cached
    assert len(requested) - len(set(requested)) <= 4  # at most the killed run's workers in flight
    assert _count(cache, ".*.part-*") == 0
    assert _out_hash(project, "download") == _out_hash(reference, "download")
    assert not (data / "rebalanced").exists()

    # 3. Train, killed after its second epoch's checkpoint.
    _kill_during(project, _epoch_reached(data / "cache" / "checkpoints", 2))
    assert _out_hash(project, "rebalance") == _out_hash(reference, "rebalance")
    assert not (project / "models" / "model.keras").exists()

    # 4. An uninterrupted repro finishes the job, resuming training from its checkpoint.
    output = run(project, "dvc", "repro")
    assert "resuming from the checkpoint of epoch" in output
    assert json.loads((project / "metrics" / "train_details.json").read_text())["epochs"] == 8
    for stage in DATA_STAGES:
        assert _out_hash(project, stage) == _out_hash(reference, stage), stage
    assert _count(data / "cache" / "checkpoints", "*/*") == 0  # a finished run deletes its checkpoint
    assert not list(project.rglob(".*.tmp-*"))


def _count_reaches(folder: Path, pattern: str, count: int) -> Callable[[], bool]:
    return lambda: _count(folder, pattern) >= count


def _epoch_reached(checkpoints: Path, epoch: int) -> Callable[[], bool]:
    def reached() -> bool:
        # <checkpoints>/<settings hash>/<phase>/training_metadata.json, Keras's record of the epoch. A
        # checkpoint is written in a temp folder (.<phase>.tmp-*) and renamed into place: only placed
        # ones count, and one may still move between listing and reading.
        for state in checkpoints.glob("*/[!.]*/training_metadata.json"):
            try:
                return json.loads(state.read_text())["epoch"] >= epoch
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                return False  # caught while it was being written or replaced
        return False

    return reached
