"""skin_lesion.files, images and manifests: atomic outputs, checked CSV reads, image decoding, labels."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_lesion.data.manifests import class_indices
from skin_lesion.errors import PipelineError
from skin_lesion.files import (
    atomic_file,
    atomic_output_dir,
    read_manifest,
    write_csv_atomic,
    write_text_atomic,
)
from skin_lesion.images import decode_rgb, load_images, load_rgb
from tests.conftest import write_image


def test_atomic_dir_appears_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_output_dir(final) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _old_output(tmp_path: Path, name: str) -> Path:
    """tmp_path/out holding one file, `name`, that reads 'old': a stage's output from an earlier run."""
    final = tmp_path / "out"
    final.mkdir()
    (final / name).write_text("old")
    return final


def test_atomic_dir_failure_keeps_old_output_and_no_temp(tmp_path: Path) -> None:
    final = _old_output(tmp_path, "a.txt")

    def write_half_then_die() -> None:
        with atomic_output_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_half_then_die()
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_replaces_old_output_whole(tmp_path: Path) -> None:
    final = _old_output(tmp_path, "stale.txt")
    with atomic_output_dir(final) as tmp:
        (tmp / "fresh.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["fresh.txt"]


def test_atomic_dir_clears_temp_left_by_a_killed_run(tmp_path: Path) -> None:
    (tmp_path / ".out.tmp-crashed").mkdir()
    with atomic_output_dir(tmp_path / "out"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_get_the_permissions_of_the_users_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("skin_lesion.files.UMASK", 0o022)  # temp files are created 0600, folders 0700
    write_text_atomic(tmp_path / "preds.csv", "path\n")
    with atomic_output_dir(tmp_path / "cams") as tmp:
        (tmp / "a.png").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "preds.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "cams").stat().st_mode) == 0o755


def test_atomic_file_leaves_no_temp_when_its_target_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "figure.png").mkdir()
    with pytest.raises(IsADirectoryError), atomic_file(tmp_path / "figure.png") as tmp:
        tmp.write_bytes(b"a figure")
    assert [path.name for path in tmp_path.iterdir()] == ["figure.png"]


def test_manifest_missing_column_is_named(tmp_path: Path) -> None:
    write_csv_atomic(tmp_path / "m.csv", pd.DataFrame({"path": ["a.jpg"]}))
    with pytest.raises(PipelineError, match=r"m.csv has no column\(s\) label"):
        read_manifest(tmp_path / "m.csv", ["path", "label"])


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"manifest: .*absent.csv not found \(run the stage"):
        read_manifest(tmp_path / "absent.csv", ["path"])


def test_load_rgb_resizes_and_converts(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (40, 20), color=128).save(path)
    pixels = load_rgb(path, size=16)
    assert pixels.shape == (16, 16, 3)
    assert pixels.dtype == np.uint8
    assert (pixels == 128).all()


def test_load_rgb_names_an_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "note.jpg"
    path.write_text("not an image")
    with pytest.raises(PipelineError, match=r"note.jpg: cannot decode image"):
        load_rgb(path, size=16)


def test_load_images_stacks_in_order(tmp_path: Path) -> None:
    red = write_image(tmp_path / "r.jpg", (250, 0, 0), size=8)
    blue = write_image(tmp_path / "b.jpg", (0, 0, 250), size=8)
    batch = load_images([red, blue], size=8)
    assert batch.shape == (2, 8, 8, 3)
    assert batch[0, ..., 0].mean() > 200
    assert batch[1, ..., 2].mean() > 200


def test_class_indices_follow_class_order() -> None:
    assert class_indices(["b", "a", "b"], ["a", "b"], source="x").tolist() == [1, 0, 1]


def test_unknown_label_is_named() -> None:
    with pytest.raises(PipelineError, match=r"val.csv: unknown class 'c'; base.classes has a, b"):
        class_indices(["a", "c"], ["a", "b"], source="val.csv")


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = load_rgb(tmp_path / "ramp16.png", size=64)
    assert pixels[0, 0, 0] == 0
    assert pixels[-1, -1, 0] == 255
    assert 120 < pixels.mean() < 135


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (10, 200, 30, 0), (10, 200, 30)),
        ("L", 77, (77, 77, 77)),
    ],
)
def test_other_colour_modes_become_rgb(tmp_path: Path, mode: str, colour: object, expected: tuple) -> None:
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    Image.new(mode, (8, 8), colour).save(path)
    assert tuple(load_rgb(path, size=8)[0, 0]) == expected


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_rgb(tmp_path / "rotated.jpg").size == (20, 40)
