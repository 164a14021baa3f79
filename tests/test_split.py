"""split: validation, duplicates, label conflicts, lesion groups, and a leakage-free stratified split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageFilter

from skin_lesion.data.dedup import inspect_images
from skin_lesion.data.manifests import IDENTITY_COLUMNS, SKIPPED_COLUMNS, SPLIT_COLUMNS
from skin_lesion.data.splitting import render_report, split_dataset
from skin_lesion.errors import PipelineError
from skin_lesion.params import SplitParams
from tests.conftest import CLASSES, assert_no_group_straddles, draw_lesion, manifest_of, repo_params

PARAMS = SplitParams.model_validate({**repo_params()["split"], "val_fraction": 0.2, "test_fraction": 0.2})


def _distinct_rows(per_class: int, split: str = "train") -> list[tuple[str, str, str, str]]:
    return [
        (f"data/raw/{split}/{label}/{split}_{k:03d}.jpg", label, split, f"{split}-{label}-{k}")
        for label in CLASSES
        for k in range(per_class)
    ]


def _split(rows, seed: int = 0, lesions: dict[str, str] | None = None, diagnoses=None, **params):
    frame = manifest_of(rows, lesions, diagnoses)
    return split_dataset(frame, CLASSES, PARAMS.model_copy(update=params), seed=seed)


# --- the split itself -------------------------------------------------------------------------


def test_the_manifests_carry_the_ids_and_hashes_that_other_sets_are_matched_on() -> None:
    # External sets and a site are matched against these without decoding the split's images again.
    rows, lesions = _distinct_rows(10), {_distinct_rows(1)[0][0]: "HAM_1"}
    written = pd.concat(_split(rows, lesions=lesions).splits.values())[SPLIT_COLUMNS]  # as the stage writes
    expected = manifest_of(rows, lesions).set_index("path")[IDENTITY_COLUMNS]
    pd.testing.assert_frame_equal(
        written.set_index("path")[IDENTITY_COLUMNS].sort_index(), expected.sort_index()
    )


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


def test_a_class_too_small_for_every_split_is_named_not_warned_by_sklearn(
    recwarn: pytest.WarningsRecorder,
) -> None:
    rows = _distinct_rows(20)
    rare = CLASSES[0]
    rows = [row for row in rows if row[1] != rare] + [row for row in rows if row[1] == rare][:2]
    result = _split(rows)
    missing = [name for name, frame in result.splits.items() if not (frame["label"] == rare).any()]
    assert missing  # 2 images cannot reach train, val and test
    warning = f"class '{rare}' has 2 images but none in the {' and '.join(missing)} split"
    assert any(line.startswith(warning) for line in result.report["provenance"]["warnings"])
    assert not [w for w in recwarn if "least populated class" in str(w.message)]


def test_too_few_images_to_hold_out_is_named() -> None:
    with pytest.raises(PipelineError, match=r"split.test_fraction=0.2: too few images per class"):
        _split(_distinct_rows(3))


def test_report_counts_every_image() -> None:
    rows = _distinct_rows(10)
    rows.append(("data/raw/train/nevus/copy.jpg", "nevus", "train", rows[0][3]))
    report = _split(rows).report
    kept = sum(sum(counts.values()) for counts in report["class_counts"].values())
    assert report["images_in"] == len(rows) == kept + report["images_removed"]
    for key in ("images_rejected", "duplicate_groups", "label_conflicts", "leakage_removed"):
        assert key in report


# --- duplicates and label conflicts -------------------------------------------------------------


def _conflict_rows() -> list[tuple[str, str, str, str]]:
    rows = _distinct_rows(10)
    # rows[0] (melanoma) is filed twice more: once as nevus, once again as melanoma.
    rows.append(("data/raw/train/nevus/copy.jpg", "nevus", "train", rows[0][3]))
    rows.append(("data/raw/train/melanoma/copy2.jpg", "melanoma", "train", rows[0][3]))
    return rows


def test_label_conflict_without_diagnosis_dropped_by_default() -> None:
    result = _split(_conflict_rows())
    kept = pd.concat(result.splits.values())
    assert _conflict_rows()[0][3] not in set(kept["sha256"])
    assert result.report["label_conflicts"] == 1
    conflicts = result.removed[result.removed["category"] == "label_conflict"]
    assert len(conflicts) == 3
    assert conflicts["reason"].str.contains("melanoma \\(2\\) and nevus \\(1\\)").all()


def _conflict_diagnoses(diagnosis: str) -> dict[str, str]:
    return {path: diagnosis for path, _, _, digest in _conflict_rows() if digest == _conflict_rows()[0][3]}


def test_label_conflict_settled_by_its_diagnosis() -> None:
    result = _split(_conflict_rows(), diagnoses=_conflict_diagnoses("nv"))
    kept = pd.concat(result.splits.values())
    survivor = kept[kept["sha256"] == _conflict_rows()[0][3]]
    assert survivor["label"].tolist() == ["nevus"]
    assert result.report["conflicts_settled_by_diagnosis"] == 1
    conflicts = result.removed[result.removed["category"] == "label_conflict"]
    assert set(conflicts["label"]) == {"melanoma"}
    assert conflicts["reason"].str.endswith("its diagnosis 'nv' says nevus").all()


def test_label_conflict_dropped_when_diagnosis_fits_both_labels() -> None:
    diagnoses = _conflict_diagnoses("nv")
    both = PARAMS.diagnosis_classes | {"nv": ["melanoma", "nevus"]}
    result = _split(_conflict_rows(), diagnoses=diagnoses, diagnosis_classes=both)
    assert _conflict_rows()[0][3] not in set(pd.concat(result.splits.values())["sha256"])
    assert result.report["conflicts_settled_by_diagnosis"] == 0


def test_label_conflict_dropped_when_copies_disagree_on_diagnosis() -> None:
    diagnoses = _conflict_diagnoses("nv") | {"data/raw/train/melanoma/copy2.jpg": "mel"}
    result = _split(_conflict_rows(), diagnoses=diagnoses)
    assert _conflict_rows()[0][3] not in set(pd.concat(result.splits.values())["sha256"])
    assert len(result.removed[result.removed["category"] == "label_conflict"]) == 3


def test_label_conflict_majority_keeps_one_majority_copy() -> None:
    result = _split(_conflict_rows(), conflicts="majority")
    kept = pd.concat(result.splits.values())
    survivor = kept[kept["sha256"] == _conflict_rows()[0][3]]
    assert survivor["label"].tolist() == ["melanoma"]
    why = result.removed.set_index("path")["category"].to_dict()
    assert why.pop("data/raw/train/nevus/copy.jpg") == "label_conflict"
    assert list(why.values()) == ["duplicate"]  # the other melanoma copy


def test_label_conflict_error_names_the_files() -> None:
    message = (
        r"copy2.jpg \(melanoma\) and .*nevus/copy.jpg \(nevus\) are the same image \(split.conflicts=error\)"
    )
    with pytest.raises(PipelineError, match=message):
        _split(_conflict_rows(), conflicts="error")


def test_same_label_duplicates_keep_one_copy() -> None:
    rows = _distinct_rows(10)
    rows.append(("data/raw/train/melanoma/zz_copy.jpg", "melanoma", "train", rows[0][3]))
    result = _split(rows)
    kept = pd.concat(result.splits.values())
    assert (kept["sha256"] == rows[0][3]).sum() == 1
    assert result.report["duplicate_groups"] == 1
    assert result.report["leakage_removed"] == 0


# --- leakage ------------------------------------------------------------------------------------


def test_train_copy_of_a_test_image_is_removed() -> None:
    rows = _distinct_rows(10) + _distinct_rows(3, split="test")
    test_image = rows[-1]
    rows.append(("data/raw/train/x/again.jpg", test_image[1], "train", test_image[3]))
    result = _split(rows)
    assert test_image[0] in set(result.splits["test"]["path"])
    assert result.report["leakage_removed"] == 1
    assert result.removed["path"].tolist() == ["data/raw/train/x/again.jpg"]
    assert_no_group_straddles(result.splits, key="sha256")


def test_photos_of_one_lesion_stay_in_one_split() -> None:
    rows = _distinct_rows(20)
    lesions = {path: f"lesion-{k % 12}" for k, (path, *_) in enumerate(rows)}  # 5 photos per lesion
    result = _split(rows, lesions=lesions)
    assert result.report["images_removed"] == 0
    assert_no_group_straddles(result.splits, key="lesion_id")


def test_train_photo_of_a_test_lesion_is_removed() -> None:
    rows = _distinct_rows(10) + _distinct_rows(3, split="test")
    train_photo, test_photo = rows[0][0], rows[-3][0]
    result = _split(rows, lesions={train_photo: "HAM_1", test_photo: "HAM_1"})
    assert train_photo not in set(pd.concat(result.splits.values())["path"])
    assert test_photo in set(result.splits["test"]["path"])
    assert result.report["leakage_removed"] == 1
    assert result.removed["reason"].tolist() == [f"same lesion as test image {test_photo}"]


# --- validation ---------------------------------------------------------------------------------


def test_rejected_images_are_recorded_and_skipped() -> None:
    frame = manifest_of(_distinct_rows(10))
    frame.loc[3, "rejected"] = "cannot decode image (truncated)"
    result = split_dataset(frame, CLASSES, PARAMS, seed=0)
    assert result.report["images_rejected"] == 1
    assert result.removed["category"].tolist() == ["rejected"]
    assert frame.loc[3, "path"] not in set(pd.concat(result.splits.values())["path"])


def test_rejected_image_stops_in_strict_mode() -> None:
    frame = manifest_of(_distinct_rows(10))
    frame.loc[3, "rejected"] = "cannot decode image (truncated)"
    strict = PARAMS.model_copy(update={"on_bad_image": "error"})
    with pytest.raises(
        PipelineError, match=r"\.jpg: cannot decode image \(truncated\) \(split.on_bad_image=error"
    ):
        split_dataset(frame, CLASSES, strict, seed=0)


# --- planted cases on real image files ----------------------------------------------------------


def _lesion(seed: int, size: int = 128) -> Image.Image:
    """A smooth, lesion-like picture, unique per seed (blurred, as photos are)."""
    return draw_lesion(seed, size).filter(ImageFilter.GaussianBlur(3))


def _planted(tmp_path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    paths: dict[str, str] = {}

    def save(name: str, label: str, image: Image.Image, split: str = "train", **kwargs) -> None:
        path = tmp_path / split / label / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        paths[name] = path.as_posix()

    for k, label in enumerate(CLASSES * 8):
        save(f"base_{k:02d}", label, _lesion(k))
    for k, label in enumerate(CLASSES * 2):
        save(f"test_{k:02d}", label, _lesion(100 + k), split="test")
    original = _lesion(0)  # base_00, a melanoma
    save("reencoded", "melanoma", original, quality=60)
    save("resized", "melanoma", original.resize((96, 96)))
    save("cropped", "melanoma", original.crop((1, 1, 127, 127)))  # 0.8 % per side: a copy
    save("cropped_more", "melanoma", original.crop((2, 2, 126, 126)))  # 1.6 %: a look-alike
    (tmp_path / "train" / "nevus" / "same_bytes.jpg").write_bytes(Path(paths["base_03"]).read_bytes())
    paths["same_bytes"] = (tmp_path / "train" / "nevus" / "same_bytes.jpg").as_posix()  # base_03: melanoma
    save("test_again", "nevus", _lesion(101))  # repeats test_01 (nevus) in train
    save("lesion_mate", "vascular lesion", _lesion(200))
    save("lesion_test", "vascular lesion", _lesion(201), split="test")
    (tmp_path / "train" / "nevus" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "nevus" / "text.jpg").write_text("not an image")
    whole = (tmp_path / "train" / "nevus" / "text.jpg").read_bytes()
    truncated = tmp_path / "train" / "nevus" / "truncated.jpg"
    _lesion(300).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: len(whole) + 400])
    for name in ("empty", "text", "truncated"):
        paths[name] = (tmp_path / "train" / "nevus" / f"{name}.jpg").as_posix()

    rows = []
    for path in paths.values():
        label, split = Path(path).parent.name, Path(path).parent.parent.name
        rows.append((path, label, split, _sha256(path)))
    manifest = manifest_of(rows, lesions={paths["lesion_mate"]: "HAM_7", paths["lesion_test"]: "HAM_7"})
    features = inspect_images(manifest["path"], max_pixels=10**7)
    manifest[features.columns] = features
    return manifest, paths


def _sha256(path: str) -> str:
    import hashlib  # noqa: PLC0415 - only this helper needs it

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_planted_cases_are_found_and_resolved(tmp_path: Path) -> None:
    manifest, paths = _planted(tmp_path)
    result = split_dataset(manifest, CLASSES, PARAMS, seed=0)
    why = result.removed.set_index("path")["category"].to_dict()

    assert {why[paths[name]] for name in ("empty", "text", "truncated")} == {"rejected"}
    assert result.report["images_rejected"] == 3
    # base_03 (melanoma) and its byte copy filed as nevus: a conflict, both dropped.
    assert why[paths["base_03"]] == why[paths["same_bytes"]] == "label_conflict"
    # The re-encoded, resized and cropped copies of base_00 are near duplicates of it.
    assert {why[paths[name]] for name in ("reencoded", "resized", "cropped")} == {"duplicate"}
    assert paths["base_00"] not in why
    assert result.report["near_duplicate_groups"] >= 1
    # A larger crop is beyond the duplicate threshold: kept, but grouped with its original.
    kept = pd.concat(result.splits.values()).set_index("path")
    assert kept.loc[paths["cropped_more"], "group"] == kept.loc[paths["base_00"], "group"]
    # A train copy of a test image, and a train photo of a test lesion, are removed.
    assert why[paths["test_again"]] == why[paths["lesion_mate"]] == "leakage"
    assert result.report["leakage_removed"] == 2
    assert {paths["test_01"], paths["lesion_test"]} <= set(result.splits["test"]["path"])
    assert len(kept) + len(result.removed) == len(manifest)
    assert_no_group_straddles(result.splits)


def test_inspect_rejects_oversized_images(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    features = inspect_images([str(path)], max_pixels=10_000)
    assert features.loc[0, "rejected"] == "200x100 pixels is over split.max_pixels=10000"


def test_inspect_hashes_decoded_pixels(tmp_path: Path) -> None:
    image = _lesion(5)
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png", compress_level=1)  # other bytes, same pixels
    features = inspect_images([str(tmp_path / "a.png"), str(tmp_path / "b.png")], max_pixels=10**6)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    assert features.loc[0, "pixel_sha256"] == features.loc[1, "pixel_sha256"]


def test_markdown_report_lists_every_removal(tmp_path: Path) -> None:
    manifest, _ = _planted(tmp_path)
    result = split_dataset(manifest, CLASSES, PARAMS, seed=0)
    report = render_report(result, pd.DataFrame(columns=SKIPPED_COLUMNS))
    for path in result.removed["path"]:
        assert f"`{path}`" in report
    assert "## Label conflicts (2)" in report


def test_inspect_rejects_images_too_small_to_show_a_lesion(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    features = inspect_images([str(tmp_path / "dot.png")], max_pixels=10**6, min_side=16)
    assert features.loc[0, "rejected"] == "1x1 pixels is under split.min_side=16"
