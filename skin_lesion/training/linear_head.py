"""The linear probe's head: a logistic regression fitted on embeddings, and its probabilities.

No Keras here: the `site` stage refits the head many times (cross-fitting, the learning curve) on
embeddings the train stage computed, and starts in a second instead of importing a deep-learning
framework it does not need.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

ABSENT_CLASS_LOGIT = -30.0  # the head's bias for a class with no training image: probability ~1e-13

# (embeddings, class indices, sample weights) -> the head's (kernel, bias)
FitHead = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def fit_probe(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float,
    class_weight: str,
    seed: int,
    sample_weight: np.ndarray | None = None,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """An L2-regularised multinomial logistic regression, as a (features, classes) kernel and a bias.

    `sample_weight` multiplies the class weights (a site's images count more than a training image).
    Newton-CG reaches the optimum in about 15 Newton steps where L-BFGS takes about 300 gradient
    steps on these unscaled embeddings: the same model, about three times faster, which the site's
    many refits need. `start` (a kernel and bias fitted on the same classes) is where the solver
    starts: a refit with a few site images more starts near its optimum, about four times faster.
    """
    regression = LogisticRegression(
        C=c,
        class_weight="balanced" if class_weight == "balanced" else None,
        solver="newton-cg",
        max_iter=1000,
        random_state=seed,
    )
    present = np.unique(labels)
    if start is not None and len(present) > 2 and np.array_equal(present, _fitted_classes(start[1])):
        # scikit-learn's documented warm start reuses coef_ and intercept_ of an earlier fit.
        regression.set_params(warm_start=True)
        regression.coef_ = np.asarray(start[0][:, present].T, dtype=np.float64)
        regression.intercept_ = np.asarray(start[1][present], dtype=np.float64)
    regression.fit(np.asarray(embeddings, dtype=np.float64), labels, sample_weight=sample_weight)
    kernel = np.zeros((embeddings.shape[1], num_classes), dtype=np.float32)
    bias = np.full(num_classes, ABSENT_CLASS_LOGIT, dtype=np.float32)
    present = regression.classes_
    if len(present) == 2:
        # scikit-learn fits two classes as one logistic unit z; a softmax over (-z/2, z/2) is sigmoid(z).
        kernel[:, present] = np.stack([-regression.coef_[0], regression.coef_[0]], axis=1) / 2
        bias[present] = np.array([-regression.intercept_[0], regression.intercept_[0]]) / 2
    else:
        kernel[:, present] = regression.coef_.T
        bias[present] = regression.intercept_
    return kernel, bias


def _fitted_classes(bias: np.ndarray) -> np.ndarray:
    return np.flatnonzero(bias != ABSENT_CLASS_LOGIT)


def head_probabilities(embeddings: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The softmax head's class probabilities for `embeddings`."""
    return softmax(np.asarray(embeddings, dtype=np.float64) @ kernel + bias, axis=1).astype(np.float32)


def probe_fitter(
    num_classes: int,
    c: float,
    class_weight: str,
    seed: int,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> FitHead:
    """The probe's fit (train.probe_c, train.class_weight) as a function of embeddings, labels, weights;
    each fit starts from `start` (fit_probe)."""

    def fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return fit_probe(x, y, num_classes, c, class_weight, seed, weights, start)

    return fit
