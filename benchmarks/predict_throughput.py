"""Prediction latency per image and throughput for a folder, through the registered pyfunc on CPU.

Uses the same path as `skin-lesion predict`: files read, checked, base64-encoded, and predicted
in batches by the registered model. Prints the figures.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/predict_throughput.py \
        --model models:/skin-lesion-classifier/1 --images ../shared/data/isic-9class/Train --count 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow

from skin_lesion.app.predict import collect_images, predict_files
from skin_lesion.tracking import configure_mlflow


def main() -> None:
    """Time single-image predictions and one folder-sized batch run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--count", type=int, default=500, help="images in the throughput run")
    parser.add_argument("--single", type=int, default=30, help="single-image predictions to time")
    args = parser.parse_args()
    configure_mlflow()
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(args.model)
    load_seconds = time.perf_counter() - started
    files = collect_images([args.images])[: args.count]

    predict_files(model, files[:1])  # warm-up: the first call traces the model
    latencies = []
    for path in files[: args.single]:
        started = time.perf_counter()
        predict_files(model, [path])
        latencies.append(1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    table = predict_files(model, files)
    seconds = time.perf_counter() - started

    print(f"model load: {load_seconds:.1f} s")
    print(
        f"single image latency over {len(latencies)} images: median {statistics.median(latencies):.1f} ms, "
        f"p90 {statistics.quantiles(latencies, n=10)[-1]:.1f} ms"
    )
    print(f"folder of {len(files)} images: {seconds:.1f} s, {len(files) / seconds:.1f} images/s")
    print(f"alerts: {int(table['melanoma_alert'].fillna(False).astype(bool).sum())}")


if __name__ == "__main__":
    main()
