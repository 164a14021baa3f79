"""Out-of-distribution score: how far an image's embedding lies from the training set's.

The embedding is what the classifier's last layer sees (the input of the `probs` layer). The training
split's embeddings are summarised by their mean and a Ledoit-Wolf shrunk covariance, and an image's
score is its Mahalanobis distance from that mean (Lee et al., 2018, with one Gaussian for all classes:
the question is "is this like what the model learned from", not "which class"). The flagging threshold
is a quantile of the validation split's scores (evaluate.ood_quantile), so by construction that share
of in-distribution images passes unflagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from sklearn.covariance import LedoitWolf

from skin_lesion.architectures import OUTPUT_LAYER


@dataclass(frozen=True)
class OodModel:
    """The training embeddings' mean and precision matrix, and the flagging threshold."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each embedding from the training mean."""
        centred = np.asarray(embeddings, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0.0))

    def save(self, path: Path) -> None:
        """Write the model as a .npz file (float32 matrices)."""
        with path.open("wb") as handle:
            np.savez(
                handle,
                mean=self.mean.astype(np.float32),
                precision=self.precision.astype(np.float32),
                threshold=np.float64(self.threshold),
            )

    @classmethod
    def load(cls, path: Path) -> OodModel:
        """Read a model written by `save`."""
        with np.load(path) as stored:
            return cls(
                stored["mean"].astype(np.float64),
                stored["precision"].astype(np.float64),
                float(stored["threshold"]),
            )


def fit_ood(train_embeddings: np.ndarray, val_embeddings: np.ndarray, quantile: float) -> OodModel:
    """Fit the Gaussian on train, set the threshold at `quantile` of the validation scores."""
    estimate = LedoitWolf().fit(np.asarray(train_embeddings, dtype=np.float64))
    unthresholded = OodModel(estimate.location_, estimate.precision_, threshold=np.inf)
    threshold = float(np.quantile(unthresholded.score(val_embeddings), quantile))
    return OodModel(estimate.location_, estimate.precision_, threshold)


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
    such embeddings (skin_lesion/probe.py), so the head sees at test time what it was fitted to.
    """
    probabilities, embeddings = call_in_batches(network, images, batch_size)
    if mirror_average:
        _, mirrored = call_in_batches(network, images[:, :, ::-1], batch_size)
        embeddings = (np.asarray(embeddings, np.float32) + np.asarray(mirrored, np.float32)) / 2
        probabilities = keras.ops.convert_to_numpy(network.get_layer(OUTPUT_LAYER)(embeddings))
    return np.asarray(probabilities, dtype=np.float32), np.asarray(embeddings)
