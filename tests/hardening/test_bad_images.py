"""Bad images in a local source: each is used correctly or rejected with its reason; none stops the run.

Every case runs the real path: download (source local) -> image inspection -> split.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_lesion.data.dedup import inspect_images
from skin_lesion.data.splitting import SplitResult, split_dataset
from skin_lesion.errors import PipelineError
from tests.conftest import CLASSES, as_params, draw_lesion, fetch_local_source, small_params

MAX_PIXELS = 150 * 150


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    draw_lesion(901, size=48).crop((0, 0, 48, 32)).save(path, exif=exif)


def _sixteen_bit(path: Path) -> None:
    pixels = (np.asarray(draw_lesion(902, mode="L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(pixels).save(path.with_suffix(".png"))


# name -> (write the file into a class folder, expected outcome: None = used, else the reason's pattern)
CASES: dict[str, tuple[Callable[[Path], None], str | None]] = {
    "zero_byte": (lambda path: path.write_bytes(b""), r"cannot decode image"),
    "truncated_jpeg": (
        lambda path: path.write_bytes(_jpeg_bytes(draw_lesion(900))[:600]),
        r"cannot decode image",
    ),
    "text_named_jpg": (lambda path: path.write_text("not an image"), r"cannot decode image"),
    "png": (lambda path: draw_lesion(903).save(path.with_suffix(".png")), None),
    "rgba": (lambda path: draw_lesion(904, mode="RGBA").save(path.with_suffix(".png")), None),
    "grayscale": (lambda path: draw_lesion(905, mode="L").save(path), None),
    "cmyk": (lambda path: draw_lesion(906, mode="CMYK").save(path), None),
    "sixteen_bit": (_sixteen_bit, None),
    "exif_rotated": (_exif_rotated, None),
    "one_pixel": (lambda path: Image.new("RGB", (1, 1)).save(path), r"1x1 pixels is under split.min_side"),
    "decompression_bomb": (
        lambda path: Image.new("RGB", (400, 400)).save(path.with_suffix(".png")),
        r"400x400 pixels is over split.max_pixels",
    ),
}


def _dataset(root: Path) -> Path:
    """Eight good images of melanoma and of nevus in ISIC layout (vascular lesion has none)."""
    for index, label in enumerate(CLASSES[:2]):
        folder = root / "Train" / label
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(8):
            draw_lesion(index * 100 + k).save(folder / f"ISIC_{index}{k:03d}.jpg")
    return root


def _run(root: Path, tmp_path: Path, on_bad_image: str = "skip") -> SplitResult:
    params = as_params(
        small_params(
            download={"source": "local", "path": str(root), "metadata": ""},
            split={"max_pixels": MAX_PIXELS, "on_bad_image": on_bad_image},
        )
    )
    manifest = fetch_local_source(params, tmp_path / "raw")
    manifest["path"] = [(tmp_path / "raw" / path).as_posix() for path in manifest["path"]]
    features = inspect_images(manifest["path"], params.split.max_pixels, params.split.min_side)
    frame = pd.concat([manifest, features], axis=1)
    return split_dataset(frame, params.base.classes, params.split, params.base.seed)


def _outcome(result: SplitResult, stem: str) -> str | None:
    """None when the image is in a split, else its rejection reason."""
    kept = pd.concat(result.splits.values())
    if any(Path(path).stem == stem for path in kept["path"]):
        return None
    removed = result.removed[[Path(path).stem == stem for path in result.removed["path"]]]
    assert len(removed) == 1, f"{stem} is neither kept nor removed"
    assert removed.iloc[0]["category"] == "rejected"
    return removed.iloc[0]["reason"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_is_used_or_rejected_with_its_reason(tmp_path: Path, case: str) -> None:
    root = _dataset(tmp_path / "isic")
    write, expected = CASES[case]
    write(root / "Train" / "nevus" / f"{case}.jpg")
    outcome = _outcome(_run(root, tmp_path), case)
    if expected is None:
        assert outcome is None, f"{case} was rejected: {outcome}"
    else:
        assert outcome is not None, f"{case} was used"
        assert pd.Series([outcome]).str.contains(expected).all(), outcome


def test_non_utf8_file_name_is_used_under_an_escaped_name(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "isic")
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    draw_lesion(907).save(root / "Train" / "nevus" / name)
    assert _outcome(_run(root, tmp_path), "caf%xe9") is None


def test_unknown_class_folder_is_rejected_with_its_name(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "isic")
    (root / "Train" / "melanom").mkdir()
    draw_lesion(908).save(root / "Train" / "melanom" / "typo.jpg")
    assert _outcome(_run(root, tmp_path), "typo") == "class 'melanom' is not in base.classes"


def test_empty_class_folder_is_reported_not_fatal(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "isic")
    (root / "Train" / "vascular lesion").mkdir()
    result = _run(root, tmp_path)
    assert result.report["images_rejected"] == 0
    assert all(counts["vascular lesion"] == 0 for counts in result.report["class_counts"].values())


def test_strict_mode_stops_at_the_first_bad_image(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "isic")
    (root / "Train" / "nevus" / "empty.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty.jpg: cannot decode image .*split.on_bad_image=error"):
        _run(root, tmp_path, on_bad_image="error")
