"""Stage `site`: every image of the site scored by a probe that did not learn it, and the learning curve.

Works on what the train stage saved (the probe's embeddings, no images, no Keras): K folds of the
site's images (site.folds; photos of one lesion share a fold, melanomas spread over the folds), each
scored by the probe fitted on the training split and the other folds (site.weight each). The
learning curve refits the probe on subsamples of the site (site.curve_sizes, site.curve_repeats) and
judges each on the site images it did not learn. evaluate turns the scores into the site's figures and
threshold. Without a site (site.name: '') it writes empty tables.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from skin_lesion.errors import PipelineError
from skin_lesion.files import atomic_output_dir, read_table, write_csv_atomic, write_json_atomic
from skin_lesion.params import load_params
from skin_lesion.plots import write_learning_curve
from skin_lesion.runner import run_cli
from skin_lesion.sites import (
    REVIEW_LOG,
    REVIEW_LOG_KEYS,
    SCORE_COLUMNS,
    cross_fit,
    learning_curve,
    load_probe_inputs,
    site_fitter,
    site_folds,
    verification_bias,
)
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.site")

SITE_IMAGE_COLUMNS = ["path", "label", "target", "group", "copies_of_training", "unreadable"]


def main() -> None:
    """Cross-fit the site's images, draw its learning curve, and say who chose what was recorded."""
    args = parse_args()
    params = load_params()
    base, site, train = params.base, params.site, params.train
    rows = read_table(args.site_images, SITE_IMAGE_COLUMNS, what="site images (run the train stage)")
    if not site.name or rows.empty:
        write_outputs(args, pd.DataFrame(columns=SCORE_COLUMNS), pd.DataFrame(), {}, site.name)
        return
    inputs, validation = load_probe_inputs(args.probe_inputs)
    fit_head = site_fitter(inputs, len(base.classes), train.probe_c, train.class_weight, base.seed)
    melanoma = base.classes.index(base.melanoma_class)
    is_melanoma = (rows["target"] == base.melanoma_class).to_numpy()
    groups = rows["group"].to_numpy()
    with stage_run("site", base, site):
        fold = site_folds(is_melanoma, groups, site.folds, base.seed)
        probabilities, _ = cross_fit(inputs, fit_head, fold, site.weight)
        scores = rows.assign(
            fold=fold,
            p_melanoma=probabilities[:, melanoma],
            predicted_label=np.asarray(base.classes)[probabilities.argmax(axis=1)],
        )[SCORE_COLUMNS]
        curve = learning_curve(
            inputs,
            fit_head,
            is_melanoma,
            groups,
            site,
            site.curve_sizes if site.curve_repeats else [],
            site.curve_repeats,
            params.evaluate.target_sensitivity,
            validation,
            melanoma,
            base.seed,
        )
        report = {
            "left_out": {key: int(rows[key].iloc[0]) for key in ("copies_of_training", "unreadable")},
            "verification": read_review_log(args.sites / site.name / REVIEW_LOG),
        }
        write_outputs(args, scores, curve, report, site.name)
        if not curve.empty:
            mlflow.log_metrics({"site_curve_points": len(curve)})
    log.info("site %s: %d images cross-fitted in %d folds", site.name, len(scores), site.folds)


def read_review_log(path: Path) -> dict[str, object] | None:
    """The verification-bias figures from export-feedback's prediction-log summary; None without one."""
    if not path.is_file():
        return None
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
        return verification_bias({key: int(counts[key]) for key in REVIEW_LOG_KEYS})
    except (ValueError, KeyError, TypeError) as err:
        raise PipelineError(
            f"{path}: not export-feedback's review log (needs {', '.join(REVIEW_LOG_KEYS)}: {err})"
        ) from err


def write_outputs(
    args: argparse.Namespace, scores: pd.DataFrame, curve: pd.DataFrame, report: dict, site: str
) -> None:
    """The cross-fitted scores, the learning curve (every run, the mean per size, a PNG) and the report."""
    means = curve.groupby("site_images", as_index=False).mean(numeric_only=True) if not curve.empty else curve
    with atomic_output_dir(args.out) as tmp:
        write_csv_atomic(tmp / "scores.csv", scores)
        write_csv_atomic(tmp / "curve_runs.csv", curve)
        write_csv_atomic(tmp / "curve.csv", means.drop(columns=["repeat"], errors="ignore"))
        write_learning_curve(curve, tmp / "curve.png", site or "(none)")
        write_json_atomic(tmp / "report.json", report)


def parse_args() -> argparse.Namespace:
    """The stage's inputs and outputs, as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-images", type=Path, required=True, help="the train stage's site images CSV")
    parser.add_argument("--probe-inputs", type=Path, required=True, help="the train stage's probe inputs")
    parser.add_argument("--sites", type=Path, required=True, help="folder of site sets (its review log)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the site's scores and curve")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
