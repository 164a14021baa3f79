"""The network's answers: class probabilities and embeddings, batch by batch, with mirror averaging."""

from __future__ import annotations

import keras
import numpy as np

from skin_lesion.model.network import OUTPUT_LAYER


def with_embeddings(model: keras.Model) -> keras.Model:
    """The same network answering (probabilities, embeddings) in one forward pass."""
    return keras.Model(model.inputs, [model.output, model.get_layer(OUTPUT_LAYER).input])


def call_in_batches(network: keras.Model, images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Each output of the network on `images`, calling it on one batch at a time.

    Not network.predict: its tf.data pipeline, under TensorFlow's op determinism (train.deterministic),
    logs a spurious "NodeDef mentions attribute" error each time it is built; and not
    predict_on_batch, which under a distribution strategy returns every replica's copy of the batch.
    """
    starts = range(0, len(images), batch_size)
    batches = [
        keras.tree.flatten(network(images[start : start + batch_size], training=False)) for start in starts
    ]
    return [
        np.concatenate([keras.ops.convert_to_numpy(batch[output]) for batch in batches])
        for output in range(len(batches[0]))
    ]


def predict_with_embeddings(
    network: keras.Model, images: np.ndarray, batch_size: int, mirror_average: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and embeddings of `images`, from a network that `with_embeddings` built.

    With `mirror_average`, each image's embedding is the mean of its own and its left-right mirror's,
    and the probabilities are the head's answer to that mean: the linear probe is fitted on exactly
    such embeddings (skin_lesion/training/probe.py), so the head sees at test time what it was fitted to.
    """
    probabilities, embeddings = call_in_batches(network, images, batch_size)
    if mirror_average:
        _, mirrored = call_in_batches(network, images[:, :, ::-1], batch_size)
        embeddings = (np.asarray(embeddings, np.float32) + np.asarray(mirrored, np.float32)) / 2
        probabilities = keras.ops.convert_to_numpy(network.get_layer(OUTPUT_LAYER)(embeddings))
    return np.asarray(probabilities, dtype=np.float32), np.asarray(embeddings)
