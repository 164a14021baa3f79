"""Image decoding: any file Pillow reads, as 8-bit RGB at the model's size, with a pixel limit."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skin_lesion.errors import PipelineError

# The formats dermatoscopes and their software write, each with the file suffix an upload is kept under.
IMAGE_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMAT_NAMES = "JPEG, PNG, BMP, TIFF or WebP"


def decode_rgb(path: Path | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Fully decode an image file (path or open binary file) to RGB, honouring EXIF rotation.

    Refuses images over max_pixels before decoding them (decompression bombs).
    """
    return decode_image(path, max_pixels)[0]


def decode_image(path: Path | BinaryIO, max_pixels: int | None = None) -> tuple[Image.Image, str]:
    """`decode_rgb`'s image and the file's format as Pillow names it (JPEG, PNG, BMP, TIFF, WEBP...)."""
    try:
        with Image.open(path) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise PipelineError(
                    f"{path}: {opened.width}x{opened.height} pixels is over split.max_pixels={max_pixels}"
                )
            return _to_8bit(ImageOps.exif_transpose(opened)).convert("RGB"), str(opened.format)
    except UnidentifiedImageError as err:
        # Pillow's message names the file object (`<_io.BytesIO object at 0x…>`) for bytes; say it plainly.
        raise PipelineError(f"{path}: cannot decode image (not a format Pillow reads)") from err
    except (OSError, Image.DecompressionBombError) as err:
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
    return resize_rgb(decode_rgb(path, max_pixels=max_pixels), size)


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """A decoded RGB image as the (size, size, 3) uint8 array the model takes."""
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
