"""The saved Keras network: its output layer's name, the custom layer it may hold, and loading it.

Importing this module registers `ShadesOfGray` with Keras, which is how `load_model` finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
from keras import layers, ops

OUTPUT_LAYER = "probs"  # the softmax head; its input is the image's embedding (skin_lesion/model/ood.py)


def load_model(path: Path | str) -> keras.Model:
    """A saved classifier, loaded in safe mode (no arbitrary code) with this module's layers known."""
    return keras.saving.load_model(path, safe_mode=True)


@keras.saving.register_keras_serializable(package="skin_lesion")
class ShadesOfGray(layers.Layer):
    """Shades of Gray colour constancy: each image's colours divided by its estimated illuminant.

    Dermoscopes light and white-balance lesions differently, so colour carries the device as well as
    the lesion. The illuminant is each channel's Minkowski `power`-mean (Finlayson and Trezzi, 2004;
    power 6 is the usual choice for dermoscopy), scaled so that a grey illuminant changes nothing.
    Keras has no colour constancy layer; this one is part of the saved model, as the same correction
    must run wherever the model does. Keep it in float32: a bfloat16 mean over 32,400 pixels is coarse.
    """

    def __init__(self, power: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.power = power

    def call(self, images: Any) -> Any:
        """The images, colour-corrected, values 0..255."""
        images = ops.cast(images, self.compute_dtype)
        normalised = ops.power(ops.clip(images / 255.0, 0.0, 1.0), self.power)
        illuminant = ops.power(ops.mean(normalised, axis=(1, 2), keepdims=True), 1.0 / self.power)
        # Unit length times sqrt(3): a grey illuminant (equal channels) gives 1 in every channel.
        length = ops.sqrt(ops.sum(ops.square(illuminant), axis=-1, keepdims=True))
        gain = ops.sqrt(3.0) * illuminant / ops.maximum(length, 1e-6)
        return ops.clip(images / ops.maximum(gain, 1e-3), 0.0, 255.0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Same shape as the input."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, for Keras serialisation."""
        return {**super().get_config(), "power": self.power}
