"""A train killed at any instant, inside a checkpoint's write included, resumes to the same model.

A kill is stood in for by KeyboardInterrupt raised from inside the write: what a kill leaves behind
(a half-written temp folder, or the previous checkpoint moved aside) is the same, except that a real
kill also leaves the temp folder, which the next run clears.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import skin_lesion.training.callbacks
from skin_lesion.training.recipes import train_model
from tests.test_train import _data, _params


def _raise_on_call(number: int, original: Callable[..., Any]) -> Callable[..., Any]:
    calls = {"count": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return wrapper


def _raise_on_move(matches: Callable[[Path, Path], bool]) -> Callable[..., Any]:
    original = os.replace

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        if matches(Path(source), Path(target)):
            raise KeyboardInterrupt
        return original(source, target, *args, **kwargs)

    return replace


# Keras creates the checkpoint folder empty before the first epoch: the first write moves that aside.
def _moving_aside(source: Path, target: Path) -> bool:
    moving_a_checkpoint = (source / "resume_state.json").is_file()
    return source.name == "train" and target.parent.name.startswith(".train.old-") and moving_a_checkpoint


def _moving_in_after_aside(source: Path, target: Path) -> bool:
    aside = any(target.parent.glob(".train.old-*/train/resume_state.json"))
    return source.name.startswith(".train.tmp-") and target.name == "train" and aside


# Where epoch 2's checkpoint write is cut short: what is patched, with what, and what is left on disk
# (folder -> the epoch of the complete checkpoint in it; a real kill also leaves the temp folder of a
# write cut short, which the wrapper's KeyboardInterrupt clears).
INSTANTS = {
    "writing the random states": (
        skin_lesion.training.callbacks.np,
        "savez",
        lambda f: _raise_on_call(2, f),
        {"train": 1},
    ),
    "writing the weights": (keras.Model, "save_weights", lambda f: _raise_on_call(2, f), {"train": 1}),
    "moving the previous checkpoint aside": (
        os,
        "replace",
        lambda f: _raise_on_move(_moving_aside),
        {"train": 1, ".train.tmp-": 2},
    ),
    "between the previous going and the new coming": (
        os,
        "replace",
        lambda f: _raise_on_move(_moving_in_after_aside),
        {".train.old-/train": 1, ".train.tmp-": 2},
    ),
}
CHECKPOINT_FILES = {"latest.weights.h5", "random_state.npz", "resume_state.json", "training_metadata.json"}


def _checkpoints(folder: Path) -> dict[str, int]:
    """Each complete checkpoint under `folder`, by its folder (random suffixes cut), and its epoch."""
    found = {}
    for state in folder.rglob("resume_state.json"):
        if {path.name for path in state.parent.iterdir()} == CHECKPOINT_FILES:
            name = state.parent.relative_to(folder).as_posix()
            key = "/".join(part.split("-")[0] + "-" if "-" in part else part for part in name.split("/"))
            found[key] = json.loads(state.read_text(encoding="utf-8"))["epoch"]
    return found


@pytest.fixture(scope="module")
def uninterrupted() -> list[np.ndarray]:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=0)
    model, _ = train_model(x, y, x_val, y_val, params.base, params.train)
    return model.get_weights()


@pytest.mark.parametrize("instant", sorted(INSTANTS))
def test_kill_inside_a_checkpoint_write_resumes_like_an_uninterrupted_run(
    instant: str, uninterrupted: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=0)
    owner, name, patched, left = INSTANTS[instant]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, patched(getattr(owner, name)))
        with pytest.raises(KeyboardInterrupt):
            train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    assert _checkpoints(tmp_path) == left
    resumed, _ = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    for got, expected in zip(resumed.get_weights(), uninterrupted, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not tmp_path.exists()  # a finished fit removes its checkpoints, leftovers included


def test_a_damaged_checkpoint_is_discarded_with_a_warning(
    uninterrupted: list[np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=0)

    class KillAfterTwo(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [KillAfterTwo()], checkpoint_dir=tmp_path)
    weights = next(tmp_path.rglob("latest.weights.h5"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that lost half
    caplog.set_level(logging.WARNING, logger="skin_lesion.training.callbacks")
    resumed, summary = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    assert "checkpoint unreadable" in caplog.text
    assert summary["epochs"] == 4
    for got, expected in zip(resumed.get_weights(), uninterrupted, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
