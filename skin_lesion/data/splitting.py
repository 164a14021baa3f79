"""Train/val/test splits that keep every group whole, stratified by class and seeded; the data report.

The official Test folder, when there is one, stays the test set, and every train image sharing a group
with a test image is removed. Otherwise test and val are carved with sklearn's StratifiedGroupKFold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from sklearn.model_selection import StratifiedGroupKFold

from skin_lesion.data.dedup import (
    _components,
    _near_pairs,
    _pairs_sharing,
    _removed,
    remove_test_leakage,
    resolve_duplicates,
)
from skin_lesion.errors import PipelineError
from skin_lesion.data.manifests import REMOVED_COLUMNS
from skin_lesion.params import SplitParams
from skin_lesion.data.provenance import (
    class_collection_association,
    mix_shares,
    provenance_warnings,
    render_provenance,
)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitResult:
    """The three splits, the images removed on the way, and the figures for the data report."""

    splits: dict[str, pd.DataFrame]
    removed: pd.DataFrame
    report: dict[str, Any]


def split_dataset(frame: pd.DataFrame, classes: Sequence[str], params: SplitParams, seed: int) -> SplitResult:
    """Reject bad images, resolve duplicates and leakage, and split the rest train/val/test."""
    frame = frame.sort_values("path", ignore_index=True)
    unknown = ~frame["label"].isin(classes) & (frame["rejected"] == "")
    reasons = [f"class {label!r} is not in base.classes" for label in frame.loc[unknown, "label"]]
    frame.loc[unknown, "rejected"] = reasons
    bad = frame["rejected"] != ""
    if bad.any() and params.on_bad_image == "error":
        first = frame[bad].iloc[0]
        raise PipelineError(
            f"{first['path']}: {first['rejected']} (split.on_bad_image=error; {bad.sum()} bad image(s))"
        )
    removed = [_removed(row, "rejected", row["rejected"]) for _, row in frame[bad].iterrows()]
    valid = frame[~bad].reset_index(drop=True)

    exact_pairs = _pairs_sharing(valid, "sha256") + _pairs_sharing(valid, "pixel_sha256")
    near_pairs = _near_pairs(valid["phash"], params.near_duplicate_distance)
    valid["duplicate_of"] = _components(len(valid), exact_pairs + near_pairs)
    exact_groups = _components(len(valid), exact_pairs)
    lesion_pairs = _pairs_sharing(valid[valid["lesion_id"] != ""], "lesion_id")
    similar_pairs = _near_pairs(valid["phash"], params.group_distance)
    groups = _components(len(valid), exact_pairs + similar_pairs + lesion_pairs)
    valid["group"] = [f"g{g:05d}" for g in groups]

    keep, dropped, figures = resolve_duplicates(
        valid, exact_groups, params.conflicts, params.diagnosis_classes
    )
    removed += dropped
    kept, leaked = remove_test_leakage(valid.loc[keep])
    removed += leaked
    figures["leakage_removed"] += len(leaked)

    official_test = kept["split"] == "test"
    if official_test.any():
        test, rest = kept[official_test], kept[~official_test]
    else:
        rest, test = _carve(kept, params.test_fraction, seed, what="split.test_fraction")
    train, val = _carve(rest, params.val_fraction, seed, what="split.val_fraction")
    splits = {
        name: part.assign(split=name).reset_index(drop=True)
        for name, part in zip(SPLIT_NAMES, (train, val, test), strict=True)
    }
    removed_frame = pd.DataFrame(removed, columns=REMOVED_COLUMNS)
    report = {
        "images_in": len(frame),
        "images_rejected": int(bad.sum()),
        **figures,
        "images_removed": len(removed_frame),
        "class_counts": {
            name: {label: int((part["label"] == label).sum()) for label in classes}
            for name, part in splits.items()
        },
        "provenance": {
            **class_collection_association(pd.concat(splits.values())),
            "collections": {name: mix_shares(part) for name, part in splits.items()},
            "warnings": provenance_warnings(splits, classes) + classes_missing_from_splits(splits, classes),
        },
    }
    return SplitResult(splits=splits, removed=removed_frame, report=report)


def render_report(result: SplitResult, skipped: pd.DataFrame) -> str:
    """A readable Markdown data report: the figures, then every removed image with its reason.

    `skipped` lists what the download did not take from a local dataset (links, other files).
    """
    report = result.report
    lines = ["# Data report", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in report.items() if isinstance(value, int)]
    lines += ["", "## Images per class and split", ""]
    classes = list(next(iter(report["class_counts"].values())))
    lines += ["| class | " + " | ".join(report["class_counts"]) + " |", "| --- |" + " --- |" * 3]
    for label in classes:
        counts = [str(report["class_counts"][name][label]) for name in report["class_counts"]]
        lines.append(f"| {label} | " + " | ".join(counts) + " |")
    titles = {
        "rejected": "Rejected images",
        "label_conflict": "Label conflicts",
        "leakage": "Removed to prevent test leakage",
        "duplicate": "Duplicates removed",
    }
    provenance = report["provenance"]
    lines += ["", "## Where the images come from", ""]
    if provenance["cramers_v"] is not None:
        lines += [
            f"Class and collection: Cramér's V {provenance['cramers_v']:.2f}; the collection alone "
            f"guesses the class of {provenance['class_from_collection_accuracy']:.0%} of the images.",
            "",
        ]
    if len(provenance["collections"]["train"]) == 1:
        lines += [
            f"All training images come from one collection: {next(iter(provenance['collections']['train']))}."
        ]
    lines += [f"- **Warning:** {warning}" for warning in provenance["warnings"]]
    lines += render_provenance(result.splits, classes)
    for category, title in titles.items():
        rows = result.removed[result.removed["category"] == category]
        lines += ["", f"## {title} ({len(rows)})", ""]
        lines += [f"- `{row.path}` ({row.label}, {row.split}): {row.reason}" for row in rows.itertuples()]
    lines += ["", f"## Entries of the dataset folder the download skipped ({len(skipped)})", ""]
    lines += [f"- `{row.path}`: {row.reason}" for row in skipped.itertuples()]
    return "\n".join(lines) + "\n"


def _carve(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    # StratifiedGroupKFold is sklearn's stratified *and* grouped splitter; one of its k folds is the
    # held-out part, so the fraction is realised as 1/k.
    n_splits = max(2, round(1 / fraction))
    if frame["group"].nunique() < n_splits or frame["label"].value_counts().max() < n_splits:
        raise PipelineError(
            f"{what}={fraction}: too few images per class ({len(frame)} in all) to hold out 1/{n_splits}"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn's "least populated class has only N members" names no class; a class that then
        # misses a split is named in the data report's warnings (classes_missing_from_splits).
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        rest_index, held_index = next(splitter.split(frame, frame["label"], groups=frame["group"]))
    return frame.iloc[rest_index], frame.iloc[held_index]


def classes_missing_from_splits(splits: dict[str, pd.DataFrame], classes: Sequence[str]) -> list[str]:
    """A warning for each class that has images but none in some split, where it goes unmeasured."""
    counts = {name: part["label"].value_counts() for name, part in splits.items()}
    found = []
    for label in classes:
        total = sum(int(count.get(label, 0)) for count in counts.values())
        missing = [name for name, count in counts.items() if total and not count.get(label, 0)]
        if missing:
            found.append(
                f"class '{label}' has {total} images but none in the {' and '.join(missing)} split: "
                "too few to stratify, so its figures there are not measured"
            )
    return found


def class_counts_figure(class_counts: dict[str, dict[str, int]]) -> Figure:
    """Each split's images per class as horizontal bars: the PNG twin of the interactive plot."""
    figure = Figure(figsize=(4 * len(class_counts), 4), layout="constrained")
    axes = figure.subplots(1, len(class_counts), sharey=True, squeeze=False)[0]
    for axis, (name, counts) in zip(axes, class_counts.items(), strict=True):
        axis.barh(list(counts), list(counts.values()), color="tab:blue")
        axis.set(title=f"{name} split", xlabel="images")
        axis.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the first class on top, as in the table
    return figure
