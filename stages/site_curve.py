"""Stage `site_curve`: does more labelling pay? The site's learning curve.

For each size of site_curve.sizes, site_curve.repeats random subsamples of the site's images (whole
lesions): the probe learns from the training split and the subsample, and is judged on the site
images it did not learn, beside the probe without any site image on the same images
(skin_lesion/evaluation/sites.learning_curve). Works on the train stage's embeddings, like the site stage.
Writes every run, the mean per size (a DVC plot) and a PNG; empty without a site.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from skin_lesion.evaluation.plots import write_learning_curve
from skin_lesion.evaluation.sites import (
    CURVE_COLUMNS,
    SITE_IMAGE_COLUMNS,
    learning_curve,
    load_probe_inputs,
    site_fitter,
)
from skin_lesion.files import atomic_output_dir, read_table, write_csv_atomic
from skin_lesion.params import load_params
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.site_curve")


def main() -> None:
    """Refit the probe on subsamples of the site and judge each on the rest."""
    args = parse_args()
    params = load_params()
    base, site, settings = params.base, params.site, params.site_curve
    rows = read_table(args.site_images, SITE_IMAGE_COLUMNS, what="site images (run the train stage)")
    with stage_run("site_curve", base, settings):
        if not site.name or rows.empty or not settings.repeats:
            write_outputs(args.out, pd.DataFrame(columns=CURVE_COLUMNS), site.name)
            return
        inputs, validation = load_probe_inputs(args.probe_inputs)
        train = params.train
        curve = learning_curve(
            inputs,
            site_fitter(inputs, len(base.classes), train.probe_c, train.class_weight, base.seed),
            (rows["target"] == base.melanoma_class).to_numpy(),
            rows["group"].to_numpy(),
            site,
            settings.sizes,
            settings.repeats,
            params.evaluate.target_sensitivity,
            validation,
            base.classes.index(base.melanoma_class),
            base.seed,
        )
        write_outputs(args.out, curve, site.name)
    log.info("site %s: learning curve of %d runs in %s", site.name, len(curve), args.out / "curve.png")


def write_outputs(out: Path, curve: pd.DataFrame, site: str) -> None:
    """Every run, the mean per size, and the figure, as one folder."""
    means = curve.drop(columns=["repeat", "threshold_source"]).groupby("site_images", as_index=False).mean()
    with atomic_output_dir(out) as tmp:
        write_csv_atomic(tmp / "curve_runs.csv", curve)
        write_csv_atomic(tmp / "curve.csv", means)
        write_learning_curve(curve, tmp / "curve.png", site or "(none)")


def parse_args() -> argparse.Namespace:
    """The stage's inputs and outputs, as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-images", type=Path, required=True, help="the train stage's site images CSV")
    parser.add_argument("--probe-inputs", type=Path, required=True, help="the train stage's probe inputs")
    parser.add_argument("--out", type=Path, required=True, help="folder of the learning curve")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
