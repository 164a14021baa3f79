"""A site's own reviewed images: read and grouped, scored by cross-fitting, its alert threshold, its
learning curve, and whether its diagnoses were recorded mostly for alerted images.

A clinic's labelled images are what moves the melanoma alert at that clinic (docs/results.md): the
probe learns from them beside the training split, each counting `site.weight` training images. Every
site image is also scored by a probe fitted without it: K folds (StratifiedGroupKFold: photos of one
lesion in one fold, melanomas spread over the folds), each fold scored by the probe fitted on the
training split and the other folds. Those cross-fitted scores, and only they, give the site's figures
and its threshold; the shipped model learns from every site image. No Keras here: the `site` stage
works on the embeddings the train stage computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import fisher_exact
from sklearn.model_selection import StratifiedGroupKFold

from skin_lesion.data.dedup import photo_groups
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.external import leave_out_copies, list_set
from skin_lesion.evaluation.metrics import (
    alert_figures,
    alert_rates,
    auc_or_none,
    bootstrap_auc,
    choose_threshold,
    exact_interval,
)
from skin_lesion.params import SiteParams
from skin_lesion.training.linear_head import FitHead, head_probabilities, probe_fitter

NOT_LEARNED = -1  # the class index of a site image labelled `other`: scored for the alert, never learned
SCORE_COLUMNS = [  # the site stage's cross-fitted scores
    *["path", "label", "target", "group", "pixel_sha256", "phash"],
    *["fold", "p_melanoma", "predicted_label"],
]
SITE_IMAGE_COLUMNS = [  # the site's images that train learned from, and what it left out
    *["path", "label", "target", "group", "pixel_sha256", "phash"],
    *["copies_of_training", "unreadable"],
]
CURVE_COLUMNS = [
    "site_images",
    "learned_images",
    "repeat",
    "melanomas",
    "crossfit_auc",
    "crossfit_auc_low",
    "crossfit_auc_high",
    "unseen_images",
    "unseen_auc",
    "baseline_auc",
    "threshold_source",
    "unseen_sensitivity",
    "unseen_false_alert_rate",
    "unseen_sensitivity_at_validation",
    "unseen_false_alert_rate_at_validation",
]
REVIEW_LOG = "review_log.json"  # what export-feedback writes beside a site's images: the prediction log
REVIEW_LOG_KEYS = ("logged_images", "logged_alerts", "diagnosed_images", "diagnosed_alerts")


def site_root(folder: Path, name: str) -> Path:
    """The folder of site `name`, which must exist: data/sites/<name>/."""
    root = folder / name
    if not root.is_dir():
        raise PipelineError(
            f"site.name={name}: {root}/ does not exist "
            f"(skin-lesion export-feedback {root}, then dvc add {root})"
        )
    return root


def load_site_rows(
    root: Path,
    settings: SiteParams,
    seen: pd.DataFrame,
    classes: Sequence[str],
    melanoma_class: str,
    near_duplicate_distance: int,
    group_distance: int,
    max_pixels: int,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The site's images (path, label, target, hashes, group), copies of `seen` left out, and the counts.

    `seen` holds the pixel and perceptual hashes of the split's images (pixel_sha256, phash): a site
    image that copies one would be scored by a model that learned it. Photos within `group_distance`
    bits share a group; images over `max_pixels` (split.max_pixels) are unreadable, never decoded.
    """
    label_map = settings.label_map or {label: label for label in classes}
    rows = list_set(root, "site", settings.labels_csv, label_map)
    # What the split keeps in one split (look-alikes within group_distance, mostly other photos of one
    # lesion) is left out too: a site photo of a test lesion, learned, would flatter the test figures.
    distance = max(near_duplicate_distance, group_distance)
    kept, left_out = leave_out_copies(rows, seen, distance, max_pixels)
    is_melanoma = kept["target"] == melanoma_class
    if not is_melanoma.any() or is_melanoma.all():
        missing = melanoma_class if not is_melanoma.any() else "non-melanoma"
        raise PipelineError(
            f"site.name={settings.name}: no {missing} image in {root} (after leaving out "
            f"{left_out['copies_of_training']} copies of training images): the alert cannot be set or checked"
        )
    groups = photo_groups(kept, distance)
    columns = ["path", "label", "target", "pixel_sha256", "phash"]
    return kept[columns].assign(group=[f"s{group:05d}" for group in groups]), left_out


def site_labels(targets: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Class indices of the site's targets, NOT_LEARNED for `other`."""
    lookup = {label: index for index, label in enumerate(classes)}
    return np.array([lookup.get(target, NOT_LEARNED) for target in targets], dtype=np.int64)


def site_folds(is_melanoma: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """The fold of each site image: grouped by lesion, stratified by melanoma, seeded."""
    lesions = len(set(groups))
    if lesions < folds:
        raise PipelineError(f"site.folds={folds}: the site has only {lesions} distinct lesions to cross-fit")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(len(is_melanoma), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # Fewer melanomas than folds leaves some folds without one; the site report says how many
        # melanomas there are, and the threshold rule refuses too few (site.min_melanomas).
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for index, (_, held) in enumerate(splitter.split(is_melanoma, is_melanoma, groups=groups)):
            fold[held] = index
    return fold


@dataclass(frozen=True)
class ProbeInputs:
    """What the probe is fitted on: the training split's (projected) embeddings and class indices, and
    a site's embeddings and class indices (NOT_LEARNED for `other`)."""

    train_x: np.ndarray
    train_y: np.ndarray
    site_x: np.ndarray
    site_y: np.ndarray

    def fit(self, fit_head: FitHead, site_images: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """The head fitted on the training split and the site images `site_images` (indices) it may learn."""
        learned = site_images[self.site_y[site_images] != NOT_LEARNED]
        x = np.concatenate([self.train_x, self.site_x[learned]])
        y = np.concatenate([self.train_y, self.site_y[learned]])
        w = np.concatenate([np.ones(len(self.train_y)), np.full(len(learned), weight)])
        return fit_head(x, y, w)


def site_fitter(inputs: ProbeInputs, num_classes: int, c: float, class_weight: str, seed: int) -> FitHead:
    """The probe's fit for the site's many refits, each starting from the probe without a site image."""
    no_site = probe_fitter(num_classes, c, class_weight, seed)
    return probe_fitter(
        num_classes, c, class_weight, seed, start=inputs.fit(no_site, np.zeros(0, np.int64), 1.0)
    )


NO_SITE = ProbeInputs(np.zeros((0, 0)), np.zeros(0, np.int64), np.zeros((0, 0)), np.zeros(0, np.int64))


def load_probe_inputs(path: Path) -> tuple[ProbeInputs, tuple[np.ndarray, np.ndarray]]:
    """What the train stage saved (save_probe_inputs, in training/recipes.py): the probe's inputs and the
    val split's."""
    with np.load(path) as stored:
        inputs = ProbeInputs(stored["train_x"], stored["train_y"], stored["site_x"], stored["site_y"])
        return inputs, (stored["val_x"], stored["val_y"])


def cross_fit(
    inputs: ProbeInputs, fit_head: FitHead, fold: np.ndarray, weight: float, images: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each of `images` (site indices; default all) scored by a head fitted without its fold.

    Returns the class probabilities (rows in the order of `images`) and, per fold, the site images
    that fold's head learned from: none of them is in the fold it scores.
    """
    images = np.arange(len(inputs.site_y)) if images is None else images
    scored, learned_by_fold = {}, []
    for k in np.unique(fold[images]):
        held = images[fold[images] == k]
        learned = images[fold[images] != k]
        if np.intersect1d(held, learned).size:
            raise AssertionError(f"fold {k}: a site image would be scored by a model that learned it")
        kernel, bias = inputs.fit(fit_head, learned, weight)
        for index, row in zip(held, head_probabilities(inputs.site_x[held], kernel, bias), strict=True):
            scored[int(index)] = row
        learned_by_fold.append(learned)
    probabilities = np.stack([scored[int(index)] for index in images])
    return probabilities, learned_by_fold


def cross_validated_alert(
    is_melanoma: np.ndarray, scores: np.ndarray, fold: np.ndarray, target_sensitivity: float
) -> dict[str, Any]:
    """The alert's figures when each fold's threshold is chosen on the other folds' scores.

    Choosing a threshold on the scores it is then judged on reaches the target by construction; this
    judges the rule (choose on the site's cross-fitted scores) on images that did not choose it.
    """
    alert = np.zeros(len(scores), dtype=bool)
    for k in np.unique(fold):
        others = fold != k
        if is_melanoma[others].any():
            threshold = choose_threshold(is_melanoma[others], scores[others], target_sensitivity)
            alert[fold == k] = scores[fold == k] >= threshold
    return alert_rates(is_melanoma, alert)


def site_threshold(
    is_melanoma: np.ndarray,
    scores: np.ndarray,
    validation_threshold: float,
    settings: SiteParams,
    target_sensitivity: float,
) -> tuple[float, str, str]:
    """The alert threshold by `site.threshold`, where it came from (site | validation), and why."""
    melanomas = int(is_melanoma.sum())
    if settings.threshold == "validation":
        return validation_threshold, "validation", "site.threshold=validation"
    if melanomas < settings.min_melanomas:
        found = int(np.ceil(target_sensitivity * melanomas))
        low, high = exact_interval(found, melanomas) or (0.0, 1.0)
        reason = (
            f"site.min_melanomas={settings.min_melanomas}: the site has {melanomas} melanomas; a threshold "
            f"finding {found} of them has a sensitivity anywhere from {low:.0%} to {high:.0%} (95 % CI), "
            "so the validation threshold stays"
        )
        return validation_threshold, "validation", reason
    threshold = choose_threshold(is_melanoma, scores, target_sensitivity)
    return threshold, "site", f"chosen on the site's {melanomas} cross-fitted melanomas"


def site_figures(
    scores: pd.DataFrame,
    melanoma_class: str,
    validation_threshold: float,
    settings: SiteParams,
    target_sensitivity: float,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The site's figures from its cross-fitted scores (columns target, fold, p_melanoma)."""
    is_melanoma = (scores["target"] == melanoma_class).to_numpy()
    p = scores["p_melanoma"].to_numpy(dtype=np.float64)
    threshold, source, reason = site_threshold(
        is_melanoma, p, validation_threshold, settings, target_sensitivity
    )
    # The alert the site is told: a threshold chosen on its own scores is judged fold by fold, each
    # fold at a threshold its own images did not choose; a validation threshold on every image.
    if source == "site":
        folds = scores["fold"].to_numpy()
        alert = {"threshold": threshold, **cross_validated_alert(is_melanoma, p, folds, target_sensitivity)}
    else:
        alert = alert_figures(is_melanoma, p, threshold)
    return {
        "site": settings.name,
        "images": len(scores),
        "melanomas": int(is_melanoma.sum()),
        "class_counts": scores["target"].value_counts().sort_index().to_dict(),
        "folds": settings.folds,
        "weight": settings.weight,
        "melanoma_auc": auc_or_none(is_melanoma, p),
        "melanoma_auc_ci": bootstrap_auc(is_melanoma, p, resamples, seed),
        "threshold": threshold,
        "threshold_source": source,
        "threshold_reason": reason,
        "alert": alert,
        # The figures at a threshold on the scores that chose it reach the target by construction.
        "alert_on_the_images_that_chose_it": alert_figures(is_melanoma, p, threshold),
        "alert_at_validation_threshold": alert_figures(is_melanoma, p, validation_threshold),
    }


def grouped_subsample(groups: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of about `size` images drawn lesion by lesion (whole groups), in a random order."""
    chosen: list[int] = []
    for group in rng.permutation(np.unique(groups)):
        if len(chosen) >= size:
            break
        chosen += np.flatnonzero(groups == group).tolist()
    return np.sort(np.array(chosen, dtype=np.int64))


def learning_curve(
    inputs: ProbeInputs,
    fit_head: FitHead,
    is_melanoma: np.ndarray,
    groups: np.ndarray,
    settings: SiteParams,
    sizes: Sequence[int],
    repeats: int,
    target_sensitivity: float,
    validation: tuple[np.ndarray, np.ndarray],
    melanoma: int,
    seed: int,
) -> pd.DataFrame:
    """For each size and repeat: learn from a subsample of the site, judge on the site images left.

    Each row has the subsample's own cross-fitted melanoma AUC and its bootstrap interval (what the
    site would be told), the AUC on the site images the model did not see (what it gets) and that of
    the probe without any site image on the same images (`baseline_auc`), and the alert on them at the
    threshold the subsample chose by `site.threshold`, and at the validation threshold (chosen on
    `validation`, the val split's embeddings and labels, scored by the subsample's model).
    """
    no_site = head_probabilities(inputs.site_x, *inputs.fit(fit_head, np.zeros(0, np.int64), 1.0))
    rows = []
    for size, repeat in ((size, repeat) for size in sizes for repeat in range(repeats)):
        if size >= len(groups) - settings.folds:
            continue  # too few images left to judge on
        chosen = grouped_subsample(groups, size, np.random.default_rng([seed, size, repeat]))
        unseen = np.setdiff1d(np.arange(len(groups)), chosen)
        too_few = len(np.unique(groups[chosen])) < settings.folds
        if too_few or not is_melanoma[chosen].any() or not is_melanoma[unseen].any():
            continue
        fold = np.full(len(groups), -1, dtype=np.int64)
        fold[chosen] = site_folds(is_melanoma[chosen], groups[chosen], settings.folds, seed + repeat)
        crossfit, _ = cross_fit(inputs, fit_head, fold, settings.weight, chosen)
        kernel, bias = inputs.fit(fit_head, chosen, settings.weight)
        val_x, val_y = validation
        val_p = head_probabilities(val_x, kernel, bias)[:, melanoma]
        val_threshold = choose_threshold(val_y == melanoma, val_p, target_sensitivity)
        threshold, source, _ = site_threshold(
            is_melanoma[chosen], crossfit[:, melanoma], val_threshold, settings, target_sensitivity
        )
        unseen_p = head_probabilities(inputs.site_x[unseen], kernel, bias)[:, melanoma]
        rows.append(
            {
                "site_images": size,  # asked for; whole lesions make it a few more
                "learned_images": len(chosen),
                "repeat": repeat,
                **_crossfit_figures(is_melanoma[chosen], crossfit[:, melanoma], seed),
                "unseen_images": len(unseen),
                "unseen_auc": auc_or_none(is_melanoma[unseen], unseen_p),
                "baseline_auc": auc_or_none(is_melanoma[unseen], no_site[unseen, melanoma]),
                "threshold_source": source,
                **_alert_columns(is_melanoma[unseen], unseen_p, threshold, ""),
                **_alert_columns(is_melanoma[unseen], unseen_p, val_threshold, "_at_validation"),
            }
        )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


CURVE_BOOTSTRAP = 200  # resamples of a subsample's cross-fitted AUC interval: enough to see it hold


def _crossfit_figures(is_melanoma: np.ndarray, scores: np.ndarray, seed: int) -> dict[str, Any]:
    interval = bootstrap_auc(is_melanoma, scores, CURVE_BOOTSTRAP, seed) or [None, None]
    return {
        "melanomas": int(is_melanoma.sum()),
        "crossfit_auc": auc_or_none(is_melanoma, scores),
        "crossfit_auc_low": interval[0],
        "crossfit_auc_high": interval[1],
    }


def _alert_columns(is_melanoma: np.ndarray, scores: np.ndarray, threshold: float, suffix: str) -> dict:
    alert = alert_figures(is_melanoma, scores, threshold)
    return {
        f"unseen_sensitivity{suffix}": alert["sensitivity"],
        f"unseen_false_alert_rate{suffix}": alert["false_alert_rate"],
    }


def verification_bias(counts: Mapping[str, int]) -> dict[str, Any]:
    """What share of the logged images got a diagnosis, and whether alerted ones got one more often.

    A site set drawn from the review page over-represents what clinicians chose to record; if they
    recorded mostly alerted images, its figures describe those, not the clinic's stream. Fisher's
    exact test compares the alert rate among the diagnosed images with that among the rest. `counts`
    has logged_images, logged_alerts, diagnosed_images and diagnosed_alerts (export-feedback's).
    """
    logged_images, logged_alerts = counts["logged_images"], counts["logged_alerts"]
    diagnosed_images, diagnosed_alerts = counts["diagnosed_images"], counts["diagnosed_alerts"]
    undiagnosed = logged_images - diagnosed_images
    rest_alerts = logged_alerts - diagnosed_alerts
    table = [
        [diagnosed_alerts, diagnosed_images - diagnosed_alerts],
        [rest_alerts, undiagnosed - rest_alerts],
    ]
    p_value = float(fisher_exact(table).pvalue) if diagnosed_images and undiagnosed else None
    return {
        "logged_images": logged_images,
        "diagnosed_images": diagnosed_images,
        "diagnosed_share": diagnosed_images / logged_images if logged_images else None,
        "alert_rate_logged": logged_alerts / logged_images if logged_images else None,
        "alert_rate_diagnosed": diagnosed_alerts / diagnosed_images if diagnosed_images else None,
        "p_value": p_value,
        "biased": p_value is not None and p_value < 0.05,
    }
