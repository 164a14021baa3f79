"""Predict: class probabilities and melanoma alerts for image files, from a registered model.

    python -m stages.predict PATH... [--model URI] [--output preds.csv] [--explain DIR]

PATH is an image file or a folder (searched recursively). The default model is
`models:/<base.model_name>@champion`, or the newest version when no champion is set yet. A file that
cannot be read gets an error row; the others are still predicted. --explain writes a Grad-CAM
overlay per alerted image, showing which regions drove P(melanoma).
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib import colormaps
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from stages.common import IMAGE_SUFFIXES, decode_rgb, load_rgb, run_cli, write_csv_atomic
from stages.config import load_params
from stages.errors import PipelineError
from stages.serving import CHAMPION_ALIAS, IMAGE_COLUMN, MAX_PIXELS
from stages.tracking import configure_mlflow, tracking_uri

log = logging.getLogger("stages.predict")

BATCH_SIZE = 32
TABLE_ROWS = 20  # rows of the terminal table; the CSV has them all


def main() -> None:
    """Predict the given images and report probabilities and alerts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    parser.add_argument("--output", type=Path, help="CSV file to write")
    parser.add_argument("--explain", type=Path, help="folder for Grad-CAM overlays of alerted images")
    args = parser.parse_args()
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name)
    log.info("model %s", uri)
    model = mlflow.pyfunc.load_model(uri)

    predictions = predict_files(model, collect_images(args.paths))
    if args.output:
        write_csv_atomic(args.output, predictions)
    sys.stdout.write(render_summary(predictions) + "\n")
    if args.explain:
        explain_alerts(model, predictions, args.explain)


def resolve_default_model(name: str) -> str:
    """`models:/name@champion`, or the newest version with a warning when no champion is set."""
    client = MlflowClient()
    try:
        client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise PipelineError(
                f"no registered model {name!r} in {tracking_uri()}: run the pipeline first"
            ) from None
        newest = max(int(version.version) for version in versions)
        log.warning(
            "no %r alias on %s yet; using its newest version %d (set the alias in the MLflow UI)",
            CHAMPION_ALIAS,
            name,
            newest,
        )
        return f"models:/{name}/{newest}"
    return f"models:/{name}@{CHAMPION_ALIAS}"


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """The image files among `paths`, folders searched recursively, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise PipelineError(f"{path}: no such file or folder")
    if not files:
        raise PipelineError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def predict_files(model: mlflow.pyfunc.PyFuncModel, files: Sequence[Path]) -> pd.DataFrame:
    """One row per file: path, the model's prediction columns, and an error for unreadable files."""
    encoded, errors = {}, {}
    for path in files:
        try:
            decode_rgb(path, max_pixels=MAX_PIXELS)  # from the path, so errors name the file
            data = path.read_bytes()
        except (OSError, PipelineError) as err:
            errors[path] = str(err).split(": ", 1)[-1] if isinstance(err, PipelineError) else str(err)
            continue
        encoded[path] = base64.b64encode(data).decode("ascii")
    frames = []
    readable = list(encoded)
    for start in range(0, len(readable), BATCH_SIZE):
        batch = readable[start : start + BATCH_SIZE]
        predicted = model.predict(pd.DataFrame({IMAGE_COLUMN: [encoded[path] for path in batch]}))
        frames.append(predicted.assign(path=[str(path) for path in batch], error=""))
    frames.append(pd.DataFrame({"path": [str(path) for path in errors], "error": list(errors.values())}))
    table = pd.concat(frames, ignore_index=True)
    order = {str(path): index for index, path in enumerate(files)}
    table = table.sort_values("path", key=lambda column: column.map(order), ignore_index=True)
    return table[["path", *[c for c in table.columns if c not in ("path", "error")], "error"]]


def render_summary(predictions: pd.DataFrame) -> str:
    """A short table for the terminal, then one line per alert and per unreadable file."""
    shown = predictions.head(TABLE_ROWS)[["path", "predicted_label", "p_melanoma", "melanoma_alert"]]
    lines = [shown.to_string(index=False, float_format=lambda value: f"{value:.3f}")]
    if len(predictions) > TABLE_ROWS:
        lines.append(f"... {len(predictions) - TABLE_ROWS} more rows (use --output for all)")
    alerts = predictions[predictions["melanoma_alert"].fillna(False).astype(bool)]
    lines += [f"MELANOMA ALERT p={row.p_melanoma:.3f}  {row.path}" for row in alerts.itertuples()]
    failed = predictions[predictions["error"] != ""]
    lines += [f"ERROR {row.path}: {row.error}" for row in failed.itertuples()]
    lines.append(f"{len(predictions)} images, {len(alerts)} melanoma alerts, {len(failed)} unreadable")
    return "\n".join(lines)


def explain_alerts(model: mlflow.pyfunc.PyFuncModel, predictions: pd.DataFrame, folder: Path) -> None:
    """Write a Grad-CAM overlay PNG for each alerted image."""
    wrapper = model.unwrap_python_model()
    config, keras_model = wrapper.config, wrapper.model
    melanoma = config["classes"].index(config["melanoma_class"])
    folder.mkdir(parents=True, exist_ok=True)
    for row in predictions[predictions["melanoma_alert"].fillna(False).astype(bool)].itertuples():
        pixels = load_rgb(Path(row.path), config["image_size"])
        heatmap = grad_cam(keras_model, pixels, melanoma)
        target = folder / f"{Path(row.path).stem}_gradcam.png"
        overlay_heatmap(Image.fromarray(pixels), heatmap).save(target)
        log.info("Grad-CAM for %s: %s", row.path, target)


def grad_cam(model: object, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM heatmap in [0, 1] of `class_index` over the model's last convolutional feature map."""
    import keras  # noqa: PLC0415 - loaded only with --explain

    feature_layer = next(
        (layer for layer in reversed(model.layers) if len(layer.output.shape) == 4),
        None,
    )
    if feature_layer is None or isinstance(feature_layer, keras.layers.InputLayer):
        raise PipelineError(f"--explain: model {model.name} exposes no convolutional feature map")
    if keras.backend.backend() != "tensorflow":
        raise PipelineError(
            f"--explain: Grad-CAM needs the tensorflow backend, not {keras.backend.backend()}"
        )
    import tensorflow as tf  # noqa: PLC0415 - gradients are backend-specific; this is not training code

    probe = keras.Model(model.inputs, [feature_layer.output, model.output])
    with tf.GradientTape() as tape:
        features, probabilities = probe([image[None]], training=False)
        score = probabilities[:, class_index]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(features, tf.float32) * weights[:, None, None, :], axis=-1))[0]
    cam = cam.numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The image with a jet-coloured heatmap blended over it."""
    resized = Image.fromarray(np.uint8(255 * heatmap)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(resized) / 255.0)[..., :3]
    return Image.blend(image, Image.fromarray(np.uint8(255 * coloured)), opacity)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
