"""Stage `evaluate`: a clinical report of the trained model on the test split, and its registration.

- The ISIC challenges' metrics: balanced multiclass accuracy, per-class sensitivity, specificity and
  one-vs-rest AUC, macro AUC, and the melanoma AUC above 80 % sensitivity.
- A melanoma operating point: the threshold on P(melanoma) is chosen on the validation split to reach
  evaluate.target_sensitivity, then reported on the test split (sensitivity, specificity, alerts per
  100 images).
- Temperature scaling (skin_lesion/evaluation/calibration.py): one temperature fitted on the validation
  split's probabilities; the threshold and every figure below are on the calibrated probabilities, which the
  served model answers. The expected calibration error before and after, on validation, test and
  external sets.
- Bootstrap 95 % intervals (evaluate.bootstrap resamples), DVC plots, and a model card
  (metrics/model_card.md).
- External validation (skin_lesion/evaluation/external.py): each evaluate.external set scored with the same
  threshold, copies of training images left out; metrics/external.json and the model card.
- An out-of-distribution summary (skin_lesion/model/ood.py): the training split's embeddings, with a flagging
  threshold at evaluate.ood_quantile of the validation split's distances.
- The model, wrapped with its classes, image size, temperature, threshold, OOD summary and test figures
  (with each external set's per-class recall; skin_lesion/model/classifier.py), becomes a new
  version of base.model_name with alias `challenger`. evaluate.promote decides `champion`: `manual`
  leaves it to a person, `auto` moves it when the challenger beats it on the same test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd

from skin_lesion.data.manifests import SPLIT_COLUMNS, class_indices
from skin_lesion.evaluation.calibration import calibration_figures, fit_temperature
from skin_lesion.evaluation.external import (
    ExternalSet,
    load_external_sets,
    score_external_set,
    seen_by_the_model,
)
from skin_lesion.evaluation.metrics import (
    SITE_RULE,
    alert_thresholds,
    experiment_row,
    known_classes,
    reference_figures,
    score_test_split,
)
from skin_lesion.evaluation.model_card import ModelCardFacts, describe_model, render_model_card
from skin_lesion.evaluation.ood_fitting import fit_ood
from skin_lesion.evaluation.plots import write_plots
from skin_lesion.evaluation.sites import SCORE_COLUMNS, site_figures
from skin_lesion.evaluation.stress import source_shift_report
from skin_lesion.files import in_main_repo, read_manifest, read_table, write_json_atomic, write_text_atomic
from skin_lesion.model.classifier import calibrated
from skin_lesion.model.network import load_model
from skin_lesion.model.ood import OodModel
from skin_lesion.params import BaseParams, EvaluateParams, Params, load_params
from skin_lesion.registry.model_contents import pip_requirements
from skin_lesion.registry.registration import (
    NEW_VERSION_ALIAS,
    log_servable_model,
    provenance_note,
    register_and_promote,
    split_fingerprint,
    version_description,
    version_tags,
)
from skin_lesion.runner import run_cli
from skin_lesion.tracking import GIT_COMMIT_TAG, loggable_metrics, stage_run, upstream_data_hashes
from skin_lesion.training.batching import load_cached_images
from skin_lesion.training.probe import EmbeddingCache

log = logging.getLogger("stages.evaluate")


def main() -> None:
    """Predict val and test, write the report, plots and model card, register and maybe promote."""
    args = parse_args()
    params = load_params()
    base, settings = params.base, params.evaluate
    melanoma = base.classes.index(base.melanoma_class)
    site_scores = read_table(args.site_scores / "scores.csv", SCORE_COLUMNS, what="site scores")
    external_sets = load_external(args, params, site_scores)
    # Every prediction goes through the backbone's cached embeddings: a refit of the head alone
    # (the probe's C, a site, the threshold rule) then embeds nothing again.
    cache = in_main_repo(args.cache)
    embedder = EmbeddingCache(load_model(args.model), cache, settings.batch_size, base.mirror_average)
    e_train = training_embeddings(args.split / "train.csv", embedder, base, cache)
    val_rows, _, y_val, raw_val, e_val = predict_split(args.split / "val.csv", embedder, base, cache)
    test_rows, x_test, y_test, raw_test, e_test = predict_split(
        args.split / "test.csv", embedder, base, cache
    )
    ood = fit_ood(e_train, e_val, settings.ood_quantile)
    with_site = bool(params.site.name) and not site_scores.empty
    temperature = evaluation_temperature(y_val, raw_val, with_site)
    p_val, p_test = calibrated(raw_val, temperature), calibrated(raw_test, temperature)
    predict = calibrated_predictor(embedder, temperature)
    with stage_run("evaluate", base, settings) as run:
        collections = val_rows["collection"].to_numpy()
        site = site_report(
            site_scores, args.site_scores, params, (y_val == melanoma, p_val[:, melanoma]), collections
        )
        site_threshold = site["threshold"] if site.get("threshold_source") == SITE_RULE else None
        scored = (y_val, p_val), (y_test, p_test)
        metrics = score_test_split(
            *scored, base.classes, melanoma, settings, base.seed, collections, site_threshold
        )
        metrics["calibration"] = calibration_report(
            temperature, (y_val, raw_val), (y_test, raw_test), settings.calibration_bins
        )
        metrics["site"] = site
        write_json_atomic(args.site_report, site)
        rule = SITE_RULE if site_threshold is not None else settings.threshold_rule
        metrics["external"] = external_report(
            external_sets, embedder, temperature, params, metrics["melanoma"]["threshold_rules"], rule
        )
        write_json_atomic(args.external_report, metrics["external"])
        shift = source_shift_report(
            predict, test_rows["collection"], x_test, y_test, p_test, melanoma, metrics, settings.stress
        )
        write_plots(args.plots, test_rows, y_test, p_test, base.classes, melanoma, settings, shift["stress"])
        write_json_atomic(args.shift_report, shift)
        data_report = json.loads(args.data_report.read_text(encoding="utf-8"))
        card = render_model_card(model_card_facts(params, metrics, shift, data_report, rule))
        write_text_atomic(args.model_card, card)
        log_reports(args, {**metrics, **shift})
        unlike = ood.score(e_test) > ood.threshold
        figures = reference_figures(
            metrics, y_test, p_test, unlike, base.classes, melanoma, metrics["external"]
        )
        version, reason = register(args, params, run.info.run_id, metrics, card, ood, figures)
        metrics["model_version"] = int(version)
        write_json_atomic(args.details, metrics)
        write_json_atomic(args.metrics, experiment_row(metrics, int(version)))
    log_summary(metrics, base.model_name, version, reason)


def load_external(args: argparse.Namespace, params: Params, site_scores: pd.DataFrame) -> list[ExternalSet]:
    """The external sets, without the images training, validation or the site already showed the model."""
    # An external image that the split would have kept with a training, validation or site image (the
    # same lesion, or another photo of it) was learned from.
    return load_external_sets(
        args.external,
        params.evaluate.external,
        seen_by_the_model(args.split, site_scores),
        params.split,
        params.base.melanoma_class,
        params.base.image_size,
    )


def training_embeddings(
    manifest: Path, embedder: EmbeddingCache, base: BaseParams, cache: Path
) -> np.ndarray:
    """The training split's embeddings, for the OOD summary: from the embedding cache when an earlier
    evaluate of this backbone made them, without decoding the images."""
    return embedder.embed_files(
        read_manifest(manifest, SPLIT_COLUMNS)["path"].tolist(), base.image_size, cache
    )


def predict_split(
    manifest: Path, embedder: EmbeddingCache, base: BaseParams, cache: Path
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A split's rows, images, class indices, uncalibrated probabilities and embeddings."""
    rows = read_manifest(manifest, SPLIT_COLUMNS)
    labels = class_indices(rows["label"], base.classes, source=str(manifest))
    images, key = load_cached_images(rows["path"].tolist(), base.image_size, cache)
    return rows, images, labels, *embedder.predict(images, key)


def evaluation_temperature(y_val: np.ndarray, raw_val: np.ndarray, with_site: bool) -> float:
    """The temperature every figure is measured at: fitted on validation, or 1 with a site."""
    # The threshold is chosen on calibrated validation probabilities, and every figure is measured on
    # calibrated ones: the served model applies the temperature before its threshold (docs/design.md).
    # A site's threshold and figures come from the site stage's uncalibrated cross-fitted P(melanoma):
    # with a site, the probabilities stay as the model gives them (temperature 1).
    return 1.0 if with_site else fit_temperature(y_val, raw_val)


def calibrated_predictor(embedder: EmbeddingCache, temperature: float) -> Callable[[np.ndarray], np.ndarray]:
    """Images to calibrated class probabilities, as the served model answers (the stress test's)."""

    def predict(images: np.ndarray) -> np.ndarray:
        return calibrated(embedder.predict(images)[0], temperature)

    return predict


def calibration_report(
    temperature: float,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    bins: int,
) -> dict[str, Any]:
    """The temperature and the calibration error before and after it on val and test (labels, raw)."""
    return {
        "temperature": temperature,
        "val": calibration_figures(*val, temperature, bins),
        "test": calibration_figures(*test, temperature, bins),
    }


def chose_recipe(settings: EvaluateParams) -> tuple[str, ...]:
    """The external sets the recipe was chosen on (evaluate.external.<name>.chose_recipe)."""
    return tuple(name for name, external in settings.external.items() if external.chose_recipe)


def model_card_facts(
    params: Params, metrics: dict[str, Any], shift: dict[str, Any], data: dict[str, Any], rule: str
) -> ModelCardFacts:
    """What the model card states, from the params and this run's figures."""
    base = params.base
    return ModelCardFacts(
        base=base,
        download=params.download,
        model=describe_model(params.train, base.image_size, base.mirror_average),
        target_sensitivity=params.evaluate.target_sensitivity,
        metrics=metrics,
        shift=shift,
        data=data,
        external=metrics["external"],
        rule=rule,
        site=metrics["site"],
        chose_recipe=chose_recipe(params.evaluate),
    )


def log_reports(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """Log the figures as metrics, and the plots and reports as artifacts, to the active run."""
    mlflow.log_metrics(loggable_metrics(figures))
    mlflow.log_artifacts(str(args.plots), "plots")
    for artifact in (args.shift_report, args.external_report, args.model_card, args.site_report):
        mlflow.log_artifact(str(artifact))


def log_summary(metrics: dict[str, Any], model_name: str, version: str, reason: str) -> None:
    """One line: the temperature, the headline test figures and what became of the new version."""
    calibration = metrics["calibration"]
    log.info(
        "temperature %.3f (validation ECE %.3f -> %.3f); test balanced accuracy %.3f, melanoma AUC %s; "
        "%s version %s is @%s; %s",
        calibration["temperature"],
        calibration["val"]["ece_before"],
        calibration["val"]["ece_after"],
        metrics["balanced_accuracy"],
        "n/a" if metrics["melanoma"]["auc"] is None else f"{metrics['melanoma']['auc']:.3f}",
        model_name,
        version,
        NEW_VERSION_ALIAS,
        reason,
    )


def external_report(
    sets: list[ExternalSet],
    embedder: EmbeddingCache,
    temperature: float,
    params: Params,
    rules: dict[str, dict[str, Any]],
    rule: str,
) -> dict[str, dict[str, Any]]:
    """Each external set's figures on calibrated probabilities (at every rule's threshold), what was
    left out of it, its calibration error before and after the temperature, and whether it chose the
    recipe.

    `rules` are the test split's operating points by threshold rule; `rule` is the one in use.
    """
    base, settings = params.base, params.evaluate
    thresholds = {name: point["threshold"] for name, point in rules.items()}
    report = {}
    for found in sets:
        raw = embedder.predict(found.images)[0]
        known, y_known = known_classes(found.rows["target"], base.classes)
        figures = score_external_set(
            found.rows["target"],
            calibrated(raw, temperature),
            base.classes,
            base.melanoma_class,
            thresholds,
            rule,
            settings.bootstrap,
            base.seed,
        )
        calibration = calibration_figures(y_known, raw[known], temperature, settings.calibration_bins)
        chose = settings.external[found.name].chose_recipe  # its figures chose the recipe: not independent
        report[found.name] = figures | found.left_out | {"calibration": calibration, "chose_recipe": chose}
    return report


def site_report(
    scores: pd.DataFrame,
    folder: Path,
    params: Params,
    val_melanoma: tuple[np.ndarray, np.ndarray],
    val_collections: np.ndarray,
) -> dict[str, Any]:
    """The site's figures from its cross-fitted scores (the site stage's), {} without a site.

    `val_melanoma` is (is melanoma, P(melanoma)) on the validation split: its threshold is the one the
    site's figures are also given at, and the one kept when the site has too few melanomas.
    """
    if not params.site.name or scores.empty:
        return {}
    settings = params.evaluate
    is_melanoma, p_melanoma = val_melanoma
    thresholds = alert_thresholds(is_melanoma, p_melanoma, val_collections, settings.target_sensitivity)
    figures = site_figures(
        scores.astype({"fold": int, "p_melanoma": float}),
        params.base.melanoma_class,
        thresholds[settings.threshold_rule],
        params.site,
        settings.target_sensitivity,
        settings.bootstrap,
        params.base.seed,
    )
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    if (report.get("verification") or {}).get("biased"):
        log.warning(
            "site %s: the alert rate among the diagnosed images differs from that of all logged ones "
            "beyond chance: its figures describe what clinicians chose to record (metrics/site.json)",
            params.site.name,
        )
    log.info(
        "site %s: threshold %.4f (%s)", params.site.name, figures["threshold"], figures["threshold_reason"]
    )
    return figures | report


def register(
    args: argparse.Namespace,
    params: Params,
    run_id: str,
    metrics: dict[str, Any],
    card: str,
    ood: OodModel,
    figures: dict[str, Any],
) -> tuple[str, str]:
    """Log the servable model, register it as @challenger and decide `champion`; version and why."""
    base, source = params.base, params.download.source
    train_run = json.loads(args.model_info.read_text(encoding="utf-8"))["run_id"]
    data = upstream_data_hashes("evaluate", Path.cwd())
    tags = version_tags(train_run, run_id, split_fingerprint(args.split / "test.csv"), metrics, source, data)
    run_tags = mlflow.get_run(run_id).data.tags
    note = provenance_note(tags, run_tags.get(GIT_COMMIT_TAG), run_tags.get("DVC_EXP_NAME"))
    card = version_description(card, note)
    threshold = metrics["melanoma"]["operating_point"]["threshold"]
    with tempfile.TemporaryDirectory() as folder:
        ood.save(Path(folder) / "ood.npz")
        model_uri = log_servable_model(
            args.model,
            base.classes,
            base.image_size,
            base.melanoma_class,
            threshold,
            pip_requirements(keras.backend.backend(), args.lock),
            source,
            ood_path=Path(folder) / "ood.npz",
            test_figures=figures,
            mirror_average=base.mirror_average,
            temperature=metrics["calibration"]["temperature"],
        )
    return register_and_promote(model_uri, base.model_name, card, tags, metrics, params.evaluate)


def parse_args() -> argparse.Namespace:
    """The stage's inputs and outputs, as dvc.yaml passes them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="folder of split manifests")
    parser.add_argument("--data-report", type=Path, required=True, help="split stage's data.json")
    parser.add_argument("--model", type=Path, required=True, help="trained .keras model")
    parser.add_argument("--model-info", type=Path, required=True, help="MLflow model reference")
    parser.add_argument("--metrics", type=Path, required=True, help="headline metrics JSON to write")
    parser.add_argument("--details", type=Path, required=True, help="all metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="folder of plot data to write")
    parser.add_argument("--model-card", type=Path, required=True, help="model card to write")
    parser.add_argument("--shift-report", type=Path, required=True, help="by-collection and stress JSON")
    parser.add_argument("--external", type=Path, required=True, help="folder of external validation sets")
    parser.add_argument("--external-report", type=Path, required=True, help="external validation JSON")
    parser.add_argument("--lock", type=Path, required=True, help="requirements lock the model pins from")
    parser.add_argument("--cache", type=Path, required=True, help="decoded-image and embedding cache")
    parser.add_argument("--site-scores", type=Path, required=True, help="the site stage's folder")
    parser.add_argument("--site-report", type=Path, required=True, help="the site's figures JSON to write")
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
