"""split: stratified, seeded, grouped; duplicates resolved; nothing shared between splits."""

from __future__ import annotations

import pandas as pd
import pytest

from stages.errors import PipelineError
from stages.split import split_dataset
from tests.conftest import CLASSES, assert_no_group_straddles, manifest_of


def _distinct_rows(per_class: int, split: str = "train") -> list[tuple[str, str, str, str]]:
    return [
        (f"data/raw/{split}/{label}/{split}_{k:03d}.jpg", label, split, f"{split}-{label}-{k}")
        for label in CLASSES
        for k in range(per_class)
    ]


def _split(rows: list[tuple[str, str, str, str]], seed: int = 0):
    return split_dataset(manifest_of(rows), CLASSES, val_fraction=0.2, test_fraction=0.2, seed=seed)


def test_carves_stratified_val_and_test_without_official_test() -> None:
    result = _split(_distinct_rows(20))
    counts = {name: frame["label"].value_counts() for name, frame in result.splits.items()}
    assert counts["test"].to_dict() == dict.fromkeys(CLASSES, 4)  # 20 per class / 5 folds
    assert set(counts["val"].to_dict().values()) <= {3, 4}  # the 16 left / 5 folds
    assert sum(len(frame) for frame in result.splits.values()) == 60
    assert_no_group_straddles(result.splits)


def test_official_test_folder_is_the_test_set() -> None:
    result = _split(_distinct_rows(10) + _distinct_rows(3, split="test"))
    assert len(result.splits["test"]) == 9
    assert result.splits["test"]["path"].str.contains("/test/").all()
    assert not result.splits["train"]["path"].str.contains("/test/").any()


def test_same_seed_same_split_other_seed_other_split() -> None:
    first, again, other = (_split(_distinct_rows(20), seed=s) for s in (1, 1, 2))
    pd.testing.assert_frame_equal(first.splits["val"], again.splits["val"])
    assert set(first.splits["val"]["path"]) != set(other.splits["val"]["path"])


def test_identical_image_under_two_labels_is_dropped() -> None:
    rows = _distinct_rows(10)
    rows.append(("data/raw/train/nevus/copy.jpg", "nevus", "train", rows[0][3]))  # rows[0] is melanoma
    result = _split(rows)
    kept = pd.concat(result.splits.values())
    assert rows[0][3] not in set(kept["sha256"])
    assert result.report["label_conflicts"] == 1
    assert set(result.removed["path"]) == {rows[0][0], "data/raw/train/nevus/copy.jpg"}
    assert result.removed["reason"].str.startswith("label conflict").all()


def test_train_copy_of_a_test_image_is_removed() -> None:
    rows = _distinct_rows(10) + _distinct_rows(3, split="test")
    test_image = rows[-1]
    rows.append(("data/raw/train/x/again.jpg", test_image[1], "train", test_image[3]))
    result = _split(rows)
    assert test_image[0] in set(result.splits["test"]["path"])
    assert result.report["leakage_removed"] == 1
    assert result.removed["path"].tolist() == ["data/raw/train/x/again.jpg"]
    assert_no_group_straddles(result.splits, key="sha256")


def test_same_label_duplicates_keep_one_copy() -> None:
    rows = _distinct_rows(10)
    rows.append(("data/raw/train/melanoma/zz_copy.jpg", "melanoma", "train", rows[0][3]))
    result = _split(rows)
    kept = pd.concat(result.splits.values())
    assert (kept["sha256"] == rows[0][3]).sum() == 1
    assert result.report["duplicate_groups"] == 1
    assert result.report["leakage_removed"] == 0


def test_report_counts_every_image() -> None:
    rows = _distinct_rows(10)
    rows.append(("data/raw/train/nevus/copy.jpg", "nevus", "train", rows[0][3]))
    report = _split(rows).report
    kept = sum(sum(counts.values()) for counts in report["class_counts"].values())
    assert report["images_in"] == len(rows) == kept + report["images_removed"]


def test_too_few_images_to_hold_out_is_named() -> None:
    with pytest.raises(PipelineError, match=r"split.test_fraction=0.2: too few images per class"):
        _split(_distinct_rows(3))
