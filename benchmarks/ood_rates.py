"""How often a registered version flags images as unlike its training data, by kind of image.

Scores, through the registered pyfunc, the train, val and test splits of a pipeline workspace, the
test split under the acquisition stress transforms, generated shapes, noise and a flat skin tone, and
prints the share flagged and the median OOD distance of each.

    python benchmarks/ood_rates.py --model "models:/skin-lesion-classifier/1" --workspace .
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow
import numpy as np
import pandas as pd

from skin_lesion.data.sources.synthetic import _draw_synthetic
from skin_lesion.evaluation.stress import TRANSFORMS
from skin_lesion.images import load_images
from skin_lesion.tracking import configure_mlflow

STRENGTHS = {
    "colour_cast": [0.3],
    "darken": [0.45, 0.7],
    "blur": [2.0, 4.0],
    "jpeg_quality": [10],
    "resolution": [0.25],
}
SKIN_TONE = (224, 172, 150)


def main() -> None:
    """Print the flagged share per image set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI")
    parser.add_argument("--workspace", type=Path, default=Path(), help="pipeline folder holding data/split")
    args = parser.parse_args()
    configure_mlflow()
    classifier = mlflow.pyfunc.load_model(args.model).unwrap_python_model()
    size = int(classifier.config["image_size"])
    sys.stdout.write(f"OOD threshold {classifier.ood.threshold:.1f}\n")

    def report(name: str, images: np.ndarray) -> None:
        frame = classifier.score(images)
        flagged, median = frame["unlike_training"].mean(), frame["ood_score"].median()
        sys.stdout.write(f"{name:<36} n={len(images):5d}  flagged {flagged:6.1%}  median {median:6.1f}\n")

    for split in ("train", "val", "test"):
        rows = pd.read_csv(args.workspace / "data" / "split" / f"{split}.csv")
        images = load_images([args.workspace / path for path in rows["path"]], size)
        report(split, images)
    for name, strengths in STRENGTHS.items():
        for strength in strengths:
            report(f"test, {name} {strength}", TRANSFORMS[name](images, strength))
    rng = np.random.default_rng(0)
    shapes = [
        np.asarray(_draw_synthetic(rng, rng.random(), int(rng.integers(0, 3)), size)) for _ in range(200)
    ]
    report("generated shapes", np.stack(shapes))
    report("uniform noise", rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8))
    report("flat skin tone", np.tile(np.array(SKIN_TONE, np.uint8), (20, size, size, 1)))


if __name__ == "__main__":
    main()
