"""A client for the ISIC Archive API v2 that fetches image files into a verified, resumable cache.

The request shapes follow the official isic-cli (isic_cli/io/http.py): `images/{isic_id}/`,
`images/search/?query=&limit=` with cursor pagination through `next`, the file at `files.full.url` of
`files.full.size` bytes, and licence texts at `zip-download/license-file/{license}/`. isic-cli is not
used as a library because it skips images whose download failed without saying so; here every failure
is retried and, if it persists, reported by id.

The cache holds, per image, `<isic_id>.json` (the archive's record plus the file's sha256) and the
file itself. Both are written through temp names and renamed only once the size (and a known sha256)
checks out, so the cache holds only complete files and a re-run fetches only what is missing.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from skin_lesion.files import process_alive, sha256_file, write_text_atomic

log = logging.getLogger("skin_lesion.data.isic_archive")


# Statuses that mean "try again later": rate limiting and server-side trouble.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


PAGE_SIZE = 100


CHUNK_BYTES = 1 << 20


USER_AGENT = "skin-lesion-mlops (+https://github.com/ImageMarkup/isic-cli compatible)"


class ArchiveError(Exception):
    """A request that failed for good: a 4xx answer, or every retry used up."""


class _TransientError(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After, in seconds, if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts per request, exponential backoff bounds and socket timeouts."""

    attempts: int
    backoff_s: float
    max_backoff_s: float
    connect_timeout_s: float
    read_timeout_s: float


class ArchiveClient:
    """Thread-safe client of one ISIC Archive API (one requests.Session per thread)."""

    def __init__(self, api_url: str, policy: RetryPolicy) -> None:
        self.api_url = api_url.rstrip("/") + "/"
        self.policy = policy
        self._local = threading.local()

    def probe(self) -> None:
        """Check that the API answers, trying a few times only, so that an offline run fails fast."""
        url = urljoin(self.api_url, "images/search/")
        self._retrying(self._get_json, url, {"limit": 1}, attempts=min(3, self.policy.attempts))

    def image(self, isic_id: str) -> dict[str, Any]:
        """The archive's record of one image (`GET images/{isic_id}/`)."""
        return self._retrying(self._get_json, urljoin(self.api_url, f"images/{isic_id}/"))

    def search(self, query: str, limit: int) -> Iterator[dict[str, Any]]:
        """Image records matching `query`, at most `limit`, following the `next` cursor until it is null."""
        url: str | None = urljoin(self.api_url, "images/search/")
        params: dict[str, Any] | None = {"query": query, "limit": min(limit, PAGE_SIZE)}
        given = 0
        while url and given < limit:
            page = self._retrying(self._get_json, url, params)
            for record in page["results"][: limit - given]:
                given += 1
                yield record
            # `next` already carries the query and the cursor.
            url, params = page.get("next"), None

    def license_text(self, license_name: str) -> str:
        """The text of one of the archive's licences (CC-0, CC-BY, CC-BY-NC)."""
        url = urljoin(self.api_url, f"zip-download/license-file/{license_name}/")
        return self._retrying(self._get_text, url)

    def download(self, record: dict[str, Any], dest: Path, expected_sha256: str = "") -> str:
        """Stream the image's full file to `dest` through a temp name; return its sha256."""
        return self._retrying(self._download_once, record, Path(dest), expected_sha256)

    def _retrying(self, call: Any, *args: Any, attempts: int | None = None) -> Any:
        attempts = attempts or self.policy.attempts
        retrying = Retrying(
            retry=retry_if_exception_type(_TransientError),
            stop=stop_after_attempt(attempts),
            wait=self._wait_s,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(call, *args)
        except _TransientError as err:
            raise ArchiveError(f"{err} (gave up after {attempts} attempts)") from err

    def _wait_s(self, state: RetryCallState) -> float:
        # Exponential backoff, unless the server said how long to wait: then at least that.
        backoff = min(self.policy.backoff_s * 2 ** (state.attempt_number - 1), self.policy.max_backoff_s)
        error = state.outcome.exception() if state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        return backoff if retry_after is None else max(backoff, retry_after)

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
            self._local.session = session
        return self._local.session

    def _get(self, url: str, params: dict[str, Any] | None = None, stream: bool = False) -> requests.Response:
        timeout = (self.policy.connect_timeout_s, self.policy.read_timeout_s)
        try:
            response = self._session().get(url, params=params, stream=stream, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise _TransientError(f"{url}: {type(err).__name__}") from err
        if response.status_code in RETRY_STATUSES:
            response.close()
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            raise _TransientError(f"{url}: HTTP {response.status_code}", retry_after)
        if not response.ok:
            response.close()
            raise ArchiveError(f"{url}: HTTP {response.status_code} {response.reason}")
        return response

    def _get_json(self, url: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self._get(url, params)
        try:
            return response.json()
        except requests.JSONDecodeError as err:
            raise _TransientError(f"{url}: incomplete JSON answer") from err

    def _get_text(self, url: str) -> str:
        return self._get(url).text

    def _download_once(self, record: dict[str, Any], dest: Path, expected_sha256: str) -> str:
        full = record["files"]["full"]
        url, size = full["url"], int(full["size"])
        digest = hashlib.sha256()
        written = 0
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part-{os.getpid()}-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as handle, self._get(url, stream=True) as response:
                for chunk in response.iter_content(CHUNK_BYTES):
                    handle.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
            if written != size:
                raise _TransientError(f"{url}: got {written} of {size} bytes")
            if expected_sha256 and digest.hexdigest() != expected_sha256:
                raise _TransientError(f"{url}: sha256 {digest.hexdigest()} is not the expected one")
            os.replace(tmp_name, dest)
        except requests.RequestException as err:
            # Raised while reading the body: the connection dropped mid-file.
            Path(tmp_name).unlink(missing_ok=True)
            lost = f"{url}: connection lost after {written} bytes ({type(err).__name__})"
            raise _TransientError(lost) from err
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return digest.hexdigest()


def file_suffix(record: dict[str, Any]) -> str:
    """The image file's extension, from its URL (the archive serves .jpg and .png)."""
    suffix = PurePosixPath(urlparse(record["files"]["full"]["url"]).path).suffix.lower()
    return suffix or ".jpg"


def fetch_to_cache(
    client: ArchiveClient, cache: Path, isic_id: str, record: dict[str, Any] | None, expected_sha256: str = ""
) -> dict[str, Any]:
    """Make sure `cache` holds the image's record and verified file; return the record (with sha256).

    `record` is the archive's record when a search already returned it, else None (fetched by id).
    """
    cached = read_cached(cache, isic_id, expected_sha256)
    if cached is not None:
        return cached
    if record is None:
        record = client.image(isic_id)
    _check_record(record, isic_id)
    image_path = cache / f"{isic_id}{file_suffix(record)}"
    sha256 = client.download(record, image_path, expected_sha256)
    record = {**record, "sha256": sha256, "file": image_path.name}
    write_text_atomic(cache / f"{isic_id}.json", json.dumps(record, sort_keys=True))
    return record


def read_cached(cache: Path, isic_id: str, expected_sha256: str = "") -> dict[str, Any] | None:
    """The cached record if its file is complete and unchanged (size and sha256), else None."""
    record_path = cache / f"{isic_id}.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    image_path = cache / record["file"]
    if not image_path.is_file() or image_path.stat().st_size != int(record["files"]["full"]["size"]):
        return None
    if expected_sha256 and record["sha256"] != expected_sha256:
        return None
    if sha256_file(image_path) != record["sha256"]:
        log.warning("%s changed on disk since it was downloaded; fetching it again", image_path)
        return None
    return record


def remove_partial_files(cache: Path) -> None:
    """Delete temp files that killed earlier runs left in the cache (not those of live processes)."""
    for partial in cache.glob(".*.part-*-*"):
        pid = int(partial.name.rsplit(".part-", 1)[1].split("-")[0])
        # Queued experiments share the cache, so another live run's temp files must be left alone.
        if not process_alive(pid):
            partial.unlink(missing_ok=True)


def _check_record(record: Any, isic_id: str) -> None:
    # A record without these fields cannot be downloaded; say so instead of a KeyError.
    try:
        ok = record["isic_id"] == isic_id and int(record["files"]["full"]["size"]) >= 0
        ok = ok and isinstance(record["files"]["full"]["url"], str)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ArchiveError(f"images/{isic_id}/: the archive's answer is not an image record of {isic_id}")


def _parse_retry_after(value: str | None) -> float | None:
    # Retry-After is either seconds or an HTTP date (RFC 9110, section 10.2.3).
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.info("retrying after attempt %d: %s", state.attempt_number, error)
