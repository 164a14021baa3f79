"""Keras 3 model architectures, selected by `train.arch`. Backend-agnostic: Keras layers and ops only.

Every model takes uint8 RGB images of shape (image_size, image_size, 3) and returns class
probabilities in float32. Augmentation layers sit inside the model, so they run on the accelerator
during training and do nothing at inference.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from stages.config import AugmentParams


def build_model(
    arch: str,
    image_size: int,
    num_classes: int,
    dropout: float,
    augment: AugmentParams,
    weights: str = "none",
) -> keras.Model:
    """Input, augmentation, the `train.arch` backbone, and a float32 softmax head."""
    inputs = keras.Input(shape=(image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # a cast to the compute dtype, values 0..255
    augmentation = _augmentation_steps(augment)
    if augmentation:
        x = keras.Sequential(augmentation, name="augment")(x)
    x = BACKBONES[arch](x, dropout, weights)
    # float32 softmax so that probabilities stay exact under mixed precision too.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=arch)


def _augmentation_steps(augment: AugmentParams) -> list[layers.Layer]:
    steps: list[layers.Layer] = []
    if augment.flip:
        steps.append(layers.RandomFlip("horizontal_and_vertical"))  # lesions have no up or left
    if augment.rotation:
        steps.append(layers.RandomRotation(augment.rotation, fill_mode="reflect"))
    if augment.zoom:
        steps.append(layers.RandomZoom(augment.zoom, fill_mode="reflect"))
    if augment.contrast:
        steps.append(layers.RandomContrast(augment.contrast, value_range=(0, 255)))
    if augment.brightness:
        steps.append(layers.RandomBrightness(augment.brightness, value_range=(0, 255)))
    return steps


def _baseline_cnn(x: keras.KerasTensor, dropout: float, _weights: str) -> keras.KerasTensor:
    """The reference notebooks' CNN: rescale, conv blocks 32/64/128 with max-pooling, dense 128."""
    x = layers.Rescaling(1.0 / 255)(x)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    return layers.Dense(128, activation="relu")(x)


def _resnet_small(x: keras.KerasTensor, dropout: float, _weights: str) -> keras.KerasTensor:
    """A small residual CNN with batch norm: a strided stem, four stages 32-256, global pooling."""
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for filters, strides in ((32, 1), (64, 2), (128, 2), (256, 2)):
        x = _residual_block(x, filters, strides)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dropout(dropout)(x)


def _residual_block(x: keras.KerasTensor, filters: int, strides: int) -> keras.KerasTensor:
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.Activation("relu")(layers.Add()([shortcut, y]))


def _application(factory: Callable[..., keras.Model]) -> Callable[..., keras.KerasTensor]:
    def backbone(x: keras.KerasTensor, dropout: float, weights: str) -> keras.KerasTensor:
        # Both nets take 0..255 pixels and normalise them inside (include_preprocessing).
        net = factory(
            include_top=False,
            weights=None if weights == "none" else weights,
            input_shape=tuple(x.shape[1:]),
            pooling="avg",
        )
        return layers.Dropout(dropout)(net(x))

    return backbone


BACKBONES: dict[str, Callable[[keras.KerasTensor, float, str], keras.KerasTensor]] = {
    "baseline_cnn": _baseline_cnn,
    "resnet_small": _resnet_small,
    "efficientnet_b0": _application(keras.applications.EfficientNetB0),
    "mobilenet_v3_small": _application(keras.applications.MobileNetV3Small),
}
