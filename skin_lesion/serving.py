"""The registered model: an MLflow pyfunc that turns image bytes into class probabilities and an alert.

It carries the class names, the image size and the melanoma threshold (chosen on the validation split
by `evaluate`), so every consumer of `models:/<name>@champion` preprocesses and alerts the same way:
the predict command, `mlflow.pyfunc.load_model`, and `mlflow models serve`.

Input: a DataFrame with a column `image` of base64-encoded image files (JPEG, PNG, ...).
Output: one row per image: `predicted_label`, `p_<class>` per class, `p_melanoma`, `melanoma_alert`,
`ood_score` and `unlike_training` (skin_lesion/ood.py), and `model_warning`.
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

log = logging.getLogger("skin_lesion.serving")

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


def prediction_frame(
    probabilities: np.ndarray,
    classes: Sequence[str],
    melanoma_class: str,
    threshold: float,
    data_source: str,
    ood_scores: np.ndarray | None = None,
    ood_threshold: float | None = None,
) -> pd.DataFrame:
    """Class probabilities, the predicted label, P(melanoma), the alert, the OOD flag and the warning.

    A model registered without an OOD summary (before it existed) answers NaN scores and no flags.
    """
    frame = pd.DataFrame(
        probabilities.astype(float), columns=[probability_column(label) for label in classes]
    )
    frame.insert(0, "predicted_label", np.asarray(classes)[probabilities.argmax(axis=1)])
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
        from skin_lesion.architectures import load_model  # noqa: PLC0415

        self.config: dict[str, Any] = dict(context.model_config)
        warning = trained_on_warning(str(self.config.get("data_source", "")))
        if warning:
            log.warning("%s", warning)
        from skin_lesion.ood import OodModel, with_embeddings  # noqa: PLC0415

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
        from skin_lesion.ood import predict_with_embeddings  # noqa: PLC0415

        mirror_average = bool(self.config.get("mirror_average", False))  # older versions: no mirroring
        probabilities, embeddings = predict_with_embeddings(
            self.network, images, PREDICT_BATCH, mirror_average
        )
        scores, threshold = None, None
        if self.ood is not None:
            scores, threshold = self.ood.score(embeddings), self.ood.threshold
        return prediction_frame(
            np.asarray(probabilities),
            self.config["classes"],
            self.config["melanoma_class"],
            float(self.config["melanoma_threshold"]),
            str(self.config.get("data_source", "")),
            scores,
            threshold,
        )


def _bad_input(message: str) -> MlflowException:
    # MLflow's scoring server answers INVALID_PARAMETER_VALUE with HTTP 400.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
