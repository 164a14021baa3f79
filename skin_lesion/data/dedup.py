"""Image validation and duplicates: unusable images, copies of one photo, label conflicts and lesion groups.

The same bytes, the same decoded pixels, or perceptual hashes at most `near_duplicate_distance` bits
apart are one photo; a group of them filed under several labels is a label conflict, settled by
`split.conflicts`. Copies, photos of one lesion and look-alikes (`group_distance`) form groups that
the split keeps whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from skin_lesion.errors import PipelineError
from skin_lesion.images import decode_rgb, resize_rgb

_HASH_CHUNK = 1024  # rows of the pairwise Hamming-distance matrix computed at once


INSPECTED_COLUMNS = ["rejected", "pixel_sha256", "phash"]


def inspect_images(paths: Iterable[str], max_pixels: int | None, min_side: int = 1) -> pd.DataFrame:
    """Decode every image: its rejection reason ('' if usable), decoded-pixel hash, perceptual hash."""
    rows = [_inspect(path, max_pixels, min_side, size=None)[0] for path in paths]
    return pd.DataFrame(rows, columns=INSPECTED_COLUMNS)


def inspect_and_resize(
    paths: Sequence[str], max_pixels: int | None, size: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """`inspect_images`' table and the (n, size, size, 3) uint8 images (black where unusable), each
    file decoded once."""
    rows, images = [], np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        row, resized = _inspect(path, max_pixels, 1, size)
        rows.append(row)
        if resized is not None:
            images[index] = resized
    return pd.DataFrame(rows, columns=INSPECTED_COLUMNS), images


def _inspect(
    path: str, max_pixels: int | None, min_side: int, size: int | None
) -> tuple[tuple[str, str, str], np.ndarray | None]:
    # Resized here, not by the caller, so that no more than one full-size image is held at a time.
    try:
        image = decode_rgb(Path(path), max_pixels=max_pixels)
    except PipelineError as err:
        return (str(err).removeprefix(f"{path}: "), "", ""), None
    if min(image.size) < min_side:
        return (f"{image.width}x{image.height} pixels is under split.min_side={min_side}", "", ""), None
    pixels = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    return ("", pixels, str(imagehash.phash(image))), None if size is None else resize_rgb(image, size)


def photo_groups(hashes: pd.DataFrame, group_distance: int) -> np.ndarray:
    """A group number per image: same decoded pixels, or perceptual hashes within `group_distance` bits
    (photos of one lesion, as the split keeps them together)."""
    pairs = _pairs_sharing(hashes, "pixel_sha256") + _near_pairs(hashes["phash"], group_distance)
    return _components(len(hashes), pairs)


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


def near_duplicate_mask(phashes: pd.Series, reference: pd.Series, max_distance: int) -> np.ndarray:
    """Which `phashes` lie within `max_distance` bits of a `reference` hash (empty hashes never do)."""
    mask = np.zeros(len(phashes), dtype=bool)
    known, targets = phashes.to_numpy() != "", _as_integers(reference[reference != ""])
    if max_distance < 0 or not known.any() or not len(targets):
        return mask
    hashes = _as_integers(phashes[known])
    nearest = np.concatenate(
        [
            np.bitwise_count(hashes[start : start + _HASH_CHUNK, None] ^ targets[None, :]).min(axis=1)
            for start in range(0, len(hashes), _HASH_CHUNK)
        ]
    )
    mask[known] = nearest <= max_distance
    return mask


def _as_integers(phashes: pd.Series) -> np.ndarray:
    return np.array([int(value, 16) for value in phashes], dtype=np.uint64)


def _near_pairs(phashes: pd.Series, max_distance: int) -> list[tuple[int, int]]:
    if max_distance < 0 or phashes.empty:
        return []
    hashes = _as_integers(phashes)
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
