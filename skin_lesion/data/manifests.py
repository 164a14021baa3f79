"""The manifests that stages hand to each other: their file name and columns, declared once.

A stage reads its input's columns from here rather than from the stage that writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.errors import PipelineError


def class_indices(labels: Sequence[str], classes: Sequence[str], source: str) -> np.ndarray:
    """Map label names to their index in `classes`, naming `source` if a label is unknown."""
    lookup = {name: index for index, name in enumerate(classes)}
    unknown = sorted(set(labels) - lookup.keys())
    if unknown:
        raise PipelineError(f"{source}: unknown class {unknown[0]!r}; base.classes has {', '.join(classes)}")
    return np.array([lookup[label] for label in labels], dtype=np.int64)


MANIFEST_NAME = "manifest.csv"  # in download's and rebalance's output folders
SKIPPED_NAME = "skipped.csv"  # in download's output folder: what the local source did not take, and why
SKIPPED_COLUMNS = ["path", "reason"]


# download: every image with its label, official split (train|test) and provenance: the download
# source, and the collection it comes from (the archive's attribution, or see download.local.collection).
RAW_COLUMNS = [
    "path",
    "label",
    "split",
    "sha256",
    "source",
    "isic_id",
    "lesion_id",
    "diagnosis",
    "collection",
]


# split: <split>.csv per split; `group` ties the photos of one lesion together; the ids and hashes the
# split grouped on (IDENTITY_COLUMNS) find these images, or other photos of their lesions, elsewhere
# (external sets, a site) without decoding them again.
SPLIT_COLUMNS = [
    "path",
    "label",
    "split",
    "sha256",
    "isic_id",
    "lesion_id",
    "group",
    "collection",
    "pixel_sha256",
    "phash",
]
HASH_COLUMNS = ["pixel_sha256", "phash"]
IDENTITY_COLUMNS = ["isic_id", "lesion_id", *HASH_COLUMNS]


# rebalance: the augmented images and the train image each was made from.
REBALANCED_COLUMNS = ["path", "label", "source_path"]


# Folder names of the public ISIC dataset's official splits, and the split names we give them.
OFFICIAL_SPLITS = {"Train": "train", "Test": "test"}


REMOVED_COLUMNS = ["path", "label", "split", "category", "reason"]


def under_folder(manifest: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The manifest with paths relative to the repository root (where stages run), not to `folder`."""
    return manifest.assign(path=[(folder / path).as_posix() for path in manifest["path"]])
