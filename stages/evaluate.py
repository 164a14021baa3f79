"""Stage `evaluate`: a clinical report of the trained model on the test split, and its registration.

- The ISIC challenges' metrics: balanced multiclass accuracy, per-class sensitivity, specificity and
  one-vs-rest AUC, macro AUC, and the melanoma AUC above 80 % sensitivity.
- A melanoma operating point: the threshold on P(melanoma) is chosen on the validation split to reach
  evaluate.target_sensitivity, then reported on the test split (sensitivity, specificity, alerts per
  100 images).
- Bootstrap 95 % intervals (evaluate.bootstrap resamples), expected calibration error, DVC plots, and
  a model card (metrics/model_card.md).
- The model, wrapped with its classes, image size and threshold (stages/serving.py), becomes a new
  version of base.model_name with alias `challenger`. evaluate.promote decides `champion`: `manual`
  leaves it to a person, `auto` moves it when the challenger beats it on the same test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from PIL import Image, ImageDraw
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    precision_recall_curve,
    precision_score,
    roc_auc_score,
    roc_curve,
)

from stages.architectures import load_model
from stages.common import (
    atomic_output_dir,
    class_indices,
    load_images,
    read_manifest,
    run_cli,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from stages.config import EvaluateParams, Params, load_params
from stages.errors import PipelineError
from stages.manifests import SPLIT_COLUMNS
from stages.serving import CHAMPION_ALIAS, IMAGE_COLUMN, LesionClassifier, pip_requirements, prediction_frame
from stages.stress import stressed_variants
from stages.tracking import flatten_params, stage_run

log = logging.getLogger("stages.evaluate")

NEW_VERSION_ALIAS = "challenger"
PARTIAL_AUC_SENSITIVITY = 0.8  # the ISIC challenges' "AUC above 80 % sensitivity"


def main() -> None:
    """Predict val and test, write the report, plots and model card, register and maybe promote."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder of split manifests")
    parser.add_argument("--data-report", type=Path, required=True, help="split stage's data.json")
    parser.add_argument("--model", type=Path, required=True, help="trained .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="folder of plot data to write")
    parser.add_argument("--model-card", type=Path, required=True, help="model card to write")
    parser.add_argument("--shift-report", type=Path, required=True, help="by-collection and stress JSON")
    args = parser.parse_args()
    params = load_params()
    base, settings = params.base, params.evaluate
    melanoma = base.classes.index(base.melanoma_class)

    model = load_model(args.model)

    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(images, batch_size=settings.batch_size, verbose=0))

    scored = {}
    for name in ("val", "test"):
        rows = read_manifest(args.split / f"{name}.csv", SPLIT_COLUMNS)
        if rows.empty:
            raise PipelineError(f"{args.split / f'{name}.csv'}: the {name} split is empty")
        y = class_indices(rows["label"], base.classes, source=str(args.split / f"{name}.csv"))
        x = load_images(rows["path"].tolist(), base.image_size)
        scored[name] = (rows, x, y, predict(x))
    test_rows, x_test, y_test, p_test = scored["test"]
    _, _, y_val, p_val = scored["val"]

    with stage_run("evaluate", base, settings) as run:
        threshold = choose_threshold(y_val == melanoma, p_val[:, melanoma], settings.target_sensitivity)
        metrics = compute_metrics(y_test, p_test, base.classes, melanoma)
        metrics["melanoma"]["operating_point"] = operating_point(
            y_test == melanoma, p_test[:, melanoma], threshold
        )
        metrics["confidence_intervals"] = bootstrap_intervals(
            y_test, p_test, melanoma, threshold, settings.bootstrap, base.seed
        )
        metrics["calibration_error"] = expected_calibration_error(y_test, p_test, settings.calibration_bins)
        # Apart from metrics/evaluate.json, which `dvc exp show` spreads into columns.
        shift = {
            "by_collection": metrics_by_collection(
                test_rows["collection"], y_test, p_test, melanoma, threshold
            ),
            "stress": stress_test(predict, x_test, y_test, melanoma, metrics, settings.stress),
        }
        write_plots(args.plots, test_rows, y_test, p_test, base.classes, melanoma, settings, shift["stress"])
        write_json_atomic(args.shift_report, shift)
        mlflow.log_metrics(_metric_names(_numeric(flatten_params({**metrics, **shift}))))
        mlflow.log_artifacts(str(args.plots), "plots")
        mlflow.log_artifact(str(args.shift_report))

        test_fingerprint = hashlib.sha256((args.split / "test.csv").read_bytes()).hexdigest()[:16]
        data_report = json.loads(args.data_report.read_text(encoding="utf-8"))
        card = render_model_card(params, metrics, shift, data_report)
        write_text_atomic(args.model_card, card)
        mlflow.log_artifact(str(args.model_card))
        tags = {
            "train_run_id": json.loads(args.model_info.read_text(encoding="utf-8"))["run_id"],
            "evaluate_run_id": run.info.run_id,
            "test_split": test_fingerprint,
            "melanoma_threshold": f"{threshold:.6f}",
            **{f"test_{key}": str(value) for key, value in headline(metrics).items()},
        }
        model_uri = log_servable_model(
            args.model, base.classes, base.image_size, base.melanoma_class, threshold
        )
        version, reason = register_and_promote(model_uri, base.model_name, card, tags, metrics, settings)
        metrics["model_version"] = int(version)
        write_json_atomic(args.metrics, metrics)
    log.info(
        "test balanced accuracy %.3f, melanoma AUC %s; %s version %s is @%s; %s",
        metrics["balanced_accuracy"],
        metrics["melanoma"]["auc"],
        base.model_name,
        version,
        NEW_VERSION_ALIAS,
        reason,
    )


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
            "auc": _auc(is_k, probabilities[:, k]),
            "support": int(is_k.sum()),
        }
    aucs = [scores["auc"] for scores in per_class.values() if scores["auc"] is not None]
    melanoma_scores = per_class[classes[melanoma]]
    return {
        "test_images": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
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


def operating_point(is_positive: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity and alerts per 100 images at a threshold."""
    alert = scores >= threshold
    return {
        "threshold": threshold,
        "sensitivity": _ratio((alert & is_positive).sum(), is_positive.sum()),
        "specificity": _ratio((~alert & ~is_positive).sum(), (~is_positive).sum()),
        "alerts_per_100": float(100 * alert.mean()),
    }


def bootstrap_intervals(
    y_true: np.ndarray, probabilities: np.ndarray, melanoma: int, threshold: float, resamples: int, seed: int
) -> dict[str, list[float] | None]:
    """95 % percentile intervals over test-set resamples (seeded) for the headline numbers."""
    is_melanoma = y_true == melanoma
    statistics: dict[str, Callable[[np.ndarray], float | None]] = {
        "balanced_accuracy": lambda i: _balanced_accuracy(y_true[i], probabilities[i].argmax(axis=1)),
        "melanoma_sensitivity": lambda i: operating_point(
            is_melanoma[i], probabilities[i, melanoma], threshold
        )["sensitivity"],
        "melanoma_auc": lambda i: _auc(is_melanoma[i], probabilities[i, melanoma]),
    }
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(y_true), size=(resamples, len(y_true)))
    intervals: dict[str, list[float] | None] = {}
    for name, statistic in statistics.items():
        values = [value for value in map(statistic, samples) if value is not None]
        intervals[name] = [float(v) for v in np.percentile(values, [2.5, 97.5])] if values else None
    return intervals


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
            "balanced_accuracy": _balanced_accuracy(y, p.argmax(axis=1)),
            "melanoma_auc": _auc(y == melanoma, p[:, melanoma]),
            "alert_sensitivity": point["sensitivity"],
            "alert_specificity": point["specificity"],
        }
    return results


def stress_test(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    y_true: np.ndarray,
    melanoma: int,
    clean: dict[str, Any],
    strengths: dict[str, list[float]],
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Balanced accuracy and melanoma AUC under each acquisition change, and their drop from clean."""
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    started = time.perf_counter()
    for name, strength, changed in stressed_variants(images, strengths):
        probabilities = predict(changed)
        balanced = _balanced_accuracy(y_true, probabilities.argmax(axis=1))
        auc_value = _auc(y_true == melanoma, probabilities[:, melanoma])
        clean_auc = clean["melanoma"]["auc"]
        results.setdefault(name, {})[f"{strength:g}"] = {
            "balanced_accuracy": balanced,
            "balanced_accuracy_drop": clean["balanced_accuracy"] - balanced,
            "melanoma_auc": auc_value,
            "melanoma_auc_drop": None if auc_value is None or clean_auc is None else clean_auc - auc_value,
        }
    if results:
        variants = sum(len(rows) for rows in results.values())
        seconds = time.perf_counter() - started
        log.info("stress test: %d variants of %d images in %.0f s", variants, len(images), seconds)
    return results


def write_stress_plot(folder: Path, stress: dict[str, dict[str, dict[str, float | None]]]) -> None:
    """stress.png: balanced accuracy and melanoma AUC against each transform's strength."""
    # Matplotlib's object API draws to a file with no GUI backend and no global pyplot state.
    figure = Figure(figsize=(10, 4), layout="constrained")
    if not stress:
        figure.text(0.5, 0.5, "Stress test off (evaluate.stress is empty)", ha="center", va="center")
        figure.savefig(folder / "stress.png", dpi=100)
        return
    axes = figure.subplots(1, 2)
    for axis, metric, title in zip(
        axes, ("balanced_accuracy", "melanoma_auc"), ("Balanced accuracy", "Melanoma AUC"), strict=True
    ):
        for name, rows in stress.items():
            first = next(iter(rows.values()))
            clean = None if first[metric] is None else first[metric] + first[f"{metric}_drop"]
            values = [clean] + [row[metric] for row in rows.values()]
            axis.plot(
                range(len(values)), [np.nan if v is None else v for v in values], marker="o", label=name
            )
        axis.set(title=f"{title} under acquisition changes", ylabel=title, ylim=(0, 1.02))
        axis.set(xlabel="strength step (0: the clean images; steps as in evaluate.stress)")
        axis.set_xticks(range(1 + max(len(rows) for rows in stress.values())))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.savefig(folder / "stress.png", dpi=100)


def write_plots(
    folder: Path,
    rows: pd.DataFrame,
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    melanoma: int,
    settings: EvaluateParams,
    stress: dict[str, dict[str, dict[str, float | None]]],
) -> None:
    """Plot data for DVC: confusion, ROC per class, melanoma PR, reliability, worst images, stress."""
    names = np.asarray(classes)
    confusion = pd.DataFrame({"actual": names[y_true], "predicted": names[probabilities.argmax(axis=1)]})
    with atomic_output_dir(folder) as tmp:
        write_csv_atomic(tmp / "confusion.csv", confusion)
        write_csv_atomic(tmp / "confusion_normalized.csv", confusion)
        for k, name in enumerate(classes):
            write_csv_atomic(tmp / "roc" / f"{name}.csv", roc_rows(y_true == k, probabilities[:, k]))
        write_csv_atomic(tmp / "pr_melanoma.csv", pr_rows(y_true == melanoma, probabilities[:, melanoma]))
        write_csv_atomic(
            tmp / "reliability.csv", reliability_table(y_true, probabilities, settings.calibration_bins)
        )
        worst_misclassified_grid(rows, y_true, probabilities, classes, settings.worst_examples).save(
            tmp / "worst_misclassified.png"
        )
        write_stress_plot(tmp, stress)


def roc_rows(is_positive: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The ROC curve's points; empty when the split lacks positives or negatives."""
    if len(set(is_positive.tolist())) < 2:
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def pr_rows(is_positive: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The precision-recall curve's points; empty without positives."""
    if not is_positive.any():
        return pd.DataFrame(columns=["recall", "precision"])
    precision, recall, _ = precision_recall_curve(is_positive, scores)
    return pd.DataFrame({"recall": recall, "precision": precision})


def worst_misclassified_grid(
    rows: pd.DataFrame, y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], count: int
) -> Image.Image:
    """A captioned grid of the test images misclassified with the highest confidence."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    tile, caption, columns = 128, 30, 4  # a tile's width holds about 21 caption characters
    grid = Image.new(
        "RGB", (columns * tile, max(1, math.ceil(len(worst) / columns)) * (tile + caption)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for slot, index in enumerate(worst):
        x, y = (slot % columns) * tile, (slot // columns) * (tile + caption)
        with Image.open(rows["path"].iloc[index]) as image:
            grid.paste(image.convert("RGB").resize((tile, tile)), (x, y))
        confidence = probabilities[index, predicted[index]]
        draw.text((x + 2, y + tile + 2), f"true: {classes[y_true[index]][:15]}", fill="black")
        draw.text(
            (x + 2, y + tile + 15), f"said: {classes[predicted[index]][:10]} {confidence:.2f}", fill="red"
        )
    return grid


def log_servable_model(
    keras_path: Path, classes: Sequence[str], image_size: int, melanoma_class: str, threshold: float
) -> str:
    """Log the pyfunc that wraps the Keras model with its preprocessing and threshold; return its URI."""
    config = {
        "classes": list(classes),
        "image_size": image_size,
        "melanoma_class": melanoma_class,
        "melanoma_threshold": threshold,
    }
    example = pd.DataFrame({IMAGE_COLUMN: ["<base64-encoded image file>"]})
    output = prediction_frame(
        np.full((1, len(classes)), 1 / len(classes)), classes, melanoma_class, threshold
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=LesionClassifier(),
        artifacts={"keras_model": str(keras_path)},
        model_config=config,
        code_paths=[str(Path(__file__).parent)],
        signature=infer_signature(example, output),
        pip_requirements=pip_requirements(keras.backend.backend()),
    )
    return info.model_uri


def register_and_promote(
    model_uri: str,
    name: str,
    card: str,
    tags: dict[str, str],
    metrics: dict[str, Any],
    settings: EvaluateParams,
) -> tuple[str, str]:
    """Register a new version (@challenger), decide `champion` by evaluate.promote; version and why."""
    version = register_version(model_uri, name=name, tags=tags, description=card)
    client = MlflowClient()
    promoted, reason = decide_promotion(client, name, version, metrics, tags["test_split"], settings)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    mlflow.set_tags({"registered_version": version, "promotion": reason})
    return version, reason


def register_version(model_uri: str, name: str, tags: dict[str, str], description: str = "") -> str:
    """Register `model_uri` as a new version of `name`, tagged and described; alias it `challenger`."""
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client = MlflowClient()
    if description:
        client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, NEW_VERSION_ALIAS, version)
    return version


def decide_promotion(
    client: MlflowClient,
    name: str,
    version: str,
    metrics: dict[str, Any],
    test_split: str,
    settings: EvaluateParams,
) -> tuple[bool, str]:
    """Whether `version` becomes champion under evaluate.promote, and why (recorded as a tag)."""
    if settings.promote == "manual":
        return False, "evaluate.promote=manual: a person sets the champion alias"
    metric = settings.promote_metric
    ours = headline(metrics)[metric]
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return True, f"no champion yet; version {version} has {metric} {ours:.4f}"
    if champion.tags.get("test_split") != test_split:
        return False, f"champion version {champion.version} was tested on another test split; not compared"
    theirs = float(champion.tags[f"test_{metric}"])
    beats = ours > theirs + settings.promote_margin
    verdict = "beats" if beats else "does not beat"
    comparison = f"champion version {champion.version} ({theirs:.4f}) by more than {settings.promote_margin}"
    return beats, f"{metric} {ours:.4f} {verdict} {comparison}"


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers promotion can compare, keyed as evaluate.promote_metric names them."""
    values = {
        "balanced_accuracy": metrics["balanced_accuracy"],
        "accuracy": metrics["accuracy"],
        "macro_auc": metrics["macro_auc"],
        "melanoma_auc": metrics["melanoma"]["auc"],
        "melanoma_auc_sens_80": metrics["melanoma"]["auc_sens_80"],
    }
    return {key: float(value) for key, value in values.items() if value is not None}


def render_model_card(
    params: Params, metrics: dict[str, Any], shift: dict[str, Any], data: dict[str, Any]
) -> str:
    """The model card: data and provenance, split, metrics with intervals, threshold, use, limits."""
    base, intervals = params.base, metrics["confidence_intervals"]
    point = metrics["melanoma"]["operating_point"]

    def with_interval(value: float | None, key: str) -> str:
        bounds = intervals.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        return shown if not bounds else f"{shown} (95 % CI {bounds[0]:.3f} to {bounds[1]:.3f})"

    counts = data["class_counts"]
    lines = [
        f"# Model card: {base.model_name}",
        "",
        "**Not a diagnostic device.** A research tool that gives a second opinion on dermoscopic images;",
        "a clinician decides. It has not been validated prospectively or on other populations.",
        "",
        "## Data",
        "",
        f"- Source: `{params.download.source}` (`{params.download.path}`)"
        + (
            " - SYNTHETIC generated shapes, not skin lesions" if params.download.source == "synthetic" else ""
        ),
        f"- Images in: {data['images_in']}; rejected: {data['images_rejected']}; removed as duplicates, "
        f"label conflicts or test leakage: {data['images_removed'] - data['images_rejected']} "
        f"({data['label_conflicts']} label conflicts, {data['conflicts_settled_by_diagnosis']} "
        f"settled by diagnosis, {data['leakage_removed']} leakage removals).",
        f"- Split: train {sum(counts['train'].values())}, val {sum(counts['val'].values())}, "
        f"test {sum(counts['test'].values())} images; photos of one lesion never straddle splits.",
        "",
        "| class | train | val | test |",
        "| --- | --- | --- | --- |",
        *[
            f"| {label} | {counts['train'][label]} | {counts['val'][label]} | {counts['test'][label]} |"
            for label in base.classes
        ],
        "",
        "## Model",
        "",
        f"`{params.train.arch}` at {base.image_size}x{base.image_size} pixels, "
        f"at most {params.train.epochs} epochs, {params.train.precision}.",
        "",
        "## Test metrics",
        "",
        f"- Balanced multiclass accuracy: {with_interval(metrics['balanced_accuracy'], 'balanced_accuracy')}",
        f"- Accuracy: {metrics['accuracy']:.3f}; macro one-vs-rest AUC: {_shown(metrics['macro_auc'])}",
        f"- Melanoma AUC: {with_interval(metrics['melanoma']['auc'], 'melanoma_auc')}; "
        f"AUC above 80 % sensitivity: {_shown(metrics['melanoma']['auc_sens_80'])}",
        f"- Expected calibration error: {metrics['calibration_error']:.3f}",
        "",
        "## Melanoma alert",
        "",
        f"An alert is raised when P(melanoma) >= {point['threshold']:.4f}, chosen on the validation split",
        f"to reach {params.evaluate.target_sensitivity:.0%} sensitivity there. On the test split:",
        f"sensitivity {with_interval(point['sensitivity'], 'melanoma_sensitivity')}, "
        f"specificity {_shown(point['specificity'])}, {point['alerts_per_100']:.1f} alerts per 100 images.",
        "",
        *_collection_lines(shift["by_collection"]),
        *_stress_lines(shift["stress"]),
        "## Limitations",
        "",
        "- The test set is small; the intervals above show how uncertain these numbers are.",
        "- Classes with few images (see the table) are learned and measured poorly.",
        "- Dermoscopic images of mostly light skin from a few clinics; performance elsewhere is unknown.",
        *[f"- Provenance: {warning}." for warning in data["provenance"]["warnings"]],
    ]
    return "\n".join(lines) + "\n"


def _collection_lines(by_collection: dict[str, dict[str, Any]]) -> list[str]:
    if not by_collection:
        return []
    lines = [
        "## By collection",
        "",
        "Where the model is strong, and where it may only recognise a collection:",
        "",
        "| collection | images | melanomas | balanced accuracy | melanoma AUC | alert sens. | alert spec. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in by_collection.items():
        figures = [
            row[key]
            for key in ("balanced_accuracy", "melanoma_auc", "alert_sensitivity", "alert_specificity")
        ]
        lines.append(
            f"| {name} | {row['images']} | {row['melanomas']} | " + " | ".join(map(_shown, figures)) + " |"
        )
    return [*lines, ""]


def _stress_lines(stress: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    if not stress:
        return []
    lines = [
        "## Acquisition stress test",
        "",
        "The test split as other devices might show it (drop from the clean images in brackets):",
        "",
        "| change | strength | balanced accuracy | melanoma AUC |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in stress.items():
        for strength, row in rows.items():
            lines.append(
                f"| {name} | {strength} | {_shown(row['balanced_accuracy'])} "
                f"({_shown(row['balanced_accuracy_drop'])}) | {_shown(row['melanoma_auc'])} "
                f"({_shown(row['melanoma_auc_drop'])}) |"
            )
    return [*lines, ""]


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # The ISIC definition: the mean sensitivity over the classes present in y_true.
    present = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == k] == k).mean() for k in present]))


def _auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    # One-vs-rest AUC is undefined when the split has no image (or only images) of the class.
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, scores))


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _metric_names(flat: dict[str, float]) -> dict[str, float]:
    # MLflow allows letters, digits, _ - . / and spaces in metric names; collection names may hold more.
    return {re.sub(r"[^\w\-. /]", "_", key): value for key, value in flat.items()}


def _numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in flat.items() if isinstance(value, (int, float))}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
