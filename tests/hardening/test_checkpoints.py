"""A train killed at any instant, inside a checkpoint's write included, resumes to the same model.

A kill is stood in for by KeyboardInterrupt raised from inside the write: what a kill leaves behind
(a half-written temp folder, or the previous checkpoint moved aside) is the same, except that a real
kill also leaves the temp folder, which the next run clears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import skin_lesion.callbacks
import skin_lesion.files
from skin_lesion.training import train_model
from tests.test_train import _data, _params


def _raise_on_call(number: int, original: Callable[..., Any]) -> Callable[..., Any]:
    calls = {"count": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] == number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return wrapper


# Where epoch 2's checkpoint write is cut short, as (what is patched, which call of it fails).
# Per write: one np.savez (random states), the weights, then moving folders: one move for the first
# checkpoint, two for later ones (the previous aside, the new one in).
INSTANTS = {
    "writing the random states": (skin_lesion.callbacks.np, "savez", 2),
    "writing the weights": (keras.Model, "save_weights", 2),
    "moving the previous checkpoint aside": (skin_lesion.files.os, "replace", 2),
    "between the previous going and the new coming": (skin_lesion.files.os, "replace", 3),
}


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
    owner, name, number = INSTANTS[instant]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, _raise_on_call(number, getattr(owner, name)))
        with pytest.raises(KeyboardInterrupt):
            train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    resumed, _ = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    for got, expected in zip(resumed.get_weights(), uninterrupted, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


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
    caplog.set_level(logging.WARNING, logger="skin_lesion.callbacks")
    resumed, summary = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    assert "checkpoint unreadable" in caplog.text
    assert summary["epochs"] == 4
    for got, expected in zip(resumed.get_weights(), uninterrupted, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
