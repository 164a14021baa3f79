"""Stage `rebalance`: Augmentor brings every class of the train split up to rebalance.samples_per_class."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow

from skin_lesion.data.manifests import MANIFEST_NAME, SPLIT_COLUMNS, under_folder
from skin_lesion.data.rebalancing import find_sparse_classes, rebalance
from skin_lesion.files import atomic_output_dir, read_manifest, write_csv_atomic
from skin_lesion.params import load_params
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.rebalance")


def main() -> None:
    """Read the train split, write augmented images and their manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="train split manifest")
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/rebalanced)")
    args = parser.parse_args()
    params = load_params()
    train = read_manifest(args.train, SPLIT_COLUMNS)

    sparse = find_sparse_classes(train, params.rebalance.min_source_images)
    for label, count in sparse.items():
        log.warning(
            "class %r has only %d training image(s) (rebalance.min_source_images: %d);"
            " its augmented images are all copies of them, so the model learns it from very few lesions",
            label,
            count,
            params.rebalance.min_source_images,
        )

    with stage_run("rebalance", params.base, params.rebalance):
        with atomic_output_dir(args.out) as tmp:
            manifest = rebalance(
                train,
                classes=params.base.classes,
                samples_per_class=params.rebalance.samples_per_class,
                operations=params.rebalance.operations,
                jpeg_quality=params.rebalance.jpeg_quality,
                seed=params.base.seed,
                out=tmp,
            )
            manifest = under_folder(manifest, args.out)
            write_csv_atomic(tmp / MANIFEST_NAME, manifest)
        added = manifest.groupby("label").size()
        mlflow.log_metrics({"images_added": len(manifest), "sparse_classes": len(sparse)})
        mlflow.log_dict({label: int(added.get(label, 0)) for label in params.base.classes}, "added.json")
    log.info("rebalance: added %d augmented training images", len(manifest))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
