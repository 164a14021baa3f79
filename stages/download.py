"""Stage `download`: gather the labelled images into data/raw/ with a manifest of path, label, split, sha256.

Sources (`download.source`):
- isic: the ISIC Archive API, either every image of `download.isic.manifest` by id (its labels and splits
  kept) or one search per class (`download.isic.queries`); also writes metadata.csv, attribution.txt and the
  licence texts, as the archive asks of anyone who redistributes its images;
- local: a folder <root>/Train/<class>/*.jpg with an optional <root>/Test/<class>/*.jpg, or a .zip of one
  (the layout of the public 9-class ISIC dataset);
- synthetic: generated shapes for smoke runs and tests; not dermoscopic images.
Each source is a module of skin_lesion/data/sources/.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import pandas as pd

from skin_lesion.data.manifests import MANIFEST_NAME, under_folder
from skin_lesion.data.sources.isic import fetch_isic
from skin_lesion.data.sources.local import fetch_local
from skin_lesion.data.sources.synthetic import fetch_synthetic
from skin_lesion.files import atomic_output_dir, in_main_repo, write_csv_atomic
from skin_lesion.params import BaseParams, DownloadParams, load_params
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.download")


def main() -> None:
    """Read params, fetch the images from the configured source into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (data/raw)")
    parser.add_argument("--cache", type=Path, required=True, help="download cache folder (resumable)")
    args = parser.parse_args()
    params = load_params()
    cache = in_main_repo(args.cache)
    with stage_run("download", params.base, params.download):
        with atomic_output_dir(args.out) as tmp:
            manifest = fetch(params.download, params.base, tmp, cache)
            manifest = under_folder(manifest, args.out)
            write_csv_atomic(tmp / MANIFEST_NAME, manifest)
        counts = manifest.groupby("split").size().to_dict()
        mlflow.set_tag("data_source", params.download.source)
        mlflow.log_metrics({f"images_{split}": int(n) for split, n in counts.items()})
        mlflow.log_artifact(str(args.out / MANIFEST_NAME))
    log.info("%d images from source %r into %s", len(manifest), params.download.source, args.out)


def fetch(download: DownloadParams, base: BaseParams, out: Path, cache: Path) -> pd.DataFrame:
    """Write the chosen source's images into `out`; return the raw manifest."""
    if download.source == "isic":
        return fetch_isic(download.isic, base.classes, out, cache)
    if download.source == "local":
        return fetch_local(download.local, base.classes, out)
    return fetch_synthetic(download.synthetic, base.classes, base.image_size, base.seed, out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
