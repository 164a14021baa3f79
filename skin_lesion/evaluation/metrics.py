"""The ISIC challenges' metrics, the melanoma operating point, bootstrap intervals and calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest, rankdata
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from skin_lesion.errors import PipelineError
from skin_lesion.params import EvaluateParams


def capped_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, class_cap: int) -> float:
    """Mean per-class recall, each class weighed by its number of images capped at class_cap.

    class_cap 1 is balanced accuracy. A larger cap keeps a class with one or two validation images
    (seborrheic keratosis, after cleaning the public dataset) from swinging early stopping's choice
    by a whole class's share on one image, while classes with enough images still count equally.
    """
    _, counts = np.unique(y_true, return_counts=True)
    recalls = list(class_recalls(y_true, y_pred).values())
    return float(np.average(recalls, weights=np.minimum(counts, class_cap)))


def class_recalls(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, float]:
    """Each class's recall (sensitivity), for the classes present in y_true, in class order."""
    labels = np.unique(y_true)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None)
    return dict(zip(labels.tolist(), recalls.tolist(), strict=True))


PARTIAL_AUC_SENSITIVITY = 0.8  # the ISIC challenges' "AUC above 80 % sensitivity"
SITE_RULE = "site"  # the threshold rule of a threshold chosen on a site's cross-fitted scores


def score_test_split(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    melanoma: int,
    settings: EvaluateParams,
    seed: int,
    val_collections: np.ndarray | None = None,
    site_threshold: float | None = None,
) -> dict[str, Any]:
    """The test metrics, the melanoma operating point (threshold chosen on val), intervals and ECE.

    `val` and `test` are (labels, probabilities) pairs. The threshold follows evaluate.threshold_rule;
    every rule's threshold and test operating point are reported (`threshold_rules`), so that what a
    sensitivity floor in every collection costs in false alerts shows beside the rule in use. A
    `site_threshold` (chosen on a site's cross-fitted scores) is the rule `site`, and the one in use.
    """
    (y_val, p_val), (y_test, p_test) = val, test
    collections = val_collections if val_collections is not None else np.full(len(y_val), "")
    thresholds = alert_thresholds(
        y_val == melanoma, p_val[:, melanoma], collections, settings.target_sensitivity
    )
    if site_threshold is not None:
        thresholds[SITE_RULE] = site_threshold
    threshold = thresholds[SITE_RULE if site_threshold is not None else settings.threshold_rule]
    metrics = compute_metrics(y_test, p_test, classes, melanoma)
    metrics["melanoma"]["operating_point"] = operating_point(
        y_test == melanoma, p_test[:, melanoma], threshold
    )
    metrics["melanoma"]["threshold_rules"] = {
        rule: operating_point(y_test == melanoma, p_test[:, melanoma], value)
        for rule, value in thresholds.items()
    }
    metrics["confidence_intervals"] = bootstrap_intervals(
        y_test, p_test, melanoma, threshold, settings.bootstrap, seed
    )
    metrics["calibration_error"] = expected_calibration_error(y_test, p_test, settings.calibration_bins)
    return metrics


def compute_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], melanoma: int
) -> dict[str, Any]:
    """The ISIC metrics from argmax decisions and probabilities; undefined values are None."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    per_class = {}
    for k, name in enumerate(classes):
        is_k = y_true == k
        per_class[name] = {
            "precision": _finite(precision_score(is_k, y_pred == k, zero_division=np.nan)),
            "sensitivity": _ratio(matrix[k, k], matrix[k].sum()),
            "specificity": _ratio(
                matrix.sum() - matrix[k].sum() - matrix[:, k].sum() + matrix[k, k], (~is_k).sum()
            ),
            "auc": auc_or_none(is_k, probabilities[:, k]),
            "support": int(is_k.sum()),
        }
    aucs = [scores["auc"] for scores in per_class.values() if scores["auc"] is not None]
    melanoma_scores = per_class[classes[melanoma]]
    return {
        "test_images": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "melanoma": {
            "sensitivity": melanoma_scores["sensitivity"],
            "specificity": melanoma_scores["specificity"],
            "auc": melanoma_scores["auc"],
            "auc_sens_80": auc_above_sensitivity(
                y_true == melanoma, probabilities[:, melanoma], PARTIAL_AUC_SENSITIVITY
            ),
        },
        "per_class": per_class,
    }


def auc_above_sensitivity(is_positive: np.ndarray, scores: np.ndarray, sensitivity: float) -> float | None:
    """Area under the ROC curve where the true-positive rate is at least `sensitivity` (ISIC 2019).

    scikit-learn's partial AUC (roc_auc_score's max_fpr) bounds the false-positive rate and applies
    the McClish correction; the ISIC metric bounds the true-positive rate and is not normalised.
    """
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    start = int(np.searchsorted(tpr, sensitivity, side="left"))
    fpr_at = float(np.interp(sensitivity, tpr[start - 1 : start + 1], fpr[start - 1 : start + 1]))
    return float(auc(np.insert(fpr[start:], 0, fpr_at), np.insert(tpr[start:], 0, sensitivity)))


def choose_threshold(is_positive: np.ndarray, scores: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold on the scores whose sensitivity reaches the target."""
    if not is_positive.any():
        raise PipelineError("evaluate.target_sensitivity: the validation split has no melanoma to tune on")
    positives = np.sort(scores[is_positive])[::-1]
    needed = math.ceil(target_sensitivity * len(positives) - 1e-9)
    return float(positives[max(needed, 1) - 1])


MIN_COLLECTION_MELANOMAS = 5  # a val collection's melanomas needed to set a threshold of its own


def alert_thresholds(
    is_positive: np.ndarray, scores: np.ndarray, collections: np.ndarray, target_sensitivity: float
) -> dict[str, float]:
    """The threshold of each evaluate.threshold_rule, chosen on validation scores.

    `overall`: the target sensitivity over all validation melanomas. `worst_collection`: the target
    in every collection with MIN_COLLECTION_MELANOMAS melanomas or more (the lowest of their
    thresholds), a floor that holds where the melanomas are hardest to tell, paid for in false alerts.
    """
    overall = choose_threshold(is_positive, scores, target_sensitivity)
    per_collection = [
        choose_threshold(is_positive[collections == name], scores[collections == name], target_sensitivity)
        for name in np.unique(collections)
        if (is_positive & (collections == name)).sum() >= MIN_COLLECTION_MELANOMAS
    ]
    return {"overall": overall, "worst_collection": min([overall, *per_collection])}


def operating_point(is_positive: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity and alerts per 100 images at a threshold."""
    alert = scores >= threshold
    return {
        "threshold": threshold,
        "sensitivity": _ratio((alert & is_positive).sum(), is_positive.sum()),
        "specificity": _ratio((~alert & ~is_positive).sum(), (~is_positive).sum()),
        "alerts_per_100": float(100 * alert.mean()),
    }


def alert_figures(is_melanoma: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The alert's sensitivity and false-alert rate (share of non-melanoma lesions) at `threshold`."""
    return {"threshold": threshold, **alert_rates(is_melanoma, scores >= threshold)}


def alert_rates(is_melanoma: np.ndarray, alert: np.ndarray) -> dict[str, Any]:
    """The sensitivity and false-alert rate of the `alert`s, each with its exact interval and count."""
    return {
        **binomial("sensitivity", int((alert & is_melanoma).sum()), int(is_melanoma.sum())),
        **binomial("false_alert_rate", int((alert & ~is_melanoma).sum()), int((~is_melanoma).sum())),
    }


def binomial(name: str, successes: int, trials: int) -> dict[str, Any]:
    """A proportion with its exact (Clopper-Pearson) 95 % interval, None when there are no trials."""
    return {
        name: successes / trials if trials else None,
        f"{name}_ci": exact_interval(successes, trials),
        f"{name}_n": trials,
    }


def bootstrap_intervals(
    y_true: np.ndarray, probabilities: np.ndarray, melanoma: int, threshold: float, resamples: int, seed: int
) -> dict[str, list[float] | None]:
    """95 % intervals of the headline numbers: percentile intervals over test-set resamples (seeded),
    and the exact (Clopper-Pearson) interval of the alert's sensitivity, a proportion, whose
    resamples collapse to a point when every melanoma is found (5 of 5 is 48 % to 100 %, not 100 %)."""
    is_melanoma = y_true == melanoma
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(y_true), size=(resamples, len(y_true)))
    predicted = probabilities.argmax(axis=1)
    intervals = {
        "balanced_accuracy": percentile_interval(
            resampled_balanced_accuracies(y_true, predicted, samples, probabilities.shape[1])
        ),
        "melanoma_auc": percentile_interval(resampled_aucs(is_melanoma, probabilities[:, melanoma], samples)),
    }
    found = int(((probabilities[:, melanoma] >= threshold) & is_melanoma).sum())
    intervals["melanoma_sensitivity"] = exact_interval(found, int(is_melanoma.sum()))
    return intervals


def bootstrap_auc(
    is_positive: np.ndarray, scores: np.ndarray, resamples: int, seed: int
) -> list[float] | None:
    """A 95 % percentile interval of the ROC AUC over seeded resamples of the set."""
    if not resamples:
        return None
    samples = np.random.default_rng(seed).integers(0, len(scores), size=(resamples, len(scores)))
    return percentile_interval(resampled_aucs(is_positive, scores, samples))


def resampled_aucs(is_positive: np.ndarray, scores: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """The ROC AUC of each resample (a row of indices); NaN for one holding a single class.

    The AUC is the Mann-Whitney U of the positives' average ranks (ties count a half, as in
    roc_auc_score), which scipy ranks for every resample at once: roc_auc_score called per resample
    took 5 ms each, 14 of evaluate's 28 s on the real data.
    """
    positive = is_positive[samples]
    ranks = rankdata(scores[samples], axis=1)
    n_positive = positive.sum(axis=1)
    n_negative = samples.shape[1] - n_positive
    u = (ranks * positive).sum(axis=1) - n_positive * (n_positive + 1) / 2
    pairs = n_positive * n_negative
    return np.where(pairs > 0, u / np.maximum(pairs, 1), np.nan)


def resampled_balanced_accuracies(
    y_true: np.ndarray, y_pred: np.ndarray, samples: np.ndarray, n_classes: int
) -> np.ndarray:
    """balanced_accuracy of each resample (a row of indices), counted for all resamples at once."""
    cells = (y_true[samples] + n_classes * np.arange(len(samples))[:, None]).ravel()
    shape = (len(samples), n_classes)
    images = np.bincount(cells, minlength=shape[0] * shape[1]).reshape(shape)
    correct = (y_pred[samples] == y_true[samples]).ravel()
    found = np.bincount(cells, weights=correct, minlength=shape[0] * shape[1]).reshape(shape)
    present = images > 0
    return (found / np.maximum(images, 1)).sum(axis=1) / present.sum(axis=1)


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of the finite values; None when there is none."""
    values = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None


def exact_interval(successes: int, trials: int) -> list[float] | None:
    """The exact (Clopper-Pearson) 95 % interval of a proportion; None when there are no trials."""
    if not trials:
        return None
    interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    return [float(interval.low), float(interval.high)]


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins."""
    table = reliability_table(y_true, probabilities, bins)
    return float((table["count"] * (table["confidence"] - table["accuracy"]).abs()).sum() / len(y_true))


def reliability_table(y_true: np.ndarray, probabilities: np.ndarray, bins: int) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count (the reliability plot's data)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [
        (confidence[which == b].mean(), correct[which == b].mean(), int((which == b).sum()))
        for b in range(bins)
        if (which == b).any()
    ]
    return pd.DataFrame(rows, columns=["confidence", "accuracy", "count"])


def metrics_by_collection(
    collections: pd.Series, y_true: np.ndarray, probabilities: np.ndarray, melanoma: int, threshold: float
) -> dict[str, dict[str, Any]]:
    """Balanced accuracy, melanoma AUC and the alert per collection, when the test split has several."""
    names = sorted(set(collections))
    if len(names) < 2:
        return {}
    results = {}
    for name in names:
        picked = (collections == name).to_numpy()
        y, p = y_true[picked], probabilities[picked]
        point = operating_point(y == melanoma, p[:, melanoma], threshold)
        results[name] = {
            "images": int(picked.sum()),
            "melanomas": int((y == melanoma).sum()),
            "balanced_accuracy": balanced_accuracy(y, p.argmax(axis=1)),
            "melanoma_auc": auc_or_none(y == melanoma, p[:, melanoma]),
            "alert_sensitivity": point["sensitivity"],
            "alert_specificity": point["specificity"],
        }
    return results


def experiment_row(metrics: dict[str, Any], version: int) -> dict[str, float | int | None]:
    """The few numbers `dvc exp show` puts side by side, under short names; the rest is in the details.

    Rounded to three decimals (the threshold to three significant digits), so that the table stays
    narrow: a test split of a few hundred images does not resolve a fourth decimal anyway, and the
    details file and MLflow keep full precision.
    """
    melanoma, point = metrics["melanoma"], metrics["melanoma"]["operating_point"]
    return {
        "bal_acc": _rounded(metrics["balanced_accuracy"]),
        "acc": _rounded(metrics["accuracy"]),
        "auc": _rounded(metrics["macro_auc"]),
        "mel_auc": _rounded(melanoma["auc"]),
        "mel_sens": _rounded(point["sensitivity"]),
        "mel_spec": _rounded(point["specificity"]),
        "mel_thr": None if point["threshold"] is None else float(f"{point['threshold']:.3g}"),
        "ece": _rounded(metrics["calibration_error"]),  # calibrated: the details have it before, and T
        **(
            {"ext_mel_auc": _rounded(mean_external_melanoma_auc(metrics["external"]))}
            if metrics.get("external")
            else {}
        ),
        **(
            {
                "site_mel_auc": _rounded(metrics["site"]["melanoma_auc"]),
                "site_sens": _rounded(metrics["site"]["alert"]["sensitivity"]),
                "site_false_alerts": _rounded(metrics["site"]["alert"]["false_alert_rate"]),
            }
            if metrics.get("site")
            else {}
        ),
        "version": version,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers promotion can compare, keyed as evaluate.promote_metric names them."""
    values = {
        "balanced_accuracy": metrics["balanced_accuracy"],
        "accuracy": metrics["accuracy"],
        "macro_auc": metrics["macro_auc"],
        "melanoma_auc": metrics["melanoma"]["auc"],
        "melanoma_auc_sens_80": metrics["melanoma"]["auc_sens_80"],
        "external_melanoma_auc": mean_external_melanoma_auc(metrics.get("external", {})),
        "site_melanoma_auc": (metrics.get("site") or {}).get("melanoma_auc"),
    }
    return {key: float(value) for key, value in values.items() if value is not None}


def mean_external_melanoma_auc(external: dict[str, dict[str, Any]]) -> float | None:
    """The mean melanoma AUC over the external sets: the one external figure of the headline file."""
    values = [result["melanoma_auc"] for result in external.values() if result["melanoma_auc"] is not None]
    return float(np.mean(values)) if values else None


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The ISIC definition: the mean sensitivity over the classes present in y_true."""
    return capped_balanced_accuracy(y_true, y_pred, class_cap=1)


def known_classes(targets: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the targets that are one of `classes`, and their class indices.

    An external image labelled `other` has no class probability to be calibrated against, and no
    class recall to count in.
    """
    targets = np.asarray(targets)
    known = np.flatnonzero(np.isin(targets, list(classes)))
    return known, np.array([list(classes).index(label) for label in targets[known]], dtype=np.int64)


def auc_or_none(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """One-vs-rest ROC AUC; None when the split has no image (or only images) of the class."""
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, scores))


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def reference_figures(
    metrics: dict[str, Any],
    y_test: np.ndarray,
    p_test: np.ndarray,
    unlike_training: np.ndarray,
    classes: Sequence[str],
    melanoma: int,
    external: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The test split's melanoma sensitivity (with its interval), alert, OOD and predicted-class rates,
    and on each external set the alert's sensitivity and false-alert rate and the recall of each class
    the set has (what the review page and predict show beside a class's probability)."""
    point = metrics["melanoma"]["operating_point"]
    predicted = np.asarray(p_test).argmax(axis=1)
    specificity = point["specificity"]
    return {
        "images": len(y_test),
        "melanomas": int((np.asarray(y_test) == melanoma).sum()),
        "melanoma_sensitivity": point["sensitivity"],
        "melanoma_sensitivity_ci": metrics["confidence_intervals"].get("melanoma_sensitivity"),
        # Per 100 non-melanoma lesions, carcinomas included; the key keeps its old name because
        # registered versions carry it.
        "alerts_per_100_benign": None if specificity is None else 100 * (1 - specificity),
        "alert_rate": point["alerts_per_100"] / 100,
        "ood_rate": float(np.mean(unlike_training)),
        "class_mix": {label: float(np.mean(predicted == k)) for k, label in enumerate(classes)},
        "external": {
            name: {
                "melanomas": result["alert"]["sensitivity_n"],
                "sensitivity": result["alert"]["sensitivity"],
                "sensitivity_ci": result["alert"]["sensitivity_ci"],
                "false_alert_rate": result["alert"]["false_alert_rate"],
                # The review page marks the figures of a set that chose the recipe, as the card does.
                "chose_recipe": bool(result.get("chose_recipe", False)),
                "class_recall": {
                    label: {"recall": recall, "images": result["class_counts"][label]}
                    for label, recall in result["recall"].items()
                },
            }
            for name, result in (external or {}).items()
        },
        **({"site": site_reference(metrics["site"])} if metrics.get("site") else {}),
    }


def site_reference(site: dict[str, Any]) -> dict[str, Any]:
    """What the review page and predict quote of a site's cross-fitted figures."""
    alert = site["alert"]
    return {
        "name": site["site"],
        "images": site["images"],
        "melanomas": alert["sensitivity_n"],
        "melanoma_auc": site["melanoma_auc"],
        "sensitivity": alert["sensitivity"],
        "sensitivity_ci": alert["sensitivity_ci"],
        "false_alert_rate": alert["false_alert_rate"],
        "threshold_source": site["threshold_source"],
    }
