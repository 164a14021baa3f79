"""A local dataset with damaged archives and odd entries: one clear line, or listed in the data report.

Each case is what a user would hand the local source: a zip with a corrupt member, one whose header
understates a member's size, links that leave the dataset folder, and files that are not images.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
import yaml

from skin_lesion.data.sources.local import extract_zip_safely, list_local_images
from skin_lesion.errors import PipelineError
from tests.conftest import CLASSES, make_isic_folder, run_stage, small_params, write_image


def _zip_with_one_member(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as handle:
        handle.writestr("Train/melanoma/a.jpg", data)
    return path


def _patch_first_header(path: Path, offset: int, value: int) -> None:
    # Offsets in the local file header: 14 CRC-32, 22 uncompressed size (zip's APPNOTE 4.3.7).
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, offset, value)
    central = raw.rfind(b"PK\x01\x02")  # the central directory repeats them at +16 and +24
    struct.pack_into("<I", raw, central + offset + 2, value)
    path.write_bytes(bytes(raw))


def test_zip_member_with_a_bad_crc_is_one_line_naming_it(tmp_path: Path) -> None:
    archive = _zip_with_one_member(tmp_path / "data.zip", b"\xff\xd8" + b"x" * 500)
    _patch_first_header(archive, 14, 0x12345678)
    with pytest.raises(
        PipelineError, match=r"data.zip: member 'Train/melanoma/a.jpg' is damaged \(Bad CRC-32"
    ):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=2**20)


def test_zip_member_larger_than_its_header_says_is_one_line_naming_it(tmp_path: Path) -> None:
    archive = _zip_with_one_member(tmp_path / "data.zip", b"\xff\xd8" + b"x" * 500)
    _patch_first_header(archive, 22, 10)
    with pytest.raises(PipelineError, match=r"data.zip: member 'Train/melanoma/a.jpg' is damaged"):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=2**20)


def test_links_out_of_the_dataset_and_odd_entries_are_skipped_and_listed(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=2)
    melanoma = root / "Train" / "melanoma"
    secret = write_image(tmp_path / "outside" / "secret.jpg", (10, 10, 10))
    os.symlink(secret, melanoma / "escape.jpg")
    os.symlink(tmp_path / "nowhere.jpg", melanoma / "dangling.jpg")
    os.symlink(
        melanoma / sorted(p.name for p in melanoma.iterdir() if p.suffix == ".jpg")[0],
        melanoma / "inside.jpg",
    )
    (melanoma / "notes.txt").write_text("not an image")
    (melanoma / "nested").mkdir()
    images, skipped = list_local_images(root, CLASSES)
    taken = {image.source_path.name for image in images if image.label == "melanoma"}
    assert "inside.jpg" in taken  # a link that stays inside the dataset is followed
    assert not {"escape.jpg", "dangling.jpg", "notes.txt"} & taken
    reasons = dict(zip(skipped["path"], skipped["reason"], strict=True))
    assert reasons["Train/melanoma/escape.jpg"].startswith("a link out of the dataset")
    assert reasons["Train/melanoma/dangling.jpg"] == "a link to nothing"
    assert reasons["Train/melanoma/notes.txt"].startswith("not an image file name")
    assert reasons["Train/melanoma/nested"] == "a folder inside a class folder (not searched)"


def test_skipped_entries_reach_the_data_report(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path / "isic", train_per_class=8, test_per_class=3)
    os.symlink("/etc/passwd", root / "Train" / "nevus" / "passwd.jpg")
    params = small_params(download={"source": "local", "path": str(root)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert run_stage(tmp_path, "download", "--out", "data/raw", "--cache", "data/cache/isic").returncode == 0
    split = run_stage(
        tmp_path,
        "split",
        "--raw",
        "data/raw",
        "--out",
        "data/split",
        "--report",
        "metrics/data.json",
        "--report-md",
        "metrics/data_report.md",
        "--counts",
        "metrics/class_counts",
    )
    assert split.returncode == 0, split.stderr
    report = (tmp_path / "metrics" / "data_report.md").read_text(encoding="utf-8")
    assert "## Entries of the dataset folder the download skipped (1)" in report
    assert "`Train/nevus/passwd.jpg`: a link out of the dataset (to /etc/passwd); refused" in report
    assert not any("passwd" in path.name for path in (tmp_path / "data" / "raw").rglob("*"))
