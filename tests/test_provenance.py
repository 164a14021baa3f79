"""Provenance: each image's collection, the class x collection table, its warnings, per-collection metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from skin_lesion.data.manifests import SKIPPED_COLUMNS
from skin_lesion.data.provenance import (
    class_collection_association,
    collection_from_isic_id,
    render_provenance,
)
from skin_lesion.data.splitting import render_report, split_dataset
from skin_lesion.evaluation.metrics import metrics_by_collection
from skin_lesion.params import SplitParams
from tests.conftest import (
    CLASSES,
    as_params,
    fetch_isic_source,
    fetch_local_source,
    make_isic_folder,
    manifest_of,
    repo_params,
    small_params,
)
from tests.isic_standin import StandinArchive, make_images, serve
from tests.test_download_isic import FAST_RETRIES

PARAMS = SplitParams.model_validate({**repo_params()["split"], "val_fraction": 0.2, "test_fraction": 0.2})


def _rows(per_class: int) -> list[tuple[str, str, str, str]]:
    return [
        (f"data/raw/train/{label}/{label}_{k:03d}.jpg", label, "train", f"{label}-{k}")
        for label in CLASSES
        for k in range(per_class)
    ]


def _split(collection_of: dict[str, str]):
    rows = _rows(20)
    collections = {path: collection_of(label, k) for k, (path, label, _, _) in enumerate(rows)}
    return split_dataset(manifest_of(rows, collections=collections), CLASSES, PARAMS, seed=0)


def test_isic_ids_map_to_their_collections() -> None:
    assert collection_from_isic_id("ISIC_0000123") == "ISIC 0-1999"
    assert collection_from_isic_id("ISIC_0012345") == "ISIC 2000-15999"
    assert collection_from_isic_id("ISIC_0024306") == "HAM10000"
    assert collection_from_isic_id("ISIC_0034320") == "HAM10000"
    assert collection_from_isic_id("ISIC_0056789") == "ISIC 34321+"
    assert collection_from_isic_id("my_photo") == "unknown"


def test_a_class_from_one_collection_is_warned_about() -> None:
    # melanoma only from "clinic A"; the other classes from both clinics.
    result = _split(lambda label, k: "clinic A" if label == "melanoma" or k % 2 else "clinic B")
    warnings = result.report["provenance"]["warnings"]
    assert any(w.startswith("class 'melanoma': 100% of its 20 images come from 'clinic A'") for w in warnings)
    assert not any("'nevus'" in warning for warning in warnings)
    report = render_report(result, pd.DataFrame(columns=SKIPPED_COLUMNS))
    assert "## Where the images come from" in report
    assert "| class | clinic A | clinic B |" in report


def test_mixed_collections_give_no_warning() -> None:
    result = _split(lambda label, k: "clinic A" if k % 2 else "clinic B")
    assert result.report["provenance"]["warnings"] == []
    assert result.report["provenance"]["cramers_v"] == pytest.approx(0.0, abs=0.05)


def test_one_collection_has_no_association_to_report() -> None:
    result = _split(lambda label, k: "clinic A")
    assert result.report["provenance"]["warnings"] == []
    assert result.report["provenance"]["cramers_v"] is None


def test_collection_that_decides_the_class_is_strongly_associated() -> None:
    frame = pd.DataFrame({"label": ["a", "a", "b", "b"], "collection": ["x", "x", "y", "y"]})
    figures = class_collection_association(frame)
    assert figures["cramers_v"] == pytest.approx(1.0)
    assert figures["class_from_collection_accuracy"] == 1.0


def test_test_images_from_a_collection_train_never_saw_are_warned_about() -> None:
    rows = _rows(10) + [(f"data/raw/test/nevus/t{k}.jpg", "nevus", "test", f"t{k}") for k in range(4)]
    collections = {path: "clinic B" if split == "test" else "clinic A" for path, _, split, _ in rows}
    result = split_dataset(manifest_of(rows, collections=collections), CLASSES, PARAMS, seed=0)
    warnings = result.report["provenance"]["warnings"]
    assert "class 'nevus': 4 of its 4 test images come from clinic B, which train has none of" in " ".join(
        warnings
    )
    assert any("the test split's collections differ from train's" in warning for warning in warnings)


def test_local_source_takes_collections_from_isic_ids(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    params = as_params(small_params(download={"path": str(root), "metadata": ""}))
    manifest = fetch_local_source(params, tmp_path / "out")
    assert set(manifest["collection"]) == {"unknown"}  # the test folder's names are not ISIC ids


def test_local_source_takes_collections_from_a_metadata_column(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    (root / "index.csv").write_text(
        "isic_id,site\nISIC_Train_0_000,clinic A\nISIC_Train_1_001,clinic B\n", encoding="utf-8"
    )
    download = {"path": str(root), "metadata": "index.csv", "diagnosis_column": "", "lesion_column": "site"}
    params = as_params(small_params(download={**download, "collection": "site"}))
    manifest = fetch_local_source(params, tmp_path / "out").set_index("isic_id")["collection"]
    assert manifest["ISIC_Train_0_000"] == "clinic A"
    assert manifest["ISIC_Train_1_001"] == "clinic B"
    assert (manifest == "unknown").sum() == len(manifest) - 2


def test_a_collection_column_needs_metadata() -> None:
    with pytest.raises(ValidationError, match=r"download.local.collection=site: a metadata column needs"):
        as_params(small_params(download={"source": "local", "metadata": "", "collection": "site"}))


def test_isic_query_download_records_each_attribution_as_collection(tmp_path: Path) -> None:
    images = make_images(9)
    ids = sorted(images)
    queries = {label: f'diagnosis_3:"{label}"' for label in CLASSES}
    searches = {queries[label]: ids[index * 3 : index * 3 + 3] for index, label in enumerate(CLASSES)}
    archive = StandinArchive(images=images, searches=searches)
    with serve(archive) as api_url:
        settings = {"source": "isic", "api_url": api_url, "mode": "query", "queries": queries, "max_side": 0}
        params = as_params(small_params(download={**settings, **FAST_RETRIES, "max_per_class": 3}))
        rows = fetch_isic_source(params, tmp_path / "out", tmp_path / "cache")
    # The stand-in attributes ids 1-9 to three hospitals and Anonymous (every fifth).
    expected = {"Anonymous" if n % 5 == 0 else f"Hospital {n % 3}" for n in range(1, 10)}
    assert set(rows["collection"]) == expected
    table = "\n".join(render_provenance({"train": rows}, CLASSES))
    assert "| class | Anonymous | Hospital 0 | Hospital 1 | Hospital 2 |" in table


def test_metrics_by_collection_split_the_test_set() -> None:
    melanoma = 0
    collections = pd.Series(["A", "A", "A", "A", "B", "B", "B", "B"])
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p_melanoma = np.array([0.9, 0.1, 0.8, 0.2, 0.3, 0.6, 0.7, 0.1])
    probabilities = np.stack([p_melanoma, 1 - p_melanoma], axis=1)
    figures = metrics_by_collection(collections, y, probabilities, melanoma, threshold=0.5)
    assert figures["A"] == {
        "images": 4,
        "melanomas": 2,
        "balanced_accuracy": 1.0,
        "melanoma_auc": 1.0,
        "alert_sensitivity": 1.0,
        "alert_specificity": 1.0,
    }
    assert figures["B"]["alert_sensitivity"] == 0.5  # 0.3 missed, 0.7 caught
    assert figures["B"]["melanoma_auc"] == 0.75  # 3 of the 4 melanoma-benign pairs ranked right


def test_one_collection_gives_no_per_collection_metrics() -> None:
    y = np.array([0, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert metrics_by_collection(pd.Series(["A", "A"]), y, probabilities, 0, 0.5) == {}
