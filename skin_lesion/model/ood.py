"""Out-of-distribution score: how far an image's embedding lies from the training set's.

The embedding is what the classifier's last layer sees (the input of the `probs` layer). The training
split's embeddings are summarised by their mean and a Ledoit-Wolf shrunk covariance, and an image's
score is its Mahalanobis distance from that mean (Lee et al., 2018, with one Gaussian for all classes:
the question is "is this like what the model learned from", not "which class"). The flagging threshold
is a quantile of the validation split's scores (evaluate.ood_quantile), so by construction that share
of in-distribution images passes unflagged. Fitting happens in evaluate
(skin_lesion/evaluation/ood_fitting.py); a served model only scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
