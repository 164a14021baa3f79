"""The manifests that stages hand to each other: their file name and columns, declared once.

A stage imports its input's columns from here rather than from the stage that writes them, so that
each stage runs (and, in dvc.yaml, depends on) only its own code and this.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.csv"  # in download's and rebalance's output folders
# download: every image with its label, official split (train|test) and provenance: the download
# source, and the collection it comes from (the archive's attribution, or see download.collection).
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
# split: <split>.csv per split; `group` ties the photos of one lesion together.
SPLIT_COLUMNS = ["path", "label", "split", "sha256", "lesion_id", "group", "collection"]
# rebalance: the augmented images and the train image each was made from.
REBALANCED_COLUMNS = ["path", "label", "source_path"]
