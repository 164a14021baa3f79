"""Augmentor brings every class of the train split up to rebalance.samples_per_class, reproducibly.

Only the train split is augmented. The reference notebooks augmented before splitting, so augmented
copies of training images sat in validation and inflated its accuracy to 0.80.

Augmentor's own `Pipeline.sample()` names files with random UUIDs and samples in threads; here each
image goes through the pipeline's per-image callable in a fixed order, with Augmentor's global random
generators seeded per class and file names derived from the index and source, so the output is
byte-identical for the same params and data.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import Augmentor
import numpy as np
import pandas as pd
from PIL import Image

from skin_lesion.errors import PipelineError
from skin_lesion.data.manifests import REBALANCED_COLUMNS


def rebalance(
    train: pd.DataFrame,
    classes: Sequence[str],
    samples_per_class: int,
    operations: Mapping[str, Mapping[str, Any]],
    jpeg_quality: int,
    seed: int,
    out: Path,
) -> pd.DataFrame:
    """Write augmented images to out/<class>/ until each class has samples_per_class; return them."""
    build_pipeline(operations)  # fail on a bad operation before any work
    rows: list[tuple[str, str, str]] = []
    for class_index, label in enumerate(classes):
        sources = sorted(train.loc[train["label"] == label, "path"])
        missing = samples_per_class - len(sources)
        if missing <= 0:
            continue
        if not sources:
            raise PipelineError(f"rebalance: class {label!r} has no training images to augment")
        rows += augment_class(
            sources, missing, operations, jpeg_quality, seed=seed + class_index, out=out / label
        )
    frame = pd.DataFrame(rows, columns=["path", "source_path", "label"])
    return frame[REBALANCED_COLUMNS]


def find_sparse_classes(train: pd.DataFrame, min_source_images: int) -> dict[str, int]:
    """Classes of the train split with fewer than min_source_images images (but some), and counts."""
    counts = train.groupby("label").size()
    return {str(label): int(count) for label, count in counts.items() if count < min_source_images}


def augment_class(
    sources: Sequence[str],
    count: int,
    operations: Mapping[str, Mapping[str, Any]],
    jpeg_quality: int,
    seed: int,
    out: Path,
) -> list[tuple[str, str, str]]:
    """Make `count` augmented images from `sources`, cycling through them in a seeded order."""
    # Augmentor draws from the global `random` and `numpy.random` generators and takes no generator
    # argument; set_seed seeds both, and nothing else runs between its draws here.
    Augmentor.Pipeline.set_seed(seed)
    transform = build_pipeline(operations).torch_transform()  # a plain PIL -> PIL callable
    order = np.random.default_rng(seed).permutation(len(sources))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        source = Path(sources[order[index % len(sources)]])
        with Image.open(source) as image:
            try:
                augmented = transform(image.convert("RGB"))
            except (ValueError, IndexError, ZeroDivisionError) as err:
                # Augmentor checks no sizes: a crop or distortion larger than the image fails in it.
                raise PipelineError(
                    f"rebalance.operations: cannot augment {source} ({image.width}x{image.height} px): "
                    f"{err}; does an operation ask for more pixels than the image has?"
                ) from err
        name = f"aug_{index:05d}_{source.stem}.jpg"
        augmented.save(out / name, quality=jpeg_quality)
        rows.append(((Path(out.name) / name).as_posix(), source.as_posix(), out.name))
    return rows


def build_pipeline(operations: Mapping[str, Mapping[str, Any]]) -> Augmentor.Pipeline:
    """An Augmentor Pipeline with each named operation method called with its arguments."""
    pipeline = Augmentor.Pipeline()
    for name, arguments in operations.items():
        method = getattr(Augmentor.Pipeline, name, None)
        if method is None or not _is_operation(method):
            raise PipelineError(f"rebalance.operations.{name}: not an Augmentor operation")
        try:
            method(pipeline, **arguments)
        except (TypeError, ValueError) as err:
            raise PipelineError(f"rebalance.operations.{name}: {err}") from err
    return pipeline


def _is_operation(method: object) -> bool:
    # Augmentor's operation methods all take `probability` first; sample/process/status do not.
    if not callable(method):
        return False
    parameters = list(inspect.signature(method).parameters)
    return len(parameters) >= 2 and parameters[1] == "probability"
