"""What learning from a site's own labelled images gives that site, measured on its images not learned.

Reads a workspace that ran `dvc repro site` with `site.name` set (its models/probe_inputs.npz and
models/site_images.csv: the probe's embeddings, no images), and for each recipe setting (site.weight,
site.folds, train.probe_c) draws, for each number of site images, `--repeats` grouped subsamples
(skin_lesion/evaluation/sites.learning_curve): the probe learns from the training split and the subsample, and
is judged on the rest of the site. Prints per setting and size: the site images' melanoma AUC without
any site image (the same images), the subsample's cross-fitted AUC (what the site is told) and how
often its 95 % interval holds the AUC on the images not learned (what the site gets), and the alert on
those images at the threshold the subsample chose (site.threshold, evaluate.target_sensitivity).

    python benchmarks/site_adaptation.py --workspace <clone> --sizes 25 50 100 200 --repeats 5 \\
        --weights 5 20 --folds 5 --c 0.01
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from skin_lesion.evaluation.sites import learning_curve, load_probe_inputs, site_fitter
from skin_lesion.params import load_params


def main() -> None:
    """Print the learning curve of every setting, a row per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workspace", type=Path, required=True, help="pipeline folder that ran the site stage"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", type=float, nargs="+", default=[5.0])
    parser.add_argument("--folds", type=int, nargs="+", default=[5])
    parser.add_argument("--c", type=float, nargs="+", default=None, help="train.probe_c (default: params)")
    parser.add_argument("--out", type=Path, help="CSV of every run")
    args = parser.parse_args()
    params = load_params(args.workspace / "params.yaml")
    base = params.base
    inputs, validation = load_probe_inputs(args.workspace / "models" / "probe_inputs.npz")
    rows = pd.read_csv(args.workspace / "models" / "site_images.csv", dtype=str, keep_default_na=False)
    is_melanoma = (rows["target"] == base.melanoma_class).to_numpy()
    melanoma = base.classes.index(base.melanoma_class)
    target = params.evaluate.target_sensitivity
    print(
        f"site {params.site.name}: {len(rows)} images, {is_melanoma.sum()} melanomas; "
        f"target sensitivity {target:.2f}; threshold rule {params.site.threshold} "
        f"(min_melanomas {params.site.min_melanomas})"
    )
    runs = []
    for weight, folds, c in itertools.product(args.weights, args.folds, args.c or [params.train.probe_c]):
        settings = params.site.model_copy(update={"weight": weight, "folds": folds})
        fit_head = site_fitter(inputs, len(base.classes), c, params.train.class_weight, base.seed)
        started = time.perf_counter()
        curve = learning_curve(
            inputs,
            fit_head,
            is_melanoma,
            rows["group"].to_numpy(),
            settings,
            args.sizes,
            args.repeats,
            target,
            validation,
            melanoma,
            base.seed,
        )
        seconds = time.perf_counter() - started
        runs.append(curve.assign(weight=weight, folds=folds, c=c))
        print(f"\nweight {weight:g}, folds {folds}, C {c:g} ({seconds:.0f} s, {len(curve)} runs)")
        print(summary(curve, target).to_string(index=False, float_format=lambda value: f"{value:.3f}"))
    if args.out:
        pd.concat(runs, ignore_index=True).to_csv(args.out, index=False)


def summary(curve: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per size: means over the repeats, and how often the cross-fitted interval held the unseen AUC."""
    held = (curve["crossfit_auc_low"] <= curve["unseen_auc"]) & (
        curve["unseen_auc"] <= curve["crossfit_auc_high"]
    )
    within = (curve["unseen_sensitivity"] - target).abs() <= 0.10
    grouped = curve.assign(interval_held=held, sensitivity_within_0_10=within).groupby("site_images")
    table = grouped[
        [
            "melanomas",
            "baseline_auc",
            "crossfit_auc",
            "unseen_auc",
            "interval_held",
            "unseen_sensitivity",
            "sensitivity_within_0_10",
            "unseen_false_alert_rate",
            "unseen_sensitivity_at_validation",
            "unseen_false_alert_rate_at_validation",
        ]
    ].mean()
    table["unseen_sensitivity_sd"] = grouped["unseen_sensitivity"].std()
    table["site_threshold_share"] = grouped["threshold_source"].apply(lambda s: (s == "site").mean())
    return table.reset_index()


if __name__ == "__main__":
    main()
