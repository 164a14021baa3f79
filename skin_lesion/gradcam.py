"""Grad-CAM: which regions of an image drove P(melanoma), as a heat map over the image."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from skin_lesion.errors import PipelineError
from skin_lesion.files import atomic_file
from skin_lesion.images import load_rgb

log = logging.getLogger("skin_lesion.gradcam")

HEATMAP = "jet"


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
        # The original at a readable size, not the model's input size.
        original = load_rgb(Path(row.path), max(config["image_size"], FIGURE_IMAGE_PX))
        caption = f"{Path(row.path).name}: {row.predicted_label}, P(melanoma) {row.p_melanoma:.3f} (alert)"
        with atomic_file(target, suffix=".png") as tmp:
            explanation_figure(original, heatmap, caption).savefig(tmp, dpi=EXPLANATION_DPI)
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


FIGURE_IMAGE_PX = 384  # each panel's image is shown at least this many pixels wide
EXPLANATION_DPI = 100


def explanation_figure(image: np.ndarray, heatmap: np.ndarray, caption: str) -> Figure:
    """The image and its Grad-CAM overlay side by side, captioned, with the heat map's colour scale."""
    overlay = overlay_heatmap(Image.fromarray(image), heatmap)
    side = image.shape[0] / EXPLANATION_DPI
    figure = Figure(figsize=(2 * side + 1.6, side + 0.9), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("original")
    shown = right.imshow(np.asarray(overlay), cmap=HEATMAP, vmin=0, vmax=1)
    right.set_title("what drove P(melanoma)")
    for axis in (left, right):
        axis.set_axis_off()
    figure.colorbar(shown, ax=right, fraction=0.046, label="Grad-CAM weight (0 to 1)")
    figure.suptitle(caption)
    return figure


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The image with a jet-coloured heatmap blended over it."""
    resized = Image.fromarray(np.uint8(255 * heatmap)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = colormaps[HEATMAP](np.asarray(resized) / 255.0)[..., :3]
    return Image.blend(image, Image.fromarray(np.uint8(255 * coloured)), opacity)
