"""Can this image be judged at all? Too small, too dark or blurred images are flagged, not silently scored.

Each check compares the uploaded image (before it is resized for the model) with fixed limits set
below every image of the 9-class ISIC training set, so that a typical dermoscopic photo never trips
them; docs/results.md gives the training set's figures they were set against.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

MIN_SIDE_PX = 90  # shorter side; the training images are 180 px
MIN_BRIGHTNESS = 60  # mean luminance, 0-255
MIN_SHARPNESS = 10.0  # variance of the Laplacian at ANALYSIS_PX
ANALYSIS_PX = 180


def quality_problems(image: Image.Image) -> list[str]:
    """Why the image is unfit to judge, in words; empty when it looks usable."""
    problems = []
    if min(image.size) < MIN_SIDE_PX:
        problems.append(f"too small ({image.width}x{image.height} px; at least {MIN_SIDE_PX} px a side)")
    grey = np.asarray(image.convert("L").resize((ANALYSIS_PX, ANALYSIS_PX)), dtype=np.float64)
    if grey.mean() < MIN_BRIGHTNESS:
        problems.append(f"too dark (mean brightness {grey.mean():.0f} of 255; at least {MIN_BRIGHTNESS})")
    edges = sharpness(grey)
    if edges < MIN_SHARPNESS:
        problems.append(f"blurred (sharpness {edges:.1f}; at least {MIN_SHARPNESS:.0f})")
    return problems


def sharpness(grey: np.ndarray) -> float:
    """The variance of the 4-neighbour Laplacian: low when edges are soft."""
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())
