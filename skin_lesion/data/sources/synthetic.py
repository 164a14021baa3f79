"""Source `synthetic`: generated coloured shapes for smoke runs and tests; not dermoscopic images."""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from skin_lesion.files import sha256_file, write_text_atomic
from skin_lesion.data.manifests import RAW_COLUMNS
from skin_lesion.params import SyntheticParams

log = logging.getLogger("skin_lesion.data.sources.synthetic")


SYNTHETIC_NOTICE = (
    "SYNTHETIC DATA: generated coloured shapes, not dermoscopic images.\n"
    "Use it for smoke runs and tests only; its metrics say nothing about skin lesions.\n"
)


def fetch_synthetic(
    settings: SyntheticParams, classes: Sequence[str], size: int, seed: int, out: Path
) -> pd.DataFrame:
    """Generate the synthetic image set into `out`; return the manifest."""
    log.warning("download.source is 'synthetic': these are generated shapes, not skin lesions")
    rows = generate_synthetic(
        out, classes=classes, images_per_class=settings.images_per_class, size=size, seed=seed
    )
    write_text_atomic(out / "SYNTHETIC_DATA.txt", SYNTHETIC_NOTICE)
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


def generate_synthetic(
    out: Path, classes: Sequence[str], images_per_class: int, size: int, seed: int
) -> list[tuple[str, ...]]:
    """Draw a learnable image set: each class has its own hue and shape on a noisy skin tone."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_index, label in enumerate(classes):
        folder = out / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        hue = class_index / len(classes)
        for image_index in range(images_per_class):
            image = _draw_synthetic(rng, hue, shape=class_index % 3, size=size)
            relative = Path("train") / label / f"synthetic_{class_index:02d}_{image_index:04d}.png"
            image.save(out / relative)
            digest = sha256_file(out / relative)
            rows.append(
                (relative.as_posix(), label, "train", digest, "synthetic", relative.stem, "", "", "synthetic")
            )
    return rows


def _draw_synthetic(rng: np.random.Generator, hue: float, shape: int, size: int) -> Image.Image:
    # The class is the lesion's hue and shape. Each image also gets its own lighting gradient, lesion
    # position and size, and dark speckles: the split stage's perceptual hash sees grey levels, not
    # hue, so without them images of different classes would look like copies of one photo.
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    lighting = 50 * (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5))
    skin = np.array([224, 172, 150]) + lighting[..., None] + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        r = size * rng.uniform(0.02, 0.07)
        px, py = rng.uniform(0, size, size=2)
        draw.ellipse((px - r, py - r, px + r, py + r), fill=tuple(int(v) for v in rng.integers(60, 130, 3)))
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.75))
    radius = size * rng.uniform(0.15, 0.3)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], colour)
    return image
