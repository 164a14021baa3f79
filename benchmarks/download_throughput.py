"""Images per second of the isic download source against the stand-in archive on 127.0.0.1.

Runs the download for --images images with download.isic.workers 1 and 8, each with and without injected
faults (one fault on every --fault-every-th image, cycling 429 with Retry-After: 1, 503, a connection
dropped mid-body and a short body). The stand-in sleeps --latency-ms per file request, standing in for
the network round trip that makes parallel downloads pay off.

    python benchmarks/download_throughput.py --images 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from skin_lesion.data.sources.isic import fetch_isic
from skin_lesion.params import Params, load_params
from tests.isic_standin import StandinArchive, make_images, plan_faults, serve


def _run_once(params: Params, archive: StandinArchive, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as scratch, serve(archive) as api_url:
        manifest = Path(scratch) / "manifest.csv"
        ids = sorted(archive.images)
        labels = [params.base.classes[index % len(params.base.classes)] for index in range(len(ids))]
        pd.DataFrame({"isic_id": ids, "label": labels, "split": "train"}).to_csv(manifest, index=False)
        settings = {"api_url": api_url, "manifest": str(manifest), "workers": workers, "max_side": 0}
        isic = params.download.isic.model_copy(update=settings)
        started = time.perf_counter()
        rows = fetch_isic(isic, params.base.classes, Path(scratch) / "out", Path(scratch) / "cache")
        elapsed = time.perf_counter() - started
    assert len(rows) == len(ids)
    return elapsed, archive.requests["file"]


def main() -> None:
    """Print images/s for each configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--fault-every", type=int, default=10)
    args = parser.parse_args()
    params = load_params()
    # Short waits between retries so that the figures measure the client, not the configured backoff.
    params = params.model_copy(
        update={"download": params.download.model_copy(update={"backoff_s": 0.1, "max_backoff_s": 1.0})}
    )
    images = make_images(args.images, size=180)
    mean_kib = sum(map(len, images.values())) / len(images) / 1024
    print(f"{args.images} images of {mean_kib:.0f} KiB, {args.latency_ms:.0f} ms latency per file")
    for faults in (False, True):
        for workers in (1, 8):
            plan = plan_faults(sorted(images), args.fault_every) if faults else {}
            archive = StandinArchive(images=images, faults=plan, latency_s=args.latency_ms / 1000)
            elapsed, requests = _run_once(params, archive, workers)
            label = f"faults 1/{args.fault_every}" if faults else "no faults"
            print(
                f"workers {workers}, {label:>11}: {args.images / elapsed:7.1f} images/s "
                f"({elapsed:.1f} s, {requests} file requests)"
            )


if __name__ == "__main__":
    main()
