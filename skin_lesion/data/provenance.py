"""Where images come from: each image's collection, and how strongly class and collection go together.

The public 9-class ISIC dataset is confounded: some classes come from one collection only, so a model
can learn the collection (its dermoscope, lighting, framing) instead of the lesion, and a test split
carved from the same data rewards it. These functions make that visible in the data report, the
model card and the evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats.contingency import association

UNKNOWN = "unknown"


# ISIC Archive id ranges of the collections that the 9-class dataset draws on: the oldest collection
# (the ISIC 2016-2017 challenges' images), later ones, and HAM10000 (ISIC_0024306 to ISIC_0034320).
ISIC_ID_RANGES = (
    (0, 1_999, "ISIC 0-1999"),
    (2_000, 15_999, "ISIC 2000-15999"),
    (16_000, 24_305, "ISIC 16000-24305"),
    (24_306, 34_320, "HAM10000"),
)


_ISIC_ID = re.compile(r"^ISIC_(\d{7})")


# A class with at least this share of its images from one collection, in a dataset of several, is
# called single-source; a Cramér's V from this on is a strong association (Cohen's convention).
SINGLE_SOURCE_SHARE = 0.95


STRONG_ASSOCIATION = 0.5


# Train and test collection mixes further apart than this (total variation distance) are a shift.
MIX_SHIFT = 0.2


def collection_from_isic_id(name: str) -> str:
    """The collection an ISIC image belongs to, from its id's range (the last resort without metadata)."""
    match = _ISIC_ID.match(name)
    if not match:
        return UNKNOWN
    number = int(match.group(1))
    for low, high, collection in ISIC_ID_RANGES:
        if low <= number <= high:
            return collection
    return f"ISIC {ISIC_ID_RANGES[-1][1] + 1}+"


def class_by_collection(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Images per class (rows, in `classes` order) and collection (columns)."""
    table = pd.crosstab(frame["label"], frame["collection"])
    return table.reindex(index=list(classes), fill_value=0)


def class_collection_association(frame: pd.DataFrame) -> dict[str, float | None]:
    """Cramér's V of class and collection, and how often the collection alone guesses the class."""
    table = pd.crosstab(frame["label"], frame["collection"])
    if table.shape[0] < 2 or table.shape[1] < 2:
        return {"cramers_v": None, "class_from_collection_accuracy": None}
    # The best guess of the class from the collection alone is the collection's most common class.
    guessed = table.max(axis=0).sum() / table.to_numpy().sum()
    return {
        "cramers_v": float(association(table.to_numpy(), method="cramer")),
        "class_from_collection_accuracy": float(guessed),
    }


def provenance_warnings(splits: dict[str, pd.DataFrame], classes: Sequence[str]) -> list[str]:
    """Plain-words warnings: single-source classes, a strong class-collection link, a test-train shift."""
    everything = pd.concat(splits.values(), ignore_index=True)
    if everything["collection"].nunique() < 2:
        return []
    warnings = []
    table = class_by_collection(everything, classes)
    for label, counts in table.iterrows():
        total = counts.sum()
        if total and counts.max() / total >= SINGLE_SOURCE_SHARE:
            warnings.append(
                f"class '{label}': {counts.max() / total:.0%} of its {total} images come from "
                f"'{counts.idxmax()}'; a model can learn that collection's look instead of the lesion"
            )
    strength = class_collection_association(everything)["cramers_v"]
    if strength is not None and strength >= STRONG_ASSOCIATION:
        warnings.append(
            f"class and collection are strongly associated (Cramér's V {strength:.2f}): a test split "
            "carved from these images rewards recognising collections"
        )
    warnings += _test_shift_warnings(splits["train"], splits["test"], classes)
    return warnings


def _test_shift_warnings(train: pd.DataFrame, test: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    if train.empty or test.empty:
        return []
    warnings = []
    train_mix = train["collection"].value_counts(normalize=True)
    test_mix = test["collection"].value_counts(normalize=True)
    distance = 0.5 * train_mix.subtract(test_mix, fill_value=0).abs().sum()
    if distance > MIX_SHIFT:
        warnings.append(
            f"the test split's collections differ from train's (total variation distance {distance:.2f})"
        )
    for label in classes:
        seen = set(train.loc[train["label"] == label, "collection"])
        tested = test.loc[test["label"] == label, "collection"]
        unseen = tested[~tested.isin(seen)]
        if len(unseen):
            warnings.append(
                f"class '{label}': {len(unseen)} of its {len(tested)} test images come from "
                f"{', '.join(sorted(set(unseen)))}, which train has none of for this class"
            )
    return warnings


def render_provenance(splits: dict[str, pd.DataFrame], classes: Sequence[str]) -> list[str]:
    """Markdown lines: a class x collection table per split."""
    lines: list[str] = []
    for name, frame in splits.items():
        table = class_by_collection(frame, classes)
        lines += ["", f"### {name}", "", "| class | " + " | ".join(table.columns) + " |"]
        lines.append("| --- |" + " --- |" * len(table.columns))
        lines += [f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in table.iterrows()]
    return lines


def mix_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Each collection's share of the images."""
    shares = frame["collection"].value_counts(normalize=True).sort_index()
    return {name: float(np.round(share, 4)) for name, share in shares.items()}
