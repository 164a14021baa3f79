"""Keras 3 model architectures, selected by `train.arch`. Backend-agnostic: Keras layers and ops only.

`build_model` makes the classifier that is saved and served: RGB pixel values 0..255 in, class
probabilities in float32 out. `with_augmentation` puts random augmentation layers in front of it for
training; they run on the accelerator with the model and are not part of the saved model. The one
custom layer a saved model may hold lives with the model's own code (skin_lesion/model/network.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
from keras import layers, ops

from skin_lesion.errors import PipelineError
from skin_lesion.files import atomic_file
from skin_lesion.model.network import OUTPUT_LAYER, ShadesOfGray
from skin_lesion.params import AugmentParams

BACKBONE_NAME = "backbone"  # the keras.applications net inside a model, frozen and unfrozen by name


def build_model(
    arch: str,
    image_size: int,
    num_classes: int,
    dropout: float,
    weights: str = "none",
    shades_of_gray: float = 0,
) -> keras.Model:
    """Input, optional colour constancy, the `train.arch` backbone, and a float32 softmax head."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = inputs
    if shades_of_gray:
        # In the saved model, so that every image it is given is corrected the same way.
        x = ShadesOfGray(shades_of_gray, dtype="float32", name="shades_of_gray")(x)
    x = layers.Rescaling(1.0, name="to_float")(x)  # a cast to the compute dtype, values 0..255
    x = BACKBONES[arch](x, dropout, weights)
    # float32 softmax so that probabilities stay exact under mixed precision too.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name=OUTPUT_LAYER)(x)
    return keras.Model(inputs, outputs, name=arch)


def with_augmentation(model: keras.Model, augment: AugmentParams) -> keras.Model:
    """`model` behind the configured random augmentation (training only); both share their weights."""
    steps: list[layers.Layer] = []
    # float32 whatever train.precision says: TensorFlow's CPU kernels for these ops are slower in
    # bfloat16 (docs/results.md); the model casts at its input.
    dtype = "float32"
    if augment.flip or augment.rotation or augment.zoom:
        steps.append(RandomAffine(augment.flip, augment.rotation, augment.zoom, dtype=dtype))
    if augment.contrast:
        steps.append(layers.RandomContrast(augment.contrast, value_range=(0, 255), dtype=dtype))
    if augment.brightness:
        steps.append(layers.RandomBrightness(augment.brightness, value_range=(0, 255), dtype=dtype))
    if not steps:
        return model
    # uint8 in, like the decoded image cache, so that batches stay small until they reach the model.
    inputs = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")
    augmented = keras.Sequential(steps, name="augment")(inputs)
    return keras.Model(inputs, model(augmented), name=f"{model.name}_augmented")


class RandomAffine(layers.Layer):
    """Random flips (both axes), rotation and zoom of each image, resampled once, in training only.

    Keras's RandomFlip, RandomRotation and RandomZoom each resample the whole batch; composing the
    three into one affine transform costs about 40 % of their time (22 vs 53 ms per batch of 32 at
    180 px on a 2-core CPU), which Keras has no layer for. `rotation` is a fraction of a full turn and
    `zoom` a fraction of the size, as in RandomRotation and RandomZoom; lesions have no up or left,
    so any flip is as plausible as the original.
    """

    def __init__(self, flip: bool, rotation: float, zoom: float, seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.flip, self.rotation, self.zoom, self.seed = flip, rotation, zoom, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool | None = None) -> Any:
        """The images transformed at random when training, else unchanged."""
        images = ops.cast(images, self.compute_dtype)
        if not training:
            return images
        count = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        angle = self._uniform(count, self.rotation) * 2 * math.pi
        scale = 1 + self._uniform(count, self.zoom)
        flip_x, flip_y = (self._random_sign(count), self._random_sign(count)) if self.flip else (1.0, 1.0)
        # Output pixel (x, y) samples the input at centre + scale * rotation @ flips @ ((x, y) - centre).
        a0, a1 = scale * ops.cos(angle) * flip_x, -scale * ops.sin(angle) * flip_y
        b0, b1 = scale * ops.sin(angle) * flip_x, scale * ops.cos(angle) * flip_y
        cx, cy = (width - 1) / 2, (height - 1) / 2
        zeros = ops.zeros_like(a0)
        transform = ops.stack(
            [a0, a1, cx - a0 * cx - a1 * cy, b0, b1, cy - b0 * cx - b1 * cy, zeros, zeros], axis=1
        )
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")

    def _uniform(self, count: Any, bound: float) -> Any:
        return keras.random.uniform((count,), -bound, bound, seed=self.seed_generator)

    def _random_sign(self, count: Any) -> Any:
        return ops.where(self._uniform(count, 1.0) < 0, -1.0, 1.0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Same shape as the input."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialisation."""
        return {
            **super().get_config(),
            "flip": self.flip,
            "rotation": self.rotation,
            "zoom": self.zoom,
            "seed": self.seed,
        }


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


def _application(
    factory: Callable[..., keras.Model],
    preprocessing: Callable[[keras.KerasTensor], keras.KerasTensor] | None,
) -> Callable[..., keras.KerasTensor]:
    def backbone(x: keras.KerasTensor, dropout: float, weights: str) -> keras.KerasTensor:
        if preprocessing is not None:
            x = preprocessing(x)  # the input scaling the backbone was pretrained with, in the saved model
        try:
            net = factory(
                include_top=False,
                weights="imagenet" if weights == "imagenet" else None,
                input_shape=tuple(x.shape[1:]),
                pooling="avg",
                name=BACKBONE_NAME,
            )
        except Exception as err:  # Keras raises a bare Exception for a failed download, nothing narrower
            if "URL fetch failure" not in str(err):
                raise
            raise PipelineError(
                "train.weights=imagenet: Keras could not download the ImageNet weights (offline?); put a "
                "weights file under weights/ and pass -S train.weights=weights/<file>.weights.h5"
            ) from None

        if weights not in ("none", "imagenet"):
            load_backbone_weights(net, Path(weights), factory.__name__)
        # A pretrained backbone's batch norm keeps its ImageNet statistics, also once it is unfrozen
        # (Keras's transfer-learning guide): a small batch's statistics would wreck what it learned.
        features = net(x, training=False) if weights != "none" else net(x)
        return layers.Dropout(dropout)(features)

    return backbone


def load_backbone_weights(net: keras.Model, path: Path, net_name: str) -> None:
    """Load a Keras weights file into a backbone, or stop with one line naming the file."""
    if not path.is_file():
        raise PipelineError(f"train.weights: {path}: file not found")
    try:
        net.load_weights(path)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:300]
        raise PipelineError(
            f"train.weights: {path}: not weights of a {net_name} backbone ({reason})"
        ) from err


def set_backbone_trainable(model: keras.Model, unfreeze: str | int) -> None:
    """Freeze the backbone (unfreeze 0), or train its top `unfreeze` weighted layers (or all)."""
    backbone = model.get_layer(BACKBONE_NAME)
    backbone.trainable = unfreeze != 0
    if unfreeze in (0, "all"):
        return
    weighted = [layer for layer in backbone.layers if layer.weights]
    for layer in weighted[: max(len(weighted) - int(unfreeze), 0)]:
        layer.trainable = False


def has_backbone(model: keras.Model) -> bool:
    """Whether the model holds a keras.applications backbone (which can be frozen)."""
    return any(layer.name == BACKBONE_NAME for layer in model.layers)


def _scale_to_unit_range(x: keras.KerasTensor) -> keras.KerasTensor:
    # keras.applications.mobilenet.preprocess_input: pixels 0..255 to -1..1.
    return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_preprocessing")(x)


BACKBONES: dict[str, Callable[[keras.KerasTensor, float, str], keras.KerasTensor]] = {
    "baseline_cnn": _baseline_cnn,
    "resnet_small": _resnet_small,
    "mobilenet": _application(keras.applications.MobileNet, _scale_to_unit_range),
    # Both take 0..255 pixels and normalise them inside (include_preprocessing).
    "efficientnet_b0": _application(keras.applications.EfficientNetB0, None),
    "mobilenet_v3_small": _application(keras.applications.MobileNetV3Small, None),
}


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save a .keras file through a temp name, so a killed run never leaves half a model."""
    with atomic_file(path, suffix=".keras") as tmp:
        model.save(tmp)
