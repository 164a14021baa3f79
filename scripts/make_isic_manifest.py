"""Build the download stage's default manifest from the 9-class ISIC dataset's index.csv.

The ids, labels, splits, HAM10000 lesion ids and diagnoses are facts about a public dataset, so the
manifest is committed; rerun this only if the index changes:

    python scripts/make_isic_manifest.py ../shared/data/isic-9class/index.csv data/manifests/isic-9class.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def build_manifest(index: pd.DataFrame) -> pd.DataFrame:
    """Rows of isic_id, label, split, lesion_id, diagnosis; an image filed under two classes keeps both."""
    manifest = pd.DataFrame(
        {
            "isic_id": index["isic_id"],
            "label": index["label"],
            "split": index["split"].str.lower(),
            "lesion_id": index["ham_lesion_id"],
            "diagnosis": index["ham_dx"],
        }
    )
    return manifest.sort_values(["split", "label", "isic_id"], ignore_index=True)


def main() -> None:
    """Read index.csv, write the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    index = pd.read_csv(args.index, dtype=str, keep_default_na=False)
    build_manifest(index).to_csv(args.out, index=False, lineterminator="\n")


if __name__ == "__main__":
    main()
