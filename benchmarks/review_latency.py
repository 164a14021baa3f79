r"""How fast the review page answers: upload to cards in a browser, and single-image scoring latency.

Starts `skin-lesion review`'s app in this process on 127.0.0.1 with the given model and a throwaway
feedback database, then
- in headless Chromium, picks 1 and then --batch images and times until every card is shown;
- over HTTP, scores one image per request --requests times in a row and prints p50 and p95.

    python benchmarks/review_latency.py --model "models:/skin-lesion-classifier/1" \
        --images ../shared/data/isic-9class/Train
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow
import uvicorn
from mlflow import MlflowClient
from playwright.sync_api import sync_playwright

from skin_lesion.app.feedback import FeedbackStore
from skin_lesion.app.promotion import describe_version
from skin_lesion.app.review import create_review_app
from skin_lesion.tracking import configure_mlflow
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, free_port


def time_upload_to_cards(url: str, files: list[Path]) -> float:
    """Seconds from picking `files` on the page until all their cards are shown."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        started = time.perf_counter()
        page.set_input_files("#files", [str(path) for path in files])
        page.wait_for_function(
            f"document.querySelectorAll('[data-testid=card]').length === {len(files)}", timeout=600_000
        )
        elapsed = time.perf_counter() - started
        browser.close()
    return elapsed


def single_image_latencies(url: str, image: Path, requests: int) -> list[float]:
    """Seconds per request of `requests` sequential one-image scorings."""
    body = json.dumps(
        {"images": [{"name": image.name, "data": base64.b64encode(image.read_bytes()).decode("ascii")}]}
    ).encode()
    latencies = []
    for _ in range(requests):
        request = urllib.request.Request(
            f"{url}/api/score", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    """Print upload-to-cards times and single-image latency percentiles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI")
    parser.add_argument(
        "--images", type=Path, required=True, help="folder of JPEG images (searched recursively)"
    )
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    configure_mlflow()
    files = sorted(args.images.rglob("*.jpg"))[: args.batch]
    model = mlflow.pyfunc.load_model(args.model)
    version = describe_version(MlflowClient(), args.model)
    with tempfile.TemporaryDirectory() as scratch:
        app = create_review_app(
            model, version, FeedbackStore(Path(scratch) / "review.db"), "http://127.0.0.1:5000"
        )
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        single_image_latencies(url, files[0], 2)  # warm-up: the first call builds the predict function
        one = time_upload_to_cards(url, files[:1])
        many = time_upload_to_cards(url, files)
        latencies = single_image_latencies(url, files[0], args.requests)
        server.should_exit = True
        thread.join(timeout=10)
    quantiles = statistics.quantiles(latencies, n=20)
    sys.stdout.write(
        f"model {args.model}\n"
        f"upload to cards, 1 image: {one:.2f} s\n"
        f"upload to cards, {len(files)} images: {many:.2f} s ({len(files) / many:.1f} images/s)\n"
        f"single-image scoring over HTTP, {args.requests} sequential requests:"
        f" p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {quantiles[18] * 1000:.0f} ms\n"
    )


if __name__ == "__main__":
    main()
