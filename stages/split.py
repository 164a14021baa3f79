"""Stage `split`: validate images, resolve duplicates, and split train/val/test with no leakage.

1. Validate: every image is decoded; unusable ones (not an image, truncated, empty, over
   split.max_pixels, under split.min_side) are rejected with a reason (split.on_bad_image: skip
   records them, error stops).
2. Duplicates: the same bytes, the same decoded pixels, or perceptual hashes at most
   split.near_duplicate_distance bits apart make a duplicate group (on the ISIC data, pairs 2 bits
   apart are re-encoded copies; from 4 bits on, some pairs are different lesions). A group whose members carry
   different labels is a label conflict, resolved by split.conflicts (by default, by the diagnosis in
   the images' metadata where it names exactly one of the labels). Each group then keeps one image:
   its official test member if it has one.
3. Groups: duplicates, photos of the same lesion (lesion_id from download) and look-alikes (hashes
   at most split.group_distance bits apart, mostly other photos of one lesion) form one group, and a
   group never straddles two splits; grouping itself removes nothing. The official Test folder, when
   there is one, stays the test set, and every train image sharing a group with a test image is removed.
4. Split: stratified by class and grouped (sklearn's StratifiedGroupKFold), seeded by base.seed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import pandas as pd

from skin_lesion.data.dedup import inspect_images
from skin_lesion.data.manifests import (
    MANIFEST_NAME,
    RAW_COLUMNS,
    REMOVED_COLUMNS,
    SKIPPED_COLUMNS,
    SKIPPED_NAME,
    SPLIT_COLUMNS,
)
from skin_lesion.data.splitting import class_counts_figure, render_report, split_dataset
from skin_lesion.files import (
    atomic_output_dir,
    read_manifest,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from skin_lesion.params import load_params
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.split")


def main() -> None:
    """Read the raw manifest, validate and split it, write the manifests and the data report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="download output (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/split)")
    parser.add_argument("--report", type=Path, required=True, help="data report JSON")
    parser.add_argument("--report-md", type=Path, required=True, help="readable data report")
    parser.add_argument("--counts", type=Path, required=True, help="folder of class-count plots")
    args = parser.parse_args()
    params = load_params()

    manifest = read_manifest(args.raw / MANIFEST_NAME, RAW_COLUMNS)
    # Only the local source skips entries of a dataset folder (links out of it, other files).
    skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if (args.raw / SKIPPED_NAME).is_file():
        skipped = read_manifest(args.raw / SKIPPED_NAME, SKIPPED_COLUMNS)

    with stage_run("split", params.base, params.split):
        features = inspect_images(manifest["path"], params.split.max_pixels, params.split.min_side)
        result = split_dataset(
            pd.concat([manifest, features], axis=1), params.base.classes, params.split, params.base.seed
        )
        with atomic_output_dir(args.out) as tmp:
            for name, frame in result.splits.items():
                write_csv_atomic(tmp / f"{name}.csv", frame[SPLIT_COLUMNS])
            write_csv_atomic(tmp / "removed.csv", result.removed[REMOVED_COLUMNS])
        result.report["files_skipped"] = len(skipped)
        write_json_atomic(args.report, result.report)
        write_text_atomic(args.report_md, render_report(result, skipped))
        with atomic_output_dir(args.counts) as tmp:
            for name, counts in result.report["class_counts"].items():
                rows = pd.DataFrame({"label": list(counts), "count": list(counts.values())})
                write_csv_atomic(tmp / f"{name}.csv", rows)
            class_counts_figure(result.report["class_counts"]).savefig(tmp / "class_counts.png", dpi=100)
        mlflow.log_metrics({key: value for key, value in result.report.items() if isinstance(value, int)})
        mlflow.log_dict(result.report, "data_report.json")
        for path in (args.report_md, args.out / "removed.csv"):
            mlflow.log_artifact(str(path))
    for warning in result.report["provenance"]["warnings"]:
        log.warning("provenance: %s", warning)
    log.info(
        "split: %s; removed %d (report: %s)",
        ", ".join(f"{name} {len(frame)}" for name, frame in result.splits.items()),
        len(result.removed),
        args.report_md,
    )


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
