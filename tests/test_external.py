"""External validation: sets from outside the training data, their label maps, copies left out, figures."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from skin_lesion.data.dedup import inspect_images
from skin_lesion.data.manifests import HASH_COLUMNS, IDENTITY_COLUMNS, SPLIT_COLUMNS
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.external import (
    ExternalSet,
    image_ids,
    leave_out_seen,
    load_external_sets,
    score_external_set,
    seen_by_the_model,
)
from skin_lesion.evaluation.metrics import binomial
from skin_lesion.images import load_images
from skin_lesion.params import ExternalSetParams, SplitParams
from tests.conftest import CLASSES, as_params, draw_lesion, repo_params, small_params

# The committed split.near_duplicate_distance (2) and split.group_distance (8).
SPLIT = SplitParams.model_validate({**repo_params()["split"], "max_pixels": 150 * 150})
NOTHING_SEEN = pd.DataFrame(columns=IDENTITY_COLUMNS)
MAP = {"mel": "melanoma", "atypical nevus": "nevus", "lentigo": "other"}
NOTHING_LEFT_OUT = {
    "unreadable": 0,
    "copies_of_training": 0,
    "left_out_same_isic_id": 0,
    "left_out_same_lesion": 0,
    "left_out_same_pixels": 0,
    "left_out_look_alike": 0,
}


def _load(
    folder: Path, settings: dict[str, ExternalSetParams], seen: pd.DataFrame = NOTHING_SEEN
) -> ExternalSet:
    (found,) = load_external_sets(folder, settings, seen, SPLIT, "melanoma", 32)
    return found


def _settings(label_map: dict[str, str] = MAP, labels_csv: str = "") -> dict[str, ExternalSetParams]:
    return {"clinic": ExternalSetParams(labels_csv=labels_csv, label_map=label_map)}


def _training_images(folder: Path) -> list[str]:
    paths = []
    for seed in range(4):
        path = folder / f"train_{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_lesion(seed, size=64).save(path)
        paths.append(str(path))
    return paths


def _external_set(root: Path) -> Path:
    """clinic/<label>/*: two melanomas, two nevi, a lentigo (BMP, TIFF, WebP, PNG), and two copies."""
    images = {
        "mel/a.bmp": draw_lesion(10, size=64),
        "mel/b.tif": draw_lesion(11, size=64),
        "atypical nevus/c.webp": draw_lesion(12, size=64).resize((80, 80)),
        "atypical nevus/d.png": draw_lesion(13, size=64),
        "lentigo/e.png": draw_lesion(14, size=64),
        "mel/copy_exact.bmp": draw_lesion(0, size=64),  # the pixels of training image 0
        "atypical nevus/copy_resized.jpg": draw_lesion(1, size=64).resize((96, 96)),  # training image 1
    }
    for name, image in images.items():
        path = root / "clinic" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **({"lossless": True} if path.suffix == ".webp" else {}))
    return root


def test_a_set_is_read_mapped_and_its_copies_of_training_images_left_out(tmp_path: Path) -> None:
    seen = _training_images(tmp_path / "train")
    found = _load(_external_set(tmp_path / "external"), _settings(), inspect_images(seen, max_pixels=None))
    assert found.name == "clinic"
    assert found.left_out == {
        **NOTHING_LEFT_OUT,
        "copies_of_training": 2,
        "left_out_same_pixels": 1,
        "left_out_look_alike": 1,
    }
    assert sorted(Path(path).name for path in found.rows["path"]) == [
        "a.bmp",
        "b.tif",
        "c.webp",
        "d.png",
        "e.png",
    ]
    targets = dict(
        zip(found.rows["path"].map(lambda path: Path(path).name), found.rows["target"], strict=True)
    )
    assert targets == {
        "a.bmp": "melanoma",
        "b.tif": "melanoma",
        "c.webp": "nevus",
        "d.png": "nevus",
        "e.png": "other",
    }
    assert found.images.shape == (5, 32, 32, 3)


def test_a_zip_of_a_set_reads_like_the_folder(tmp_path: Path) -> None:
    folder = _external_set(tmp_path / "unpacked") / "clinic"
    archive = tmp_path / "external" / "clinic.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, "wrapped/" + path.relative_to(folder).as_posix())
    seen = inspect_images(_training_images(tmp_path / "train"), max_pixels=None)
    roots = (tmp_path / "unpacked", tmp_path / "external")
    from_folder, from_zip = (_load(root, _settings(), seen) for root in roots)

    def by_label_folder(rows: pd.DataFrame) -> pd.DataFrame:  # the folders the sets lie in differ
        return rows.assign(path=[f"{Path(p).parent.name}/{Path(p).name}" for p in rows["path"]])

    assert len(from_folder.rows) == 5  # the seven images less the two copies of training images
    pd.testing.assert_frame_equal(by_label_folder(from_zip.rows), by_label_folder(from_folder.rows))
    np.testing.assert_array_equal(from_zip.images, from_folder.images)
    assert from_zip.left_out == from_folder.left_out


def test_reviewed_images_exported_by_export_feedback_are_a_set(tmp_path: Path) -> None:
    for index, label in enumerate(["melanoma", "nevus", "nevus"]):
        path = tmp_path / "external" / "clinic" / "Train" / label / f"{index}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_lesion(20 + index).save(path)
    (tmp_path / "external" / "clinic" / "metadata.csv").write_text("isic_id,label\n", encoding="utf-8")
    identity = {"melanoma": "melanoma", "nevus": "nevus"}
    found = _load(tmp_path / "external", _settings(identity))
    assert sorted(found.rows["target"]) == ["melanoma", "nevus", "nevus"]


def test_labels_can_come_from_a_csv(tmp_path: Path) -> None:
    folder = _set_with_labels_csv(tmp_path, b"isic_id,label\na,mel\nb,mel\nc,atypical nevus\nd,lentigo\n")
    found = _load(folder, _settings(labels_csv="labels.csv"))
    assert sorted(found.rows["target"]) == [
        "melanoma",
        "melanoma",
        "nevus",
        "other",
    ]  # unlisted images left out


def _set_with_labels_csv(root: Path, labels: bytes) -> Path:
    """external/clinic/all/* (the _external_set images, flat) with `labels` as its labels.csv."""
    clinic = _external_set(root / "external") / "clinic"
    flat = clinic / "all"
    flat.mkdir()
    for path in list(clinic.rglob("*.*")):
        if path.parent != flat:
            shutil.move(path, flat / path.name)
    (clinic / "labels.csv").write_bytes(labels)
    return root / "external"


def test_a_labels_csv_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    folder = _set_with_labels_csv(
        tmp_path, "isic_id,label\na,mel\nb,naevus atypique\u00e9\n".encode("latin-1")
    )
    with pytest.raises(
        PipelineError,
        match=r"^evaluate.external.clinic: .*labels.csv is not UTF-8 text; save it as a UTF-8 CSV$",
    ):
        _load(folder, _settings(labels_csv="labels.csv"))


def test_rows_giving_an_image_two_labels_are_refused_naming_the_ids(tmp_path: Path) -> None:
    labels = b"isic_id,label\na,mel\nb,mel\nc,atypical nevus\nd,mel\na,atypical nevus\nd,lentigo\n"
    folder = _set_with_labels_csv(tmp_path, labels)
    with pytest.raises(
        PipelineError,
        match=r"^evaluate.external.clinic: .*labels.csv: rows with different labels for the same "
        r"isic_id: a, d$",
    ):
        _load(folder, _settings(labels_csv="labels.csv"))


def test_identical_duplicate_rows_are_read_once(tmp_path: Path) -> None:
    folder = _set_with_labels_csv(tmp_path, b"isic_id,label\na,mel\na,mel\nc,atypical nevus\n")
    found = _load(folder, _settings(labels_csv="labels.csv"))
    assert sorted(found.rows["target"]) == ["melanoma", "nevus"]


def test_an_image_over_split_max_pixels_is_left_out_as_unreadable(tmp_path: Path) -> None:
    folder = _external_set(tmp_path / "external")
    draw_lesion(15, size=64).resize((400, 400)).save(folder / "clinic" / "mel" / "bomb.png")
    found = _load(folder, _settings())
    assert found.left_out["unreadable"] == 1
    assert "bomb.png" not in {Path(path).name for path in found.rows["path"]}


def test_a_zip_over_the_size_limit_names_the_limit_in_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("skin_lesion.evaluation.external.MAX_EXTRACT_BYTES", 2**20)
    archive = tmp_path / "clinic.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("mel/a.png", b"\0" * (2 * 2**20))
    with pytest.raises(
        PipelineError,
        match=r"^evaluate.external.clinic: .*clinic.zip unpacks to more than the limit of 1 MiB$",
    ):
        _load(tmp_path, _settings())


def test_figures_are_computed_as_by_hand() -> None:
    # Rows: P(melanoma), P(nevus), P(vascular lesion). Threshold 0.5.
    targets = ["melanoma"] * 4 + ["nevus"] * 4 + ["other"] * 2
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # melanoma: alert, right
            [0.8, 0.1, 0.1],  # melanoma: alert, right
            [0.4, 0.5, 0.1],  # melanoma: missed, called nevus
            [0.2, 0.3, 0.5],  # melanoma: missed, called vascular lesion
            [0.7, 0.2, 0.1],  # nevus: false alert
            [0.3, 0.6, 0.1],  # nevus: right
            [0.1, 0.8, 0.1],  # nevus: right
            [0.05, 0.9, 0.05],  # nevus: right
            [0.6, 0.2, 0.2],  # other: false alert
            [0.01, 0.98, 0.01],  # other
        ]
    )
    thresholds = {"overall": 0.5, "worst_collection": 0.35}
    result = score_external_set(
        targets, probabilities, CLASSES, "melanoma", thresholds, "overall", 200, seed=0
    )
    # Melanoma scores 0.9, 0.8, 0.4, 0.2 against 0.7, 0.3, 0.1, 0.05, 0.6, 0.01: 6 + 6 + 4 + 3 of 24 pairs.
    assert result["melanoma_auc"] == pytest.approx(19 / 24)
    low, high = result["melanoma_auc_ci"]
    assert low < 19 / 24 < high
    alert = result["alert"]
    assert alert["sensitivity"] == pytest.approx(2 / 4)
    assert alert["sensitivity_n"] == 4
    assert alert["false_alert_rate"] == pytest.approx(2 / 6)
    assert alert["false_alert_rate_n"] == 6
    # Clopper-Pearson for 2 of 4: the 2.5 % quantile of Beta(2, 3) and the 97.5 % quantile of Beta(3, 2).
    assert alert["sensitivity_ci"] == pytest.approx([0.0676, 0.9324], abs=1e-4)
    lower = result["alert_by_rule"]["worst_collection"]  # at 0.35: one more melanoma, no more false alerts
    assert (lower["sensitivity"], lower["false_alert_rate"]) == (pytest.approx(3 / 4), pytest.approx(2 / 6))
    assert result["alert_by_rule"]["overall"] == alert
    assert result["recall"] == {"melanoma": 0.5, "nevus": 0.75}  # only the classes the set has
    assert result["balanced_accuracy"] == pytest.approx(0.625)
    assert result["class_counts"] == {"melanoma": 4, "nevus": 4, "other": 2}
    assert result["images"] == 10


def test_five_of_five_has_an_interval_that_does_not_collapse() -> None:
    found = binomial("sensitivity", 5, 5)
    assert found["sensitivity"] == 1.0
    assert found["sensitivity_ci"] == pytest.approx([0.4782, 1.0], abs=1e-4)


def test_a_missing_set_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        PipelineError, match=r"^evaluate.external.clinic: neither .*clinic/ nor .*clinic.zip exists$"
    ):
        _load(tmp_path, _settings())


def test_a_label_missing_from_the_map_is_one_line(tmp_path: Path) -> None:
    partial = {"mel": "melanoma", "atypical nevus": "nevus"}
    with pytest.raises(
        PipelineError, match=r"^evaluate.external.clinic.label_map: no entry for label 'lentigo' \(1 images"
    ):
        _load(_external_set(tmp_path), _settings(partial))


def test_a_set_without_melanoma_is_one_line(tmp_path: Path) -> None:
    no_melanoma = {"mel": "nevus", "atypical nevus": "nevus", "lentigo": "other"}
    with pytest.raises(
        PipelineError, match=r"^evaluate.external.clinic: no melanoma image .* cannot be checked on it$"
    ):
        _load(_external_set(tmp_path), _settings(no_melanoma))


def test_a_map_onto_an_unknown_class_is_refused_by_the_params() -> None:
    external = {"clinic": {"labels_csv": "", "label_map": {"mel": "melanom"}}}
    with pytest.raises(ValidationError, match=r"evaluate.external.clinic.label_map: 'mel' maps to 'melanom'"):
        as_params(small_params(evaluate={"external": external}))


def test_promoting_on_external_figures_needs_external_sets() -> None:
    with pytest.raises(
        ValidationError, match=r"promote_metric=external_melanoma_auc needs evaluate.external"
    ):
        as_params(small_params(evaluate={"promote_metric": "external_melanoma_auc"}))


def _write_split(folder: Path, rows: dict[str, list[dict[str, str]]]) -> Path:
    """Split manifests <split>.csv in `folder`, each row's unnamed columns empty."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, split_rows in rows.items():
        frame = pd.DataFrame(
            [{column: row.get(column, "") for column in SPLIT_COLUMNS} for row in split_rows]
        )
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


def _clinic(root: Path, images: dict[str, Image.Image]) -> Path:
    """external/clinic/<label>/<file> with the given images, as `_settings()` maps them."""
    for name, image in images.items():
        path = root / "clinic" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return root


def test_an_image_with_the_isic_id_of_a_training_or_validation_image_is_left_out(tmp_path: Path) -> None:
    # Other pixels, same archive image: ISIC 2017's test set holds images that ISIC 2019 trains on.
    split = _write_split(
        tmp_path / "split",
        {
            "train": [{"path": "t.png", "isic_id": "ISIC_0000001", "phash": "0" * 16}],
            "val": [{"path": "v.png", "isic_id": "ISIC_0000002", "phash": "0" * 16}],
            "test": [{"path": "s.png", "isic_id": "ISIC_0000003", "phash": "0" * 16}],
        },
    )
    folder = _clinic(
        tmp_path / "external",
        {f"mel/ISIC_000000{k}.png": draw_lesion(30 + k) for k in (1, 2, 3)}
        | {"atypical nevus/n.png": draw_lesion(34), "lentigo/l.png": draw_lesion(35)},
    )
    found = _load(folder, _settings(), seen_by_the_model(split, pd.DataFrame(columns=HASH_COLUMNS)))
    assert found.left_out["left_out_same_isic_id"] == found.left_out["copies_of_training"] == 2
    assert sorted(Path(path).stem for path in found.rows["path"]) == ["ISIC_0000003", "l", "n"]


def test_only_a_file_named_by_an_isic_id_has_one() -> None:
    # Another set's img_001 is not the training split's img_001: only archive ids name one image.
    ids = image_ids(pd.Series(["set/mel/ISIC_0012345.jpg", "set/mel/img_001.jpg", "ISIC_12.png"]), {})
    assert ids["isic_id"].tolist() == ["ISIC_0012345", "", ""]


def test_an_image_of_a_training_lesion_is_left_out_by_its_lesion_id(tmp_path: Path) -> None:
    seen = pd.DataFrame({"isic_id": [""], "lesion_id": ["HAM_7"], "pixel_sha256": ["x"], "phash": ["0" * 16]})
    folder = _set_with_labels_csv(
        tmp_path, b"isic_id,label,lesion_id\na,mel,HAM_7\nb,mel,HAM_8\nc,atypical nevus,\n"
    )
    found = _load(folder, _settings(labels_csv="labels.csv"), seen)
    assert found.left_out["left_out_same_lesion"] == found.left_out["copies_of_training"] == 1
    assert sorted(Path(path).stem for path in found.rows["path"]) == ["b", "c"]


def test_a_look_alike_the_split_would_group_with_a_training_image_is_left_out(tmp_path: Path) -> None:
    # A 1-pixel crop is 4 bits from its original: beyond split.near_duplicate_distance, within
    # split.group_distance (another photo of the lesion, kept in its split). A 3-pixel crop is 10 bits away.
    (tmp_path / "train").mkdir()
    for seed in (0, 2):
        draw_lesion(seed).save(tmp_path / "train" / f"{seed}.png")
    seen = inspect_images([str(tmp_path / "train" / f"{seed}.png") for seed in (0, 2)], max_pixels=None)
    folder = _clinic(
        tmp_path / "external",
        {
            "mel/near.png": draw_lesion(0).crop((1, 1, 63, 63)),
            "mel/far.png": draw_lesion(2).crop((3, 3, 61, 61)),
            "atypical nevus/n.png": draw_lesion(36),
        },
    )
    found = _load(folder, _settings(), seen)
    assert found.left_out["left_out_look_alike"] == found.left_out["copies_of_training"] == 1
    assert sorted(Path(path).stem for path in found.rows["path"]) == ["far", "n"]


def test_an_image_left_out_is_counted_once_under_the_first_reason_that_holds() -> None:
    seen = pd.DataFrame(
        {"isic_id": ["ISIC_0000001"], "lesion_id": ["HAM_1"], "pixel_sha256": ["p"], "phash": ["0" * 16]}
    )
    hashed = pd.DataFrame(
        {
            "rejected": ["", "", "", "", "not an image"],
            "isic_id": ["ISIC_0000001", "", "", "", "ISIC_0000001"],
            "lesion_id": ["HAM_1", "HAM_1", "", "", ""],
            "pixel_sha256": ["p", "p", "p", "q", ""],
            "phash": ["0" * 16, "0" * 16, "0" * 16, "f" * 16, ""],
        }
    )
    keep, left_out = leave_out_seen(hashed, seen, max_distance=8)
    assert keep.tolist() == [False, False, False, True, False]
    assert left_out == {
        **NOTHING_LEFT_OUT,
        "unreadable": 1,
        "copies_of_training": 3,
        "left_out_same_isic_id": 1,
        "left_out_same_lesion": 1,
        "left_out_same_pixels": 1,
    }


def test_each_external_image_is_decoded_once_into_the_pixels_it_was_scored_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _external_set(tmp_path / "external")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.append(path) or real_open(path, *args))
    found = _load(folder, _settings())
    assert len(opened) == len(found.rows) == 7
    monkeypatch.undo()
    np.testing.assert_array_equal(found.images, load_images(found.rows["path"].tolist(), 32))
