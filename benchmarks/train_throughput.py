"""Train the baseline CNN two ways on the same real images and compare throughput and accuracy.

1. The reference notebooks' recipe: `image_dataset_from_directory`, `.cache()`, float32.
2. This project's train path with its defaults from params.yaml (decoded uint8 cache, mixed
   precision, in-model augmentation, endless prefetched batches, ...), with train.arch set to
   baseline_cnn.

Both include decoding in their time (the reference decodes during its first epoch, the project
before fitting), which runs to the end of the last epoch: after it, `fit` waits while TensorFlow
deletes its last tf.data iterator, whose autotuning thread finishes its current sleep first (seen
in a debugger; 0 to 18 s on this VM, once per fit whatever its length, so a 3-epoch run would
mostly time the luck of that wait). That wait is printed apart; the iterators that the reference
remakes every epoch pay it before its last epoch ends, and count. Each run is a fresh Python
process, and the recipes alternate, `--repeats` times each, repeat k training with seed base.seed +
k (the images are the same): this VM's CPU speed drifts by up to 2x over minutes, and a few epochs'
accuracy depends on the seed, so one run of each says little. Prints each recipe's best images/s
(as timeit does: slower runs were disturbed, not different) with every run's, images/s after the
first epoch, the mean held-out accuracy with every run's, and last `ratio: X.XX` (best project /
best reference, overall images/s).
`--without-augmentation` adds a third recipe, the project path with train.augment all off, to show
what the augmentation costs.

    python benchmarks/train_throughput.py --data ../shared/data/isic-9class/Train --per-class 200 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras

from skin_lesion.params import AugmentParams, load_params
from skin_lesion.training.architectures import build_model
from skin_lesion.training.batching import load_cached_images
from skin_lesion.training.recipes import train_model

log = logging.getLogger("benchmark")
REPO = Path(__file__).resolve().parents[1]
RECIPES = ("reference", "project", "project_unaugmented")
RESULT_PREFIX = "RESULT "
NO_AUGMENTATION = AugmentParams(flip=False, rotation=0, zoom=0, contrast=0, brightness=0)


def main() -> None:
    """Run both recipes, alternating, each in its own process; print their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <class>/*.jpg")
    parser.add_argument("--per-class", type=int, default=120, help="images per class, at most")
    parser.add_argument("--holdout", type=float, default=0.25, help="share held out for accuracy")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each recipe")
    parser.add_argument("--without-augmentation", action="store_true", help="also time it without")
    parser.add_argument("--only", choices=RECIPES, help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)  # its seed offset
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.only:
        print(RESULT_PREFIX + json.dumps(_run(args.only, args, args.repeat)), flush=True)
        return

    recipes = RECIPES if args.without_augmentation else RECIPES[:2]
    runs: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    for repeat in range(args.repeats):
        for recipe in recipes:
            command = [sys.executable, __file__, *sys.argv[1:], "--only", recipe, "--repeat", str(repeat)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.split(RESULT_PREFIX, 1)[1])
            log.info("%s run: %s", recipe, result)
            runs[recipe].append(result)

    precision = load_params(REPO / "params.yaml").train.precision
    titles = {
        "reference": "reference recipe (image_dataset_from_directory, cache, float32)",
        "project": f"project train path ({precision}, decoded cache)",
        "project_unaugmented": f"project train path without augmentation ({precision}, decoded cache)",
    }
    best = {}
    for recipe in recipes:
        rates = ", ".join(f"{run['rate']:.1f}" for run in runs[recipe])
        best[recipe] = max(runs[recipe], key=lambda run: run["rate"])
        print(f"{titles[recipe]}: {best[recipe]['rate']:.1f} images/s (runs: {rates})")
        print(f"{recipe} after its first epoch: {best[recipe]['steady']:.1f} images/s")
        waits = ", ".join(f"{run['teardown']:.1f}" for run in runs[recipe])
        print(f"{recipe} wait after its last epoch, not counted: {waits} s")
        accuracies = [run["accuracy"] for run in runs[recipe]]
        each = ", ".join(f"{accuracy:.3f}" for accuracy in accuracies)
        print(
            f"{recipe} held-out accuracy after {args.epochs} epochs: {np.mean(accuracies):.3f} (runs: {each})"
        )
    if args.without_augmentation:
        unaugmented = best["project_unaugmented"]["rate"] / best["reference"]["rate"]
        print(f"ratio without augmentation: {unaugmented:.2f}")
    print(f"ratio: {best['project']['rate'] / best['reference']['rate']:.2f}")


def _run(recipe: str, args: argparse.Namespace, repeat: int) -> dict[str, float]:
    params = load_params(REPO / "params.yaml")
    classes, size = list(params.base.classes), params.base.image_size
    train_paths, train_labels, test_paths, test_labels = _pick(
        args.data, classes, args.per_class, args.holdout, params.base.seed
    )
    seed = params.base.seed + repeat
    with tempfile.TemporaryDirectory() as folder:
        x_test, _ = load_cached_images(test_paths, size, Path(folder) / "test")
        timer = EpochTimer()
        started = time.perf_counter()
        if recipe == "reference":
            model = _fit_reference(
                train_paths, train_labels, classes, Path(folder), size, args.epochs, seed, timer
            )
        else:
            x_train, _ = load_cached_images(train_paths, size, Path(folder) / "train")
            update: dict[str, object] = {
                "arch": "baseline_cnn",
                "epochs": args.epochs,
                "early_stopping_patience": 0,
            }
            if recipe == "project_unaugmented":
                update["augment"] = NO_AUGMENTATION
            settings = params.train.model_copy(update=update)
            y_train = np.array([classes.index(label) for label in train_labels])
            base = params.base.model_copy(update={"seed": seed})
            model, _ = train_model(
                x_train, y_train, x_test[:64], test_labels[:64], base, settings, callbacks=[timer]
            )
        teardown = time.perf_counter() - timer.ended
    accuracy = float((model.predict(x_test, verbose=0).argmax(axis=1) == test_labels).mean())
    return {
        "rate": len(train_paths) * args.epochs / (timer.ended - started),
        "teardown": teardown,
        "steady": timer.steady_rate(len(train_paths)),
        "accuracy": accuracy,
        "epoch_seconds": [round(s, 2) for s in timer.seconds],
    }


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
        self.ended = time.perf_counter()
        self.seconds.append(self.ended - self._started)

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


def _fit_reference(
    paths: list[str],
    labels: list[str],
    classes: list[str],
    folder: Path,
    size: int,
    epochs: int,
    seed: int,
    timer: EpochTimer,
) -> keras.Model:
    import tensorflow as tf  # noqa: PLC0415 - the reference recipe is TensorFlow's tf.data

    for path, label in zip(paths, labels, strict=True):
        link = folder / "reference" / label / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(path).resolve())
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_dtype_policy("float32")
    dataset = keras.utils.image_dataset_from_directory(
        folder / "reference", class_names=classes, image_size=(size, size), batch_size=32, seed=seed
    )
    dataset = dataset.cache().prefetch(tf.data.AUTOTUNE)
    model = build_model("baseline_cnn", size, len(classes), 0.25)
    model.compile(
        optimizer=keras.optimizers.Adam(0.001),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    model.fit(dataset, epochs=epochs, verbose=2, callbacks=[timer])
    return model


if __name__ == "__main__":
    main()
