"""External validation: the model scored on labelled image sets from outside the training data.

The carved test split comes from the same collections as training, so it rewards learning what
those collections look like; only images from elsewhere (another clinic, device or archive) say
whether the melanoma alert holds where it will be used. Each set under data/external/ is a folder
`<name>/<label>/*` (or `<name>.zip` of one; the folder an image is in is its label, so what
`skin-lesion export-feedback` writes is a set too), or any layout with a labels CSV (`isic_id,label`,
the isic_id being the file's stem). evaluate.external maps each set's labels onto base.classes or
`other`. Images that the split would have kept with a training or validation image are left out and
counted, by reason: the same ISIC id (a file named by one, ISIC_0012345), the same lesion id (a
`lesion_id` column of the labels CSV), the same decoded pixels, or a perceptual hash within
split.group_distance bits (mostly other photos of one lesion). The model has seen them, or their lesion.
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

from skin_lesion.data.dedup import inspect_and_resize, inspect_images, near_duplicate_mask
from skin_lesion.data.manifests import HASH_COLUMNS, IDENTITY_COLUMNS, SPLIT_COLUMNS
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.metrics import (
    alert_figures,
    auc_or_none,
    balanced_accuracy,
    bootstrap_auc,
    class_recalls,
    known_classes,
)
from skin_lesion.files import extract_zip_safely, read_manifest, read_table
from skin_lesion.images import IMAGE_SUFFIXES
from skin_lesion.params import OTHER_LABEL, ExternalSetParams, SplitParams

log = logging.getLogger("skin_lesion.evaluation.external")

MAX_EXTRACT_BYTES = 4096 * 2**20  # an external set's .zip may unpack to at most this
ISIC_ID = r"ISIC_\d{7}"  # the ISIC Archive's image ids, which its files are named by
# Why an image counts as one the model has seen, in the order checked: each is counted under the first.
SEEN_REASONS = ("same_isic_id", "same_lesion", "same_pixels", "look_alike")


@dataclass(frozen=True)
class ExternalSet:
    """One set, decoded: its rows (path, label, target class, ids, hashes), images, and what was left out."""

    name: str
    rows: pd.DataFrame
    images: np.ndarray
    left_out: dict[str, int]


def seen_by_the_model(split_folder: Path, site_scores: pd.DataFrame) -> pd.DataFrame:
    """The ids and hashes of the images the model learned from or was tuned on: the train and val
    splits' (from their manifests, as the split stage computed them) and a site's (hashes only)."""
    manifests = [
        read_manifest(split_folder / name, SPLIT_COLUMNS)[IDENTITY_COLUMNS]
        for name in ("train.csv", "val.csv")
    ]
    return pd.concat([*manifests, site_scores[HASH_COLUMNS]], ignore_index=True)


def load_external_sets(
    folder: Path,
    sets: Mapping[str, ExternalSetParams],
    seen: pd.DataFrame,
    split: SplitParams,
    melanoma_class: str,
    image_size: int,
) -> list[ExternalSet]:
    """Every configured set, decoded once at `image_size`, without the images that the split would
    have kept with a `seen` image (`seen_reasons`; `seen` as `seen_by_the_model` gives it).

    Each set must exist, have every label in its map, and keep a melanoma image: the checks run
    before any prediction, so that a wrong set stops the stage early, in one line. Images over
    split.max_pixels are unreadable, as in the split stage: never decoded.
    """
    if not sets:
        return []
    # The split keeps copies (near_duplicate_distance) and look-alikes (group_distance) in one split.
    max_distance = max(split.near_duplicate_distance, split.group_distance)
    loaded = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, settings in sets.items():
            root = locate_set(folder, name, Path(scratch))
            rows = list_set(root, f"evaluate.external.{name}", settings.labels_csv, settings.label_map)
            inspected, images = inspect_and_resize(rows["path"].tolist(), split.max_pixels, image_size)
            rows = with_hashes(rows, inspected)
            keep, left_out = leave_out_seen(rows, seen, max_distance)
            rows = rows[keep].reset_index(drop=True)
            if not (rows["target"] == melanoma_class).any():
                raise PipelineError(
                    f"evaluate.external.{name}: no {melanoma_class} image (after leaving out "
                    f"{left_out['copies_of_training']} copies of training images): the alert cannot be "
                    "checked on it"
                )
            log.info(
                "external set %s: %d images; left out %d copies of training images (%s), %d unreadable",
                name,
                len(rows),
                left_out["copies_of_training"],
                describe_reasons(left_out),
                left_out["unreadable"],
            )
            loaded.append(ExternalSet(name, rows, images[keep], left_out))
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
    """The set's images: path, the set's own label, the class it maps to (or `other`), and the ids
    that the split groups photos by: isic_id and lesion_id ('' where the set gives none).

    `what` is the parameter section that named the set (`evaluate.external.<name>`, `site`).
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    lesions: dict[str, str] = {}
    if labels_csv:
        table = read_table(root / labels_csv, ["isic_id", "label"], what=what)
        refuse_conflicting_labels(table, f"{what}: {root / labels_csv}")
        labels = dict(zip(table["isic_id"].astype(str), table["label"].astype(str), strict=True))
        if "lesion_id" in table:
            lesions = dict(zip(table["isic_id"].astype(str), table["lesion_id"].astype(str), strict=True))
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
    return images.assign(**image_ids(images["path"], lesions))


def image_ids(paths: pd.Series, lesions: Mapping[str, str]) -> dict[str, pd.Series]:
    """Each file's isic_id (its stem, when that is an ISIC id) and lesion id (from `lesions`, by stem)."""
    stems = paths.map(lambda path: Path(path).stem)
    # Only a file named by an ISIC id is known to be that archive image: img_001 is anyone's.
    return {
        "isic_id": stems.where(stems.str.fullmatch(ISIC_ID), ""),
        "lesion_id": stems.map(lambda stem: lesions.get(stem, "")),
    }


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
    """The images that are neither unreadable (over `max_pixels` too) nor ones the split would keep
    with a `seen` image (`seen_reasons`), with their hashes, and how many were left out and why."""
    hashed = with_hashes(images, inspect_images(images["path"], max_pixels=max_pixels))
    keep, left_out = leave_out_seen(hashed, seen, max_distance)
    return hashed[keep].reset_index(drop=True), left_out


def with_hashes(images: pd.DataFrame, inspected: pd.DataFrame) -> pd.DataFrame:
    """The images' rows with inspect_images' columns: rejected ('' if readable), pixel_sha256, phash."""
    return images.reset_index(drop=True).assign(**{name: inspected[name].to_numpy() for name in inspected})


def leave_out_seen(
    hashed: pd.DataFrame, seen: pd.DataFrame, max_distance: int
) -> tuple[np.ndarray, dict[str, int]]:
    """Which `hashed` images to keep (readable, and none the split would keep with a `seen` image), and
    how many were left out: unreadable, copies_of_training, and those by reason (left_out_<reason>)."""
    readable = (hashed["rejected"] == "").to_numpy()
    reasons = np.where(readable, seen_reasons(hashed, seen, max_distance), "")
    counts = {"unreadable": int((~readable).sum()), "copies_of_training": int((reasons != "").sum())}
    counts |= {f"left_out_{reason}": int((reasons == reason).sum()) for reason in SEEN_REASONS}
    return readable & (reasons == ""), counts


def seen_reasons(images: pd.DataFrame, seen: pd.DataFrame, max_distance: int) -> np.ndarray:
    """Why the split would have kept each image with a `seen` one ('' when it would not): the first of
    SEEN_REASONS that holds. As in the split, photos within `max_distance` bits are one lesion's; an
    id counts where both sides have one."""
    checks = [
        *(_shared(images, seen, column) for column in ("isic_id", "lesion_id", "pixel_sha256")),
        near_duplicate_mask(images["phash"], seen["phash"], max_distance),
    ]
    return np.select(checks, SEEN_REASONS, default="")


def _shared(images: pd.DataFrame, seen: pd.DataFrame, column: str) -> np.ndarray:
    # Empty values (no id; no hash: unreadable) never match; a site's rows in `seen` have no ids.
    known = set(seen[column].dropna()) - {""} if column in seen else set()
    return images[column].isin(known).to_numpy()


def describe_reasons(left_out: Mapping[str, int]) -> str:
    """The images left out by reason, in words: `2 same pixels, 1 look alike`."""
    counted = [(reason, left_out[f"left_out_{reason}"]) for reason in SEEN_REASONS]
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in counted if count) or "none"


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
    known, y_known = known_classes(targets, classes)
    predicted = probabilities[known].argmax(axis=1)
    recall = {classes[k]: value for k, value in class_recalls(y_known, predicted).items()}
    return {
        "images": len(targets),
        "class_counts": {label: int((targets == label).sum()) for label in [*recall, OTHER_LABEL]},
        "melanoma_auc": auc_or_none(is_melanoma, scores),
        "melanoma_auc_ci": bootstrap_auc(is_melanoma, scores, resamples, seed),
        "alert": alert_figures(is_melanoma, scores, thresholds[rule]),
        "alert_by_rule": {
            name: alert_figures(is_melanoma, scores, value) for name, value in thresholds.items()
        },
        "balanced_accuracy": balanced_accuracy(y_known, predicted),
        "recall": recall,
    }
