"""Grad-CAM: which regions of an image drove P(melanoma), as a heat map over the image."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from skin_lesion.errors import PipelineError
from skin_lesion.files import atomic_file
from skin_lesion.images import load_rgb

log = logging.getLogger("skin_lesion.app.gradcam")

HEATMAP = "jet"
EMPTY_MAP = "no region of the image raised P(melanoma) at the last feature map"


def explain_alerts(model: mlflow.pyfunc.PyFuncModel, predictions: pd.DataFrame, folder: Path) -> int:
    """Write a Grad-CAM overlay PNG for each alerted image; how many. No alert writes no folder."""
    wrapper = model.unwrap_python_model()
    config, keras_model = wrapper.config, wrapper.model
    melanoma = config["classes"].index(config["melanoma_class"])
    alerted = predictions[predictions["melanoma_alert"].fillna(False).astype(bool)]
    if alerted.empty:
        log.info("no image raised a melanoma alert: no Grad-CAM to write to %s", folder)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    for row in alerted.itertuples():
        pixels = load_rgb(Path(row.path), config["image_size"])
        heatmap = grad_cam(keras_model, pixels, melanoma)
        target = folder / f"{Path(row.path).stem}_gradcam.png"
        # The original at a readable size, not the model's input size.
        original = load_rgb(Path(row.path), max(config["image_size"], FIGURE_IMAGE_PX))
        # Not the predicted class: beside an alert, a class the version rarely gets right (nevus, 29 %
        # on ISIC 2017) reads as a reassurance it has not earned; the map is of melanoma anyway.
        caption = f"{Path(row.path).name}: P(melanoma) {row.p_melanoma:.3f} (alert)"
        with atomic_file(target, suffix=".png") as tmp:
            explanation_figure(original, heatmap, caption).savefig(tmp, dpi=EXPLANATION_DPI)
        if heatmap.any():
            log.info("Grad-CAM for %s: %s", row.path, target)
        else:
            log.warning("Grad-CAM for %s is empty (%s): %s", row.path, EMPTY_MAP, target)
    return len(alerted)


def grad_cam(model: object, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM heatmap in [0, 1] of `class_index` over the model's last convolutional feature map.

    For a pretrained backbone (a model nested in the classifier) that map is inside the backbone.
    """
    import keras  # noqa: PLC0415 - loaded only with --explain

    if keras.backend.backend() != "tensorflow":
        raise PipelineError(f"Grad-CAM needs the tensorflow backend, not {keras.backend.backend()}")
    import tensorflow as tf  # noqa: PLC0415 - gradients are backend-specific; this is not training code

    forward = _forward_with_features(model)
    with tf.GradientTape() as tape:
        features, probabilities = forward(tf.convert_to_tensor(image[None]))
        score = probabilities[:, class_index]
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2))
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(features, tf.float32) * weights[:, None, None, :], axis=-1))[0]
    cam = cam.numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def _forward_with_features(model: Any) -> Callable[[Any], tuple[Any, Any]]:
    """A function of an image batch giving (last convolutional feature map, class probabilities)."""
    import keras  # noqa: PLC0415

    from skin_lesion.training.architectures import BACKBONE_NAME  # noqa: PLC0415 - Keras loads only when used

    if BACKBONE_NAME in [layer.name for layer in model.layers]:
        backbone = model.get_layer(BACKBONE_NAME)
        inner = _last_feature_layer(backbone.layers)
        extractor = keras.Model(backbone.inputs, [inner.output, backbone.output])
        # The classifier around a backbone is a chain (input scaling, backbone, dropout, head), so it
        # can run layer by layer with the backbone swapped for one that also gives its feature map.

        def forward(x: Any) -> tuple[Any, Any]:
            features = None
            for layer in model.layers[1:]:
                if layer.name == BACKBONE_NAME:
                    features, x = extractor(x, training=False)
                else:
                    x = layer(x, training=False)
            return features, x

        return forward
    feature_layer = _last_feature_layer(model.layers)
    probe = keras.Model(model.inputs, [feature_layer.output, model.output])
    return lambda x: probe(x, training=False)


def _last_feature_layer(layers: list[Any]) -> Any:
    import keras  # noqa: PLC0415

    layer = next((layer for layer in reversed(layers) if len(layer.output.shape) == 4), None)
    if layer is None or isinstance(layer, keras.layers.InputLayer):
        raise PipelineError("Grad-CAM: the model exposes no convolutional feature map")
    return layer


FIGURE_IMAGE_PX = 384  # each panel's image is shown at least this many pixels wide
EXPLANATION_DPI = 100


def explanation_figure(image: np.ndarray, heatmap: np.ndarray, caption: str) -> Figure:
    """The image and its Grad-CAM overlay side by side, captioned, with the heat map's colour scale.

    An all-zero map (no region of the last feature map raised P(melanoma)) is said in words, not
    drawn as a uniform colour that would read as "everywhere".
    """
    side = image.shape[0] / EXPLANATION_DPI
    figure = Figure(figsize=(2 * side + 1.6, side + 0.9), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(image)
    left.set_title("original")
    for axis in (left, right):
        axis.set_axis_off()
    figure.suptitle(caption)
    if not heatmap.any():
        right.text(0.5, 0.5, f"Grad-CAM map is empty:\n{EMPTY_MAP}", ha="center", va="center", wrap=True)
        return figure
    overlay = overlay_heatmap(Image.fromarray(image), heatmap)
    shown = right.imshow(np.asarray(overlay), cmap=HEATMAP, vmin=0, vmax=1)
    right.set_title("what drove P(melanoma)")
    figure.colorbar(shown, ax=right, fraction=0.046, label="Grad-CAM weight (0 to 1)")
    return figure


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.45) -> Image.Image:
    """The image with a jet-coloured heatmap blended over it."""
    resized = Image.fromarray(np.uint8(255 * heatmap)).resize(image.size, Image.Resampling.BILINEAR)
    coloured = colormaps[HEATMAP](np.asarray(resized) / 255.0)[..., :3]
    return Image.blend(image, Image.fromarray(np.uint8(255 * coloured)), opacity)
