"""A stand-in ISIC Archive API on 127.0.0.1: the archive's JSON shapes, generated images, injected faults.

Used by the download tests and benchmarks/download_throughput.py; it never touches the internet.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np
from PIL import Image

API_PREFIX = "/api/v2/"
# Faults a file request can meet, consumed one per request, in order:
#   "429": rate limited, with Retry-After: 1;  "503": server error;
#   "drop": the connection closes halfway through the body;
#   "short": a complete response whose body is shorter than files.full.size.
FAULTS = ("429", "503", "drop", "short")
LICENSES = ("CC-0", "CC-BY", "CC-BY-NC")


@dataclass
class StandinArchive:
    """What the stand-in serves: image bytes by id, search results by query, and faults to inject."""

    images: dict[str, bytes]
    diagnoses: dict[str, str] = field(default_factory=dict)
    searches: dict[str, list[str]] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    page_size: int = 100
    latency_s: float = 0.0
    requests: Counter = field(default_factory=Counter)
    files_requested: list[str] = field(default_factory=list)  # image ids, in the order asked for
    base_url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, isic_id: str) -> dict:
        """The archive's JSON record of one image."""
        number = int(isic_id.split("_")[1])
        suffix = ".png" if self.images[isic_id].startswith(b"\x89PNG") else ".jpg"
        size = len(self.images[isic_id])
        return {
            "isic_id": isic_id,
            "public": True,
            "copyright_license": LICENSES[number % len(LICENSES)],
            "attribution": "Anonymous" if number % 5 == 0 else f"Hospital {number % 3}",
            "metadata": {
                "acquisition": {"image_type": "dermoscopic"},
                "clinical": {
                    "diagnosis_1": "Benign",
                    "diagnosis_3": self.diagnoses.get(isic_id, "Nevus"),
                    "lesion_id": f"IL_{number // 2:07d}",
                },
            },
            "files": {
                "full": {"url": f"{self.base_url}/files/{isic_id}{suffix}", "size": size},
                "thumbnail_256": {"url": f"{self.base_url}/thumbs/{isic_id}.jpg", "size": 0},
            },
        }

    def next_fault(self, isic_id: str) -> str | None:
        """Pop the next fault planned for this image's file, if any."""
        with self._lock:
            planned = self.faults.get(isic_id)
            return planned.pop(0) if planned else None

    def count(self, kind: str) -> None:
        """Count one request of a kind (record, search, file, license)."""
        with self._lock:
            self.requests[kind] += 1


def make_images(count: int, size: int = 64, start: int = 1) -> dict[str, bytes]:
    """`count` distinct JPEGs keyed by ISIC id (ISIC_0000001, ...)."""
    images = {}
    for number in range(start, start + count):
        rng = np.random.default_rng(number)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images[f"ISIC_{number:07d}"] = buffer.getvalue()
    return images


class _Handler(BaseHTTPRequestHandler):
    archive: StandinArchive
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm on, each response would
    # wait for the client's delayed ACK (about 40 ms), which real servers do not.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        """Route one GET like the archive would."""
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (tests kill it on purpose)

    def _route(self) -> None:
        url = urlparse(self.path)
        path = url.path
        if path.startswith("/files/"):
            self._file(path.removeprefix("/files/").split(".")[0])
        elif path == API_PREFIX + "images/search/":
            self._search(parse_qs(url.query))
        elif path.startswith(API_PREFIX + "images/"):
            self._record(path.removeprefix(API_PREFIX + "images/").strip("/"))
        elif path.startswith(API_PREFIX + "zip-download/license-file/"):
            self.archive.count("license")
            name = path.removeprefix(API_PREFIX + "zip-download/license-file/").strip("/")
            self._send(200, f"{name} licence text\n".encode(), "text/plain")
        else:
            self._send(404, b'{"detail": "Not found."}')

    def _record(self, isic_id: str) -> None:
        self.archive.count("record")
        if isic_id not in self.archive.images or isic_id in self.archive.missing:
            self._send(404, b'{"detail": "Not found."}')
            return
        self._send(200, json.dumps(self.archive.record(isic_id)).encode())

    def _search(self, query: dict[str, list[str]]) -> None:
        self.archive.count("search")
        text = query.get("query", [""])[0]
        ids = self.archive.searches.get(text, sorted(self.archive.images) if not text else [])
        limit = min(int(query.get("limit", ["100"])[0]), self.archive.page_size)
        cursor = int(query.get("cursor", ["0"])[0])
        page = ids[cursor : cursor + limit]
        following = None
        if cursor + limit < len(ids):
            params = urlencode({"query": text, "limit": limit, "cursor": cursor + limit})
            following = f"{self.archive.base_url}{API_PREFIX}images/search/?{params}"
        body = {
            "count": len(ids),
            "next": following,
            "previous": None,
            "results": [self.archive.record(isic_id) for isic_id in page],
        }
        self._send(200, json.dumps(body).encode())

    def _file(self, isic_id: str) -> None:
        self.archive.count("file")
        with self.archive._lock:
            self.archive.files_requested.append(isic_id)
        if self.archive.latency_s:
            time.sleep(self.archive.latency_s)
        body = self.archive.images.get(isic_id)
        if body is None:
            self._send(404, b"")
            return
        fault = self.archive.next_fault(isic_id)
        if fault == "429":
            self._send(429, b"", headers={"Retry-After": "1"})
        elif fault == "503":
            self._send(503, b"")
        elif fault == "drop":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            # Close the socket under the client, as a dropped connection would.
            self.connection.shutdown(2)
        elif fault == "short":
            self._send(200, body[: len(body) // 2], "image/jpeg")
        else:
            self._send(200, body, "image/png" if body.startswith(b"\x89PNG") else "image/jpeg")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve(archive: StandinArchive) -> Iterator[str]:
    """Serve `archive` on a free port of 127.0.0.1; yield the API URL (…/api/v2)."""
    handler = type("Handler", (_Handler,), {"archive": archive})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    archive.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield archive.base_url + API_PREFIX.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()


def plan_faults(ids: list[str], every: int) -> dict[str, list[str]]:
    """One fault of each kind in turn on every `every`-th image (for benchmarks)."""
    plan: dict[str, list[str]] = defaultdict(list)
    for position, isic_id in enumerate(ids[::every]):
        plan[isic_id].append(FAULTS[position % len(FAULTS)])
    return dict(plan)
