"""Stage `download`: gather the labelled images into data/raw/ with a manifest of path, label, split, sha256.

Sources (`download.source`):
- isic: the ISIC Archive API, either every image of `download.manifest` by id (its labels and splits
  kept) or one search per class (`download.queries`); also writes metadata.csv, attribution.txt and the
  licence texts, as the archive asks of anyone who redistributes its images;
- local: a folder <root>/Train/<class>/*.jpg with an optional <root>/Test/<class>/*.jpg, or a .zip of one
  (the layout of the public 9-class ISIC dataset);
- synthetic: generated shapes for smoke runs and tests; not dermoscopic images.
A new source is one function (params, output folder, download cache) -> manifest rows, added to SOURCES.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import os
import shutil
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import mlflow
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages.common import (
    IMAGE_SUFFIXES,
    atomic_output_dir,
    run_cli,
    sha256_file,
    write_csv_atomic,
    write_text_atomic,
)
from stages.config import COLLECTION_FROM_ID, Params, load_params
from stages.errors import PipelineError
from stages.isic_archive import (
    ArchiveClient,
    ArchiveError,
    RetryPolicy,
    fetch_to_cache,
    read_cached,
    remove_partial_files,
)
from stages.manifests import MANIFEST_NAME, RAW_COLUMNS
from stages.provenance import UNKNOWN, collection_from_isic_id
from stages.tracking import repo_root, stage_run

log = logging.getLogger("stages.download")

# Folder names of the public ISIC dataset's official splits, and the split names we give them.
OFFICIAL_SPLITS = {"Train": "train", "Test": "test"}
SYNTHETIC_NOTICE = (
    "SYNTHETIC DATA: generated coloured shapes, not dermoscopic images.\n"
    "Use it for smoke runs and tests only; its metrics say nothing about skin lesions.\n"
)


@dataclass(frozen=True)
class _Image:
    source_path: Path
    label: str
    split: str


def main() -> None:
    """Read params, fetch the images from the configured source into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/raw)")
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder (resumable)")
    args = parser.parse_args()
    params = load_params()
    fetch = SOURCES[params.download.source]
    # Queued experiments run in throw-away copies of the repo; the cache lives in the real one.
    cache = repo_root() / args.cache
    with stage_run("download", params.base, params.download):
        with atomic_output_dir(args.out) as tmp:
            manifest = fetch(params, tmp, cache)
            # Paths in every manifest are relative to the repository root, where stages run.
            manifest["path"] = [(args.out / path).as_posix() for path in manifest["path"]]
            write_csv_atomic(tmp / MANIFEST_NAME, manifest)
        counts = manifest.groupby("split").size().to_dict()
        mlflow.set_tag("data_source", params.download.source)
        mlflow.log_metrics({f"images_{split}": int(n) for split, n in counts.items()})
        mlflow.log_artifact(str(args.out / MANIFEST_NAME))
    log.info("%d images from source %r into %s", len(manifest), params.download.source, args.out)


def fetch_local(params: Params, out: Path, cache: Path | None = None) -> pd.DataFrame:
    """Copy a local ISIC-layout folder (or .zip of one) into `out`; return the manifest."""
    root = Path(params.download.path)
    if not root.exists():
        raise PipelineError(f"download.path: {root} does not exist")
    with tempfile.TemporaryDirectory() as scratch:
        if root.is_file():
            if root.suffix.lower() != ".zip":
                raise PipelineError(f"download.path: {root} is a file but not a .zip")
            extract_zip_safely(root, Path(scratch), params.download.max_extract_mb * 2**20)
            root = find_dataset_root(Path(scratch), label=str(params.download.path))
        images = list_local_images(root, params.base.classes)
        manifest = copy_images(images, out, source="local")
        settings = params.download
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


def fetch_synthetic(params: Params, out: Path, cache: Path | None = None) -> pd.DataFrame:
    """Generate the synthetic image set into `out`; return the manifest."""
    log.warning("download.source is 'synthetic': these are generated shapes, not skin lesions")
    rows = generate_synthetic(
        out,
        classes=params.base.classes,
        images_per_class=params.download.synthetic.images_per_class,
        size=params.base.image_size,
        seed=params.base.seed,
    )
    write_text_atomic(out / "SYNTHETIC_DATA.txt", SYNTHETIC_NOTICE)
    return pd.DataFrame(rows, columns=RAW_COLUMNS)


def fetch_isic(params: Params, out: Path, cache: Path) -> pd.DataFrame:
    """Fetch images from the ISIC Archive through the download cache into `out`; return the manifest."""
    settings = params.download
    client = ArchiveClient(
        settings.api_url,
        RetryPolicy(
            attempts=settings.retries,
            backoff_s=settings.backoff_s,
            max_backoff_s=settings.max_backoff_s,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
        ),
    )
    cache.mkdir(parents=True, exist_ok=True)
    remove_partial_files(cache)
    if settings.mode == "query":
        _probe(client, settings.api_url)
        wanted, found = search_archive(client, settings.queries, settings.max_per_class)
    else:
        wanted, found = read_isic_manifest(Path(settings.manifest), params.base.classes), {}
    records = cached_records(cache, wanted)
    missing = wanted[~wanted["isic_id"].isin(records)]
    if settings.mode == "manifest" and not missing.empty:
        _probe(client, settings.api_url)
    records |= download_all(client, cache, missing, found, settings.workers)
    metadata = place_images(wanted, records, cache, out, settings.max_side)
    write_csv_atomic(out / "metadata.csv", metadata.drop(columns="path"))
    write_text_atomic(out / "attribution.txt", attribution_text(metadata["attribution"]))
    for name in sorted(set(metadata["copyright_license"]) - {""}):
        write_text_atomic(out / "licenses" / f"{name}.txt", _license_text(client, cache, name))
    # The archive's attribution names the collection (the clinic or study) each image comes from.
    collection = metadata["attribution"].replace("", UNKNOWN)
    return metadata.assign(source="isic", collection=collection)[RAW_COLUMNS]


SOURCES: dict[str, Callable[[Params, Path, Path], pd.DataFrame]] = {
    "isic": fetch_isic,
    "local": fetch_local,
    "synthetic": fetch_synthetic,
}

ISIC_MANIFEST_SPLITS = tuple(OFFICIAL_SPLITS.values())
WANTED_COLUMNS = ["isic_id", "label", "split", "lesion_id", "diagnosis", "sha256"]


def read_isic_manifest(path: Path, classes: Sequence[str]) -> pd.DataFrame:
    """Rows of isic_id, label, split, lesion_id, diagnosis, sha256 from a manifest CSV, checked by line."""
    if not path.is_file():
        raise PipelineError(f"download.manifest: {path} not found")
    manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in ("isic_id", "label", "split") if column not in manifest.columns]
    if missing:
        raise PipelineError(f"download.manifest: {path} has no column(s) {', '.join(missing)}")
    for optional in WANTED_COLUMNS[3:]:
        if optional not in manifest.columns:
            manifest[optional] = ""
    if manifest.empty:
        raise PipelineError(f"download.manifest: {path} lists no images")
    for line, row in enumerate(manifest.itertuples(), start=2):
        if not row.isic_id.startswith("ISIC_"):
            raise PipelineError(f"{path}, line {line}: {row.isic_id!r} is not an ISIC id")
        if row.label not in classes:
            raise PipelineError(f"{path}, line {line}: unknown class {row.label!r}; see base.classes")
        if row.split not in ISIC_MANIFEST_SPLITS:
            raise PipelineError(f"{path}, line {line}: split {row.split!r} is not train or test")
    repeated = manifest.duplicated(["isic_id", "label", "split"])
    if repeated.any():
        first = manifest[repeated].iloc[0]
        raise PipelineError(f"download.manifest: {path} lists {first.isic_id} as {first.label!r} twice")
    return manifest[WANTED_COLUMNS].sort_values(["split", "label", "isic_id"], ignore_index=True)


def search_archive(
    client: ArchiveClient, queries: dict[str, str], max_per_class: int
) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Run one archive search per class; return the wanted rows (all train) and the records found."""
    rows, records = [], {}
    for label, query in sorted(queries.items()):
        try:
            found = list(client.search(query, max_per_class))
        except ArchiveError as err:
            raise PipelineError(f"download.queries[{label!r}]: search failed: {err}") from err
        if not found:
            raise PipelineError(f"download.queries[{label!r}]: the archive has no image for {query!r}")
        log.info("%s: %d images for %s", label, len(found), query)
        for record in found:
            records[record["isic_id"]] = record
            rows.append((record["isic_id"], label, "train", "", "", ""))
    wanted = pd.DataFrame(rows, columns=WANTED_COLUMNS)
    return wanted.sort_values(["split", "label", "isic_id"], ignore_index=True), records


def cached_records(cache: Path, wanted: pd.DataFrame) -> dict[str, dict]:
    """The records of the wanted images that the cache holds complete and verified (size and sha256)."""
    expected = dict(zip(wanted["isic_id"], wanted["sha256"], strict=True))
    records = {isic_id: read_cached(cache, isic_id, sha256) for isic_id, sha256 in expected.items()}
    return {isic_id: record for isic_id, record in records.items() if record is not None}


def download_all(
    client: ArchiveClient, cache: Path, wanted: pd.DataFrame, found: dict[str, dict], workers: int
) -> dict[str, dict]:
    """Fetch every wanted image into the cache with `workers` threads; fail naming every id not got."""
    expected = dict(zip(wanted["isic_id"], wanted["sha256"], strict=True))
    ids = sorted(expected)
    records: dict[str, dict] = {}
    failures: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {
            pool.submit(fetch_to_cache, client, cache, isic_id, found.get(isic_id), sha256): isic_id
            for isic_id, sha256 in sorted(expected.items())
        }
        with tqdm(total=len(ids), unit="img", desc="download", mininterval=1.0) as progress:
            for future in as_completed(futures):
                isic_id = futures[future]
                try:
                    records[isic_id] = future.result()
                except ArchiveError as err:
                    failures[isic_id] = str(err)
                progress.update()
    finally:
        # On Ctrl-C, drop the queued downloads instead of waiting for all of them.
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        details = "; ".join(f"{isic_id}: {failures[isic_id]}" for isic_id in sorted(failures))
        raise PipelineError(
            f"download: could not get {len(failures)} of {len(ids)} images "
            f"({', '.join(sorted(failures))}). {details}"
        )
    return records


def place_images(
    wanted: pd.DataFrame, records: dict[str, dict], cache: Path, out: Path, max_side: int
) -> pd.DataFrame:
    """Copy (or downsize) each cached image to out/<split>/<class>/<isic_id>.<ext>; return the metadata."""
    rows = []
    for row in wanted.itertuples():
        record = records[row.isic_id]
        source = cache / record["file"]
        relative = Path(row.split) / row.label / source.name
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        original_size, size = _copy_or_downsize(source, target, max_side)
        clinical = record.get("metadata", {}).get("clinical", {})
        rows.append(
            {
                "path": relative.as_posix(),
                "isic_id": row.isic_id,
                "label": row.label,
                "split": row.split,
                "copyright_license": record.get("copyright_license", ""),
                "attribution": record.get("attribution", ""),
                **{key: value for key, value in sorted(clinical.items()) if key.startswith("diagnosis")},
                "lesion_id": row.lesion_id or clinical.get("lesion_id") or "",
                "archive_lesion_id": clinical.get("lesion_id") or "",
                "diagnosis": row.diagnosis,
                "original_sha256": record["sha256"],
                "original_size": original_size,
                "size": size,
                "sha256": sha256_file(target),
            }
        )
    return pd.DataFrame(rows).fillna("")


def attribution_text(attributions: pd.Series) -> str:
    """The archive's attribution list: most images first, then by name, Anonymous last (as isic-cli)."""
    counts = Counter(attributions)
    ordered = sorted(counts, key=lambda name: (name == "Anonymous", -counts[name], name))
    return "\n\n".join(ordered) + "\n"


def _copy_or_downsize(source: Path, target: Path, max_side: int) -> tuple[str, str]:
    try:
        image = Image.open(source)
    except (UnidentifiedImageError, OSError):
        # Not an image after all: kept as it came, so that `split` rejects it with its reason.
        shutil.copyfile(source, target)
        return "", ""
    with image:
        original = f"{image.width}x{image.height}"
        if not max_side or max(image.size) <= max_side:
            shutil.copyfile(source, target)
            return original, original
        # Rotating per EXIF before resizing, because the re-encoded file carries no EXIF.
        upright = ImageOps.exif_transpose(image)
        upright.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        options = {"quality": 95} if image.format == "JPEG" else {}
        upright.save(target, format=image.format, icc_profile=image.info.get("icc_profile"), **options)
        return original, f"{upright.width}x{upright.height}"


def _probe(client: ArchiveClient, api_url: str) -> None:
    # Thousands of ids each retried against an archive that cannot be reached would take hours.
    try:
        client.probe()
    except ArchiveError as err:
        raise PipelineError(
            f"download.api_url: {api_url} does not answer ({err}); without internet, "
            "use download.source: local with a copy of the dataset"
        ) from err


def _license_text(client: ArchiveClient, cache: Path, name: str) -> str:
    cached = cache / "licenses" / f"{name}.txt"
    if not cached.is_file():
        try:
            write_text_atomic(cached, client.license_text(name))
        except ArchiveError as err:
            raise PipelineError(f"download: licence text {name} could not be fetched: {err}") from err
    return cached.read_text(encoding="utf-8")


def extract_zip_safely(archive_path: Path, dest: Path, max_bytes: int) -> None:
    """Extract a zip after refusing absolute paths, '..', links and oversized contents."""
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as err:
        raise PipelineError(f"download.path: {archive_path} is not a valid zip ({err})") from err
    with archive:
        total = 0
        for entry in archive.infolist():
            name = PurePosixPath(entry.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in entry.filename:
                raise PipelineError(f"download.path: {archive_path} has unsafe entry {entry.filename!r}")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise PipelineError(f"download.path: {archive_path} has symbolic link {entry.filename!r}")
            total += entry.file_size
            if total > max_bytes:
                raise PipelineError(
                    f"download.path: {archive_path} unpacks to more than "
                    f"download.max_extract_mb={max_bytes // 2**20} MiB"
                )
        archive.extractall(dest)


def find_dataset_root(folder: Path, label: str) -> Path:
    """The folder holding Train/: `folder` itself or its single subfolder (zips often wrap one)."""
    if (folder / "Train").is_dir():
        return folder
    subfolders = [child for child in folder.iterdir() if child.is_dir()]
    if len(subfolders) == 1 and (subfolders[0] / "Train").is_dir():
        return subfolders[0]
    raise PipelineError(f"download.path: {label} has no Train/ folder")


def list_local_images(root: Path, classes: Sequence[str]) -> list[_Image]:
    """List images under <root>/Train|Test/<class>/, checking class names against base.classes."""
    if not (root / "Train").is_dir():
        raise PipelineError(f"download.path: {root} has no Train/ folder")
    images: list[_Image] = []
    for folder_name, split in OFFICIAL_SPLITS.items():
        split_dir = root / folder_name
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(child for child in split_dir.iterdir() if child.is_dir()):
            # Unknown classes are kept here so that `split` rejects them with a reason in the report
            # (or stops, in strict mode) instead of them vanishing without trace.
            if class_dir.name not in classes:
                log.warning("%s: class not in base.classes; split will reject its images", class_dir)
            files = sorted(
                path
                for path in class_dir.iterdir()
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            )
            if not files:
                log.warning("%s: class folder has no images", class_dir)
            images.extend(_Image(path, class_dir.name, split) for path in files)
    missing = sorted(set(classes) - {image.label for image in images})
    if missing:
        log.warning("no images for class(es): %s", ", ".join(missing))
    return images


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
    if not path.is_file():
        raise PipelineError(f"download.metadata: {path} not found")
    metadata = pd.read_csv(path, dtype=str, keep_default_na=False)
    for needed in ("isic_id", *columns):
        if needed not in metadata.columns:
            raise PipelineError(f"download.metadata: {path} has no column {needed!r}")
    # An image filed under two classes has a row per class; its metadata is the image's, so one row,
    # unless the rows disagree, when no row can be trusted over the other.
    rows = metadata.drop_duplicates(["isic_id", *columns])
    clashing = rows.loc[rows["isic_id"].duplicated(), "isic_id"]
    if len(clashing):
        raise PipelineError(
            f"download.metadata: {path} gives {len(clashing)} isic_id(s) different {', '.join(columns)}"
            f" in different rows, e.g. {clashing.iloc[0]}"
        )
    return rows.set_index("isic_id")[list(columns)]


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
    skin = np.array([224, 172, 150]) + rng.normal(0, 12, size=(size, size, 3))
    image = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.75))
    radius = size * rng.uniform(0.2, 0.32)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], colour)
    return image


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
