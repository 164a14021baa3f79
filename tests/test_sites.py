"""A site's own images: read and grouped, cross-fitted without leakage, its threshold, its learning curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from skin_lesion.app.feedback import review_log_summary
from skin_lesion.data.dedup import inspect_images
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.sites import (
    NOT_LEARNED,
    ProbeInputs,
    cross_fit,
    cross_validated_alert,
    learning_curve,
    load_site_rows,
    site_figures,
    site_folds,
    site_labels,
    site_root,
    site_threshold,
    verification_bias,
)
from skin_lesion.params import SiteParams
from skin_lesion.training.linear_head import head_probabilities, probe_fitter
from tests.conftest import CLASSES, as_params, draw_lesion, small_params

MELANOMA = CLASSES.index("melanoma")


def _settings(**changes: object) -> SiteParams:
    values = {
        "name": "clinic",
        "labels_csv": "",
        "label_map": {},
        "weight": 5.0,
        "folds": 3,
        "threshold": "site",
        "min_melanomas": 4,
    }
    return SiteParams(**(values | changes))


def _inputs(site_images: int = 36, seed: int = 0) -> tuple[ProbeInputs, np.ndarray, np.ndarray]:
    """Embeddings in which melanoma shifts feature 0; the site's images are shifted as a whole."""
    rng = np.random.default_rng(seed)
    train_y = np.repeat(np.arange(len(CLASSES)), 20)
    train_x = rng.normal(size=(len(train_y), 6)) + np.eye(6)[train_y] * 2
    site_y = np.resize(np.arange(len(CLASSES)), site_images)
    site_x = rng.normal(size=(site_images, 6)) + np.eye(6)[site_y] * 2 + 0.5
    groups = np.arange(site_images) // 2  # two photos per lesion
    return ProbeInputs(train_x, train_y, site_x, site_y), site_y == MELANOMA, groups


FIT = probe_fitter(len(CLASSES), 1.0, "balanced", 0)


def test_no_site_image_is_scored_by_a_model_that_learned_it() -> None:
    inputs, is_melanoma, groups = _inputs()
    fold = site_folds(is_melanoma, groups, 3, seed=0)
    probabilities, learned_by_fold = cross_fit(inputs, FIT, fold, weight=5.0)
    assert probabilities.shape == (36, len(CLASSES))
    for k, learned in enumerate(learned_by_fold):
        scored = np.flatnonzero(fold == k)
        assert scored.size
        assert not set(scored) & set(learned.tolist())
        assert set(learned.tolist()) == set(np.flatnonzero(fold != k))


def test_the_folds_keep_a_lesions_photos_together_and_spread_the_melanomas() -> None:
    _, is_melanoma, groups = _inputs()
    fold = site_folds(is_melanoma, groups, 3, seed=0)
    for group in np.unique(groups):
        assert len(set(fold[groups == group])) == 1
    assert all(is_melanoma[fold == k].any() for k in range(3))


def test_cross_fitted_scores_differ_from_a_model_that_saw_the_images() -> None:
    inputs, is_melanoma, groups = _inputs()
    fold = site_folds(is_melanoma, groups, 3, seed=0)
    crossfit, _ = cross_fit(inputs, FIT, fold, weight=50.0)
    kernel, bias = inputs.fit(FIT, np.arange(36), weight=50.0)
    seen = head_probabilities(inputs.site_x, kernel, bias)
    # A model that learned an image scores its own label higher than one that did not.
    rows = np.arange(36)
    assert seen[rows, inputs.site_y].mean() > crossfit[rows, inputs.site_y].mean()


def test_other_is_scored_but_never_learned() -> None:
    inputs, _, _ = _inputs(site_images=6)
    labels = site_labels(["melanoma", "other", "nevus", "other", "melanoma", "nevus"], CLASSES)
    assert labels.tolist() == [0, NOT_LEARNED, 1, NOT_LEARNED, 0, 1]
    seen = []

    def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen.append((len(y), sorted(set(w.tolist())), NOT_LEARNED in y))
        return FIT(x, y, w)

    ProbeInputs(inputs.train_x, inputs.train_y, inputs.site_x, labels).fit(fit, np.arange(6), weight=5.0)
    assert seen == [(len(inputs.train_y) + 4, [1.0, 5.0], False)]


def test_the_site_threshold_reaches_the_target_on_the_sites_melanomas() -> None:
    is_melanoma = np.array([True] * 10 + [False] * 30)
    scores = np.linspace(0, 1, 40)[np.random.default_rng(0).permutation(40)]
    threshold, source, _ = site_threshold(is_melanoma, scores, 0.99, _settings(), 0.9)
    assert source == "site"
    assert (scores[is_melanoma] >= threshold).mean() >= 0.9
    assert (scores[is_melanoma] >= np.nextafter(threshold, 2)).mean() < 0.9


def test_too_few_melanomas_keep_the_validation_threshold_and_say_why() -> None:
    is_melanoma = np.array([True] * 3 + [False] * 30)
    threshold, source, reason = site_threshold(is_melanoma, np.linspace(0, 1, 33), 0.42, _settings(), 0.9)
    assert (threshold, source) == (0.42, "validation")
    assert "site.min_melanomas=4" in reason
    assert "3 melanomas" in reason
    assert "95 % CI" in reason
    assert "\n" not in reason


def test_the_validation_rule_keeps_the_validation_threshold() -> None:
    is_melanoma = np.array([True] * 20 + [False] * 20)
    threshold, source, _ = site_threshold(
        is_melanoma, np.linspace(0, 1, 40), 0.3, _settings(threshold="validation"), 0.9
    )
    assert (threshold, source) == (0.3, "validation")


def test_the_threshold_rule_is_judged_on_folds_that_did_not_choose_it() -> None:
    # Fold 1's melanomas score low: a threshold chosen on fold 0 misses them, one chosen on all would not.
    is_melanoma = np.array([True] * 5 + [False] * 5 + [True] * 5 + [False] * 5)
    scores = np.array([0.9] * 5 + [0.1] * 5 + [0.3] * 5 + [0.05] * 5)
    fold = np.repeat([0, 1], 10)
    figures = cross_validated_alert(is_melanoma, scores, fold, 0.9)
    assert figures["sensitivity"] == 0.5
    assert figures["sensitivity_n"] == 10


def test_site_figures_hold_the_auc_interval_and_the_alert_with_counts() -> None:
    inputs, is_melanoma, groups = _inputs()
    fold = site_folds(is_melanoma, groups, 3, seed=0)
    probabilities, _ = cross_fit(inputs, FIT, fold, weight=5.0)
    scores = pd.DataFrame(
        {
            "target": np.asarray(CLASSES)[inputs.site_y],
            "fold": fold,
            "p_melanoma": probabilities[:, MELANOMA],
        }
    )
    figures = site_figures(scores, "melanoma", 0.5, _settings(), 0.9, resamples=50, seed=0)
    assert figures["images"] == 36
    assert figures["melanomas"] == 12
    assert figures["melanoma_auc_ci"][0] <= figures["melanoma_auc"] <= figures["melanoma_auc_ci"][1]
    assert figures["threshold_source"] == "site"
    assert figures["alert_on_the_images_that_chose_it"]["sensitivity"] >= 0.9  # by construction
    assert figures["alert"]["sensitivity_n"] == 12  # judged on folds that did not choose it
    assert figures["alert"]["false_alert_rate_n"] == 24
    assert figures["alert_at_validation_threshold"]["threshold"] == 0.5


def test_the_learning_curve_judges_each_subsample_on_the_images_it_did_not_learn() -> None:
    inputs, is_melanoma, groups = _inputs(site_images=48)
    fits = []

    def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fits.append(int((w > 1).sum()))
        return FIT(x, y, w)

    validation = (inputs.train_x, inputs.train_y)
    curve = learning_curve(
        inputs, fit, is_melanoma, groups, _settings(), [12, 24], 2, 0.9, validation, MELANOMA, seed=0
    )
    assert curve["site_images"].tolist() == [12, 12, 24, 24]
    assert (curve["unseen_images"] == 48 - curve["site_images"]).all()
    assert curve["unseen_auc"].between(0, 1).all()
    assert curve["crossfit_auc"].between(0, 1).all()
    assert max(fits) <= 24  # no fit learned more site images than its subsample


def test_verification_bias_is_flagged_when_mostly_alerted_images_were_recorded() -> None:
    biased = verification_bias(
        {"logged_images": 400, "logged_alerts": 80, "diagnosed_images": 40, "diagnosed_alerts": 35}
    )
    assert biased["biased"]
    assert biased["diagnosed_share"] == 0.1
    assert biased["p_value"] < 0.05
    fair = verification_bias(
        {"logged_images": 400, "logged_alerts": 80, "diagnosed_images": 40, "diagnosed_alerts": 8}
    )
    assert not fair["biased"]


def _write_site(root: Path, labels: dict[str, int], seed: int = 100) -> Path:
    """A site folder as export-feedback writes it: Train/<label>/<id>.png, each its own lesion."""
    for label, count in labels.items():
        (root / "Train" / label).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            draw_lesion(seed, size=48).save(root / "Train" / label / f"{label[:3]}{index}.png")
            seed += 1
    return root


def _no_seen() -> pd.DataFrame:
    return inspect_images([], max_pixels=None)


def test_a_site_is_read_grouped_and_its_copies_of_training_images_left_out(tmp_path: Path) -> None:
    root = _write_site(tmp_path / "clinic", {"melanoma": 3, "nevus": 3})
    training = tmp_path / "train.png"
    draw_lesion(100, size=48).save(training)  # the pixels of the site's first melanoma
    seen = inspect_images([str(training)], max_pixels=None)
    rows, left_out = load_site_rows(root, _settings(), seen, CLASSES, "melanoma", 2, 8, 10**7)
    assert (left_out["unreadable"], left_out["copies_of_training"], left_out["left_out_same_pixels"]) == (
        0,
        1,
        1,
    )
    assert len(rows) == 5
    assert list(rows.columns) == ["path", "label", "target", "pixel_sha256", "phash", "group"]
    assert rows["group"].nunique() >= 3


def test_a_site_image_named_by_the_isic_id_of_a_split_image_is_left_out(tmp_path: Path) -> None:
    root = _write_site(tmp_path / "clinic", {"melanoma": 2, "nevus": 2})
    (root / "Train" / "melanoma" / "mel0.png").rename(root / "Train" / "melanoma" / "ISIC_0000001.png")
    seen = _no_seen().assign(isic_id=pd.Series(dtype=str), lesion_id=pd.Series(dtype=str))
    seen.loc[0] = {"isic_id": "ISIC_0000001", "lesion_id": "", "pixel_sha256": "0", "phash": "0" * 16}
    rows, left_out = load_site_rows(root, _settings(), seen, CLASSES, "melanoma", 2, 8, 10**7)
    assert left_out["left_out_same_isic_id"] == 1
    assert not rows["path"].str.contains("ISIC_0000001").any()


def test_a_site_without_melanoma_is_refused_in_one_line(tmp_path: Path) -> None:
    root = _write_site(tmp_path / "clinic", {"nevus": 4})
    with pytest.raises(PipelineError, match=r"^site.name=clinic: no melanoma image in .*clinic") as err:
        load_site_rows(root, _settings(), _no_seen(), CLASSES, "melanoma", 2, 8, 10**7)
    assert "\n" not in str(err.value)


def test_an_unmapped_site_label_names_the_parameter(tmp_path: Path) -> None:
    root = _write_site(tmp_path / "clinic", {"melanoma": 2, "lentigo": 2})
    with pytest.raises(PipelineError, match=r"^site.label_map: no entry for label 'lentigo'"):
        load_site_rows(root, _settings(), _no_seen(), CLASSES, "melanoma", 2, 8, 10**7)


def test_a_site_with_fewer_lesions_than_folds_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"^site\.folds=3: the site has only 2 distinct lesions"):
        site_folds(np.array([True, False, False]), ["a", "b", "b"], 3, seed=0)


def test_a_site_of_melanomas_only_is_refused(tmp_path: Path) -> None:
    root = _write_site(tmp_path / "clinic", {"melanoma": 4})
    with pytest.raises(PipelineError, match=r"^site\.name=clinic: no non-melanoma image in "):
        load_site_rows(root, _settings(), _no_seen(), CLASSES, "melanoma", 2, 8, 10**7)


def test_a_site_needs_the_linear_probe() -> None:
    with pytest.raises(ValidationError, match=r"only train\.recipe=linear_probe learns from a site"):
        as_params(small_params(site={"name": "clinic"}))


def test_a_site_label_mapped_outside_the_classes_is_refused() -> None:
    params = small_params(site={"name": "clinic", "label_map": {"mel": "melanomas"}})
    params["train"].update(recipe="linear_probe", arch="mobilenet", weights="weights/x.weights.h5")
    with pytest.raises(ValidationError, match=r"site\.label_map: 'mel' maps to 'melanomas'"):
        as_params(params)


def test_the_review_log_summary_counts_distinct_images_and_their_diagnoses() -> None:
    predictions = pd.DataFrame(
        {"sha256": ["a", "a", "b", "c", "d"], "melanoma_alert": [0, 1, 1, 0, 0]}  # a: alerted once
    )
    diagnoses = pd.DataFrame({"sha256": ["a", "c", "zz"]})  # zz was never logged
    assert review_log_summary(predictions, diagnoses) == {
        "logged_images": 4,
        "logged_alerts": 2,
        "diagnosed_images": 2,
        "diagnosed_alerts": 1,
    }


def test_a_missing_site_folder_names_the_parameter_and_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"^site\.name=clinic: .*clinic/ does not exist \(skin-lesion"):
        site_root(tmp_path, "clinic")
