"""Stage `train`: fit a Keras 3 CNN on the train split (plus its augmented images), validated on val.

Runs on whatever Keras backend KERAS_BACKEND names (TensorFlow by default) and on a GPU when one is
visible; the device used is recorded in the stage's metrics. Images are decoded once into a uint8
cache that later runs with the same inputs reuse. Each epoch's loss and accuracy, and the validation
balanced accuracy that early stopping watches, go to DVCLive (for `dvc plots show`) and MLflow; the
best epoch's model is saved to models/ and logged with the mlflow.keras flavor.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from dvclive import Live
from mlflow.models import infer_signature
from sklearn.metrics import recall_score
from sklearn.utils.class_weight import compute_sample_weight

from stages.architectures import build_model, has_backbone, set_backbone_trainable, with_augmentation
from stages.common import (
    class_indices,
    load_images,
    read_manifest,
    run_cli,
    write_json_atomic,
)
from stages.config import BaseParams, TrainParams, load_params
from stages.errors import PipelineError
from stages.manifests import REBALANCED_COLUMNS, SPLIT_COLUMNS
from stages.serving import pip_requirements
from stages.tracking import repo_root, stage_run

log = logging.getLogger("stages.train")

MLFLOW_MODEL_NAME = "model"  # the model's name inside its MLflow run
MONITOR = "val_balanced_accuracy"


def main() -> None:
    """Load the images, train, save the model, and log it all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder of split manifests")
    parser.add_argument("--rebalanced", type=Path, required=True, help="rebalance manifest")
    parser.add_argument("--cache", type=Path, required=True, help="decoded-image cache folder")
    parser.add_argument("--pretrained", type=Path, required=True, help="folder of backbone weights files")
    parser.add_argument("--model", type=Path, required=True, help="where to save the .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="train metrics JSON")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    args = parser.parse_args()
    params = load_params()
    base = params.base
    check_weights_file(params.train.weights, args.pretrained)

    frames = [read_manifest(args.split / "train.csv", SPLIT_COLUMNS)[["path", "label"]]]
    if params.train.use_rebalanced:
        frames.append(read_manifest(args.rebalanced, REBALANCED_COLUMNS)[["path", "label"]])
    train_rows = pd.concat(frames, ignore_index=True)
    val_rows = read_manifest(args.split / "val.csv", SPLIT_COLUMNS)
    # Queued experiments run in throw-away copies of the repo; the cache lives in the real one.
    cache = repo_root() / args.cache
    x_train, train_key = load_cached_images(train_rows["path"].tolist(), base.image_size, cache)
    y_train = class_indices(train_rows["label"], base.classes, source=str(args.split))
    x_val, val_key = load_cached_images(val_rows["path"].tolist(), base.image_size, cache)
    y_val = class_indices(val_rows["label"], base.classes, source=str(args.split / "val.csv"))
    log.info("training on %d images, validating on %d", len(x_train), len(x_val))

    checkpoint_dir = None
    if params.train.resume:
        # One checkpoint folder per (inputs, params, checkpoint format): a resumed run only ever
        # continues the same training.
        settings = f"{train_key}{val_key}{base.model_dump_json()}{params.train.model_dump_json()}"
        settings += f"format {ResumableCheckpoint.FORMAT}"
        checkpoint_dir = cache / "checkpoints" / hashlib.sha256(settings.encode()).hexdigest()[:24]

    with stage_run("train", base, params.train) as run:
        live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None)
        model, summary = train_model(
            x_train,
            y_train,
            x_val,
            y_val,
            base,
            params.train,
            callbacks=[EpochLogger(live)],
            checkpoint_dir=checkpoint_dir,
        )
        live.end()
        mlflow.log_metrics({key: v for key, v in summary.items() if isinstance(v, (int, float))})
        mlflow.set_tag("device", summary["device"])
        save_model_atomic(model, args.model)
        info = mlflow.keras.log_model(
            model,
            name=MLFLOW_MODEL_NAME,
            signature=infer_signature(x_val[:2], model.predict(x_val[:2], verbose=0)),
            pip_requirements=pip_requirements(keras.backend.backend()),
        )
        write_json_atomic(args.model_info, {"run_id": run.info.run_id, "model_uri": info.model_uri})
        write_json_atomic(args.metrics, summary)
    log.info(
        "trained %s on %s in %.0f s; best epoch %d, val balanced accuracy %.3f",
        params.train.arch,
        summary["device"],
        summary["seconds"],
        summary["best_epoch"],
        summary["best_val_balanced_accuracy"],
    )


def check_weights_file(weights: str, folder: Path) -> None:
    """A weights file must exist inside `folder`, which DVC tracks, so that new weights retrain."""
    if weights in ("none", "imagenet"):
        return
    path = Path(weights)
    if not path.resolve().is_relative_to(folder.resolve()):
        raise PipelineError(f"train.weights: {weights}: put the file under {folder}/, which DVC tracks")
    if not path.is_file():
        raise PipelineError(f"train.weights: {weights}: file not found")


@dataclass(frozen=True)
class Phase:
    """Epochs [first_epoch, end_epoch) trained at one learning rate with one set of trainable layers."""

    name: str
    first_epoch: int
    end_epoch: int
    learning_rate: float
    unfreeze: str | int  # the backbone's layers trained, from the top: a count (0: frozen) or "all"


def training_phases(train: TrainParams) -> list[Phase]:
    """A pretrained backbone: warm-up with it frozen, then fine-tuning at a lower rate; else one phase."""
    if not train.pretrained:
        return [Phase("train", 0, train.epochs, train.learning_rate, "all")]
    phases = []
    if train.freeze_epochs:
        phases.append(Phase("warm_up", 0, train.freeze_epochs, train.learning_rate, 0))
    if train.epochs > train.freeze_epochs:
        phases.append(
            Phase(
                "fine_tune", train.freeze_epochs, train.epochs, train.fine_tune_learning_rate, train.unfreeze
            )
        )
    return phases


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    base: BaseParams,
    train: TrainParams,
    callbacks: list[keras.callbacks.Callback] | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """Fit the configured model phase by phase, keeping the last phase's best val balanced accuracy.

    It trains behind its augmentation layers; the model returned (to save and serve) has none.

    With `checkpoint_dir`, every epoch is checkpointed there (a folder per phase) and a killed run
    resumes from the last one, in the phase it was in.
    """
    configure_determinism(base.seed, train.deterministic)
    callbacks = callbacks or []
    sample_weight = compute_sample_weight("balanced", y_train) if train.class_weight == "balanced" else None
    data = (x_train, keras.utils.to_categorical(y_train, len(base.classes)), sample_weight, x_val, y_val)
    phases = training_phases(train)
    epochs_run: dict[str, list[float]] = {}
    epochs_trained = 0
    started = time.perf_counter()
    # One scope for the whole fit: every phase compiles and trains under the same strategy.
    with distribution_scope(train.distribution):
        model, trainer = build_trainer(base, train)
        for phase in phases:
            checkpoint = checkpoint_dir / phase.name if checkpoint_dir else None
            ran, history = fit_phase(
                model, trainer, data, base.seed, train, phase, phase is phases[-1], callbacks, checkpoint
            )
            epochs_trained += ran
            for name, values in history.items():
                epochs_run.setdefault(name, []).extend(values)
    seconds = time.perf_counter() - started
    if checkpoint_dir and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # finished: nothing left to resume
    scores = epochs_run[MONITOR]
    # The best epoch of the last phase (a warm-up's epochs are not candidates); with early stopping
    # the model holds its weights, else the last epoch's.
    best = phases[-1].first_epoch + int(np.argmax(scores[phases[-1].first_epoch :]))
    kept = best if train.early_stopping_patience else len(scores) - 1
    summary = {
        "arch": train.arch,
        "weights": "file" if train.weights not in ("none", "imagenet") else train.weights,
        "precision": train.precision,
        "backend": keras.backend.backend(),
        "device": detect_device(),
        "epochs": len(scores),
        "best_epoch": best + 1,
        "best_val_balanced_accuracy": float(scores[best]),
        "kept_epoch": kept + 1,
        "seconds": round(seconds, 2),
        "images_per_second": round(epochs_trained * len(x_train) / seconds, 2),
        "train_images": len(x_train),
        "val_images": len(x_val),
        **{key: float(values[kept]) for key, values in epochs_run.items() if key != "learning_rate"},
    }
    return model, summary


def fit_phase(
    model: keras.Model,
    trainer: keras.Model,
    data: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray],
    seed: int,
    train: TrainParams,
    phase: Phase,
    last: bool,
    callbacks: list[keras.callbacks.Callback],
    checkpoint_dir: Path | None,
) -> tuple[int, dict[str, list[float]]]:
    """Train one phase; return how many epochs it trained now and the logs of all its epochs."""
    x_train, y_train, sample_weight, x_val, y_val = data
    batches_per_epoch = math.ceil(len(x_train) / train.batch_size)
    compile_phase(model, trainer, train, phase, batches_per_epoch * (phase.end_epoch - phase.first_epoch))
    # Early stopping, and so the epoch kept, only in the last phase: a warm-up is there to end.
    early_stopping = None
    if train.early_stopping_patience and last:
        early_stopping = keras.callbacks.EarlyStopping(
            monitor=MONITOR, mode="max", patience=train.early_stopping_patience, restore_best_weights=True
        )
    recorder = None
    if checkpoint_dir:
        recorder = ResumableCheckpoint(checkpoint_dir, phase.first_epoch, early_stopping, callbacks)
    # The validation pass comes first so that the callbacks after it see its metrics.
    phase_callbacks = [
        ValidationMetrics(x_val, y_val, train.batch_size, train.val_class_cap),
        *([early_stopping] if early_stopping else []),
        *([recorder] if recorder else []),
        *callbacks,
    ]
    # A resumed fit carries on with the batch order the interrupted one would have used.
    first_epoch = max(recorder.saved_epoch() if recorder else 0, phase.first_epoch)
    batches = ShuffledBatches(
        x_train, y_train, train.batch_size, seed, sample_weight, train.cutmix, first_epoch=first_epoch
    )
    history = trainer.fit(
        batches,
        initial_epoch=phase.first_epoch,
        epochs=phase.end_epoch,
        steps_per_epoch=batches_per_epoch,
        shuffle=False,  # the batches shuffle themselves
        callbacks=phase_callbacks,
        verbose=2,
    )
    trained = len(history.history.get(MONITOR, []))
    # A resumed fit's History only holds the epochs it ran; the checkpoint recorded the earlier ones.
    return trained, recorder.history if recorder else history.history


def build_trainer(base: BaseParams, train: TrainParams) -> tuple[keras.Model, keras.Model]:
    """The model to save, and the model that fits it behind augmentation (compiled per phase)."""
    # Global in Keras, and read when layers are built: train.precision holds for every net built after.
    keras.mixed_precision.set_dtype_policy(train.precision)
    model = build_model(
        train.arch, base.image_size, len(base.classes), train.dropout, train.weights, train.shades_of_gray
    )
    return model, with_augmentation(model, train.augment)


def compile_phase(
    model: keras.Model, trainer: keras.Model, train: TrainParams, phase: Phase, steps: int
) -> None:
    """Set which backbone layers the phase trains; compile the trainer for its `steps` at its rate."""
    if has_backbone(model):
        set_backbone_trainable(model, phase.unfreeze)
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = phase.learning_rate
    if train.schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(phase.learning_rate, decay_steps=steps)
    trainer.compile(
        optimizer=make_optimizer(learning_rate, train.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def make_optimizer(
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule, weight_decay: float
) -> keras.optimizers.Optimizer:
    """Adam, or AdamW with `weight_decay` on the kernels when it is above 0."""
    if not weight_decay:
        return keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    # Decaying biases and batch norm's scale and offset only pulls them off their learned values.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def load_cached_images(paths: Sequence[str], size: int, cache_dir: Path) -> tuple[np.ndarray, str]:
    """Decoded (n, size, size, 3) uint8 images (from the cache if these files were seen) and their key."""
    key = _content_key(paths, size)
    cache_file = cache_dir / f"decoded-{size}px-{key}.npy"
    if cache_file.is_file():
        log.info("reusing decoded images from %s", cache_file)
        return np.load(cache_file), key
    images = load_images(paths, size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, images)
    tmp.replace(cache_file)
    log.info("decoded %d images into %s", len(images), cache_file)
    return images, key


def _content_key(paths: Sequence[str], size: int) -> str:
    # Hashing the files' bytes is cheap next to decoding them, and it is what the cache depends on.
    digest = hashlib.sha256(f"{size}\n".encode())
    for path in paths:
        digest.update(path.encode() + b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:24]


@contextlib.contextmanager
def distribution_scope(kind: str) -> Iterator[None]:
    """Build and compile under data parallelism over all visible devices when asked to."""
    if kind == "none":
        yield
        return
    backend = keras.backend.backend()
    if backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        try:
            yield
        finally:
            keras.distribution.set_distribution(None)
    elif backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415 - only this backend needs its own strategy

        # Reduction to one device, not the default collective all-reduce, which failed once the
        # fine-tuning phase recompiled: the replicas disagreed on the gradients' shapes (the warm-up's).
        strategy = tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.ReductionToOneDevice())
        with strategy.scope():
            yield
    else:
        raise PipelineError(f"train.distribution={kind}: not supported on the {backend} backend")


class ShuffledBatches(keras.utils.PyDataset):
    """Endless batches of the decoded images, reshuffled every epoch from the seed; Keras prefetches them.

    Endless, with fit's steps_per_epoch, so that Keras keeps one iterator for the whole fit: given
    arrays, fit makes a new TensorFlow iterator every epoch, and on a 2-core CPU that stalled about one
    epoch in two for 4.7 s before its first batch.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
        sample_weight: np.ndarray | None = None,
        cutmix: float = 0.0,
        first_epoch: int = 0,
    ) -> None:
        # workers=1: Keras makes each batch on demand, counting from index 0 in every new iterator
        # (TensorFlow's tf.data prefetches them in the background). With workers > 1 its enqueuer
        # threads keep counting across iterators, so the batch that a distribution strategy takes
        # to build the model is skipped, and training no longer matches single-device training.
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size, self.seed, self.first_epoch = batch_size, seed, first_epoch
        self.cutmix = cutmix
        self.batches_per_epoch = math.ceil(len(x) / batch_size)
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    @property
    def num_batches(self) -> None:
        """None: endless (Keras's marker for an infinite dataset)."""
        return None

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        """Batch `index`, counted across epochs from the start of the fit (at `first_epoch`)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        epoch += self.first_epoch
        picked = self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        x, y = self.x[picked], self.y[picked]
        if self.cutmix:
            x, y = cut_and_mix(x, y, self.cutmix, np.random.default_rng([self.seed, epoch, position]))
        if self.sample_weight is None:
            return x, y
        return x, y, self.sample_weight[picked]

    def _order(self, epoch: int) -> np.ndarray:
        # Derived from (seed, epoch) alone, so any batch can be made in any order, deterministically.
        # Kept for the epoch's other batches: the permutation of 5,900 images takes about as long as
        # gathering a batch of 32 (0.1 ms), which a GPU's short steps would feel.
        cached_epoch, order = self._epoch_order
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
            self._epoch_order = (epoch, order)  # one assignment, so a reader never sees a mixed pair
        return order


def cut_and_mix(
    images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """CutMix: a random box of another image of the batch pasted into each; labels mixed by area.

    Hand-written because keras.layers.CutMix draws from a stateful seed generator, so a batch could
    not be remade from its index alone (which resuming relies on). The box's share of the image is
    1 - Beta(alpha, alpha), as in Yun et al. 2019; pixels stay uint8.
    """
    count, height, width = images.shape[:3]
    partners = rng.permutation(count)
    box_side = np.sqrt(1 - rng.beta(alpha, alpha, size=count))
    box_heights = np.round(box_side * height).astype(int)
    box_widths = np.round(box_side * width).astype(int)
    tops = rng.integers(0, height - box_heights + 1)
    lefts = rng.integers(0, width - box_widths + 1)
    mixed = images.copy()
    for i, (partner, top, left, box_height, box_width) in enumerate(
        zip(partners, tops, lefts, box_heights, box_widths, strict=True)
    ):
        box = (slice(top, top + box_height), slice(left, left + box_width))
        mixed[i][box] = images[partner][box]
    pasted = (box_heights * box_widths / (height * width))[:, None]
    return mixed, (1 - pasted) * labels + pasted * labels[partners]


class ValidationMetrics(keras.callbacks.Callback):
    """One pass over the validation set per epoch: val_loss, val_accuracy, val_balanced_accuracy.

    val_balanced_accuracy (early stopping's monitor) is `capped_balanced_accuracy` with class_cap.
    """

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray, batch_size: int, class_cap: int) -> None:
        super().__init__()
        self.x_val, self.y_val, self.batch_size, self.class_cap = x_val, y_val, batch_size, class_cap

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Add the validation metrics to this epoch's logs."""
        probabilities = np.asarray(self.model.predict(self.x_val, batch_size=self.batch_size, verbose=0))
        predicted = probabilities.argmax(axis=1)
        picked = probabilities[np.arange(len(self.y_val)), self.y_val]
        if logs is not None:
            logs["val_loss"] = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
            logs["val_accuracy"] = float((predicted == self.y_val).mean())
            logs[MONITOR] = capped_balanced_accuracy(self.y_val, predicted, self.class_cap)


def capped_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, class_cap: int) -> float:
    """Mean per-class recall, each class weighed by its number of images capped at class_cap.

    class_cap 1 is balanced accuracy. A larger cap keeps a class with one or two validation images
    (seborrheic keratosis, after cleaning the public dataset) from swinging early stopping's choice
    by a whole class's share on one image, while classes with enough images still count equally.
    """
    labels, counts = np.unique(y_true, return_counts=True)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None)
    return float(np.average(recalls, weights=np.minimum(counts, class_cap)))


class ResumableCheckpoint(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore (weights, optimizer, epoch) of one training phase, plus what it leaves out.

    It also keeps each epoch's logs, the early-stopping state and the random generators' states
    (augmentation, dropout), so that a resumed run trains, stops, keeps its best epoch and reports its
    history exactly as an uninterrupted one would, and replays the earlier epochs to `replay_to` (the
    DVCLive and MLflow loggers) before carrying on.
    """

    FORMAT = 3  # bumped when the files below change, so that old checkpoints are not read
    STATE_FILE = "resume_state.json"
    BEST_WEIGHTS_FILE = "best_weights.npz"
    RANDOM_STATE_FILE = "random_state.npz"

    def __init__(
        self,
        backup_dir: Path,
        first_epoch: int,
        early_stopping: keras.callbacks.EarlyStopping | None,
        replay_to: Sequence[keras.callbacks.Callback],
    ) -> None:
        # Kept when the fit ends: a later phase's resume restores this phase's end from it.
        super().__init__(backup_dir=str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.backup_path = Path(backup_dir)
        self.first_epoch = first_epoch
        self.early_stopping = early_stopping
        self.replay_to = list(replay_to)
        self.history: dict[str, list[float]] = {}

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

    def _save_model(self) -> None:
        # Keras writes the weights, then the epoch; our state goes first, stamped with the epoch it
        # belongs to, so that a kill between the writes is detected instead of mixing epochs.
        self.backup_path.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"epoch": self._current_epoch, "history": self.history}
        self._save(self.RANDOM_STATE_FILE, [keras.ops.convert_to_numpy(v) for v in self._random_states()])
        if self.early_stopping is not None:
            stopping = self.early_stopping
            best = None if stopping.best is None else float(stopping.best)
            state["early_stopping"] = {"wait": stopping.wait, "best": best, "best_epoch": stopping.best_epoch}
            self._save(self.BEST_WEIGHTS_FILE, stopping.best_weights or [])
        write_json_atomic(self.backup_path / self.STATE_FILE, state)
        super()._save_model()

    def _random_states(self) -> list[keras.Variable]:
        # The seed generators' states are variables but not weights, so save_weights leaves them out.
        weights = {id(weight) for weight in self.model.weights}
        return [variable for variable in self.model.variables if id(variable) not in weights]

    def _save(self, name: str, arrays: Sequence[np.ndarray]) -> None:
        tmp = self.backup_path / f".{name}.tmp.npz"
        np.savez(tmp, *arrays)
        tmp.replace(self.backup_path / name)

    def _load(self, name: str) -> list[np.ndarray]:
        with np.load(self.backup_path / name) as stored:
            return [stored[f"arr_{i}"] for i in range(len(stored.files))]


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


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and the backend; ask TensorFlow for deterministic kernels if wanted."""
    keras.utils.set_random_seed(seed)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415 - only this backend has the switch

        tf.config.experimental.enable_op_determinism()


def detect_device() -> str:
    """'gpu' when the active Keras backend sees a GPU (and so trains on it), else 'cpu'."""
    backend = keras.backend.backend()
    # Each backend asks its own runtime; importing only the active one keeps the others optional.
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    elif backend == "jax":
        import jax  # noqa: PLC0415

        has_gpu = any(device.platform == "gpu" for device in jax.devices())
    elif backend == "torch":
        import torch  # noqa: PLC0415

        has_gpu = torch.cuda.is_available()
    else:
        has_gpu = False
    return "gpu" if has_gpu else "cpu"


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a .keras file through a temp name, so a killed run never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
