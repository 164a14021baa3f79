"""Time to quality: how long each train stage took until its val balanced accuracy first reached a target.

Reads the train runs of an MLflow store (the stages log every epoch's `val_balanced_accuracy`, the
score early stopping watches, with a timestamp) and prints, per run: the recipe, the epoch and the
wall time from the run's start until the score first reached `--target` (0.60 by default), and the
run's whole time. The run starts when the stage has loaded its images, before the model is built, so
the time includes building the net, loading pretrained weights and each epoch's validation pass.

    python benchmarks/time_to_quality.py --tracking-uri sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import os

import mlflow
import pandas as pd
from mlflow import MlflowClient

MONITOR = "val_balanced_accuracy"  # skin_lesion.training.callbacks.MONITOR, read without importing Keras


def main() -> None:
    """Print each train run's time to the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    parser.add_argument("--target", type=float, default=0.60)
    args = parser.parse_args()
    mlflow.set_tracking_uri(args.tracking_uri)
    client = MlflowClient()
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.stage = 'train'", order_by=["start_time"]
    )
    print(f"{'experiment':<22} {'recipe':<62} {'reached at':>17} {'run':>7}")
    for _, run in runs.iterrows():
        history = epoch_history(client, run["run_id"])
        if not history or run["status"] != "FINISHED":
            continue
        start_ms = run["start_time"].value // 1_000_000
        total_s = (run["end_time"].value // 1_000_000 - start_ms) / 1000
        reached = next((metric for metric in history if metric.value >= args.target), None)
        when = "not reached"
        if reached is not None:
            when = f"epoch {reached.step + 1}, {(reached.timestamp - start_ms) / 1000:.0f} s"
        name = run.get("tags.DVC_EXP_NAME") or run["run_id"][:8]
        print(f"{name:<22} {_recipe(run):<62} {when:>17} {total_s:>6.0f}s")


def epoch_history(client: MlflowClient, run_id: str) -> list:
    """The monitored score of each epoch, in order: the first value logged at each step."""
    # The stage also logs the kept epoch's figures once more at the end, at step 0; drop that one.
    first: dict[int, object] = {}
    for metric in sorted(client.get_metric_history(run_id, MONITOR), key=lambda m: m.timestamp):
        first.setdefault(metric.step, metric)
    return [first[step] for step in sorted(first)]


def _recipe(run: pd.Series) -> str:
    def param(key: str) -> str:
        return str(run.get(f"params.train.{key}", "?"))

    weights = param("weights")
    weights = "file" if weights not in ("none", "imagenet") else weights
    parts = [param("arch"), f"seed {run.get('params.base.seed', '?')}", f"weights {weights}"]
    if weights != "none":
        parts.append(f"freeze {param('freeze_epochs')}, unfreeze {param('unfreeze')}")
    return ", ".join([*parts, f"{param('epochs')} epochs"])


if __name__ == "__main__":
    main()
