"""download: local folders and zips in ISIC layout, the synthetic set, and clear errors for bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from skin_lesion.data.dedup import inspect_images
from skin_lesion.data.manifests import RAW_COLUMNS
from skin_lesion.data.sources.local import copy_images, list_local_images
from skin_lesion.data.sources.synthetic import generate_synthetic
from skin_lesion.data.splitting import split_dataset
from skin_lesion.errors import PipelineError
from tests.conftest import CLASSES, as_params, fetch_local_source, make_isic_folder, run_stage, small_params


def _zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                handle.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def test_local_folder_keeps_train_and_test_splits(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=3, test_per_class=2)
    images, skipped = list_local_images(root, CLASSES)
    assert skipped.empty
    assert len(images) == 15
    assert {(image.split, image.label) for image in images} == {
        (split, label) for split in ("train", "test") for label in CLASSES
    }


def test_local_folder_takes_bmp_tiff_and_webp_images(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=1)
    pixels = np.full((24, 24, 3), (150, 60, 60), dtype=np.uint8)
    for suffix in (".bmp", ".tif", ".tiff", ".webp"):
        Image.fromarray(pixels).save(root / "Train" / "melanoma" / f"ISIC_9{suffix}")
    images, skipped = list_local_images(root, CLASSES)
    assert skipped.empty
    assert sorted(image.source_path.suffix for image in images if image.label == "melanoma") == [
        ".bmp",
        ".jpg",
        ".tif",
        ".tiff",
        ".webp",
    ]


def test_copy_images_writes_files_and_manifest(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    manifest = copy_images(list_local_images(root, CLASSES)[0], tmp_path / "out", source="local")
    assert list(manifest.columns) == RAW_COLUMNS
    first = manifest.iloc[0]
    copied = tmp_path / "out" / first["path"]
    assert copied.read_bytes() == (root / "Train" / first["label"] / copied.name).read_bytes()
    assert first["path"] == f"train/{first['label']}/{copied.name}"
    assert len(first["sha256"]) == 64


def test_missing_path_is_named(tmp_path: Path) -> None:
    params = as_params(small_params(download={"path": str(tmp_path / "absent")}))
    with pytest.raises(PipelineError, match=r"download.local.path: .*absent does not exist"):
        fetch_local_source(params, tmp_path / "out")


def test_folder_without_train_is_named(tmp_path: Path) -> None:
    (tmp_path / "isic" / "train").mkdir(parents=True)
    params = as_params(small_params(download={"path": str(tmp_path / "isic")}))
    with pytest.raises(PipelineError, match=r"download.local.path: .*isic has no Train/ folder"):
        fetch_local_source(params, tmp_path / "out")


def test_file_that_is_not_a_zip_is_named(tmp_path: Path) -> None:
    (tmp_path / "data.tar").write_bytes(b"not a zip")
    params = as_params(small_params(download={"path": str(tmp_path / "data.tar")}))
    with pytest.raises(PipelineError, match=r"download.local.path: .*data.tar is a file but not a .zip"):
        fetch_local_source(params, tmp_path / "out")


def test_corrupt_zip_is_named(tmp_path: Path) -> None:
    (tmp_path / "data.zip").write_bytes(b"PK but not really")
    params = as_params(small_params(download={"path": str(tmp_path / "data.zip")}))
    with pytest.raises(PipelineError, match=r"data.zip is not a valid zip"):
        fetch_local_source(params, tmp_path / "out")


def test_zip_with_wrapping_folder_is_read(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2, test_per_class=1)
    archive = _zip_folder(root, tmp_path / "isic.zip", prefix="Skin cancer ISIC/")
    params = as_params(small_params(download={"path": str(archive), "metadata": ""}))
    manifest = fetch_local_source(params, tmp_path / "out")
    assert len(manifest) == 9
    assert sorted(set(manifest["split"])) == ["test", "train"]


def test_synthetic_set_is_deterministic(tmp_path: Path) -> None:
    first = generate_synthetic(tmp_path / "a", CLASSES, images_per_class=3, size=32, seed=7)
    second = generate_synthetic(tmp_path / "b", CLASSES, images_per_class=3, size=32, seed=7)
    assert first == second
    assert len(first) == 9


def test_synthetic_classes_differ_in_colour(tmp_path: Path) -> None:
    rows = generate_synthetic(tmp_path, CLASSES, images_per_class=4, size=32, seed=1)
    lesion_colour = {}
    for path, label, *_ in rows:
        with Image.open(tmp_path / path) as image:
            pixels = np.asarray(image).reshape(-1, 3).astype(float)
        # The lesion is the saturated part: skin and speckles are greyer.
        saturation = (pixels.max(axis=1) - pixels.min(axis=1)) / np.maximum(pixels.max(axis=1), 1)
        lesion_colour.setdefault(label, []).append(pixels[saturation > 0.7].mean(axis=0))
    means = [np.mean(lesion_colour[label], axis=0) for label in CLASSES]
    gaps = [np.abs(a - b).sum() for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(gaps) > 40


def test_synthetic_images_are_distinct_to_the_duplicate_detector(tmp_path: Path) -> None:
    rows = generate_synthetic(tmp_path, CLASSES, images_per_class=30, size=64, seed=3)
    manifest = pd.DataFrame(rows, columns=RAW_COLUMNS).assign(
        path=lambda f: [str(tmp_path / p) for p in f["path"]]
    )
    params = as_params(small_params())
    features = inspect_images(manifest["path"], params.split.max_pixels, params.split.min_side)
    result = split_dataset(pd.concat([manifest, features], axis=1), CLASSES, params.split, seed=0)
    assert result.report["duplicate_groups"] == 0
    assert result.report["near_duplicate_groups"] == 0
    assert result.report["label_conflicts"] == 0
    assert len(result.removed) == 0


def test_stage_cli_reports_bad_path_in_one_line(tmp_path: Path) -> None:
    params = small_params(download={"source": "local", "path": str(tmp_path / "absent")})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = run_stage(tmp_path, "download", "--out", "data/raw", "--cache", "data/cache/isic")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ERROR skin_lesion: download.local.path: {tmp_path / 'absent'} does not exist"
    assert not (tmp_path / "data" / "raw").exists()


def _fetch_with_index(tmp_path: Path, rows: str) -> pd.DataFrame:
    # A local dataset whose index.csv holds `rows` (isic_id, label, split, ham_lesion_id, ham_dx).
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    (root / "index.csv").write_text("isic_id,label,split,ham_lesion_id,ham_dx\n" + rows, encoding="utf-8")
    params = as_params(small_params(download={"path": str(root), "metadata": "index.csv"}))
    return fetch_local_source(params, tmp_path / "out")


def test_metadata_attaches_lesion_ids_and_diagnoses_by_isic_id(tmp_path: Path) -> None:
    rows = "ISIC_Train_0_000,melanoma,train,HAM_1,mel\nISIC_Train_1_001,nevus,train,,\n"
    manifest = _fetch_with_index(tmp_path, rows).set_index("isic_id")
    assert manifest.loc["ISIC_Train_0_000", ["lesion_id", "diagnosis"]].tolist() == ["HAM_1", "mel"]
    assert manifest.loc["ISIC_Train_1_001", ["lesion_id", "diagnosis"]].tolist() == ["", ""]
    assert (manifest["lesion_id"] != "").sum() == 1


def test_metadata_rows_of_an_image_in_two_classes_are_one(tmp_path: Path) -> None:
    rows = "ISIC_Train_0_000,melanoma,train,HAM_1,mel\nISIC_Train_0_000,nevus,test,HAM_1,mel\n"
    manifest = _fetch_with_index(tmp_path, rows).set_index("isic_id")
    assert manifest.loc["ISIC_Train_0_000", ["lesion_id", "diagnosis"]].tolist() == ["HAM_1", "mel"]


def test_metadata_rows_of_one_image_must_agree(tmp_path: Path) -> None:
    rows = "ISIC_Train_0_000,melanoma,train,HAM_1,mel\nISIC_Train_0_000,nevus,train,HAM_2,nv\n"
    with pytest.raises(PipelineError, match=r"index.csv gives 1 isic_id\(s\) different .* ISIC_Train_0_000"):
        _fetch_with_index(tmp_path, rows)


def test_no_diagnosis_column_leaves_diagnoses_empty(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    (root / "index.csv").write_text("isic_id,ham_lesion_id\nISIC_Train_0_000,HAM_1\n", encoding="utf-8")
    download = {"path": str(root), "metadata": "index.csv", "diagnosis_column": ""}
    manifest = fetch_local_source(as_params(small_params(download=download)), tmp_path / "out")
    assert (manifest["diagnosis"] == "").all()
    assert (manifest["lesion_id"] == "HAM_1").sum() == 1


def test_missing_metadata_file_is_named(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    params = as_params(small_params(download={"path": str(root), "metadata": "index.csv"}))
    with pytest.raises(PipelineError, match=r"download.local.metadata: .*index.csv not found"):
        fetch_local_source(params, tmp_path / "out")


def test_metadata_without_lesion_column_is_named(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    (root / "index.csv").write_text("isic_id,label\n", encoding="utf-8")
    params = as_params(small_params(download={"path": str(root), "metadata": "index.csv"}))
    with pytest.raises(PipelineError, match=r"index.csv has no column\(s\) ham_lesion_id"):
        fetch_local_source(params, tmp_path / "out")
