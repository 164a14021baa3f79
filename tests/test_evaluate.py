"""evaluate: metrics against values worked out by hand, plots data, and registration."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from stages.evaluate import compute_metrics, confusion_rows, register_version, roc_rows

CLASSES = ["melanoma", "nevus", "vascular lesion"]
# Six test images, two per class. Predictions: 0 right, 1 missed melanoma (said nevus),
# 2 right, 3 false melanoma alarm, 4 and 5 right.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.7, 0.2],
        [0.6, 0.3, 0.1],
        [0.1, 0.2, 0.7],
        [0.2, 0.1, 0.7],
    ]
)


def test_headline_metrics_match_hand_computation() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    assert metrics["test_images"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    # AUCs: melanoma 7/8 pairs ranked right, nevus 7/8, vascular 8/8.
    assert metrics["macro_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)


def test_melanoma_metrics_match_hand_computation() -> None:
    melanoma = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)["melanoma"]
    assert melanoma == {"sensitivity": 0.5, "specificity": 0.75, "auc": 7 / 8}


def test_per_class_metrics_match_hand_computation() -> None:
    per_class = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)["per_class"]
    assert per_class["melanoma"] == {"precision": 0.5, "recall": 0.5, "auc": 7 / 8, "support": 2}
    assert per_class["vascular lesion"] == {"precision": 1.0, "recall": 1.0, "auc": 1.0, "support": 2}


def test_class_absent_from_test_has_undefined_metrics() -> None:
    keep = Y_TRUE != 2
    metrics = compute_metrics(Y_TRUE[keep], PROBS[keep], CLASSES, melanoma=0)
    absent = metrics["per_class"]["vascular lesion"]
    assert absent["support"] == 0
    assert absent["recall"] is None
    assert absent["auc"] is None
    assert metrics["macro_auc"] == pytest.approx(
        np.mean([a["auc"] for a in list(metrics["per_class"].values())[:2]])
    )


def test_confusion_rows_name_actual_and_predicted() -> None:
    rows = confusion_rows(Y_TRUE, PROBS, CLASSES)
    assert rows.iloc[1].to_dict() == {"actual": "melanoma", "predicted": "nevus"}
    assert rows.iloc[3].to_dict() == {"actual": "nevus", "predicted": "melanoma"}


def test_roc_rows_run_from_origin_to_corner() -> None:
    roc = roc_rows(Y_TRUE == 0, PROBS[:, 0])
    assert (roc["fpr"].iloc[0], roc["tpr"].iloc[0]) == (0.0, 0.0)
    assert (roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (1.0, 1.0)


def test_roc_rows_empty_without_positives() -> None:
    assert roc_rows(np.zeros(4, dtype=bool), np.linspace(0, 1, 4)).empty


def test_register_version_sets_challenger_alias(in_tmp: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{in_tmp / 'mlflow.db'}")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    with mlflow.start_run():
        info = mlflow.keras.log_model(model, name="model", pip_requirements=["keras"])
    first = register_version(info.model_uri, "lesions", tags={"test_accuracy": "0.5"})
    second = register_version(info.model_uri, "lesions", tags={"test_accuracy": "0.6"})
    client = mlflow.MlflowClient()
    assert (first, second) == ("1", "2")
    challenger = client.get_model_version_by_alias("lesions", "challenger")
    assert str(challenger.version) == "2"
    assert challenger.tags["test_accuracy"] == "0.6"
