"""Training: the recipes (fine-tuning, linear probe, LP-FT), the phases of a fit, optimizer and devices."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, log_loss
from sklearn.utils.class_weight import compute_sample_weight

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.metrics import capped_balanced_accuracy
from skin_lesion.evaluation.sites import ProbeInputs
from skin_lesion.files import atomic_file
from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings
from skin_lesion.params import BaseParams, TrainParams
from skin_lesion.training.architectures import (
    build_model,
    has_backbone,
    set_backbone_trainable,
    with_augmentation,
)
from skin_lesion.training.batching import ShuffledBatches
from skin_lesion.training.callbacks import (
    MONITOR,
    ResumableCheckpoint,
    StopOnNonFiniteLoss,
    TrainingClock,
    ValidationMetrics,
)
from skin_lesion.training.linear_head import probe_fitter
from skin_lesion.training.probe import (
    cached_embeddings,
    collection_projection,
    interpolate_weights,
    set_head,
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
    """A pretrained backbone: warm-up with it frozen, then fine-tuning at a lower rate; else one phase.

    LP-FT has no warm-up: its head starts as the converged linear probe.
    """
    if not train.pretrained:
        return [Phase("train", 0, train.epochs, train.learning_rate, "all")]
    warm_up = 0 if train.recipe == "lp_ft" else train.freeze_epochs
    phases = []
    if warm_up:
        phases.append(Phase("warm_up", 0, warm_up, train.learning_rate, 0))
    if train.epochs > warm_up:
        phases.append(
            Phase("fine_tune", warm_up, train.epochs, train.fine_tune_learning_rate, train.unfreeze)
        )
    return phases


@dataclass(frozen=True)
class ImageSet:
    """Decoded uint8 images, their class indices, the key of their bytes (for the embedding cache), and
    each image's collection (split's provenance)."""

    images: np.ndarray
    labels: np.ndarray
    key: str
    collections: np.ndarray | None = None


def fit_recipe(
    train_set: ImageSet,
    val_set: ImageSet,
    base: BaseParams,
    train: TrainParams,
    cache_dir: Path,
    callbacks: list[keras.callbacks.Callback] | None = None,
    checkpoint_dir: Path | None = None,
    site: SiteImages | None = None,
    inputs_file: Path | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """The model `train.recipe` makes, and its training summary; `site` and `inputs_file` are the
    linear probe's (train_linear_probe)."""
    if site is not None and train.recipe != "linear_probe":
        raise PipelineError(f"site: train.recipe={train.recipe} does not learn from a site; use linear_probe")
    if train.recipe == "lp_ft":
        return train_lp_ft(train_set, val_set, base, train, cache_dir, callbacks, checkpoint_dir)
    if train.recipe == "fine_tune":
        return fine_tune(train_set, val_set, base, train, callbacks, checkpoint_dir)
    probe, summary = train_linear_probe(train_set, val_set, base, train, cache_dir, site, inputs_file)
    # Fitted once, not per epoch: its loss and accuracies are the one step of its curves.
    for callback in callbacks or []:
        callback.on_epoch_end(0, summary["fit"])
    return probe, summary


def fine_tune(
    train_set: ImageSet,
    val_set: ImageSet,
    base: BaseParams,
    train: TrainParams,
    callbacks: list[keras.callbacks.Callback] | None = None,
    checkpoint_dir: Path | None = None,
    start: keras.Model | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """train_model on two image sets: the fine_tune recipe, and LP-FT's fine-tuning of its probe."""
    return train_model(
        train_set.images,
        train_set.labels,
        val_set.images,
        val_set.labels,
        base,
        train,
        callbacks,
        checkpoint_dir,
        start=start,
    )


def train_lp_ft(
    train_set: ImageSet,
    val_set: ImageSet,
    base: BaseParams,
    train: TrainParams,
    cache_dir: Path,
    callbacks: list[keras.callbacks.Callback] | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """LP-FT: the linear probe, fine-tuned without a warm-up, then mixed with its start (WiSE-FT).

    Its validation figures, best_val_balanced_accuracy included, are the returned model's, predicted
    as evaluate predicts (mirror averaging as base.mirror_average says), so that they compare with
    the probe's; best_epoch and the epochs' curves stay the fine-tuning's.
    """
    # One scope for both: the net the probe is fitted into is the net fine-tuned, so it is built
    # under the strategy that trains it.
    with distribution_scope(train.distribution):
        model, probe_summary = train_linear_probe(train_set, val_set, base, train, cache_dir)
        start = model.get_weights()
        model, summary = fine_tune(train_set, val_set, base, train, callbacks, checkpoint_dir, start=model)
    model = interpolate_weights(start, model, train.interpolation)
    figures = validation_figures(model, val_set, train.batch_size, base.mirror_average, train.val_class_cap)
    figures["best_val_balanced_accuracy"] = figures["val_balanced_accuracy"]  # what the stage reports
    probe_figures = {f"probe_{key}": probe_summary[key] for key in ("val_balanced_accuracy", "seconds")}
    return model, {**summary, **figures, **probe_figures, "interpolation": train.interpolation}


def validation_figures(
    model: keras.Model, val_set: ImageSet, batch_size: int, mirror_average: bool, class_cap: int
) -> dict[str, float]:
    """val_loss, val_accuracy and the capped val_balanced_accuracy of `model`, predicting as evaluate does."""
    probabilities, _ = predict_with_embeddings(
        with_embeddings(model), val_set.images, batch_size, mirror_average
    )
    predicted = probabilities.argmax(axis=1)
    return {
        **probability_figures(probabilities, val_set.labels, "val_"),
        "val_balanced_accuracy": capped_balanced_accuracy(val_set.labels, predicted, class_cap),
    }


@dataclass(frozen=True)
class SiteImages:
    """A site's decoded images, their class indices (sites.NOT_LEARNED for `other`), the key of their
    bytes, and the weight of each in the probe's fit (site.weight)."""

    images: np.ndarray
    labels: np.ndarray
    key: str
    weight: float


def train_linear_probe(
    train_set: ImageSet,
    val_set: ImageSet,
    base: BaseParams,
    train: TrainParams,
    cache_dir: Path,
    site: SiteImages | None = None,
    inputs_file: Path | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """The pretrained backbone with a softmax head fitted as a logistic regression on its embeddings.

    With `site`, the head also learns from the site's images. With `inputs_file`, what the head was
    fitted on (projected embeddings and class indices of train, val and the site) is saved there as
    .npz, for the `site` stage's cross-fitting.
    """
    configure_determinism(base.seed, train.deterministic)
    model = build_network(base, train)
    started = time.perf_counter()
    sets = {"train": train_set, "val": val_set, **({"site": site} if site is not None else {})}
    embed = embed_sets(model, sets, cache_dir, train.batch_size, base.mirror_average)
    fitting = time.perf_counter()
    projection = np.eye(embed["train"].shape[1], dtype=np.float32)
    if train.probe_remove_collections and train_set.collections is not None:
        projection = collection_projection(embed["train"], train_set.labels, train_set.collections)
    # The projection is symmetric and idempotent, so (x P) W = x (P W) = (x P) (P W): a head fitted
    # on projected embeddings takes raw embeddings as before.
    inputs = ProbeInputs(
        embed["train"] @ projection,
        train_set.labels,
        (embed["site"] @ projection) if site else np.zeros((0, len(projection)), np.float32),
        site.labels if site else np.zeros(0, np.int64),
    )
    fit_head = probe_fitter(len(base.classes), train.probe_c, train.class_weight, base.seed)
    kernel, bias = inputs.fit(fit_head, np.arange(len(inputs.site_y)), site.weight if site else 1.0)
    kernel = projection @ kernel
    set_head(model, kernel, bias)
    seconds = time.perf_counter() - fitting
    if inputs_file is not None:
        save_probe_inputs(inputs_file, inputs, embed["val"] @ projection, val_set.labels)
    val_logits = embed["val"] @ kernel + bias
    val_score = capped_balanced_accuracy(val_set.labels, val_logits.argmax(axis=1), train.val_class_cap)
    fit = {
        **head_figures(embed["train"] @ kernel + bias, train_set.labels, ""),
        **head_figures(val_logits, val_set.labels, "val_"),
        "val_balanced_accuracy": val_score,
    }
    return model, {
        **training_setup(train),
        "epochs": 0,
        "best_epoch": 0,
        "best_val_balanced_accuracy": val_score,
        "val_balanced_accuracy": val_score,
        "seconds": round(seconds, 2),  # the regression's fit; the embeddings are cached
        "embedding_seconds": round(fitting - started, 2),
        "collection_directions_removed": round(len(projection) - float(np.trace(projection))),
        "train_images": len(train_set.images),
        "val_images": len(val_set.images),
        **({"site_images": len(site.images), "site_weight": site.weight} if site else {}),
        "fit": fit,
    }


def embed_sets(
    model: keras.Model,
    sets: dict[str, ImageSet | SiteImages],
    cache_dir: Path,
    batch_size: int,
    mirror_average: bool,
) -> dict[str, np.ndarray]:
    """The embeddings the model's head sees for each named image set, through the embedding cache."""
    return {
        name: cached_embeddings(model, image_set.images, image_set.key, cache_dir, batch_size, mirror_average)
        for name, image_set in sets.items()
    }


def head_figures(logits: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """Cross-entropy loss and accuracy of a head's logits, named as Keras names an epoch's logs."""
    return probability_figures(softmax(logits, axis=1), labels, prefix)


def probability_figures(probabilities: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """Cross-entropy loss and accuracy of class probabilities, named as Keras names an epoch's logs."""
    classes = np.arange(probabilities.shape[1])
    return {
        f"{prefix}loss": float(log_loss(labels, probabilities, labels=classes)),
        f"{prefix}accuracy": float(accuracy_score(labels, probabilities.argmax(axis=1))),
    }


def save_probe_inputs(path: Path, inputs: ProbeInputs, val_x: np.ndarray, val_y: np.ndarray) -> None:
    """Write what the probe was fitted on, and the val split's embeddings, as one .npz."""
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(
            tmp,
            train_x=inputs.train_x.astype(np.float32),
            train_y=inputs.train_y,
            site_x=inputs.site_x.astype(np.float32),
            site_y=inputs.site_y,
            val_x=np.asarray(val_x, np.float32),
            val_y=val_y,
        )


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    base: BaseParams,
    train: TrainParams,
    callbacks: list[keras.callbacks.Callback] | None = None,
    checkpoint_dir: Path | None = None,
    start: keras.Model | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """Fit the configured model phase by phase, keeping the last phase's best val balanced accuracy.

    It trains behind its augmentation layers; the model returned (to save and serve) has none.
    `start` (LP-FT: the linear probe, built under train.distribution) is the model trained, instead
    of a newly built one.

    With `checkpoint_dir`, every epoch is checkpointed there (a folder per phase) and a killed run
    resumes from the last one, in the phase it was in.
    """
    if train.batch_size > len(x_train):
        raise PipelineError(
            f"train.batch_size: {train.batch_size} is more than the {len(x_train)} training images"
        )
    configure_determinism(base.seed, train.deterministic)
    callbacks = callbacks or []
    sample_weight = compute_sample_weight("balanced", y_train) if train.class_weight == "balanced" else None
    data = (x_train, keras.utils.to_categorical(y_train, len(base.classes)), sample_weight, x_val, y_val)
    phases = training_phases(train)
    epochs_run: dict[str, list[float]] = {}
    epochs_trained = 0
    started, clock = time.perf_counter(), TrainingClock()
    # One scope for the whole fit: every phase compiles and trains under the same strategy.
    with distribution_scope(train.distribution):
        model, trainer = build_trainer(base, train, start)
        for phase in phases:
            checkpoint = checkpoint_dir / phase.name if checkpoint_dir else None
            ran, history = fit_phase(
                model,
                trainer,
                data,
                base.seed,
                train,
                phase,
                phase is phases[-1],
                callbacks,
                checkpoint,
                clock,
            )
            epochs_trained += ran
            for name, values in history.items():
                epochs_run.setdefault(name, []).extend(values)
    if checkpoint_dir and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)  # finished: nothing left to resume
    speed = epochs_trained * len(x_train) / (time.perf_counter() - started)  # this process's epochs
    summary = training_summary(train, epochs_run, phases[-1].first_epoch, clock.seconds(), speed)
    return model, {**summary, "train_images": len(x_train), "val_images": len(x_val)}


def training_setup(train: TrainParams) -> dict[str, str]:
    """What every recipe's summary starts with: how it trained, and on what."""
    return {
        "recipe": train.recipe,
        "arch": train.arch,
        "weights": "file" if train.weights not in ("none", "imagenet") else train.weights,
        "precision": train.precision,
        "backend": keras.backend.backend(),
        "device": detect_device(),
    }


def training_summary(
    train: TrainParams,
    epochs_run: dict[str, list[float]],
    last_phase_start: int,
    seconds: float,
    images_per_second: float,
) -> dict[str, Any]:
    """What train.json records: the set-up, the best and the kept epoch and its logs, the time."""
    scores = epochs_run[MONITOR]
    # The best epoch of the last phase (a warm-up's epochs are not candidates); with early stopping
    # the model holds its weights, else the last epoch's.
    best = last_phase_start + int(np.argmax(scores[last_phase_start:]))
    kept = best if train.early_stopping_patience else len(scores) - 1
    return {
        **training_setup(train),
        "epochs": len(scores),
        "best_epoch": best + 1,
        "best_val_balanced_accuracy": float(scores[best]),
        "kept_epoch": kept + 1,
        "seconds": round(seconds, 2),  # with the time of the killed runs it resumed
        "images_per_second": round(images_per_second, 2),
        **{key: float(values[kept]) for key, values in epochs_run.items() if key != "learning_rate"},
    }


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
    clock: TrainingClock | None = None,
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
        recorder = ResumableCheckpoint(checkpoint_dir, phase.first_epoch, early_stopping, callbacks, clock)
    # The validation pass comes first so that the callbacks after it see its metrics.
    phase_callbacks = [
        StopOnNonFiniteLoss(),
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


def build_trainer(
    base: BaseParams, train: TrainParams, start: keras.Model | None = None
) -> tuple[keras.Model, keras.Model]:
    """The model to save (`start`, else a new one), and the model that fits it behind augmentation
    (compiled per phase)."""
    model = start if start is not None else build_network(base, train)
    with global_dtype_policy(train.precision):  # the augmentation's layers, and the trainer's own
        return model, with_augmentation(model, train.augment)


def build_network(base: BaseParams, train: TrainParams) -> keras.Model:
    """The configured net (train.arch, its weights), its layers in train.precision."""
    with global_dtype_policy(train.precision):
        return build_model(
            train.arch, base.image_size, len(base.classes), train.dropout, train.weights, train.shades_of_gray
        )


@contextlib.contextmanager
def global_dtype_policy(name: str) -> Iterator[None]:
    """Keras's global dtype policy set to `name` inside, and restored after, even on an error."""
    # Keras reads it when it builds a layer; left set, it would change every net the caller builds after.
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


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


@contextlib.contextmanager
def distribution_scope(kind: str) -> Iterator[None]:
    """Build and compile under data parallelism over all visible devices when asked to; inside such
    a scope already (LP-FT's probe and its fine-tuning share one), carry on in it."""
    if kind == "none" or under_distribution():
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


def under_distribution() -> bool:
    """Whether a distribution scope (JAX's distribution, TensorFlow's strategy) is in force."""
    backend = keras.backend.backend()
    if backend == "jax":
        return keras.distribution.distribution() is not None
    if backend == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415 - only this backend has strategies

        return tf.distribute.has_strategy()
    return False


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
