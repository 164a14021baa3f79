"""Time to quality: wall time of the train stage's own training until val balanced accuracy first
reaches a target (0.60 by default), for a recipe given as `section.key=value` overrides.

Run it in a workspace where `dvc repro rebalance` has made the split and the augmented images (the
real data: `download.source=local`); it reads that workspace's params.yaml and data, applies the
overrides, and trains as the stage does (same images, decoded cache, phases, callbacks) until the
target is reached or the epochs run out. The clock starts before the model is built, as the stage's
does, and stops at the end of the epoch whose validation pass reaches the target. The score is the
one early stopping watches (`val_balanced_accuracy`, capped by train.val_class_cap). Prints one line
per epoch and last `time_to_quality_s: X` (or `not reached`).

    python benchmarks/time_to_quality.py --workspace /tmp/exp1 train.arch=resnet_small
    python benchmarks/time_to_quality.py --workspace /tmp/exp1 train.arch=mobilenet \
        train.weights=weights/mobilenet_1_0_224_imagenet_no_top.weights.h5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import keras
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.common import class_indices, read_manifest
from stages.config import Params
from stages.manifests import REBALANCED_COLUMNS, SPLIT_COLUMNS
from stages.train import MONITOR, load_cached_images, train_model

log = logging.getLogger("benchmark")


class TargetReachedError(Exception):
    """Raised to end training at once, whichever phase it is in."""


class StopAtTarget(keras.callbacks.Callback):
    """Record when the monitored score first reaches the target, and end training there."""

    def __init__(self, target: float, started: float) -> None:
        super().__init__()
        self.target, self.started = target, started
        self.reached_after: float | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        """Print the epoch's score; stop once it reaches the target."""
        score = (logs or {}).get(MONITOR, 0.0)
        elapsed = time.perf_counter() - self.started
        print(f"epoch {epoch + 1}: {MONITOR} {score:.3f} after {elapsed:.0f} s", flush=True)
        if score >= self.target:
            self.reached_after = elapsed
            raise TargetReachedError  # stop_training would end only this phase's fit


def main() -> None:
    """Train the recipe until it reaches the target; print the time it took."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="repo after `dvc repro rebalance`")
    parser.add_argument("--target", type=float, default=0.60)
    parser.add_argument("overrides", nargs="*", help="section.key=value, as `dvc exp run -S` takes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.chdir(args.workspace)
    raw = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    for override in args.overrides:
        key, _, value = override.partition("=")
        section, *path = key.split(".")
        target = raw[section]
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = yaml.safe_load(value)
    params = Params.model_validate(raw)
    base, train = params.base, params.train.model_copy(update={"resume": False})

    frames = [read_manifest(Path("data/split/train.csv"), SPLIT_COLUMNS)[["path", "label"]]]
    if train.use_rebalanced:
        rebalanced = read_manifest(Path("data/rebalanced/manifest.csv"), REBALANCED_COLUMNS)
        frames.append(rebalanced[["path", "label"]])
    rows = pd.concat(frames, ignore_index=True)
    val = read_manifest(Path("data/split/val.csv"), SPLIT_COLUMNS)
    cache = Path("data/cache")
    x_train, _ = load_cached_images(rows["path"].tolist(), base.image_size, cache)
    x_val, _ = load_cached_images(val["path"].tolist(), base.image_size, cache)
    y_train = class_indices(rows["label"], base.classes, source="train")
    y_val = class_indices(val["label"], base.classes, source="val")

    started = time.perf_counter()
    stopper = StopAtTarget(args.target, started)
    with contextlib.suppress(TargetReachedError):
        train_model(x_train, y_train, x_val, y_val, base, train, callbacks=[stopper])
    print(f"recipe: {train.arch}, weights {train.weights}, {' '.join(args.overrides)}")
    if stopper.reached_after is None:
        print(f"time_to_quality_s: not reached ({MONITOR} {args.target} in {train.epochs} epochs)")
    else:
        print(f"time_to_quality_s: {stopper.reached_after:.0f}")


if __name__ == "__main__":
    main()
