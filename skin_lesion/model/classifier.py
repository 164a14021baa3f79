"""The registered model: an MLflow pyfunc that turns image bytes into class probabilities and an alert.

It carries the class names, the image size, the temperature and the melanoma threshold (both chosen
on the validation split by `evaluate`), so every consumer of `models:/<name>@champion` preprocesses,
calibrates and alerts the same way: the predict command, `mlflow.pyfunc.load_model`, and
`mlflow models serve`.

Input: a DataFrame with a column `image` of base64-encoded image files (JPEG, PNG, ...).
Output: one row per image: `predicted_label`, `predicted_label_external_recall` (how often the version
found that class on external sets; NaN where none had it), `p_<class>` per class (calibrated),
`p_melanoma`, `melanoma_alert`, `ood_score` and `unlike_training` (model/ood.py), and
`model_warning`.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from skin_lesion.errors import PipelineError
from skin_lesion.images import load_rgb
from skin_lesion.model.ood import OodModel

log = logging.getLogger("skin_lesion.model.classifier")

IMAGE_COLUMN = "image"


MAX_IMAGE_BYTES = 20 * 2**20  # one uploaded image; larger payloads get a 400


MAX_PIXELS = 50_000_000
PREDICT_BATCH = 32  # images through the network at once
SYNTHETIC_WARNING = "TRAINED ON SYNTHETIC SHAPES, NOT SKIN LESIONS: its predictions mean nothing clinically"


def probability_column(label: str) -> str:
    """The output column holding P(label): `p_` and the label with spaces as underscores."""
    return "p_" + label.replace(" ", "_")


def trained_on_warning(data_source: str) -> str:
    """What every answer of a model says about its training data: nothing, unless it was not lesions."""
    return SYNTHETIC_WARNING if data_source == "synthetic" else ""


def calibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: the softmax of log(p) / temperature; 1 leaves them as they are."""
    if temperature == 1:  # versions registered before calibration answer exactly as they did
        return np.asarray(probabilities)
    # log(p) is the logits up to a constant per row, which the softmax ignores. numpy, not scipy: the
    # registered model ships only the packages its code imports (registry/model_contents.py).
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None)) / temperature
    scaled = np.exp(logits - logits.max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def external_class_recall(figures: dict[str, Any], classes: Sequence[str]) -> dict[str, float | None]:
    """Each class's recall over the version's external sets (pooled), None where no set had the class."""
    found = dict.fromkeys(classes, 0.0)
    images = dict.fromkeys(classes, 0)
    for result in (figures.get("external") or {}).values():
        for label, row in (result.get("class_recall") or {}).items():
            if label in found:
                found[label] += row["recall"] * row["images"]
                images[label] += row["images"]
    return {label: found[label] / images[label] if images[label] else None for label in classes}


def prediction_frame(
    probabilities: np.ndarray,
    classes: Sequence[str],
    melanoma_class: str,
    threshold: float,
    data_source: str,
    ood_scores: np.ndarray | None = None,
    ood_threshold: float | None = None,
    class_recall: dict[str, float | None] | None = None,
) -> pd.DataFrame:
    """Class probabilities, the predicted label and its external recall, P(melanoma), the alert, the OOD
    flag and the warning.

    A model registered without an OOD summary (before it existed) answers NaN scores and no flags;
    without external figures (`class_recall`, external_class_recall), NaN recalls.
    """
    frame = pd.DataFrame(
        probabilities.astype(float), columns=[probability_column(label) for label in classes]
    )
    predicted = np.asarray(classes)[probabilities.argmax(axis=1)]
    frame.insert(0, "predicted_label", predicted)
    # A predicted class reads as a diagnosis; beside it, how often this version got that class right
    # on images from elsewhere (ISIC 2017: nevus 0.29), or NaN: never measured outside its test split.
    recall = class_recall or {}
    frame.insert(1, "predicted_label_external_recall", [recall.get(label) for label in predicted])
    frame["predicted_label_external_recall"] = frame["predicted_label_external_recall"].astype(float)
    frame["p_melanoma"] = frame[probability_column(melanoma_class)]
    frame["melanoma_alert"] = frame["p_melanoma"] >= threshold
    if ood_scores is None or ood_threshold is None:
        frame["ood_score"], frame["unlike_training"] = np.nan, False
    else:
        frame["ood_score"] = np.asarray(ood_scores, dtype=float)
        frame["unlike_training"] = frame["ood_score"] > ood_threshold
    frame["model_warning"] = trained_on_warning(data_source)
    return frame


def decode_base64_image(text: object, size: int, row: int) -> np.ndarray:
    """Decode one base64 image to a (size, size, 3) uint8 array, or raise a 400-class error.

    Error messages name the row and the problem, never the data itself.
    """
    try:
        data = image_file_of_base64(text)
    except ValueError as err:
        raise _bad_input(f"row {row}: {err}") from None
    try:
        return load_rgb(io.BytesIO(data), size, max_pixels=MAX_PIXELS)
    except PipelineError as err:
        raise _bad_input(f"row {row}: {str(err).split(': ', 1)[-1]}") from err


def image_file_of_base64(text: object) -> bytes:
    """The bytes of one base64-encoded image file; ValueError saying what is wrong, never the data."""
    if not isinstance(text, str):
        raise ValueError(f"expected a base64-encoded image file, got a {type(text).__name__}")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(oversized(MAX_IMAGE_BYTES))
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64-encoded") from None


def oversized(limit_bytes: int) -> str:
    """What an image over the size limit is told."""
    return f"larger than the {limit_bytes // 2**20} MiB limit for one image"


class LesionClassifier(mlflow.pyfunc.PythonModel):
    """Keras CNN plus its preprocessing and melanoma alert logic."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras model (safe mode) and the configuration that travels with it."""
        # The backend loads only when a model is used.
        from skin_lesion.model.network import load_model  # noqa: PLC0415
        from skin_lesion.model.prediction import with_embeddings  # noqa: PLC0415

        self.config: dict[str, Any] = dict(context.model_config)
        warning = trained_on_warning(str(self.config.get("data_source", "")))
        if warning:
            log.warning("%s", warning)

        self.model = load_model(context.artifacts["keras_model"])
        self.network = with_embeddings(self.model)
        self.ood = OodModel.load(Path(context.artifacts["ood"])) if "ood" in context.artifacts else None

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Probabilities and the melanoma alert for base64-encoded images in column `image`."""
        if IMAGE_COLUMN not in model_input.columns:
            raise _bad_input(f"input needs a column {IMAGE_COLUMN!r} of base64-encoded images")
        if model_input.empty:
            raise _bad_input("no images: the request has no rows")
        size = int(self.config["image_size"])
        images = np.stack(
            [decode_base64_image(text, size, row) for row, text in enumerate(model_input[IMAGE_COLUMN])]
        )
        return self.score(images)

    def score(self, images: np.ndarray) -> pd.DataFrame:
        """The prediction frame of decoded (n, size, size, 3) uint8 images."""
        from skin_lesion.model.prediction import predict_with_embeddings  # noqa: PLC0415

        mirror_average = bool(self.config.get("mirror_average", False))  # older versions: no mirroring
        probabilities, embeddings = predict_with_embeddings(
            self.network, images, PREDICT_BATCH, mirror_average
        )
        # The threshold was chosen on calibrated validation probabilities (docs/design.md); versions
        # registered before calibration carry no temperature and were thresholded on raw ones.
        probabilities = calibrated(np.asarray(probabilities), float(self.config.get("temperature", 1.0)))
        scores, threshold = None, None
        if self.ood is not None:
            scores, threshold = self.ood.score(embeddings), self.ood.threshold
        classes = self.config["classes"]
        return prediction_frame(
            probabilities,
            classes,
            self.config["melanoma_class"],
            float(self.config["melanoma_threshold"]),
            str(self.config.get("data_source", "")),
            scores,
            threshold,
            external_class_recall(self.config.get("test_figures") or {}, classes),
        )


def _bad_input(message: str) -> MlflowException:
    # MLflow's scoring server answers INVALID_PARAMETER_VALUE with HTTP 400.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
