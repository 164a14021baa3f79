"""Acquisition stress test: the test images as another dermoscope or camera might have taken them.

Dermoscopes and cameras differ in white balance, exposure, focus, compression and resolution. Each
transform below changes one of these by a strength (evaluate.stress lists the strengths); scoring
the test split under each shows how much of the model's skill survives a change of device. The
transforms are deterministic (no random draws), so the same model and images give the same table.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from skin_lesion.evaluation.metrics import auc_or_none, balanced_accuracy, metrics_by_collection

log = logging.getLogger("skin_lesion.evaluation.stress")


Transform = Callable[[np.ndarray, float], np.ndarray]


def colour_cast(images: np.ndarray, strength: float) -> np.ndarray:
    """A warm white-balance error: red gained and blue lost by `strength` (0.2: +20 % / -20 %)."""
    gains = np.array([1 + strength, 1.0, 1 - strength], dtype=np.float32)
    return _to_uint8(images.astype(np.float32) * gains)


def darken(images: np.ndarray, strength: float) -> np.ndarray:
    """Under-exposure: every pixel scaled by 1 - `strength`."""
    return _to_uint8(images.astype(np.float32) * (1 - strength))


def blur(images: np.ndarray, strength: float) -> np.ndarray:
    """Defocus: a Gaussian blur of radius `strength` pixels (at the model's input size)."""
    return _per_image(images, lambda image: image.filter(ImageFilter.GaussianBlur(strength)))


def jpeg(images: np.ndarray, strength: float) -> np.ndarray:
    """Compression: re-encoded as JPEG at quality `strength` (lower is stronger)."""

    def encode(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(strength))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return decoded.convert("RGB")

    return _per_image(images, encode)


def low_resolution(images: np.ndarray, strength: float) -> np.ndarray:
    """A coarser sensor: shrunk to `strength` of the side, then enlarged back (0.5: half resolution)."""

    def resample(image: Image.Image) -> Image.Image:
        small = max(1, round(image.width * strength)), max(1, round(image.height * strength))
        return image.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)

    return _per_image(images, resample)


TRANSFORMS: dict[str, Transform] = {
    "colour_cast": colour_cast,
    "darken": darken,
    "blur": blur,
    "jpeg_quality": jpeg,
    "resolution": low_resolution,
}


def stressed_variants(
    images: np.ndarray, strengths: dict[str, Sequence[float]]
) -> Iterator[tuple[str, float, np.ndarray]]:
    """Every (transform, strength, transformed images) that evaluate.stress asks for, in its order."""
    # One variant at a time: all of them at once would hold 15 copies of the test split.
    for name, values in strengths.items():
        for strength in values:
            yield name, float(strength), TRANSFORMS[name](images, strength)


def _per_image(images: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(change(Image.fromarray(image)), dtype=np.uint8) for image in images])


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def source_shift_report(
    predict: Callable[[np.ndarray], np.ndarray],
    collections: pd.Series,
    images: np.ndarray,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    melanoma: int,
    clean: dict[str, Any],
    strengths: dict[str, list[float]],
) -> dict[str, Any]:
    """How the model fares by collection of the test split, and under acquisition changes."""
    threshold = clean["melanoma"]["operating_point"]["threshold"]
    return {
        "by_collection": metrics_by_collection(collections, y_true, probabilities, melanoma, threshold),
        "stress": stress_test(predict, images, y_true, melanoma, clean, strengths),
    }


def stress_test(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    y_true: np.ndarray,
    melanoma: int,
    clean: dict[str, Any],
    strengths: dict[str, list[float]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Balanced accuracy and melanoma AUC under each acquisition change, and their drop from clean."""
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    started = time.perf_counter()
    for name, strength, changed in stressed_variants(images, strengths):
        probabilities = predict(changed)
        balanced = balanced_accuracy(y_true, probabilities.argmax(axis=1))
        auc_value = auc_or_none(y_true == melanoma, probabilities[:, melanoma])
        clean_auc = clean["melanoma"]["auc"]
        results.setdefault(name, {})[f"{strength:g}"] = {
            "balanced_accuracy": balanced,
            "balanced_accuracy_drop": clean["balanced_accuracy"] - balanced,
            "melanoma_auc": auc_value,
            "melanoma_auc_drop": None if auc_value is None or clean_auc is None else clean_auc - auc_value,
        }
    if results:
        variants = sum(len(rows) for rows in results.values())
        seconds = time.perf_counter() - started
        log.info("stress test: %d variants of %d images in %.0f s", variants, len(images), seconds)
    return results
