"""download.source=isic against a stand-in ISIC Archive on 127.0.0.1 that injects faults."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from skin_lesion.data.isic_archive import (
    ArchiveClient,
    ArchiveError,
    RetryPolicy,
    fetch_to_cache,
    remove_partial_files,
)
from skin_lesion.data.manifests import RAW_COLUMNS
from skin_lesion.data.sources.isic import read_isic_manifest
from skin_lesion.errors import PipelineError
from tests.conftest import CLASSES, as_params, fetch_isic_source, run_stage, small_params
from tests.isic_standin import StandinArchive, make_images, serve

FAST_RETRIES = {"retries": 4, "backoff_s": 0.01, "max_backoff_s": 0.05, "read_timeout_s": 5}


def _write_manifest(path: Path, ids: list[str], split: str = "train") -> Path:
    rows = [(isic_id, CLASSES[index % len(CLASSES)], split) for index, isic_id in enumerate(ids)]
    pd.DataFrame(rows, columns=["isic_id", "label", "split"]).to_csv(path, index=False)
    return path


def _isic_params(api_url: str, manifest: Path, **download: object):
    settings = {"source": "isic", "api_url": api_url, "manifest": str(manifest), "max_side": 0}
    return as_params(small_params(download={**settings, **FAST_RETRIES, **download}))


def _files_by_id(out: Path) -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in out.rglob("ISIC_*.jpg")}


def test_manifest_mode_fetches_every_image_byte_identical(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(12))
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        rows = fetch_isic_source(
            _isic_params(api_url, manifest, workers=4), tmp_path / "out", tmp_path / "cache"
        )
    assert list(rows.columns) == RAW_COLUMNS
    assert _files_by_id(tmp_path / "out") == archive.images
    first = rows.iloc[0]
    assert first["path"] == f"train/{first['label']}/{first['isic_id']}.jpg"


def test_manifest_labels_and_splits_are_kept(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(2))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "isic_id,label,split,lesion_id,diagnosis\n"
        "ISIC_0000001,melanoma,train,HAM_1,nv\nISIC_0000001,nevus,test,HAM_1,nv\nISIC_0000002,nevus,test,,\n"
    )
    with serve(archive) as api_url:
        rows = fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
    columns = ["isic_id", "label", "split", "lesion_id", "diagnosis"]
    assert sorted(rows[columns].itertuples(index=False, name=None)) == [
        ("ISIC_0000001", "melanoma", "train", "HAM_1", "nv"),
        ("ISIC_0000001", "nevus", "test", "HAM_1", "nv"),
        # No lesion id in the manifest: the archive's own lesion id is used.
        ("ISIC_0000002", "nevus", "test", "IL_0000001", ""),
    ]
    assert (tmp_path / "out" / "test" / "nevus" / "ISIC_0000001.jpg").is_file()
    assert archive.requests["file"] == 2


def test_metadata_attribution_and_licenses_are_written(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(6))
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
    metadata = pd.read_csv(tmp_path / "out" / "metadata.csv", dtype=str, keep_default_na=False)
    for column in ("isic_id", "label", "split", "copyright_license", "attribution", "diagnosis_1"):
        assert column in metadata.columns
    assert {"diagnosis_3", "lesion_id", "sha256", "original_size"} <= set(metadata.columns)
    assert set(metadata["diagnosis_3"]) == {"Nevus"}
    # Ids 1-6: Hospital 0 and 1 have two images each (a tie, broken by name), Hospital 2 one.
    assert (tmp_path / "out" / "attribution.txt").read_text().split("\n\n") == [
        "Hospital 0",
        "Hospital 1",
        "Hospital 2",
        "Anonymous\n",
    ]
    licenses = sorted(path.name for path in (tmp_path / "out" / "licenses").iterdir())
    assert licenses == ["CC-0.txt", "CC-BY-NC.txt", "CC-BY.txt"]


@pytest.mark.parametrize("fault", ["503", "drop", "short"])
def test_transient_fault_is_retried_to_an_identical_file(tmp_path: Path, fault: str) -> None:
    archive = StandinArchive(images=make_images(3), faults={"ISIC_0000002": [fault, fault]})
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        fetch_isic_source(_isic_params(api_url, manifest, workers=2), tmp_path / "out", tmp_path / "cache")
    assert _files_by_id(tmp_path / "out") == archive.images
    assert archive.requests["file"] == 3 + 2


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(1), faults={"ISIC_0000001": ["429"]})
    manifest = _write_manifest(tmp_path / "manifest.csv", ["ISIC_0000001"])
    with serve(archive) as api_url:
        started = time.monotonic()
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
        waited = time.monotonic() - started
    assert waited >= 1.0  # the stand-in asks for Retry-After: 1; the backoff alone is 0.01 s
    assert _files_by_id(tmp_path / "out") == archive.images


def _fetch_twice(tmp_path: Path, archive: StandinArchive, between: Callable[[Path], None]) -> Counter:
    """Fetch every image of `archive` into first/, call `between` on the cache, fetch again into
    second/ with the same cache; the archive's request counts after the first fetch."""
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        params = _isic_params(api_url, manifest)
        fetch_isic_source(params, tmp_path / "first", tmp_path / "cache")
        after_first = archive.requests.copy()
        between(tmp_path / "cache")
        fetch_isic_source(params, tmp_path / "second", tmp_path / "cache")
    assert _files_by_id(tmp_path / "second") == archive.images
    return after_first


def test_rerun_downloads_nothing(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(5))
    after_first = _fetch_twice(tmp_path, archive, between=lambda cache: None)
    assert archive.requests == after_first


def test_corrupted_cache_file_is_fetched_again(tmp_path: Path) -> None:
    def corrupt(cache: Path) -> None:
        cached = cache / "ISIC_0000001.jpg"
        cached.write_bytes(bytes(reversed(cached.read_bytes())))  # same size, other bytes

    archive = StandinArchive(images=make_images(2))
    _fetch_twice(tmp_path, archive, between=corrupt)
    assert archive.requests["file"] == 3


def test_permanently_missing_image_is_named(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(3), missing={"ISIC_0000002"})
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url, pytest.raises(PipelineError) as raised:
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
    message = str(raised.value)
    assert message.startswith("download: could not get 1 of 3 images (ISIC_0000002)")
    assert "HTTP 404" in message
    assert "\n" not in message


def test_fault_that_never_clears_is_named_after_the_retries(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(2), faults={"ISIC_0000001": ["503"] * 10})
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url, pytest.raises(PipelineError, match=r"\(ISIC_0000001\).*gave up after 4"):
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
    assert archive.requests["file"] == 4 + 1


def test_no_partial_file_is_left_after_a_failure(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(2), faults={"ISIC_0000001": ["drop"] * 10})
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url, pytest.raises(PipelineError):
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
        "ISIC_0000002.jpg",
        "ISIC_0000002.json",
    ]


def test_partial_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    stale = tmp_path / f".ISIC_0000001.jpg.part-{int(dead.stdout)}-abc"
    live = tmp_path / f".ISIC_0000002.jpg.part-{os.getpid()}-abc"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    remove_partial_files(tmp_path)
    assert not stale.exists()
    assert live.exists()


def test_query_mode_follows_pagination_up_to_max_per_class(tmp_path: Path) -> None:
    images = make_images(9)
    ids = sorted(images)
    queries = {label: f'diagnosis_3:"{label}"' for label in CLASSES}
    archive = StandinArchive(
        images=images,
        searches={queries[label]: ids[index * 3 : index * 3 + 3] for index, label in enumerate(CLASSES)},
        page_size=2,
    )
    with serve(archive) as api_url:
        params = _isic_params(
            api_url, tmp_path / "unused.csv", mode="query", queries=queries, max_per_class=3
        )
        rows = fetch_isic_source(params, tmp_path / "out", tmp_path / "cache")
    assert len(rows) == 9
    assert set(rows["split"]) == {"train"}
    assert rows.groupby("label").size().to_dict() == dict.fromkeys(CLASSES, 3)
    assert archive.requests["search"] == 1 + 6  # a probe, then two pages of two and one per class
    assert archive.requests["record"] == 0  # search results already carry the file URLs
    assert _files_by_id(tmp_path / "out") == images


def test_query_without_results_is_named(tmp_path: Path) -> None:
    queries = {label: f'diagnosis_3:"{label}"' for label in CLASSES}
    archive = StandinArchive(images=make_images(1), searches={queries["melanoma"]: ["ISIC_0000001"]})
    with serve(archive) as api_url:
        params = _isic_params(api_url, tmp_path / "unused.csv", mode="query", queries=queries)
        with pytest.raises(PipelineError, match=r"isic.queries\['nevus'\]: the archive has no image"):
            fetch_isic_source(params, tmp_path / "out", tmp_path / "cache")


def test_max_side_downsizes_and_records_sizes(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(2, size=100))
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        fetch_isic_source(_isic_params(api_url, manifest, max_side=40), tmp_path / "out", tmp_path / "cache")
    for path in (tmp_path / "out").rglob("ISIC_*.jpg"):
        with Image.open(path) as image:
            assert image.size == (40, 40)
    metadata = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert set(metadata["original_size"]) == {"100x100"}
    assert set(metadata["size"]) == {"40x40"}


def test_archive_file_that_is_not_an_image_is_kept_for_split_to_reject(tmp_path: Path) -> None:
    archive = StandinArchive(images={**make_images(1), "ISIC_0000002": b"<html>maintenance</html>"})
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        rows = fetch_isic_source(
            _isic_params(api_url, manifest, max_side=40), tmp_path / "out", tmp_path / "cache"
        )
    assert len(rows) == 2
    stored = tmp_path / "out" / rows.set_index("isic_id").loc["ISIC_0000002", "path"]
    assert stored.read_bytes() == b"<html>maintenance</html>"


def test_downsizing_is_deterministic(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(3, size=100))
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        params = _isic_params(api_url, manifest, max_side=50)
        first = fetch_isic_source(params, tmp_path / "a", tmp_path / "cache-a")
        second = fetch_isic_source(params, tmp_path / "b", tmp_path / "cache-b")
    assert first["sha256"].tolist() == second["sha256"].tolist()


def test_expected_sha256_mismatch_is_an_error(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(1))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"isic_id,label,split,sha256\nISIC_0000001,melanoma,train,{'0' * 64}\n")
    with serve(archive) as api_url, pytest.raises(PipelineError, match=r"ISIC_0000001.*not the expected one"):
        fetch_isic_source(_isic_params(api_url, manifest), tmp_path / "out", tmp_path / "cache")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("isic_id,label\n", r"has no column\(s\) split"),
        ("isic_id,label,split\n", r"lists no images"),
        ("isic_id,label,split\nISIC_1,melanom,train\n", r"line 2: unknown class 'melanom'"),
        ("isic_id,label,split\nISIC_1,melanoma,val\n", r"line 2: split 'val' is not train or test"),
        ("isic_id,label,split\nIMG_1,melanoma,train\n", r"line 2: 'IMG_1' is not an ISIC id"),
        ("isic_id,label,split\nISIC_1,nevus,train\nISIC_1,nevus,train\n", r"lists ISIC_1 as 'nevus' twice"),
    ],
)
def test_bad_manifest_is_named(tmp_path: Path, content: str, message: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    with pytest.raises(PipelineError, match=message):
        read_isic_manifest(manifest, CLASSES)


def test_archive_answering_another_record_is_an_error(tmp_path: Path) -> None:
    client = ArchiveClient("http://127.0.0.1:9", RetryPolicy(1, 0, 0, 1, 1))
    record = {"isic_id": "ISIC_0000009", "files": {"full": {"url": "http://x/a.jpg", "size": 1}}}
    with pytest.raises(ArchiveError, match="not an image record of ISIC_0000001"):
        fetch_to_cache(client, tmp_path, "ISIC_0000001", record)


def test_unreachable_archive_fails_after_retries(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "manifest.csv", ["ISIC_0000001"])
    params = _isic_params("http://127.0.0.1:9/api/v2", manifest, connect_timeout_s=0.5)
    with pytest.raises(PipelineError, match=r"isic.api_url: http://127.0.0.1:9/api/v2 does not answer"):
        fetch_isic_source(params, tmp_path / "out", tmp_path / "cache")


def test_stage_cli_downloads_into_data_raw(tmp_path: Path) -> None:
    archive = StandinArchive(images=make_images(3))
    manifest = _write_manifest(tmp_path / "manifest.csv", sorted(archive.images))
    with serve(archive) as api_url:
        params = small_params(download={"source": "isic", "api_url": api_url, "manifest": str(manifest)})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        result = run_stage(tmp_path, "download", "--out", "data/raw", "--cache", "data/cache/isic")
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(tmp_path / "data" / "raw" / "manifest.csv")
    assert written["path"].str.startswith("data/raw/train/").all()
    for path in written["path"]:
        assert Image.open(io.BytesIO((tmp_path / path).read_bytes())).size == (64, 64)
