"""External validation: the model scored on labelled image sets from outside the training data.

The carved test split comes from the same collections as training, so it rewards learning what
those collections look like; only images from elsewhere (another clinic, device or archive) say
whether the melanoma alert holds where it will be used. Each set under data/external/ is a folder
`<name>/<label>/*` (or `<name>.zip` of one; the folder an image is in is its label, so what
`skin-lesion export-feedback` writes is a set too), or any layout with a labels CSV (`isic_id,label`,
the isic_id being the file's stem). evaluate.external maps each set's labels onto base.classes or
`other`. Images that are copies of training or validation images (the same decoded pixels, or
perceptual hashes within split.near_duplicate_distance bits, as the split stage finds them) are left
out and counted: the model has seen them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion.data.dedup import inspect_images, near_duplicate_mask
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.metrics import auc_or_none, bootstrap_auc, exact_interval
from skin_lesion.files import extract_zip_safely, read_table
from skin_lesion.images import IMAGE_SUFFIXES, load_images
from skin_lesion.params import OTHER_LABEL, ExternalSetParams

log = logging.getLogger("skin_lesion.evaluation.external")

MAX_EXTRACT_BYTES = 4096 * 2**20  # an external set's .zip may unpack to at most this


@dataclass(frozen=True)
class ExternalSet:
    """One set, decoded: its rows (path, label, target class), images, and what was left out."""

    name: str
    rows: pd.DataFrame
    images: np.ndarray
    left_out: dict[str, int]


def load_external_sets(
    folder: Path,
    sets: Mapping[str, ExternalSetParams],
    seen: pd.DataFrame,
    max_distance: int,
    melanoma_class: str,
    image_size: int,
    max_pixels: int,
) -> list[ExternalSet]:
    """Every configured set, copies of `seen` images (their pixel_sha256 and phash, as the split's
    manifests hold them) left out, decoded at `image_size`.

    Each set must exist, have every label in its map, and keep a melanoma image: the checks run
    before any prediction, so that a wrong set stops the stage early, in one line. Images over
    `max_pixels` (split.max_pixels) are unreadable, as in the split stage: never decoded.
    """
    if not sets:
        return []
    loaded = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, settings in sets.items():
            root = locate_set(folder, name, Path(scratch))
            rows = list_set(root, f"evaluate.external.{name}", settings.labels_csv, settings.label_map)
            rows, left_out = leave_out_copies(rows, seen, max_distance, max_pixels)
            if not (rows["target"] == melanoma_class).any():
                raise PipelineError(
                    f"evaluate.external.{name}: no {melanoma_class} image (after leaving out "
                    f"{left_out['copies_of_training']} copies of training images): the alert cannot be "
                    "checked on it"
                )
            log.info(
                "external set %s: %d images; left out %d copies of training images, %d unreadable",
                name,
                len(rows),
                left_out["copies_of_training"],
                left_out["unreadable"],
            )
            loaded.append(ExternalSet(name, rows, load_images(rows["path"].tolist(), image_size), left_out))
    return loaded


def locate_set(folder: Path, name: str, scratch: Path) -> Path:
    """The folder of set `name`: folder/name, or folder/name.zip unpacked into `scratch`."""
    root, archive = folder / name, folder / f"{name}.zip"
    if root.is_dir():
        return root
    if archive.is_file():
        extract_zip_safely(archive, scratch / name, MAX_EXTRACT_BYTES, f"evaluate.external.{name}", None)
        inner = [child for child in (scratch / name).iterdir() if child.is_dir()]
        has_files = any(child.is_file() for child in (scratch / name).iterdir())
        # Zips often wrap their contents in one folder.
        return inner[0] if len(inner) == 1 and not has_files else scratch / name
    raise PipelineError(f"evaluate.external.{name}: neither {root}/ nor {archive} exists")


def list_set(root: Path, what: str, labels_csv: str, label_map: Mapping[str, str]) -> pd.DataFrame:
    """The set's images: path, the set's own label, and the class it maps to (or `other`).

    `what` is the parameter section that named the set (`evaluate.external.<name>`, `site`).
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if labels_csv:
        table = read_table(root / labels_csv, ["isic_id", "label"], what=what)
        refuse_conflicting_labels(table, f"{what}: {root / labels_csv}")
        labels = dict(zip(table["isic_id"].astype(str), table["label"].astype(str), strict=True))
        unlabelled = [path for path in files if path.stem not in labels]
        if unlabelled:
            log.warning(
                "%s: %d images have no row in %s; left out",
                what,
                len(unlabelled),
                labels_csv,
            )
        rows = [(str(path), labels[path.stem]) for path in files if path.stem in labels]
    else:
        # The folder an image is in is its label: <name>/<label>/* and export-feedback's Train/<label>/*.
        rows = [(str(path), path.parent.name) for path in files if path.parent != root]
    if not rows:
        raise PipelineError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    images = pd.DataFrame(rows, columns=["path", "label"])
    unmapped = sorted(set(images["label"]) - set(label_map))
    if unmapped:
        count = int(images["label"].isin(unmapped).sum())
        raise PipelineError(
            f"{what}.label_map: no entry for label {unmapped[0]!r} "
            f"({count} images of {root}; map it to a class or to {OTHER_LABEL!r})"
        )
    images["target"] = images["label"].map(label_map)
    return images


def refuse_conflicting_labels(table: pd.DataFrame, source: str) -> None:
    """Stop when an isic_id has rows with different labels: which one is right is not ours to guess."""
    labels_per_id = table.groupby("isic_id")["label"].nunique()
    conflicting = sorted(labels_per_id[labels_per_id > 1].index)
    if conflicting:
        more = f" and {len(conflicting) - 5} more" if len(conflicting) > 5 else ""
        shown = ", ".join(conflicting[:5]) + more
        raise PipelineError(f"{source}: rows with different labels for the same isic_id: {shown}")


def leave_out_copies(
    images: pd.DataFrame, seen: pd.DataFrame, max_distance: int, max_pixels: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The images that are neither unreadable (over `max_pixels` too) nor copies of `seen` images
    (with their pixel and perceptual hashes), and how many were left out.

    A copy has the same decoded pixels or a perceptual hash within `max_distance` bits of a seen
    image's, or within that image's own `max_distance` where `seen` has that column (a site's images
    are kept apart as the split keeps a lesion's photos apart: within split.group_distance).
    """
    hashes = inspect_images(images["path"], max_pixels=max_pixels)
    readable = (hashes["rejected"] == "").to_numpy()
    exact = hashes["pixel_sha256"].isin(set(seen["pixel_sha256"])).to_numpy()
    distances = seen["max_distance"].fillna(max_distance) if "max_distance" in seen else max_distance
    distances = pd.Series(distances, index=seen.index)
    near = np.zeros(len(hashes), dtype=bool)
    for distance, part in seen.groupby(distances.to_numpy()):
        near |= near_duplicate_mask(hashes["phash"], part["phash"], int(distance))
    copies = readable & (exact | near)
    hashed = images.assign(pixel_sha256=hashes["pixel_sha256"].to_numpy(), phash=hashes["phash"].to_numpy())
    kept = hashed[readable & ~copies].reset_index(drop=True)
    return kept, {"unreadable": int((~readable).sum()), "copies_of_training": int(copies.sum())}


def score_external_set(
    targets: Sequence[str],
    probabilities: np.ndarray,
    classes: Sequence[str],
    melanoma_class: str,
    thresholds: Mapping[str, float],
    rule: str,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Melanoma AUC with its bootstrap interval, the alert at the `rule`'s threshold with exact
    binomial intervals (and at every rule's, in `alert_by_rule`), and the balanced accuracy and
    recall over the classes the set has."""
    targets = np.asarray(targets)
    melanoma = list(classes).index(melanoma_class)
    is_melanoma = targets == melanoma_class
    scores = probabilities[:, melanoma]
    predicted = np.asarray(classes)[probabilities.argmax(axis=1)]
    present = [label for label in classes if (targets == label).any()]
    recall = {label: float((predicted[targets == label] == label).mean()) for label in present}
    return {
        "images": len(targets),
        "class_counts": {label: int((targets == label).sum()) for label in [*present, OTHER_LABEL]},
        "melanoma_auc": auc_or_none(is_melanoma, scores),
        "melanoma_auc_ci": bootstrap_auc(is_melanoma, scores, resamples, seed),
        "alert": alert_figures(is_melanoma, scores, thresholds[rule]),
        "alert_by_rule": {
            name: alert_figures(is_melanoma, scores, value) for name, value in thresholds.items()
        },
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "recall": recall,
    }


def alert_figures(is_melanoma: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The alert's sensitivity and false-alert rate (share of non-melanoma lesions) at `threshold`."""
    alert = scores >= threshold
    return {
        "threshold": threshold,
        **binomial("sensitivity", int((alert & is_melanoma).sum()), int(is_melanoma.sum())),
        **binomial("false_alert_rate", int((alert & ~is_melanoma).sum()), int((~is_melanoma).sum())),
    }


def binomial(name: str, successes: int, trials: int) -> dict[str, Any]:
    """A proportion with its exact (Clopper-Pearson) 95 % interval, None when there are no trials."""
    return {
        name: successes / trials if trials else None,
        f"{name}_ci": exact_interval(successes, trials),
        f"{name}_n": trials,
    }
