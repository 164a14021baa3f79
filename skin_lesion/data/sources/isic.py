"""Source `isic`: images from the ISIC Archive, by manifest (ids, labels, splits) or one search per class.

Also writes metadata.csv, attribution.txt and the licence texts, as the archive asks of anyone who
redistributes its images.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from skin_lesion.errors import PipelineError
from skin_lesion.files import read_table, sha256_file, write_csv_atomic, write_text_atomic
from skin_lesion.data.isic_archive import (
    ArchiveClient,
    ArchiveError,
    RetryPolicy,
    fetch_to_cache,
    read_cached,
    remove_partial_files,
)
from skin_lesion.data.manifests import OFFICIAL_SPLITS, RAW_COLUMNS
from skin_lesion.params import IsicParams
from skin_lesion.data.provenance import UNKNOWN

log = logging.getLogger("skin_lesion.data.sources.isic")


def fetch_isic(settings: IsicParams, classes: Sequence[str], out: Path, cache: Path) -> pd.DataFrame:
    """Fetch images from the ISIC Archive through the download cache into `out`; return the manifest."""
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
        wanted, found = read_isic_manifest(Path(settings.manifest), classes), {}
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


ISIC_MANIFEST_SPLITS = tuple(OFFICIAL_SPLITS.values())


WANTED_COLUMNS = ["isic_id", "label", "split", "lesion_id", "diagnosis", "sha256"]
DOWNSIZED_JPEG_QUALITY = 95  # re-encoding a downsized original; high enough to add no visible artefacts


def read_isic_manifest(path: Path, classes: Sequence[str]) -> pd.DataFrame:
    """Rows of isic_id, label, split, lesion_id, diagnosis, sha256 from a manifest CSV, checked by line."""
    manifest = read_table(path, ["isic_id", "label", "split"], what="download.isic.manifest")
    for optional in WANTED_COLUMNS[3:]:
        if optional not in manifest.columns:
            manifest[optional] = ""
    if manifest.empty:
        raise PipelineError(f"download.isic.manifest: {path} lists no images")
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
        raise PipelineError(f"download.isic.manifest: {path} lists {first.isic_id} as {first.label!r} twice")
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
            raise PipelineError(f"download.isic.queries[{label!r}]: search failed: {err}") from err
        if not found:
            raise PipelineError(f"download.isic.queries[{label!r}]: the archive has no image for {query!r}")
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
        # disable=None: a bar on a terminal, nothing in a log file (one line per update would flood it).
        with tqdm(total=len(ids), unit="img", desc="download", mininterval=1.0, disable=None) as progress:
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
        options = {"quality": DOWNSIZED_JPEG_QUALITY} if image.format == "JPEG" else {}
        upright.save(target, format=image.format, icc_profile=image.info.get("icc_profile"), **options)
        return original, f"{upright.width}x{upright.height}"


def _probe(client: ArchiveClient, api_url: str) -> None:
    # Thousands of ids each retried against an archive that cannot be reached would take hours.
    try:
        client.probe()
    except ArchiveError as err:
        raise PipelineError(
            f"download.isic.api_url: {api_url} does not answer ({err}); without internet, use"
            " download.source: local with a copy of the dataset, or download.source: synthetic for a"
            " smoke run on generated images"
        ) from err


def _license_text(client: ArchiveClient, cache: Path, name: str) -> str:
    cached = cache / "licenses" / f"{name}.txt"
    if not cached.is_file():
        try:
            write_text_atomic(cached, client.license_text(name))
        except ArchiveError as err:
            raise PipelineError(f"download: licence text {name} could not be fetched: {err}") from err
    return cached.read_text(encoding="utf-8")
