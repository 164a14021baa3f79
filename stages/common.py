"""Shared plumbing for the stages: error reporting, atomic outputs, manifests and image decoding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.errors import PipelineError
from stages.tracking import check_tracking_server

log = logging.getLogger("stages")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def run_cli(main: Callable[[], None]) -> int:
    """Run a stage's main(), turning a PipelineError into one line on stderr and exit code 1.

    A tracking server that does not answer stops the stage before it does any work.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_tracking_server()
        main()
    except PipelineError as err:
        log.error("%s", err)
        return 1
    return 0


@contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final` and move it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # A killed earlier run may have left its temp folder behind; it was never in place, so drop it.
    for stale in final.parent.glob(prefix + "*"):
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_path(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temp name so that readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV without its index, atomically."""
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def read_manifest(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read a CSV manifest and check that it has the given columns."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: manifest not found (run the stage that writes it first)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
    return frame


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decode_rgb(path: Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Fully decode an image file (path or open binary file) to RGB, honouring EXIF rotation.

    Refuses images over max_pixels before decoding them (decompression bombs).
    """
    try:
        with Image.open(path) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise PipelineError(
                    f"{path}: {opened.width}x{opened.height} pixels is over split.max_pixels={max_pixels}"
                )
            return _to_8bit(ImageOps.exif_transpose(opened)).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise PipelineError(f"{path}: cannot decode image ({err})") from err


def _to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit and 32-bit grey values to 255 instead of scaling them.
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    full_scale = 255.0 if pixels.max() <= 255 else 65535.0
    return Image.fromarray(np.uint8(np.clip(pixels / full_scale * 255.0, 0, 255).round()), "L")


def load_rgb(path: Path | BinaryIO, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to a (size, size, 3) uint8 RGB array, honouring EXIF rotation."""
    image = decode_rgb(path, max_pixels=max_pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Decode many images into one (n, size, size, 3) uint8 array, on every core."""
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    # Pillow releases the GIL while it decodes and resizes, so threads use all the cores.
    with ThreadPoolExecutor() as pool:
        for index, image in enumerate(pool.map(lambda path: load_rgb(Path(path), size), paths)):
            images[index] = image
    return images


def class_indices(labels: Sequence[str], classes: Sequence[str], source: str) -> np.ndarray:
    """Map label names to their index in `classes`, naming `source` if a label is unknown."""
    lookup = {name: index for index, name in enumerate(classes)}
    unknown = sorted(set(labels) - lookup.keys())
    if unknown:
        raise PipelineError(f"{source}: unknown class {unknown[0]!r}; base.classes has {', '.join(classes)}")
    return np.array([lookup[label] for label in labels], dtype=np.int64)


def _replace_path(new: Path, final: Path) -> None:
    # Move the old output aside first so that `final` is either the old or the new one, never a mix.
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(new, final)
        shutil.rmtree(trash)
    else:
        os.replace(new, final)
