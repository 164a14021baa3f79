"""One evaluate run's figures, small but complete, for rendering a model card in tests."""

from __future__ import annotations

from typing import Any

from skin_lesion.params import BaseParams, DownloadParams
from tests.conftest import CLASSES, as_params, small_params

RULES = ("overall", "worst_collection")


def card_params() -> tuple[BaseParams, DownloadParams]:
    """The small test params' base and download sections (synthetic source)."""
    params = as_params(small_params(download={"source": "synthetic"}))
    return params.base, params.download


def _alert(sensitivity: float, melanomas: int) -> dict[str, Any]:
    return {
        "sensitivity": sensitivity,
        "sensitivity_ci": [sensitivity - 0.1, min(sensitivity + 0.1, 1.0)],
        "sensitivity_n": melanomas,
        "false_alert_rate": 0.25,
        "false_alert_rate_ci": [0.2, 0.3],
        "false_alert_rate_n": 40,
    }


def _calibration(images: int) -> dict[str, Any]:
    return {"images": images, "ece_before": 0.12, "ece_after": 0.05, "nll_before": 1.2, "nll_after": 0.9}


def external_result(auc: float, recall: dict[str, float]) -> dict[str, Any]:
    """One external set's figures as external_report writes them."""
    return {
        "images": 50,
        "copies_of_training": 2,
        "melanoma_auc": auc,
        "melanoma_auc_ci": [auc - 0.05, auc + 0.05],
        "balanced_accuracy": 0.55,
        "alert": _alert(0.5, 10),
        "alert_by_rule": {rule: {"sensitivity": 0.5, "false_alert_rate": 0.25} for rule in RULES},
        "recall": recall,
        "class_counts": dict.fromkeys(recall, 10),
        "calibration": _calibration(50),
    }


def metrics() -> dict[str, Any]:
    """The test split's figures as score_test_split and evaluate's calibration write them."""
    point = {"threshold": 0.31234, "sensitivity": 0.9, "specificity": 0.75, "alerts_per_100": 32.5}
    return {
        "test_images": 60,
        "balanced_accuracy": 0.6,
        "accuracy": 0.7,
        "macro_auc": 0.8,
        "calibration_error": 0.05,
        "confidence_intervals": {"balanced_accuracy": [0.5, 0.7], "melanoma_auc": [0.8, 0.95]},
        "melanoma": {
            "auc": 0.88,
            "auc_sens_80": None,
            "operating_point": point,
            "threshold_rules": {rule: point for rule in RULES},
        },
        "per_class": {label: {"sensitivity": 0.5 + k / 10, "support": 20} for k, label in enumerate(CLASSES)},
        "calibration": {"temperature": 1.25, "val": _calibration(30), "test": _calibration(60)},
    }


def external() -> dict[str, dict[str, Any]]:
    """Two external sets: one with every class, one without the vascular lesions."""
    return {
        "isic2017": external_result(0.69, {"melanoma": 0.5, "nevus": 0.8}),
        "clinic": external_result(0.75, dict.fromkeys(CLASSES, 0.6)),
    }


def shift() -> dict[str, Any]:
    """Two collections and one stress change, as source_shift_report writes them."""
    row = {"balanced_accuracy": 0.6, "melanoma_auc": 0.8, "alert_sensitivity": 0.9, "alert_specificity": 0.7}
    drop = {
        "balanced_accuracy": 0.5,
        "balanced_accuracy_drop": 0.1,
        "melanoma_auc": 0.7,
        "melanoma_auc_drop": 0.1,
    }
    return {
        "by_collection": {
            "a": {"images": 30, "melanomas": 10, **row},
            "b": {"images": 30, "melanomas": 0, **row},
        },
        "stress": {"blur": {"1.0": drop}},
    }


def data_report() -> dict[str, Any]:
    """The split stage's data.json, with one provenance warning."""
    return {
        "class_counts": {
            split: {label: (k + 1) * size for k, label in enumerate(CLASSES)}
            for split, size in (("train", 10), ("val", 3), ("test", 4))
        },
        "images_in": 100,
        "images_rejected": 2,
        "images_removed": 7,
        "label_conflicts": 1,
        "conflicts_settled_by_diagnosis": 1,
        "leakage_removed": 2,
        "provenance": {"warnings": ["some images have no licence"]},
    }


def site() -> dict[str, Any]:
    """A site whose threshold was chosen on its cross-fitted melanomas, as site_report returns it."""
    alert = _alert(0.9, 20)
    return {
        "site": "clinic-a",
        "images": 80,
        "melanomas": 20,
        "weight": 5.0,
        "folds": 5,
        "left_out": {"copies_of_training": 1},
        "melanoma_auc": 0.9,
        "melanoma_auc_ci": [0.85, 0.95],
        "threshold": 0.2,
        "threshold_source": "site",
        "threshold_reason": "chosen on the site's 20 cross-fitted melanomas",
        "alert": alert,
        "alert_on_the_images_that_chose_it": alert,
        "alert_at_validation_threshold": alert,
        "verification": {
            "diagnosed_images": 80,
            "logged_images": 100,
            "alert_rate_diagnosed": 0.3,
            "alert_rate_logged": 0.2,
            "biased": True,
            "p_value": 0.01,
        },
    }


def bare_metrics() -> dict[str, Any]:
    """The test split's figures of a version evaluated before calibration, with no interval."""
    figures = metrics()
    del figures["calibration"]
    return figures | {"confidence_intervals": {}}
