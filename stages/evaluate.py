"""Stage `evaluate`: score the trained model on the test split and register it in MLflow.

Writes accuracy, balanced accuracy, per-class precision/recall/AUC, macro one-vs-rest AUC and the
melanoma sensitivity, specificity and AUC to the metrics JSON; a confusion matrix and the melanoma ROC
as DVC plots. The model becomes a new version of base.model_name with the alias `challenger`;
promoting it to `champion` is a person's decision, taken in the MLflow UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from stages.common import (
    atomic_output_dir,
    class_indices,
    load_images,
    read_manifest,
    run_cli,
    write_csv_atomic,
    write_json_atomic,
)
from stages.config import load_params
from stages.errors import PipelineError
from stages.split import SPLIT_COLUMNS
from stages.tracking import flatten_params, stage_run

log = logging.getLogger("stages.evaluate")

NEW_VERSION_ALIAS = "challenger"


def main() -> None:
    """Predict the test split, write metrics and plots, register the model version."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=Path, required=True, help="test split manifest")
    parser.add_argument("--model", type=Path, required=True, help="trained .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="folder of plot data to write")
    args = parser.parse_args()
    params = load_params()
    base = params.base

    test = read_manifest(args.test, SPLIT_COLUMNS)
    if test.empty:
        raise PipelineError(f"{args.test}: the test split is empty")
    y_true = class_indices(test["label"], base.classes, source=str(args.test))
    x_test = load_images(test["path"].tolist(), base.image_size)
    model = keras.saving.load_model(args.model, safe_mode=True)
    probabilities = model.predict(x_test, batch_size=params.evaluate.batch_size, verbose=0)
    melanoma = base.classes.index(base.melanoma_class)

    with stage_run("evaluate", base, params.evaluate) as run:
        metrics = compute_metrics(y_true, probabilities, base.classes, melanoma)
        with atomic_output_dir(args.plots) as tmp:
            write_csv_atomic(tmp / "confusion.csv", confusion_rows(y_true, probabilities, base.classes))
            write_csv_atomic(
                tmp / "roc_melanoma.csv", roc_rows(y_true == melanoma, probabilities[:, melanoma])
            )
        mlflow.log_metrics(_numeric(flatten_params(metrics)))
        model_info = json.loads(args.model_info.read_text(encoding="utf-8"))
        version = register_version(
            model_info["model_uri"],
            name=base.model_name,
            tags={
                "train_run_id": model_info["run_id"],
                "evaluate_run_id": run.info.run_id,
                "test_accuracy": f"{metrics['accuracy']:.4f}",
                "test_balanced_accuracy": f"{metrics['balanced_accuracy']:.4f}",
                "test_melanoma_auc": str(metrics["melanoma"]["auc"]),
            },
        )
        mlflow.set_tag("registered_version", version)
        metrics["model_version"] = int(version)
        write_json_atomic(args.metrics, metrics)
    log.info(
        "test accuracy %.3f, balanced accuracy %.3f; registered %s version %s as @%s",
        metrics["accuracy"],
        metrics["balanced_accuracy"],
        base.model_name,
        version,
        NEW_VERSION_ALIAS,
    )


def compute_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], melanoma: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class and melanoma metrics; undefined values are None."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan
    )
    aucs = [_auc(y_true == k, probabilities[:, k]) for k in labels]
    defined_aucs = [auc for auc in aucs if auc is not None]
    is_melanoma, said_melanoma = y_true == melanoma, y_pred == melanoma
    negatives = int((~is_melanoma).sum())
    return {
        "test_images": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_auc": float(np.mean(defined_aucs)) if defined_aucs else None,
        "melanoma": {
            "sensitivity": _finite(recall[melanoma]),
            "specificity": (float((~is_melanoma & ~said_melanoma).sum() / negatives) if negatives else None),
            "auc": aucs[melanoma],
        },
        "per_class": {
            name: {
                "precision": _finite(precision[k]),
                "recall": _finite(recall[k]),
                "auc": aucs[k],
                "support": int(support[k]),
            }
            for k, name in enumerate(classes)
        },
    }


def confusion_rows(y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted), the shape DVC's confusion template reads."""
    names = np.asarray(classes)
    return pd.DataFrame({"actual": names[y_true], "predicted": names[probabilities.argmax(axis=1)]})


def roc_rows(is_positive: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The ROC curve's points; empty when the test split lacks positives or negatives."""
    if len(set(is_positive.tolist())) < 2:
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def register_version(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version of `name`, tag it, and point the challenger alias at it."""
    version = mlflow.register_model(model_uri, name, tags=tags).version
    MlflowClient().set_registered_model_alias(name, NEW_VERSION_ALIAS, version)
    return str(version)


def _auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    # One-vs-rest AUC is undefined when the test split has no image (or only images) of the class.
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, scores))


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in flat.items() if isinstance(value, (int, float))}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
