"""Fitting the out-of-distribution model (skin_lesion/model/ood.py) on a version's own splits."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from skin_lesion.model.ood import OodModel


def fit_ood(train_embeddings: np.ndarray, val_embeddings: np.ndarray, quantile: float) -> OodModel:
    """Fit the Gaussian on train, set the threshold at `quantile` of the validation scores."""
    estimate = LedoitWolf().fit(np.asarray(train_embeddings, dtype=np.float64))
    unthresholded = OodModel(estimate.location_, estimate.precision_, threshold=np.inf)
    threshold = float(np.quantile(unthresholded.score(val_embeddings), quantile))
    return OodModel(estimate.location_, estimate.precision_, threshold)
