"""Temperature scaling (Guo et al., 2017): one number, fitted on the validation split, that makes the
class probabilities say how often they are right, and the calibration error before and after it.

The registered model applies the temperature itself (calibrated, in model/classifier.py), so what
evaluate measures on calibrated probabilities is what a clinician is shown.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from skin_lesion.evaluation.metrics import expected_calibration_error
from skin_lesion.model.classifier import calibrated

# The search range of the temperature: far beyond what a softmax head needs either way.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def negative_log_likelihood(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The mean -log P(true class), the quantity temperature scaling minimises."""
    picked = np.asarray(probabilities)[np.arange(len(y_true)), y_true]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `y_true` (validation labels)."""
    low, high = TEMPERATURE_BOUNDS

    def loss(log_temperature: float) -> float:
        return negative_log_likelihood(y_true, calibrated(probabilities, math.exp(log_temperature)))

    # On log T: the loss is smoother there, and T > 0 by construction.
    result = minimize_scalar(loss, bounds=(math.log(low), math.log(high)), method="bounded")
    return float(math.exp(result.x))


def calibration_figures(
    y_true: np.ndarray, probabilities: np.ndarray, temperature: float, bins: int
) -> dict[str, float | int]:
    """ECE and negative log-likelihood of the raw probabilities and of the calibrated ones."""
    after = calibrated(probabilities, temperature)
    return {
        "images": len(y_true),
        "ece_before": expected_calibration_error(y_true, probabilities, bins),
        "ece_after": expected_calibration_error(y_true, after, bins),
        "nll_before": negative_log_likelihood(y_true, probabilities),
        "nll_after": negative_log_likelihood(y_true, after),
    }
