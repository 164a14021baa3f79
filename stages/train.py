"""Stage `train`: fit a Keras 3 CNN on the train split plus its augmented images, validated on val.

Runs on whatever Keras backend KERAS_BACKEND names (TensorFlow by default) and on a GPU when one is
visible; the device used is recorded in the stage's metrics. Per-epoch curves go to DVCLive (for
`dvc plots show`) and MLflow; the model is saved to models/ and logged with the mlflow.keras flavor.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from dvclive import Live
from mlflow.models import infer_signature

from stages.architectures import build_model
from stages.common import (
    class_indices,
    load_images,
    read_manifest,
    run_cli,
    write_json_atomic,
)
from stages.config import BaseParams, TrainParams, load_params
from stages.rebalance import MANIFEST_COLUMNS as REBALANCED_COLUMNS
from stages.split import SPLIT_COLUMNS
from stages.tracking import stage_run

log = logging.getLogger("stages.train")

MLFLOW_MODEL_NAME = "model"  # the model's name inside its MLflow run


def main() -> None:
    """Load the images, train, save the model, and log it all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder of split manifests")
    parser.add_argument("--rebalanced", type=Path, required=True, help="rebalance manifest")
    parser.add_argument("--model", type=Path, required=True, help="where to save the .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="train metrics JSON")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    args = parser.parse_args()
    params = load_params()
    base = params.base

    train_rows = pd.concat(
        [
            read_manifest(args.split / "train.csv", SPLIT_COLUMNS)[["path", "label"]],
            read_manifest(args.rebalanced, REBALANCED_COLUMNS)[["path", "label"]],
        ],
        ignore_index=True,
    )
    val_rows = read_manifest(args.split / "val.csv", SPLIT_COLUMNS)
    x_train = load_images(train_rows["path"].tolist(), base.image_size)
    y_train = class_indices(train_rows["label"], base.classes, source=str(args.split))
    x_val = load_images(val_rows["path"].tolist(), base.image_size)
    y_val = class_indices(val_rows["label"], base.classes, source=str(args.split / "val.csv"))
    log.info("training on %d images, validating on %d", len(x_train), len(x_val))

    with stage_run("train", base, params.train) as run:
        live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None)
        model, summary = train_model(
            x_train, y_train, x_val, y_val, base, params.train, callbacks=[EpochLogger(live)]
        )
        live.end()
        mlflow.log_metrics({key: v for key, v in summary.items() if isinstance(v, (int, float))})
        mlflow.set_tag("device", summary["device"])
        save_model_atomic(model, args.model)
        info = mlflow.keras.log_model(
            model,
            name=MLFLOW_MODEL_NAME,
            signature=infer_signature(x_val[:2], model.predict(x_val[:2], verbose=0)),
            pip_requirements=_pip_requirements(),
        )
        write_json_atomic(args.model_info, {"run_id": run.info.run_id, "model_uri": info.model_uri})
        write_json_atomic(args.metrics, summary)
    log.info("trained %s on %s in %.0f s", params.train.arch, summary["device"], summary["seconds"])


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    base: BaseParams,
    train: TrainParams,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> tuple[keras.Model, dict[str, Any]]:
    """Build and fit the configured model; return it with a summary of the run."""
    configure_determinism(base.seed, train.deterministic)
    model = build_model(train.arch, base.image_size, len(base.classes), train.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=train.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=train.epochs,
        batch_size=train.batch_size,
        shuffle=True,
        callbacks=callbacks or [],
        verbose=2,
    )
    seconds = time.perf_counter() - started
    epochs_run = len(history.history["loss"])
    summary = {
        "backend": keras.backend.backend(),
        "device": detect_device(),
        "epochs": epochs_run,
        "seconds": round(seconds, 2),
        "images_per_second": round(epochs_run * len(x_train) / seconds, 2),
        "train_images": len(x_train),
        "val_images": len(x_val),
        **{key: float(values[-1]) for key, values in history.history.items()},
    }
    return model, summary


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


def _pip_requirements() -> list[str]:
    # Pinning what is installed is exact and skips MLflow's slow requirement inference, which loads
    # the model again in a subprocess. The backend's package is named like the backend.
    requirements = []
    for name in ("keras", "numpy", "pillow", keras.backend.backend()):
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(name)  # installed under another name, e.g. tensorflow-cpu
    return requirements


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
