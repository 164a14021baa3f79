"""Stage `site`: every image of the site scored by a probe that did not learn it.

Works on what the train stage saved (the probe's embeddings, no images, no Keras): K folds of the
site's images (site.folds; photos of one lesion share a fold, melanomas spread over the folds), each
scored by the probe fitted on the training split and the other folds (site.weight each). evaluate
turns the scores into the site's figures and threshold. The summary of the review page's prediction
log that export-feedback wrote beside the images says whether mostly alerted images were recorded.
Without a site (site.name: '') it writes an empty table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.sites import (
    REVIEW_LOG,
    REVIEW_LOG_KEYS,
    SCORE_COLUMNS,
    SITE_IMAGE_COLUMNS,
    ProbeInputs,
    cross_fit,
    load_probe_inputs,
    site_fitter,
    site_folds,
    verification_bias,
)
from skin_lesion.files import atomic_output_dir, read_table, write_csv_atomic, write_json_atomic
from skin_lesion.params import Params, load_params
from skin_lesion.runner import run_cli
from skin_lesion.tracking import stage_run

log = logging.getLogger("stages.site")


def main() -> None:
    """Cross-fit the site's images, and say whether what was recorded is what the clinic sees."""
    args = parse_args()
    params = load_params()
    base, site = params.base, params.site
    rows = read_table(args.site_images, SITE_IMAGE_COLUMNS, what="site images (run the train stage)")
    with stage_run("site", base, site):
        if not site.name or rows.empty:
            write_outputs(args.out, pd.DataFrame(columns=SCORE_COLUMNS), {})
            return
        inputs, _ = load_probe_inputs(args.probe_inputs)
        if len(inputs.site_y) != len(rows):
            raise PipelineError(
                f"{args.probe_inputs} holds {len(inputs.site_y)} site images, {args.site_images} "
                f"{len(rows)}: rerun the train stage (dvc repro train)"
            )
        scores = cross_fitted_scores(rows, inputs, params)
        report = {
            "left_out": {key: int(rows[key].iloc[0]) for key in ("copies_of_training", "unreadable")},
            "verification": read_review_log(args.sites / site.name / REVIEW_LOG),
        }
        write_outputs(args.out, scores, report)
    log.info("site %s: %d images cross-fitted in %d folds", site.name, len(scores), site.folds)


def cross_fitted_scores(rows: pd.DataFrame, inputs: ProbeInputs, params: Params) -> pd.DataFrame:
    """Each site image with its fold and the scores of the probe fitted without that fold."""
    base, site, train = params.base, params.site, params.train
    fit_head = site_fitter(inputs, len(base.classes), train.probe_c, train.class_weight, base.seed)
    is_melanoma = (rows["target"] == base.melanoma_class).to_numpy()
    fold = site_folds(is_melanoma, rows["group"].to_numpy(), site.folds, base.seed)
    probabilities, _ = cross_fit(inputs, fit_head, fold, site.weight)
    return rows.assign(
        fold=fold,
        p_melanoma=probabilities[:, base.classes.index(base.melanoma_class)],
        predicted_label=np.asarray(base.classes)[probabilities.argmax(axis=1)],
    )[SCORE_COLUMNS]


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


def write_outputs(out: Path, scores: pd.DataFrame, report: dict) -> None:
    """The cross-fitted scores and the report (left-out counts, verification bias), as one folder."""
    with atomic_output_dir(out) as tmp:
        write_csv_atomic(tmp / "scores.csv", scores)
        write_json_atomic(tmp / "report.json", report)


def parse_args() -> argparse.Namespace:
    """The stage's inputs and outputs, as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site-images", type=Path, required=True, help="the train stage's site images CSV")
    parser.add_argument("--probe-inputs", type=Path, required=True, help="the train stage's probe inputs")
    parser.add_argument("--sites", type=Path, required=True, help="folder of site sets (its review log)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the site's scores and report")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
