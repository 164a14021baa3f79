"""Stage `train`: fit a Keras 3 CNN on the train split (plus its augmented images), validated on val.

Runs on whatever Keras backend KERAS_BACKEND names (TensorFlow by default) and on a GPU when one is
visible; the device used is recorded in the stage's metrics. Images are decoded once into a uint8
cache that later runs with the same inputs reuse. Each epoch's loss and accuracy, and the validation
balanced accuracy that early stopping watches, go to DVCLive (for `dvc plots show`) and MLflow; the
best epoch's model is saved to models/ and logged with the mlflow.keras flavor.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from dvclive import Live
from mlflow.models import infer_signature

from skin_lesion.data.manifests import IDENTITY_COLUMNS, REBALANCED_COLUMNS, SPLIT_COLUMNS, class_indices
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.plots import write_training_curves
from skin_lesion.evaluation.sites import NO_SITE, SITE_IMAGE_COLUMNS, load_site_rows, site_labels, site_root
from skin_lesion.files import in_main_repo, read_manifest, write_csv_atomic, write_json_atomic
from skin_lesion.params import Params, load_params
from skin_lesion.registry.model_contents import MLFLOW_MODEL_NAME, pip_requirements
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run
from skin_lesion.training.architectures import save_model_atomic
from skin_lesion.training.batching import load_cached_images
from skin_lesion.training.callbacks import EpochLogger, checkpoint_folder, predict_in_batches
from skin_lesion.training.recipes import (
    ImageSet,
    SiteImages,
    check_weights_file,
    fit_recipe,
    save_probe_inputs,
)

log = logging.getLogger("stages.train")


def main() -> None:
    """Load the images, train, save the model, and log it all."""
    args = parse_args()
    params = load_params()
    base, train = params.base, params.train
    check_weights_file(train.weights, args.pretrained)

    split_rows = read_manifest(args.split / "train.csv", SPLIT_COLUMNS)
    augmented = read_manifest(args.rebalanced, REBALANCED_COLUMNS) if train.use_rebalanced else None
    train_rows = training_rows(split_rows, augmented, str(args.rebalanced))
    val_rows = read_manifest(args.split / "val.csv", SPLIT_COLUMNS)
    cache = in_main_repo(args.cache)
    site, site_rows = load_site(args, params, cache) if params.site.name else (None, None)
    x_train, train_key = load_cached_images(train_rows["path"].tolist(), base.image_size, cache)
    y_train = class_indices(train_rows["label"], base.classes, source=str(args.split))
    x_val, val_key = load_cached_images(val_rows["path"].tolist(), base.image_size, cache)
    y_val = class_indices(val_rows["label"], base.classes, source=str(args.split / "val.csv"))
    log.info("training on %d images, validating on %d", len(x_train), len(x_val))
    # A resumed run only ever continues the same training: same inputs, params and checkpoint format.
    settings = f"{train_key}{val_key}{base.model_dump_json()}{train.model_dump_json()}"
    checkpoint_dir = checkpoint_folder(cache, settings) if train.resume else None

    with stage_run("train", base, train) as run:
        if site is not None:  # what the model learned from beyond the training split
            mlflow.log_params({f"site.{key}": value for key, value in params.site.model_dump().items()})
        live = Live(dir=str(args.live), save_dvc_exp=False, dvcyaml=None)
        model, summary = fit_recipe(
            ImageSet(x_train, y_train, train_key, train_rows["collection"].to_numpy()),
            ImageSet(x_val, y_val, val_key, val_rows["collection"].to_numpy()),
            base,
            train,
            cache,
            [EpochLogger(live)],
            checkpoint_dir,
            site,
            args.probe_inputs if site else None,
        )
        if site is None:  # nothing to cross-fit: an empty file, so that the stage's outputs exist
            save_probe_inputs(args.probe_inputs, NO_SITE, np.zeros((0, 0)), np.zeros(0, np.int64))
        write_site_rows(args.site_images, site_rows)
        live.end()
        mlflow.log_metrics({key: v for key, v in summary.items() if isinstance(v, (int, float))})
        mlflow.set_tag("device", summary["device"])
        save_model_atomic(model, args.model)
        model_uri = log_keras_model(model, x_val[:2], args.lock)
        write_json_atomic(args.model_info, {"run_id": run.info.run_id, "model_uri": model_uri})
        write_json_atomic(args.details, summary)
        write_json_atomic(args.metrics, {key: summary[key] for key in ("best_epoch", "seconds")})
        write_training_curves(args.live / "plots" / "metrics", args.live / "curves.png")
    log.info(
        "trained %s (%s) on %s in %.0f s; best epoch %d, val balanced accuracy %.3f",
        train.arch,
        train.recipe,
        summary["device"],
        summary["seconds"],
        summary["best_epoch"],
        summary["best_val_balanced_accuracy"],
    )


def log_keras_model(model: keras.Model, examples: np.ndarray, lock: Path) -> str:
    """Log the model with the mlflow.keras flavor, its signature from `examples`; return its URI."""
    info = mlflow.keras.log_model(
        model,
        name=MLFLOW_MODEL_NAME,
        signature=infer_signature(examples, predict_in_batches(model, examples, batch_size=2)),
        pip_requirements=pip_requirements(keras.backend.backend(), lock),
    )
    return info.model_uri


def training_rows(split_rows: pd.DataFrame, augmented: pd.DataFrame | None, source: str) -> pd.DataFrame:
    """The train split's path, label and collection, with the rebalance stage's images when given.

    An augmented image comes from the collection of the image it was made from; one made from an image
    the train split no longer holds (`source`, the rebalanced manifest, is stale) is an error, not a
    collection of its own.
    """
    frames = [split_rows]
    if augmented is not None:
        collections = augmented["source_path"].map(split_rows.set_index("path")["collection"])
        if collections.isna().any():
            orphan = augmented["source_path"][collections.isna()].iloc[0]
            stale = f"an image made from {orphan}, which the train split no longer holds"
            raise PipelineError(f"{source}: {stale}: run `dvc repro rebalance`")
        frames.append(augmented.assign(collection=collections))
    return pd.concat([frame[["path", "label", "collection"]] for frame in frames], ignore_index=True)


def load_site(args: argparse.Namespace, params: Params, cache: Path) -> tuple[SiteImages, pd.DataFrame]:
    """The site's images that are not copies of the split's, decoded, with their rows."""
    # A site image the split would keep with a split image (same ISIC or lesion id, pixels, look-alike)
    # would be learned, and the test figures would flatter.
    seen = pd.concat(
        read_manifest(args.split / name, SPLIT_COLUMNS)[IDENTITY_COLUMNS]
        for name in ("train.csv", "val.csv", "test.csv")
    )
    root = site_root(args.sites, params.site.name)
    rows, left_out = load_site_rows(
        root,
        params.site,
        seen,
        params.base.classes,
        params.base.melanoma_class,
        params.split.near_duplicate_distance,
        params.split.group_distance,
        params.split.max_pixels,
    )
    log.info(
        "site %s: %d images (%d melanomas); left out %d copies of training images, %d unreadable",
        params.site.name,
        len(rows),
        int((rows["target"] == params.base.melanoma_class).sum()),
        left_out["copies_of_training"],
        left_out["unreadable"],
    )
    images, key = load_cached_images(rows["path"].tolist(), params.base.image_size, cache)
    labels = site_labels(rows["target"], params.base.classes)
    return SiteImages(images, labels, key, params.site.weight), rows.assign(**left_out)


def write_site_rows(path: Path, rows: pd.DataFrame | None) -> None:
    """The site's images and what was left out (an empty table without a site)."""
    columns = SITE_IMAGE_COLUMNS
    write_csv_atomic(path, rows[columns] if rows is not None else pd.DataFrame(columns=columns))


def parse_args() -> argparse.Namespace:
    """The stage's inputs and outputs, as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder of split manifests")
    parser.add_argument("--rebalanced", type=Path, required=True, help="rebalance manifest")
    parser.add_argument("--cache", type=Path, required=True, help="decoded-image cache folder")
    parser.add_argument("--pretrained", type=Path, required=True, help="folder of backbone weights files")
    parser.add_argument("--model", type=Path, required=True, help="where to save the .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="headline train metrics JSON")
    parser.add_argument("--details", type=Path, required=True, help="all train metrics JSON")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder")
    parser.add_argument("--lock", type=Path, required=True, help="requirements lock the model pins from")
    parser.add_argument("--sites", type=Path, required=True, help="folder of site sets (site.name)")
    parser.add_argument("--probe-inputs", type=Path, required=True, help="the probe's fit inputs (.npz)")
    parser.add_argument("--site-images", type=Path, required=True, help="the site's images used (CSV)")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
