"""Where a training step's time goes: TensorFlow's profiler over a few steps, CPU time grouped by op.

Builds and compiles `--arch` as the train stage does (`build_trainer`, with params.yaml's recipe),
trains it on one random batch held in memory (so that no input pipeline is timed), profiles
`--steps` steps after a warm-up, and prints each group's share of the CPU time spent in ops, then the
busiest ops. Needs the TensorFlow backend: the groups are read from its profiler's trace.

    python benchmarks/profile_train_step.py --arch baseline_cnn --steps 10
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from benchmarks.train_throughput import EpochTimer
from skin_lesion.params import load_params
from skin_lesion.training.recipes import build_trainer, compile_phase, training_phases

REPO = Path(__file__).resolve().parents[1]
# Op types (the part of a trace event's name after the colon) by group, checked in this order.
GROUPS = {
    "convolution gradients": ("Conv2DBackprop",),
    "forward convolutions": ("Conv2D",),
    "matrix products (dense layers)": ("MatMul",),
    "activation and pooling gradients": ("ReluGrad", "MaxPoolGrad", "BiasAddGrad", "FusedBatchNormGrad"),
    "augmentation resample": ("ImageProjectiveTransform",),
    "random numbers (dropout, augmentation)": ("RandomUniform", "StatelessRandom"),
}


def main() -> None:
    """Profile the steps and print the shares."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="baseline_cnn")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    size, classes = params.base.image_size, len(params.base.classes)
    settings = params.train.model_copy(update={"arch": args.arch})
    # Random weights (no download) step as fast as pretrained ones; the last phase is the one profiled.
    model, trainer = build_trainer(params.base, settings.model_copy(update={"weights": "none"}))
    compile_phase(model, trainer, settings, training_phases(settings)[-1], steps=args.steps)
    batch = params.train.batch_size
    rng = np.random.default_rng(params.base.seed)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = keras.utils.to_categorical(np.arange(batch) % classes, classes)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    trainer.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # traces and warms up

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        # Timed to the end of the epoch: deleting the tf.data iterator after it can wait seconds.
        timer = EpochTimer()
        trainer.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[timer])
        seconds = timer.seconds[0]
        tf.profiler.experimental.stop()
        op_seconds = _op_seconds(next(Path(logdir).rglob("*.xplane.pb")))
    optimizer_scope = f"/{trainer.optimizer.name}/"  # adam or adamw, as train.weight_decay says
    total = sum(op_seconds.values())
    groups: collections.Counter[str] = collections.Counter()
    op_types: collections.Counter[str] = collections.Counter()
    for name, spent in op_seconds.items():
        groups[_group(name, optimizer_scope)] += spent
        op_types[name.rsplit(":", 1)[1]] += spent
    step_ms = seconds / args.steps * 1000
    print(f"{args.arch}, {params.train.precision}, batch {batch}: {step_ms:.0f} ms per step")
    busy = total / (seconds * (os.cpu_count() or 1))
    print(f"CPU time in ops: {total / args.steps * 1000:.0f} ms per step ({busy:.0%} of all cores' time)")
    for group, spent in groups.most_common():
        print(f"{spent / total:6.1%}  {group}")
    print("busiest op types:")
    for op_type, spent in op_types.most_common(10):
        print(f"{spent / total:6.1%}  {op_type}")


def _op_seconds(trace: Path) -> collections.Counter[str]:
    # TensorFlow ships no reader for its trace besides TensorBoard's plugin; its protobuf is enough.
    space = xplane_pb2.XSpace()
    space.ParseFromString(trace.read_bytes())
    spent: collections.Counter[str] = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the threads that run ops
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # Ops are "scope/op_name:OpType"; "ExecutorState::Process" and the like enclose them.
                if ":" in name and "::" not in name:
                    spent[name] += event.duration_ps / 1e12
    return spent


def _group(name: str, optimizer_scope: str) -> str:
    scope, op_type = name.rsplit(":", 1)
    if optimizer_scope in scope:
        return "optimizer update"
    for group, markers in GROUPS.items():
        if any(marker in op_type for marker in markers):
            return group
    return "other"


if __name__ == "__main__":
    main()
