"""Source `local`: a folder <root>/Train/<class>/*.jpg (optional <root>/Test/<class>/*.jpg), or a .zip of one.

That is the layout of the public 9-class ISIC dataset; an optional metadata CSV inside the folder
gives lesion ids, diagnoses and collections.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skin_lesion.errors import PipelineError
from skin_lesion.files import extract_zip_safely, read_table, sha256_file, write_csv_atomic
from skin_lesion.images import IMAGE_SUFFIXES
from skin_lesion.data.manifests import OFFICIAL_SPLITS, RAW_COLUMNS, SKIPPED_COLUMNS, SKIPPED_NAME
from skin_lesion.params import COLLECTION_FROM_ID, LocalParams
from skin_lesion.data.provenance import UNKNOWN, collection_from_isic_id

log = logging.getLogger("skin_lesion.data.sources.local")


@dataclass(frozen=True)
class _Image:
    source_path: Path
    label: str
    split: str


def fetch_local(settings: LocalParams, classes: Sequence[str], out: Path) -> pd.DataFrame:
    """Copy a local ISIC-layout folder (or .zip of one) into `out`; return the manifest."""
    root = Path(settings.path)
    if not root.exists():
        raise PipelineError(f"download.local.path: {root} does not exist")
    with tempfile.TemporaryDirectory() as scratch:
        if root.is_file():
            if root.suffix.lower() != ".zip":
                raise PipelineError(f"download.local.path: {root} is a file but not a .zip")
            extract_zip_safely(root, Path(scratch), settings.max_extract_mb * 2**20)
            root = find_dataset_root(Path(scratch), label=settings.path)
        images, skipped = list_local_images(root, classes)
        manifest = copy_images(images, out, source="local")
        write_csv_atomic(out / SKIPPED_NAME, skipped)
        columns = {"lesion_id": settings.lesion_column, "diagnosis": settings.diagnosis_column}
        if settings.collection != COLLECTION_FROM_ID:
            columns["collection"] = settings.collection
        columns = {ours: theirs for ours, theirs in columns.items() if theirs}
        if settings.metadata:
            known = read_metadata(root / settings.metadata, list(dict.fromkeys(columns.values())))
            for ours, theirs in columns.items():
                manifest[ours] = manifest["isic_id"].map(known[theirs]).fillna("")
        if settings.collection == COLLECTION_FROM_ID:
            manifest["collection"] = manifest["isic_id"].map(collection_from_isic_id)
        manifest["collection"] = manifest["collection"].replace("", UNKNOWN)
        return manifest


def find_dataset_root(folder: Path, label: str) -> Path:
    """The folder holding Train/: `folder` itself or its single subfolder (zips often wrap one)."""
    if (folder / "Train").is_dir():
        return folder
    subfolders = [child for child in folder.iterdir() if child.is_dir()]
    if len(subfolders) == 1 and (subfolders[0] / "Train").is_dir():
        return subfolders[0]
    raise PipelineError(f"download.local.path: {label} has no Train/ folder")


def list_local_images(root: Path, classes: Sequence[str]) -> tuple[list[_Image], pd.DataFrame]:
    """Images under <root>/Train|Test/<class>/, and every entry skipped there with its reason.

    Links are followed only while they stay inside the dataset: one that leads out of it (to
    /etc/passwd, say) would copy that file into data/raw and the DVC cache.
    """
    if not (root / "Train").is_dir():
        raise PipelineError(f"download.local.path: {root} has no Train/ folder")
    inside = root.resolve()
    images: list[_Image] = []
    skipped: list[tuple[str, str]] = []
    for folder_name, split in OFFICIAL_SPLITS.items():
        split_dir = root / folder_name
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(split_dir.iterdir()):
            reason = _skip_reason(class_dir, inside, folder=True)
            if reason:
                skipped.append((class_dir.relative_to(root).as_posix(), reason))
                continue
            # Unknown classes are kept here so that `split` rejects them with a reason in the report
            # (or stops, in strict mode) instead of them vanishing without trace.
            if class_dir.name not in classes:
                log.warning("%s: class not in base.classes; split will reject its images", class_dir)
            files = []
            for path in sorted(class_dir.iterdir()):
                reason = _skip_reason(path, inside, folder=False)
                if reason:
                    skipped.append((path.relative_to(root).as_posix(), reason))
                else:
                    files.append(path)
            if not files:
                log.warning("%s: class folder has no images", class_dir)
            images.extend(_Image(path, class_dir.name, split) for path in files)
    missing = sorted(set(classes) - {image.label for image in images})
    if missing:
        log.warning("no images for class(es): %s", ", ".join(missing))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return images, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)


def _skip_reason(path: Path, inside: Path, folder: bool) -> str:
    """Why an entry of a split or class folder is not taken; empty when it is."""
    if path.is_symlink() and not path.exists():
        return "a link to nothing"
    if path.is_symlink() and not path.resolve().is_relative_to(inside):
        return f"a link out of the dataset (to {path.resolve()}); refused"
    if folder:
        return "" if path.is_dir() else "a file where class folders belong"
    if path.is_dir():
        return "a folder inside a class folder (not searched)"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file name ({', '.join(IMAGE_SUFFIXES)})"
    return ""


def copy_images(images: Sequence[_Image], out: Path, source: str) -> pd.DataFrame:
    """Copy images to out/<split>/<class>/<name>; return their manifest rows (no lesion ids, diagnoses)."""
    rows = []
    for image in images:
        relative = Path(image.split) / image.label / _utf8_name(image.source_path.name)
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image.source_path, target)
        digest = sha256_file(target)
        rows.append(
            (relative.as_posix(), image.label, image.split, digest, source, relative.stem, "", "", "")
        )
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


def _utf8_name(name: str) -> str:
    # A name whose bytes are not UTF-8 cannot go into the UTF-8 manifest: its bad bytes become %xNN.
    utf8 = os.fsencode(name).decode("utf-8", errors="backslashreplace").replace("\\", "%")
    if utf8 != name:
        log.warning("file name %r is not UTF-8; stored as %r", name, utf8)
    return utf8


def read_metadata(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """The given columns per isic_id from a metadata CSV (such as the ISIC dataset's index.csv)."""
    metadata = read_table(path, ["isic_id", *columns], what="download.local.metadata")
    # An image filed under two classes has a row per class; its metadata is the image's, so one row,
    # unless the rows disagree, when no row can be trusted over the other.
    rows = metadata.drop_duplicates(["isic_id", *columns])
    clashing = rows.loc[rows["isic_id"].duplicated(), "isic_id"]
    if len(clashing):
        raise PipelineError(
            f"download.local.metadata: {path} gives {len(clashing)} isic_id(s) different {', '.join(columns)}"
            f" in different rows, e.g. {clashing.iloc[0]}"
        )
    return rows.set_index("isic_id")[list(columns)]
