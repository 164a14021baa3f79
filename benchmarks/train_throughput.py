"""Train the baseline CNN two ways on the same real images and compare throughput and accuracy.

1. The reference notebooks' recipe: `image_dataset_from_directory`, `.cache()`, float32.
2. This project's train path with its defaults from params.yaml (decoded uint8 cache, mixed
   precision, in-model augmentation, ...), with train.arch set to baseline_cnn.

Both include decoding in their time (the reference decodes during its first epoch, the project
before fitting). Prints images/s for each, overall and after the first epoch (steady state, without
decoding and graph tracing), held-out accuracy, and last `ratio: X.XX` (project / reference, overall).

    python benchmarks/train_throughput.py --data ../shared/data/isic-9class/Train --per-class 120 --epochs 3
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import tensorflow as tf

from stages.architectures import build_model
from stages.config import load_params
from stages.train import load_cached_images, train_model

log = logging.getLogger("benchmark")


def main() -> None:
    """Run both recipes and print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <class>/*.jpg")
    parser.add_argument("--per-class", type=int, default=120, help="images per class, at most")
    parser.add_argument("--holdout", type=float, default=0.25, help="share held out for accuracy")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    classes, size, seed = list(params.base.classes), params.base.image_size, params.base.seed

    train_paths, train_labels, test_paths, test_labels = _pick(
        args.data, classes, args.per_class, args.holdout, seed
    )
    x_test, _ = load_cached_images(test_paths, size, Path(tempfile.mkdtemp()))
    log.info("%d training and %d held-out images, %d epochs", len(train_paths), len(test_paths), args.epochs)

    with tempfile.TemporaryDirectory() as folder:
        reference_rate, reference_steady, reference_acc = _reference(
            train_paths, train_labels, classes, Path(folder), size, args.epochs, seed, x_test, test_labels
        )
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        x_train, _ = load_cached_images(train_paths, size, Path(cache))
        recipe = params.train.model_copy(
            update={"arch": "baseline_cnn", "epochs": args.epochs, "early_stopping_patience": 0}
        )
        y_train = np.array([classes.index(label) for label in train_labels])
        timer = EpochTimer()
        model, _ = train_model(
            x_train, y_train, x_test[:64], test_labels[:64], params.base, recipe, callbacks=[timer]
        )
        project_rate = len(train_paths) * args.epochs / (time.perf_counter() - started)
        project_steady = timer.steady_rate(len(train_paths))
        project_acc = _accuracy(model, x_test, test_labels)

    print(f"reference recipe (image_dataset_from_directory, cache, float32): {reference_rate:.1f} images/s")
    print(f"reference after its first epoch: {reference_steady:.1f} images/s")
    print(f"reference held-out accuracy after {args.epochs} epochs: {reference_acc:.3f}")
    print(f"project train path ({recipe.precision}, decoded cache): {project_rate:.1f} images/s")
    print(f"project after its first epoch: {project_steady:.1f} images/s")
    print(f"project held-out accuracy after {args.epochs} epochs: {project_acc:.3f}")
    print(f"ratio: {project_rate / reference_rate:.2f}")


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, to tell the steady state from the first epoch's decoding and tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Start the clock."""
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Stop the clock."""
        self.seconds.append(time.perf_counter() - self._started)

    def steady_rate(self, images: int) -> float:
        """Images per second over the epochs after the first."""
        later = self.seconds[1:] or self.seconds
        return images * len(later) / sum(later)


def _pick(
    root: Path, classes: list[str], per_class: int, holdout: float, seed: int
) -> tuple[list[str], list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    train_paths, train_labels, test_paths, test_labels = [], [], [], []
    for index, label in enumerate(classes):
        files = sorted(str(path) for path in (root / label).glob("*.jpg"))
        files = [files[k] for k in rng.permutation(len(files))[:per_class]]
        cut = max(1, round(len(files) * holdout))
        test_paths += files[:cut]
        test_labels += [index] * cut
        train_paths += files[cut:]
        train_labels += [label] * (len(files) - cut)
    return train_paths, train_labels, test_paths, np.array(test_labels)


def _reference(
    paths: list[str],
    labels: list[str],
    classes: list[str],
    folder: Path,
    size: int,
    epochs: int,
    seed: int,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> tuple[float, float, float]:
    for path, label in zip(paths, labels, strict=True):
        link = folder / label / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(path).resolve())
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_dtype_policy("float32")
    dataset = keras.utils.image_dataset_from_directory(
        folder, class_names=classes, image_size=(size, size), batch_size=32, seed=seed
    )
    dataset = dataset.cache().prefetch(tf.data.AUTOTUNE)
    model = build_model("baseline_cnn", size, len(classes), 0.25)
    model.compile(
        optimizer=keras.optimizers.Adam(0.001),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    timer = EpochTimer()
    model.fit(dataset, epochs=epochs, verbose=2, callbacks=[timer])
    rate = len(paths) * epochs / (time.perf_counter() - started)
    return rate, timer.steady_rate(len(paths)), _accuracy(model, x_test, y_test)


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, verbose=0).argmax(axis=1) == y).mean())


if __name__ == "__main__":
    main()
