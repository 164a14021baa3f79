"""Images/s of the train stage's fit on the active Keras backend and device, and the input wait.

For each `--arch`, `--batch-size` and `--precision` (params.yaml's train.precision by default),
builds and compiles the net as the train stage does (`build_trainer`, with params.yaml's recipe:
augmentation, optimizer; `--without-augmentation` adds a run of each with train.augment all off),
then times `--epochs` epochs of `--steps` steps of `trainer.fit` two ways, on the same real images:

1. fed by the stage's own `ShuffledBatches` (a reshuffled gather from the decoded uint8 array, then
   Keras's copy to the device), as the train stage feeds it;
2. fed one batch made beforehand, over and over, so that only the step and the copy remain;

then (1) again, and the two runs of (1) are averaged.

The first epoch of each fit (tracing, compiling, warming up) is left out: the figures are the median
epoch after it. The share of step time spent waiting for input is 1 - (2)/(1), floored at 0. The
stage's validation pass and checkpoint after each epoch are not part of these steps; the stage's
own `images_per_second` in metrics/train.json includes them. Comparing precisions with the fixed
batch and no augmentation shows what mixed precision alone buys on the device.

    KERAS_BACKEND=jax python benchmarks/train_step_throughput.py \
        --data ../shared/data/isic-9class/Train --arch baseline_cnn resnet_small --batch-size 32 256
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import typing
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras

from benchmarks.train_throughput import NO_AUGMENTATION, EpochTimer
from skin_lesion.images import load_images
from skin_lesion.params import BaseParams, TrainParams, load_params
from skin_lesion.training.batching import ShuffledBatches
from skin_lesion.training.recipes import (
    build_trainer,
    compile_phase,
    configure_determinism,
    detect_device,
    training_phases,
)

log = logging.getLogger("benchmark")
REPO = Path(__file__).resolve().parents[1]
# The choices that params.yaml accepts for train.precision.
PRECISIONS = typing.get_args(TrainParams.model_fields["precision"].annotation)


def main() -> None:
    """Time every (arch, batch size, precision, augmentation) combination; print a table of their figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of <class>/*.jpg")
    parser.add_argument("--arch", nargs="+", default=["baseline_cnn"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per way, the first not counted")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, help="default: train.precision")
    parser.add_argument("--without-augmentation", action="store_true", help="also time it without")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(REPO / "params.yaml")
    precisions = args.precision or [params.train.precision]
    augments = {"on": params.train.augment}
    if args.without_augmentation:
        augments["off"] = NO_AUGMENTATION
    paths = sorted(str(path) for path in args.data.glob("*/*.jpg"))
    if len(paths) < max(args.batch_size):
        parser.error(f"--data {args.data}: {len(paths)} images, fewer than a batch of {max(args.batch_size)}")
    images = load_images(paths, params.base.image_size)
    labels = np.arange(len(images)) % len(params.base.classes)  # the step's cost ignores the labels
    backend, device = keras.backend.backend(), detect_device()
    log.info(
        "%d images at %d px; Keras %s on %s (%s)",
        len(images),
        params.base.image_size,
        keras.__version__,
        backend,
        device,
    )

    rows = []
    for arch, batch_size, precision, (augment, augment_params) in itertools.product(
        args.arch, args.batch_size, precisions, augments.items()
    ):
        settings = params.train.model_copy(
            update={"arch": arch, "batch_size": batch_size, "precision": precision, "augment": augment_params}
        )
        row = time_fit(images, labels, params.base, settings, args.steps, args.epochs)
        log.info("%s, batch %d, %s, augmentation %s: %s", arch, batch_size, precision, augment, row)
        rows.append((arch, batch_size, precision, augment, row))

    print(f"backend {backend}, device {device}")
    print(
        f"{'arch':<14} {'batch':>5} {'precision':<15} {'augment':<7} "
        f"{'images/s':>10} {'no input':>10} {'input wait':>10}"
    )
    for arch, batch_size, precision, augment, row in rows:
        print(
            f"{arch:<14} {batch_size:>5} {precision:<15} {augment:<7} {row['images_per_second']:>10,.0f} "
            f"{row['images_per_second_fixed_batch']:>10,.0f} {row['input_wait_share']:>10.1%}"
        )


def time_fit(
    images: np.ndarray, labels: np.ndarray, base: BaseParams, train: TrainParams, steps: int, epochs: int
) -> dict[str, float]:
    """Steady-state images/s with the stage's batches and with one fixed batch, and the input wait."""
    configure_determinism(base.seed, train.deterministic)
    num_classes = len(base.classes)
    # Random weights step as fast as pretrained ones, and need no download; the phase timed is the
    # last one (fine-tuning, for a pretrained net), whose schedule spans all three fits.
    model, trainer = build_trainer(base, train.model_copy(update={"weights": "none"}))
    compile_phase(model, trainer, train, training_phases(train)[-1], steps * epochs * 3)
    # Whole batches only: a short last batch is a new shape, which JAX compiles anew inside a timed epoch.
    whole = len(images) // train.batch_size * train.batch_size
    one_hot = keras.utils.to_categorical(labels[:whole], num_classes)
    shuffled = ShuffledBatches(images[:whole], one_hot, train.batch_size, base.seed)
    fixed = _FixedBatch(*shuffled[0])
    # Shuffled, fixed, shuffled again: a drift in the machine's speed during the run (seen on a shared
    # CPU VM) then weighs on both ways alike instead of favouring whichever runs first.
    before, fixed_seconds, after = (
        _epoch_seconds(trainer, data, steps, epochs) for data in (shuffled, fixed, shuffled)
    )
    shuffled_seconds = (before + after) / 2
    per_epoch = steps * train.batch_size
    return {
        "images_per_second": per_epoch / shuffled_seconds,
        "images_per_second_fixed_batch": per_epoch / fixed_seconds,
        "input_wait_share": max(0.0, 1 - fixed_seconds / shuffled_seconds),
    }


def _epoch_seconds(trainer: keras.Model, data: keras.utils.PyDataset, steps: int, epochs: int) -> float:
    # Keras turns the epoch's logs into numbers before on_epoch_end, which waits for the device.
    timer = EpochTimer()
    trainer.fit(data, epochs=epochs, steps_per_epoch=steps, shuffle=False, callbacks=[timer], verbose=0)
    return statistics.median(timer.seconds[1:])


class _FixedBatch(keras.utils.PyDataset):
    """The same batch, endlessly: the fit then spends nothing on making batches."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.batch = x, y

    @property
    def num_batches(self) -> None:
        return None

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch


if __name__ == "__main__":
    main()
