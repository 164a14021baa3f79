"""Stage `split`: validate images, resolve duplicates, and split train/val/test with no leakage.

1. Validate: every image is decoded; unusable ones (not an image, truncated, empty, over
   split.max_pixels, under split.min_side) are rejected with a reason (split.on_bad_image: skip
   records them, error stops).
2. Duplicates: the same bytes, the same decoded pixels, or perceptual hashes at most
   split.near_duplicate_distance bits apart make a duplicate group (on the ISIC data, pairs 2 bits
   apart are re-encoded copies; from 4 bits on, some pairs are different lesions). A group whose members carry
   different labels is a label conflict, resolved by split.conflicts (by default, by the diagnosis in
   the images' metadata where it names exactly one of the labels). Each group then keeps one image:
   its official test member if it has one.
3. Groups: duplicates, photos of the same lesion (lesion_id from download) and look-alikes (hashes
   at most split.group_distance bits apart, mostly other photos of one lesion) form one group, and a
   group never straddles two splits; grouping itself removes nothing. The official Test folder, when
   there is one, stays the test set, and every train image sharing a group with a test image is removed.
4. Split: stratified by class and grouped (sklearn's StratifiedGroupKFold), seeded by base.seed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import mlflow
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from stages.common import (
    atomic_output_dir,
    decode_rgb,
    read_manifest,
    run_cli,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from stages.config import SplitParams, load_params
from stages.errors import PipelineError
from stages.manifests import MANIFEST_NAME, RAW_COLUMNS, SPLIT_COLUMNS
from stages.provenance import (
    class_collection_association,
    mix_shares,
    provenance_warnings,
    render_provenance,
)
from stages.tracking import stage_run

log = logging.getLogger("stages.split")

SPLIT_NAMES = ("train", "val", "test")
REMOVED_COLUMNS = ["path", "label", "split", "category", "reason"]
_HASH_CHUNK = 1024  # rows of the pairwise Hamming-distance matrix computed at once


@dataclass(frozen=True)
class SplitResult:
    """The three splits, the images removed on the way, and the figures for the data report."""

    splits: dict[str, pd.DataFrame]
    removed: pd.DataFrame
    report: dict[str, Any]


def main() -> None:
    """Read the raw manifest, validate and split it, write the manifests and the data report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="download output (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/split)")
    parser.add_argument("--report", type=Path, required=True, help="data report JSON")
    parser.add_argument("--report-md", type=Path, required=True, help="readable data report")
    parser.add_argument("--counts", type=Path, required=True, help="folder of class-count plots")
    args = parser.parse_args()
    params = load_params()

    manifest = read_manifest(args.raw / MANIFEST_NAME, RAW_COLUMNS)

    with stage_run("split", params.base, params.split):
        features = inspect_images(manifest["path"], params.split.max_pixels, params.split.min_side)
        result = split_dataset(
            pd.concat([manifest, features], axis=1), params.base.classes, params.split, params.base.seed
        )
        with atomic_output_dir(args.out) as tmp:
            for name, frame in result.splits.items():
                write_csv_atomic(tmp / f"{name}.csv", frame[SPLIT_COLUMNS])
            write_csv_atomic(tmp / "removed.csv", result.removed[REMOVED_COLUMNS])
        write_json_atomic(args.report, result.report)
        write_text_atomic(args.report_md, render_report(result))
        with atomic_output_dir(args.counts) as tmp:
            for name, counts in result.report["class_counts"].items():
                rows = pd.DataFrame({"label": list(counts), "count": list(counts.values())})
                write_csv_atomic(tmp / f"{name}.csv", rows)
        mlflow.log_metrics({key: value for key, value in result.report.items() if isinstance(value, int)})
        mlflow.log_dict(result.report, "data_report.json")
        for path in (args.report_md, args.out / "removed.csv"):
            mlflow.log_artifact(str(path))
    for warning in result.report["provenance"]["warnings"]:
        log.warning("provenance: %s", warning)
    log.info(
        "split: %s; removed %d (report: %s)",
        ", ".join(f"{name} {len(frame)}" for name, frame in result.splits.items()),
        len(result.removed),
        args.report_md,
    )


def inspect_images(paths: Iterable[str], max_pixels: int, min_side: int = 1) -> pd.DataFrame:
    """Decode every image: its rejection reason ('' if usable), decoded-pixel hash, perceptual hash."""
    rows = []
    for path in paths:
        try:
            image = decode_rgb(Path(path), max_pixels=max_pixels)
        except PipelineError as err:
            rows.append((str(err).removeprefix(f"{path}: "), "", ""))
            continue
        if min(image.size) < min_side:
            rows.append((f"{image.width}x{image.height} pixels is under split.min_side={min_side}", "", ""))
            continue
        pixels = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
        rows.append(("", pixels, str(imagehash.phash(image))))
    return pd.DataFrame(rows, columns=["rejected", "pixel_sha256", "phash"])


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
            "warnings": provenance_warnings(splits, classes),
        },
    }
    return SplitResult(splits=splits, removed=removed_frame, report=report)


def resolve_duplicates(
    valid: pd.DataFrame,
    exact_groups: np.ndarray,
    conflicts: str,
    diagnosis_classes: dict[str, list[str]],
) -> tuple[list[int], list[dict[str, str]], dict[str, int]]:
    """Settle label conflicts by policy and keep one image per duplicate group (a test one if any)."""
    keep: list[int] = []
    removed: list[dict[str, str]] = []
    figures = {
        "duplicate_groups": 0,
        "near_duplicate_groups": 0,
        "label_conflicts": 0,
        "conflicts_settled_by_diagnosis": 0,
        "leakage_removed": 0,
    }
    for _, group in valid.groupby("duplicate_of", sort=True):
        if len(group) == 1:
            keep.append(group.index[0])
            continue
        figures["duplicate_groups"] += 1
        figures["near_duplicate_groups"] += int(len(set(exact_groups[group.index])) > 1)
        labels = group["label"].value_counts()
        members = group
        if len(labels) > 1:
            figures["label_conflicts"] += 1
            members, conflicting = _settle_conflict(group, labels, conflicts, diagnosis_classes)
            removed += conflicting
            figures["conflicts_settled_by_diagnosis"] += int(conflicts == "diagnosis" and not members.empty)
            if members.empty:
                continue
        in_test = members[members["split"] == "test"]
        keeper = (in_test if len(in_test) else members).index[0]
        keep.append(keeper)
        for _, row in members.drop(index=keeper).iterrows():
            if len(in_test) and row["split"] != "test":
                figures["leakage_removed"] += 1
                removed.append(_removed(row, "leakage", f"copy of test image {valid.at[keeper, 'path']}"))
            else:
                removed.append(_removed(row, "duplicate", f"duplicate of {valid.at[keeper, 'path']}"))
    return sorted(keep), removed, figures


def remove_test_leakage(kept: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Remove train images whose group (same lesion, look-alike or copy) holds a test image."""
    test_groups = kept.loc[kept["split"] == "test"].groupby("group")["path"].first()
    leaks = (kept["split"] != "test") & kept["group"].isin(test_groups.index)
    removed = [
        _removed(row, "leakage", f"same lesion as test image {test_groups[row['group']]}")
        for _, row in kept[leaks].iterrows()
    ]
    return kept[~leaks], removed


def render_report(result: SplitResult) -> str:
    """A readable Markdown data report: the figures, then every removed image with its reason."""
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
    return "\n".join(lines) + "\n"


def _settle_conflict(
    members: pd.DataFrame, labels: pd.Series, policy: str, diagnosis_classes: dict[str, list[str]]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    described = " and ".join(f"{label} ({count})" for label, count in sorted(labels.items()))
    if policy == "error":
        first = members.iloc[0]
        other = members[members["label"] != first["label"]].iloc[0]
        raise PipelineError(
            f"{first['path']} ({first['label']}) and {other['path']} ({other['label']}) "
            "are the same image (split.conflicts=error)"
        )
    keeper, why = "", ""
    if policy == "diagnosis":
        keeper, why = _label_named_by_diagnosis(members, list(labels.index), diagnosis_classes)
    elif policy == "majority" and labels.iloc[0] > labels.iloc[1]:
        keeper, why = labels.index[0], f"kept the majority label {labels.index[0]}"
    if keeper:
        reason = f"label conflict: filed as {described}; {why}"
        others = members[members["label"] != keeper]
        return members[members["label"] == keeper], [
            _removed(row, "label_conflict", reason) for _, row in others.iterrows()
        ]
    reason = f"label conflict: the same image is filed as {described}"
    return members.iloc[0:0], [_removed(row, "label_conflict", reason) for _, row in members.iterrows()]


def _label_named_by_diagnosis(
    members: pd.DataFrame, labels: list[str], diagnosis_classes: dict[str, list[str]]
) -> tuple[str, str]:
    # One diagnosis for the image, consistent with exactly one of its labels, settles the conflict.
    diagnoses = sorted(set(members["diagnosis"]) - {""})
    if len(diagnoses) != 1:
        return "", ""
    consistent = [label for label in labels if label in diagnosis_classes.get(diagnoses[0], [])]
    if len(consistent) != 1:
        return "", ""
    return consistent[0], f"its diagnosis {diagnoses[0]!r} says {consistent[0]}"


def _removed(row: pd.Series, category: str, reason: str) -> dict[str, str]:
    return {
        "path": row["path"],
        "label": row["label"],
        "split": row["split"],
        "category": category,
        "reason": reason,
    }


def _pairs_sharing(frame: pd.DataFrame, column: str) -> list[tuple[int, int]]:
    # Linking every member to the first is enough for connected components.
    pairs = []
    for _, members in frame.groupby(column, sort=False):
        first = members.index[0]
        pairs += [(first, other) for other in members.index[1:]]
    return pairs


def _near_pairs(phashes: pd.Series, max_distance: int) -> list[tuple[int, int]]:
    if max_distance < 0 or phashes.empty:
        return []
    hashes = np.array([int(value, 16) for value in phashes], dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), _HASH_CHUNK):
        distances = np.bitwise_count(hashes[start : start + _HASH_CHUNK, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        rows += start
        upper = cols > rows
        pairs += list(zip(rows[upper].tolist(), cols[upper].tolist(), strict=True))
    return pairs


def _components(count: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    # scipy's connected components turn pairwise links (duplicates, shared lesions) into groups.
    if not pairs:
        return np.arange(count)
    rows, cols = zip(*pairs, strict=True)
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def _carve(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    # StratifiedGroupKFold is sklearn's stratified *and* grouped splitter; one of its k folds is the
    # held-out part, so the fraction is realised as 1/k.
    n_splits = max(2, round(1 / fraction))
    if frame["group"].nunique() < n_splits or frame["label"].value_counts().max() < n_splits:
        raise PipelineError(
            f"{what}={fraction}: too few images per class ({len(frame)} in all) to hold out 1/{n_splits}"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rest_index, held_index = next(splitter.split(frame, frame["label"], groups=frame["group"]))
    return frame.iloc[rest_index], frame.iloc[held_index]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
