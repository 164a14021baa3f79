"""Stage `split`: a seeded, stratified, grouped train/val/test split with no leakage between splits.

Images that share a group never land in two splits. Today a group is the set of byte-identical files
(the public ISIC dataset files the same image under two classes and repeats Train images in Test):
- a group whose members carry different labels is dropped, since its true label is unknown;
- a group with an official test member keeps that one test image and drops every other copy;
- any other group keeps one image.
The official Test folder is the test set when the source has one; otherwise one is carved out.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from stages.common import (
    atomic_output_dir,
    class_indices,
    read_manifest,
    run_cli,
    write_csv_atomic,
    write_json_atomic,
)
from stages.config import load_params
from stages.download import MANIFEST_COLUMNS, MANIFEST_NAME
from stages.errors import PipelineError
from stages.tracking import stage_run

log = logging.getLogger("stages.split")

SPLIT_NAMES = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "label", "split", "sha256", "group"]
REMOVED_COLUMNS = ["path", "label", "split", "sha256", "reason"]


@dataclass(frozen=True)
class SplitResult:
    """The three splits, the images removed on the way, and the figures for the data report."""

    splits: dict[str, pd.DataFrame]
    removed: pd.DataFrame
    report: dict[str, Any]


def main() -> None:
    """Read the raw manifest, split it, write the split manifests and the data report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="download output (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/split)")
    parser.add_argument("--report", type=Path, required=True, help="data report JSON")
    parser.add_argument("--counts", type=Path, required=True, help="folder of class-count plots")
    args = parser.parse_args()
    params = load_params()

    manifest = read_manifest(args.raw / MANIFEST_NAME, MANIFEST_COLUMNS)
    class_indices(manifest["label"], params.base.classes, source=str(args.raw / MANIFEST_NAME))

    with stage_run("split", params.base, params.split):
        result = split_dataset(
            manifest,
            classes=params.base.classes,
            val_fraction=params.split.val_fraction,
            test_fraction=params.split.test_fraction,
            seed=params.base.seed,
        )
        with atomic_output_dir(args.out) as tmp:
            for name, frame in result.splits.items():
                write_csv_atomic(tmp / f"{name}.csv", frame[SPLIT_COLUMNS])
            write_csv_atomic(tmp / "removed.csv", result.removed[REMOVED_COLUMNS])
        write_json_atomic(args.report, result.report)
        with atomic_output_dir(args.counts) as tmp:
            for name, counts in result.report["class_counts"].items():
                rows = pd.DataFrame({"label": list(counts), "count": list(counts.values())})
                write_csv_atomic(tmp / f"{name}.csv", rows)
        mlflow.log_metrics({key: value for key, value in result.report.items() if isinstance(value, int)})
        mlflow.log_dict(result.report, "data_report.json")
        mlflow.log_artifact(str(args.out / "removed.csv"))
    log.info(
        "split: %s; removed %d",
        ", ".join(f"{name} {len(frame)}" for name, frame in result.splits.items()),
        len(result.removed),
    )


def split_dataset(
    manifest: pd.DataFrame,
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> SplitResult:
    """Group exact duplicates, resolve them, and split train/val/test without straddling groups."""
    frame = manifest.sort_values("path", ignore_index=True)
    frame["group"] = frame["sha256"]
    kept, removed, figures = resolve_duplicate_groups(frame)

    official_test = kept["split"] == "test"
    if official_test.any():
        test, rest = kept[official_test], kept[~official_test]
    else:
        rest, test = _carve(kept, test_fraction, seed, what="split.test_fraction")
    train, val = _carve(rest, val_fraction, seed, what="split.val_fraction")
    splits = {
        name: part.assign(split=name).reset_index(drop=True)
        for name, part in zip(SPLIT_NAMES, (train, val, test), strict=True)
    }
    report = {
        "images_in": len(manifest),
        "images_removed": len(removed),
        **figures,
        "class_counts": {
            name: {label: int((part["label"] == label).sum()) for label in classes}
            for name, part in splits.items()
        },
    }
    return SplitResult(splits=splits, removed=removed, report=report)


def resolve_duplicate_groups(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Keep one image per group, dropping label conflicts and train copies of test images."""
    keep: list[int] = []
    removed: list[dict[str, str]] = []
    figures = {"duplicate_groups": 0, "label_conflicts": 0, "leakage_removed": 0}
    for _, members in frame.groupby("group", sort=True):
        if len(members) == 1:
            keep.append(members.index[0])
            continue
        figures["duplicate_groups"] += 1
        labels = sorted(set(members["label"]))
        if len(labels) > 1:
            figures["label_conflicts"] += 1
            reason = f"label conflict: same image filed as {' and '.join(labels)}"
            removed += [dict(row, reason=reason) for row in members.to_dict("records")]
            continue
        in_test = members[members["split"] == "test"]
        keeper = in_test.index[0] if len(in_test) else members.index[0]
        keep.append(keeper)
        for _, row in members.drop(index=keeper).iterrows():
            leak = row["split"] != "test" and len(in_test) > 0
            figures["leakage_removed"] += int(leak)
            reason = "copy of a test image" if leak else "duplicate"
            removed.append(dict(row, reason=f"{reason}: {frame.at[keeper, 'path']}"))
    kept = frame.loc[sorted(keep)]
    return kept, pd.DataFrame(removed, columns=[*frame.columns, "reason"]), figures


def _carve(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    # StratifiedGroupKFold is sklearn's stratified *and* grouped splitter; one of its k folds is the
    # held-out part, so the fraction is realised as 1/k.
    n_splits = max(2, round(1 / fraction))
    if frame["label"].value_counts().max() < n_splits:
        raise PipelineError(
            f"{what}={fraction}: too few images per class ({len(frame)} in all) to hold out 1/{n_splits}"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_index, held_index = next(splitter.split(frame, frame["label"], groups=frame["group"]))
    return frame.iloc[rest_index], frame.iloc[held_index]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
