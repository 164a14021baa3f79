"""Keras 3 model architectures, selected by `train.arch`. Backend-agnostic: layers and keras.ops only."""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers


def build_baseline_cnn(image_size: int, num_classes: int, dropout: float) -> keras.Model:
    """The reference notebooks' CNN: rescale, conv blocks 32/64/128 with max-pooling, dense 128."""
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    # float32 softmax so that probabilities stay exact under mixed precision too.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


ARCHITECTURES: dict[str, Callable[[int, int, float], keras.Model]] = {
    "baseline_cnn": build_baseline_cnn,
}


def build_model(arch: str, image_size: int, num_classes: int, dropout: float) -> keras.Model:
    """Build the architecture named by `train.arch`."""
    return ARCHITECTURES[arch](image_size, num_classes, dropout)
