"""rebalance: Augmentor fills each train class up to the target, deterministically, from train only."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from skin_lesion.data.manifests import REBALANCED_COLUMNS
from skin_lesion.data.rebalancing import augment_class, build_pipeline, find_sparse_classes, rebalance
from skin_lesion.errors import PipelineError
from tests.conftest import CLASSES, make_isic_folder, repo_params, write_image

OPERATIONS = repo_params()["rebalance"]["operations"]


def _train_manifest(tmp_path: Path, per_class: int = 3) -> pd.DataFrame:
    root = make_isic_folder(tmp_path / "isic", train_per_class=per_class)
    rows = [(path.as_posix(), path.parent.name) for path in sorted((root / "Train").glob("*/*.jpg"))]
    return pd.DataFrame(rows, columns=["path", "label"])


def _rebalance(train: pd.DataFrame, out: Path, target: int = 5, seed: int = 0) -> pd.DataFrame:
    return rebalance(
        train, CLASSES, samples_per_class=target, operations=OPERATIONS, jpeg_quality=90, seed=seed, out=out
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.jpg"))}


def test_every_class_reaches_the_target(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path, per_class=3)
    train = train.drop(index=train.index[train["label"] == "nevus"][1:])  # nevus: 1 image
    added = _rebalance(train, tmp_path / "out", target=5)
    assert list(added.columns) == REBALANCED_COLUMNS
    assert added["label"].value_counts().to_dict() == {"melanoma": 2, "nevus": 4, "vascular lesion": 2}
    for path in added["path"]:
        assert (tmp_path / "out" / path).is_file()


def test_classes_already_at_target_get_nothing(tmp_path: Path) -> None:
    added = _rebalance(_train_manifest(tmp_path, per_class=3), tmp_path / "out", target=3)
    assert added.empty


def test_augments_only_the_given_train_images(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path)
    added = _rebalance(train, tmp_path / "out", target=8)
    assert set(added["source_path"]) <= set(train["path"])
    for _, row in added.iterrows():
        assert train.loc[train["path"] == row["source_path"], "label"].item() == row["label"]


def test_same_seed_gives_identical_files_and_names(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path)
    first = _rebalance(train, tmp_path / "a", target=8, seed=3)
    second = _rebalance(train, tmp_path / "b", target=8, seed=3)
    pd.testing.assert_frame_equal(first, second)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path)
    _rebalance(train, tmp_path / "a", target=8, seed=3)
    _rebalance(train, tmp_path / "b", target=8, seed=4)
    assert _files(tmp_path / "a") != _files(tmp_path / "b")


def test_class_without_train_images_is_named(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path)
    train = train[train["label"] != "nevus"]
    with pytest.raises(PipelineError, match=r"rebalance: class 'nevus' has no training images"):
        _rebalance(train, tmp_path / "out")


def test_unknown_operation_is_named() -> None:
    with pytest.raises(PipelineError, match=r"rebalance.operations.spin: not an Augmentor operation"):
        build_pipeline({"spin": {"probability": 0.5}})


def test_non_operation_method_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"rebalance.operations.sample: not an Augmentor operation"):
        build_pipeline({"sample": {"n": 3}})


def test_bad_operation_argument_is_named() -> None:
    with pytest.raises(PipelineError, match=r"rebalance.operations.rotate: .*max_rotation"):
        build_pipeline({"rotate": {"probability": 0.5, "max_rotation": 10}})


def test_classes_with_few_training_images_are_found(tmp_path: Path) -> None:
    train = _train_manifest(tmp_path, per_class=3)
    train = train.drop(index=train.index[train["label"] == "nevus"][1:])  # nevus: 1 image
    assert find_sparse_classes(train, min_source_images=2) == {"nevus": 1}
    assert find_sparse_classes(train, min_source_images=0) == {}


def test_an_operation_larger_than_the_images_is_one_line_naming_the_image(tmp_path: Path) -> None:
    source = write_image(tmp_path / "src" / "a.jpg", (120, 60, 60), size=24)
    operations = {"crop_by_size": {"probability": 1.0, "width": 100, "height": 100, "centre": False}}
    with pytest.raises(PipelineError, match=r"rebalance.operations: cannot augment .*a.jpg \(24x24 px\)"):
        augment_class([str(source)], 2, operations, jpeg_quality=90, seed=0, out=tmp_path / "out")
