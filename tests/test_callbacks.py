"""The Keras version pin that ResumableCheckpoint's use of BackupAndRestore internals depends on."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import keras
from packaging.requirements import Requirement

from skin_lesion.training.callbacks import ResumableCheckpoint
from tests.conftest import REPO


def _keras_requirement() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return next(Requirement(spec) for spec in project["dependencies"] if spec.startswith("keras"))


def test_installed_keras_is_the_pinned_minor_version() -> None:
    requirement = _keras_requirement()
    assert requirement.specifier.contains(importlib.metadata.version("keras"))
    # One minor version: a new Keras must be tested (and the pin moved) before it is allowed.
    assert any(spec.operator == "<" for spec in requirement.specifier)


def test_backup_and_restore_has_the_internals_the_checkpoint_uses(tmp_path: Path) -> None:
    callback = ResumableCheckpoint(tmp_path / "backup", first_epoch=0, early_stopping=None, replay_to=[])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    callback.set_model(model)
    assert hasattr(callback, "_training_metadata_path")
    assert hasattr(callback, "_current_epoch")
    assert callable(keras.callbacks.BackupAndRestore._save_model)
    model.fit(keras.ops.ones((4, 2)), keras.ops.ones((4, 1)), epochs=1, verbose=0, callbacks=[callback])
    assert hasattr(model, "_initial_epoch")
    assert callback.saved_epoch() == 1
