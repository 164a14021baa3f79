"""Evaluation plots: what DVC draws (confusion, ROC, PR, reliability) and images (worst errors, stress)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, precision_recall_curve, roc_curve

from skin_lesion.evaluation.metrics import reliability_table
from skin_lesion.files import atomic_file, atomic_output_dir, write_csv_atomic
from skin_lesion.params import EvaluateParams

FIGURE_DPI = 100  # the PNG figures: 700 px wide and more


def write_stress_plot(folder: Path, stress: dict[str, dict[str, dict[str, float | None]]]) -> None:
    """stress.png: balanced accuracy and melanoma AUC against each transform's strength."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    if not stress:
        figure.text(0.5, 0.5, "Stress test off (evaluate.stress is empty)", ha="center", va="center")
        figure.savefig(folder / "stress.png", dpi=FIGURE_DPI)
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
    figure.savefig(folder / "stress.png", dpi=FIGURE_DPI)


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
    """The evaluation plots: data for DVC's charts, and the same figures as PNG images for offline reading.

    roc.csv (one curve per class), pr_melanoma.csv, confusion.csv and reliability.csv feed dvc.yaml's
    top-level plots; their PNG twins, the worst errors and the stress test are images.
    """
    names = np.asarray(classes)
    confusion = pd.DataFrame({"actual": names[y_true], "predicted": names[probabilities.argmax(axis=1)]})
    roc = roc_table(y_true, probabilities, classes)
    pr = pr_rows(y_true == melanoma, probabilities[:, melanoma]).assign(**{"class": classes[melanoma]})
    reliability = reliability_table(y_true, probabilities, settings.calibration_bins)
    with atomic_output_dir(folder) as tmp:
        write_csv_atomic(tmp / "confusion.csv", confusion)
        write_csv_atomic(tmp / "roc.csv", roc)
        write_csv_atomic(tmp / "pr_melanoma.csv", pr)
        write_csv_atomic(tmp / "reliability.csv", reliability)
        _curves_figure(roc, "fpr", "tpr", "ROC, one curve per class (test split)", diagonal=True).savefig(
            tmp / "roc.png", dpi=FIGURE_DPI
        )
        _curves_figure(pr, "recall", "precision", "Melanoma precision-recall (test split)").savefig(
            tmp / "pr_melanoma.png", dpi=FIGURE_DPI
        )
        predicted = probabilities.argmax(axis=1)
        _confusion_figure(y_true, predicted, classes).savefig(tmp / "confusion.png", dpi=FIGURE_DPI)
        _confusion_figure(y_true, predicted, classes, normalised=True).savefig(
            tmp / "confusion_normalized.png", dpi=FIGURE_DPI
        )
        _reliability_figure(reliability).savefig(tmp / "reliability.png", dpi=FIGURE_DPI)
        worst_misclassified_grid(rows, y_true, probabilities, classes, settings.worst_examples).save(
            tmp / "worst_misclassified.png"
        )
        write_stress_plot(tmp, stress)


def write_training_curves(series_folder: Path, target: Path) -> None:
    """curves.png: loss, then accuracy and validation balanced accuracy, per epoch (DVCLive's files)."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = {"Loss": ("loss", "val_loss"), "Accuracy": ("accuracy", "val_accuracy", "val_balanced_accuracy")}
    for axis, (title, names) in zip(figure.subplots(1, 2), panels.items(), strict=True):
        for name in names:
            path = series_folder / f"{name}.tsv"
            if path.is_file():
                series = pd.read_csv(path, sep="\t")
                axis.plot(series["step"] + 1, series[name], marker=".", label=name)
        axis.set(title=title, xlabel="epoch")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    with atomic_file(target, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=FIGURE_DPI)


def roc_table(y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Every class's one-vs-rest ROC curve, long format (class, step, fpr, tpr), for one chart."""
    curves = [
        roc_rows(y_true == k, probabilities[:, k]).assign(**{"class": name}) for k, name in enumerate(classes)
    ]
    table = pd.concat([curve for curve in curves if not curve.empty], ignore_index=True)
    return table[["class", "step", "fpr", "tpr"]] if not table.empty else table


def roc_rows(is_positive: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The ROC curve's points in drawing order; empty when the split lacks positives or negatives."""
    if len(set(is_positive.tolist())) < 2:
        return pd.DataFrame(columns=["step", "fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    return pd.DataFrame({"step": range(len(fpr)), "fpr": fpr, "tpr": tpr, "threshold": thresholds})


def pr_rows(is_positive: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The precision-recall curve as the step function it is, in drawing order; empty without positives.

    Between two thresholds' recalls, precision is the one at the higher recall: joining the points
    with straight lines would invent precisions no threshold gives.
    """
    if not is_positive.any():
        return pd.DataFrame(columns=["step", "recall", "precision"])
    precision, recall, _ = precision_recall_curve(is_positive, scores)
    recall, precision = recall[::-1], precision[::-1]  # ascending recall, from (0, 1)
    xs, ys = [recall[0]], [precision[0]]
    for k in range(1, len(recall)):
        xs += [recall[k - 1], recall[k]]
        ys += [precision[k], precision[k]]
    return pd.DataFrame({"step": range(len(xs)), "recall": xs, "precision": ys})


def _curves_figure(table: pd.DataFrame, x: str, y: str, title: str, diagonal: bool = False) -> Figure:
    # Matplotlib's object API draws to a file with no GUI backend and no global pyplot state.
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    axis = figure.subplots()
    for name, curve in table.groupby("class", sort=False):
        axis.plot(curve[x].astype(float), curve[y].astype(float), label=name)
    if diagonal:
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axis.set(title=title, xlabel=x, ylabel=y, xlim=(0, 1), ylim=(0, 1.02))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="lower right" if diagonal else "lower left")
    return figure


def _confusion_figure(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], normalised: bool = False
) -> Figure:
    counts = confusion_matrix(
        y_true, y_pred, labels=range(len(classes)), normalize="true" if normalised else None
    )
    figure = Figure(figsize=(8, 7), layout="constrained")
    axis = figure.subplots()
    ConfusionMatrixDisplay(np.nan_to_num(counts), display_labels=list(classes)).plot(
        ax=axis,
        colorbar=True,
        xticks_rotation=45,
        cmap="Blues",
        values_format=".2f" if normalised else "d",
        im_kw={"vmin": 0, "vmax": 1} if normalised else None,  # a share's scale is 0 to 1
    )
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")  # long class names end under their column
    title = "rows normalised by true class" if normalised else "rows are the true class"
    axis.set(title=f"Confusion matrix (test split), {title}")
    return figure


def _reliability_figure(reliability: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(6, 5), layout="constrained")
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    axis.plot(reliability["confidence"], reliability["accuracy"], marker="o", label="model")
    axis.set(title="Reliability (test split)", xlabel="confidence", ylabel="accuracy", xlim=(0, 1))
    axis.set(ylim=(0, 1.02))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return figure


GRID_TILE_PX = 160  # a tile's width holds about 26 caption characters
GRID_CAPTION_PX = 30  # two lines of Pillow's default font
GRID_COLUMNS = 4


def worst_misclassified_grid(
    rows: pd.DataFrame, y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], count: int
) -> Image.Image:
    """A captioned grid of the test images misclassified with the highest confidence."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    tile, caption, columns = GRID_TILE_PX, GRID_CAPTION_PX, GRID_COLUMNS
    if len(worst) == 0:
        notice = Image.new("RGB", (columns * tile, tile), "white")
        ImageDraw.Draw(notice).text((10, tile // 2 - 6), "No test image was misclassified.", fill="black")
        return notice
    grid = Image.new(
        "RGB", (columns * tile, max(1, math.ceil(len(worst) / columns)) * (tile + caption)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for slot, index in enumerate(worst):
        x, y = (slot % columns) * tile, (slot // columns) * (tile + caption)
        with Image.open(rows["path"].iloc[index]) as image:
            grid.paste(image.convert("RGB").resize((tile, tile)), (x, y))
        confidence = probabilities[index, predicted[index]]
        draw.text((x + 2, y + tile + 2), f"true: {classes[y_true[index]][:20]}", fill="black")
        draw.text(
            (x + 2, y + tile + 15), f"said: {classes[predicted[index]][:15]} {confidence:.2f}", fill="red"
        )
    return grid


def write_learning_curve(runs: pd.DataFrame, target: Path, site: str) -> None:
    """The site's learning curve as a PNG: melanoma AUC and the alert against the site images learned."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = {
        "Melanoma AUC": {"unseen_auc": "on the site images not learned", "crossfit_auc": "cross-fitted"},
        "Alert on the site images not learned": {
            "unseen_sensitivity": "sensitivity",
            "unseen_false_alert_rate": "false-alert rate",
        },
    }
    for axis, (title, series) in zip(figure.subplots(1, 2), panels.items(), strict=True):
        for column, label in series.items():
            if runs.empty:
                continue
            axis.scatter(runs["site_images"], runs[column], alpha=0.4, s=12)
            means = runs.groupby("site_images")[column].mean()
            axis.plot(means.index, means.to_numpy(), marker="o", label=f"{label} (mean)")
        axis.set(title=title, xlabel=f"images of site {site} learned from")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "no learning curve", ha="center", va="center", transform=axis.transAxes)
    with atomic_file(target, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=FIGURE_DPI)
