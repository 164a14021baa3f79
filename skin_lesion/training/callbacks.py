"""Keras callbacks of a training run: the validation metric, resumable checkpoints, per-epoch logging."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import keras
import mlflow
import numpy as np
from dvclive import Live

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.metrics import capped_balanced_accuracy
from skin_lesion.files import atomic_output_dir, restore_interrupted_swap
from skin_lesion.model.prediction import call_in_batches

log = logging.getLogger("skin_lesion.training.callbacks")


MONITOR = "val_balanced_accuracy"
CHECKPOINT_KEY_LENGTH = 24  # hex digits of the settings hash that names a checkpoint folder


def predict_in_batches(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The single-output model's answer, one batch at a time (prediction.call_in_batches says why)."""
    return call_in_batches(model, images, batch_size)[0]


class ValidationMetrics(keras.callbacks.Callback):
    """One pass over the validation set per epoch: val_loss, val_accuracy, val_balanced_accuracy.

    val_balanced_accuracy (early stopping's monitor) is `capped_balanced_accuracy` with class_cap.
    """

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, batch_size: int, class_cap: int) -> None:
        super().__init__()
        self.x_val, self.y_val, self.batch_size, self.class_cap = x_val, y_val, batch_size, class_cap

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Add the validation metrics to this epoch's logs."""
        probabilities = predict_in_batches(self.model, self.x_val, self.batch_size)
        predicted = probabilities.argmax(axis=1)
        picked = probabilities[np.arange(len(self.y_val)), self.y_val]
        if logs is not None:
            logs["val_loss"] = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
            logs["val_accuracy"] = float((predicted == self.y_val).mean())
            logs[MONITOR] = capped_balanced_accuracy(self.y_val, predicted, self.class_cap)


class ResumableCheckpoint(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore (weights, optimizer, epoch) of one training phase, plus what it leaves out.

    It also keeps each epoch's logs, the early-stopping state and the random generators' states
    (augmentation, dropout), so that a resumed run trains, stops, keeps its best epoch and reports its
    history exactly as an uninterrupted one would, and replays the earlier epochs to `replay_to` (the
    DVCLive and MLflow loggers) before carrying on.
    """

    FORMAT = 4  # bumped when the files below change, so that old checkpoints are not read
    STATE_FILE = "resume_state.json"
    BEST_WEIGHTS_FILE = "best_weights.npz"
    RANDOM_STATE_FILE = "random_state.npz"

    def __init__(
        self,
        backup_dir: Path,
        first_epoch: int,
        early_stopping: keras.callbacks.EarlyStopping | None,
        replay_to: Sequence[keras.callbacks.Callback],
        clock: TrainingClock | None = None,
    ) -> None:
        # Kept when the fit ends: a later phase's resume restores this phase's end from it.
        super().__init__(backup_dir=str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.backup_path = Path(backup_dir)
        self.first_epoch = first_epoch
        self.early_stopping = early_stopping
        self.replay_to = list(replay_to)
        self.history: dict[str, list[float]] = {}
        self.clock = clock or TrainingClock()
        restore_interrupted_swap(self.backup_path)
        problem = self.unreadable()
        if problem:
            log.warning("%s: checkpoint unreadable (%s); training from the start", self.backup_path, problem)
            shutil.rmtree(self.backup_path)

    def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
        """Restore the last checkpoint, if any, and replay its epochs to the loggers."""
        super().on_train_begin(logs)
        start_epoch = self.model._initial_epoch or 0
        state_path = self.backup_path / self.STATE_FILE
        if not start_epoch or not state_path.is_file():
            return
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state["epoch"] != start_epoch:
            raise PipelineError(f"{self.backup_path}: checkpoint is inconsistent; delete it to retrain")
        self.history = state["history"]
        self.clock.resume_at(state["seconds"])
        for variable, value in zip(self._random_states(), self._load(self.RANDOM_STATE_FILE), strict=True):
            variable.assign(value)
        if self.early_stopping is not None:
            for name in ("wait", "best", "best_epoch"):
                setattr(self.early_stopping, name, state["early_stopping"][name])
            self.early_stopping.best_weights = self._load(self.BEST_WEIGHTS_FILE)
        log.info("resuming from the checkpoint of epoch %d in %s", start_epoch, self.backup_path)
        for epoch in range(self.first_epoch, start_epoch):
            epoch_logs = {name: values[epoch - self.first_epoch] for name, values in self.history.items()}
            for callback in self.replay_to:
                callback.on_epoch_end(epoch, epoch_logs)

    def on_train_end(self, logs: dict[str, float] | None = None) -> None:
        """Forget the restored start epoch, which Keras keeps on the model for every later fit."""
        super().on_train_end(logs)
        # Else the next phase's fit would start at this phase's resumed epoch instead of its own first.
        self.model._initial_epoch = None

    def saved_epoch(self) -> int:
        """How many epochs the checkpoint holds: where a resumed fit starts (0 without one)."""
        # Keras's own record, which its on_train_begin restores the epoch from.
        path = Path(self._training_metadata_path)
        return json.loads(path.read_text(encoding="utf-8"))["epoch"] if path.is_file() else 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Record the epoch's logs, then checkpoint."""
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        super().on_epoch_end(epoch, logs)

    def unreadable(self) -> str:
        """Why the checkpoint in place cannot be resumed from; empty when it can (or there is none).

        Every file is read in full, without touching the model, so that a damaged checkpoint is
        discarded before any of it is loaded.
        """
        if not self.backup_path.exists():
            return ""
        try:
            keras_epoch = json.loads(Path(self._training_metadata_path).read_text(encoding="utf-8"))["epoch"]
            state = json.loads((self.backup_path / self.STATE_FILE).read_text(encoding="utf-8"))
            if state["epoch"] != keras_epoch:
                return f"its files are from epochs {state['epoch']} and {keras_epoch}"
            self._load(self.RANDOM_STATE_FILE)
            if "early_stopping" in state:
                self._load(self.BEST_WEIGHTS_FILE)
            with h5py.File(self._weights_path, "r") as weights:
                weights.visititems(_read_dataset)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
            return f"{type(err).__name__}: {err}"
        return ""

    def _save_model(self) -> None:
        # All of an epoch's files go to a new folder that then replaces the previous one, so that a
        # kill at any instant leaves one complete checkpoint: the previous epoch's or this one's.
        with atomic_output_dir(self.backup_path) as folder:
            state: dict[str, Any] = {
                "epoch": self._current_epoch,
                "history": self.history,
                "seconds": self.clock.seconds(),
            }
            randoms = [keras.ops.convert_to_numpy(v) for v in self._random_states()]
            np.savez(folder / self.RANDOM_STATE_FILE, *randoms)
            if self.early_stopping is not None:
                stopping = self.early_stopping
                best = None if stopping.best is None else float(stopping.best)
                state["early_stopping"] = {
                    "wait": stopping.wait,
                    "best": best,
                    "best_epoch": stopping.best_epoch,
                }
                np.savez(folder / self.BEST_WEIGHTS_FILE, *(stopping.best_weights or []))
            (folder / self.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
            # Keras's own files (weights, epoch) into the same new folder, then back to their place.
            in_place = self._weights_path, self._training_metadata_path
            self._weights_path = str(folder / Path(in_place[0]).name)
            self._training_metadata_path = str(folder / Path(in_place[1]).name)
            try:
                super()._save_model()
            finally:
                self._weights_path, self._training_metadata_path = in_place

    def _random_states(self) -> list[keras.Variable]:
        # The seed generators' states are variables but not weights, so save_weights leaves them out.
        weights = {id(weight) for weight in self.model.weights}
        return [variable for variable in self.model.variables if id(variable) not in weights]

    def _load(self, name: str) -> list[np.ndarray]:
        with np.load(self.backup_path / name) as stored:
            return [stored[f"arr_{i}"] for i in range(len(stored.files))]


def _read_dataset(_: str, item: h5py.Group | h5py.Dataset) -> None:
    # Reading every array finds a truncated file; h5py.File opens one without complaint.
    if isinstance(item, h5py.Dataset):
        item[()]


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first batch whose loss is NaN or infinite, with one line naming the epoch.

    Keras's TerminateOnNaN stops quietly, and the stage would then save and register a broken model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Remember the epoch, for the message."""
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
        """Raise when the batch's loss is not a finite number."""
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise PipelineError(
                f"train: the loss became {float(loss)} in epoch {self.epoch + 1}, batch {batch + 1}; "
                "no model was saved (try a lower train.learning_rate)"
            )


class EpochLogger(keras.callbacks.Callback):
    """Log each epoch's metrics to DVCLive and to the active MLflow run.

    DVCLive ships a Keras callback, but it imports TensorFlow, which the JAX backend on a GPU machine
    does not have; this one uses only Keras 3.
    """

    def __init__(self, live: Live) -> None:
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Record the epoch's loss and accuracy, train and validation."""
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()
        mlflow.log_metrics(metrics, step=epoch)


class TrainingClock:
    """The seconds a training has taken, the killed runs that a resumed one continues included."""

    def __init__(self) -> None:
        self.before = 0.0
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Training time so far."""
        return self.before + time.perf_counter() - self.started

    def resume_at(self, seconds: float) -> None:
        """Carry on from a checkpoint that had taken `seconds` to reach."""
        self.before, self.started = seconds, time.perf_counter()


def checkpoint_folder(cache: Path, settings: str) -> Path:
    """One checkpoint folder per training settings (inputs, params) and checkpoint format."""
    key = f"{settings}format {ResumableCheckpoint.FORMAT}"
    return cache / "checkpoints" / hashlib.sha256(key.encode()).hexdigest()[:CHECKPOINT_KEY_LENGTH]
