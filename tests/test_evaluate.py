"""evaluate: metrics against hand computation and the official ISIC scorer, threshold, promotion."""

from __future__ import annotations

import itertools
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from PIL import Image
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.calibration import calibration_figures, fit_temperature
from skin_lesion.evaluation.external import score_external_set
from skin_lesion.evaluation.metrics import (
    alert_thresholds,
    auc_above_sensitivity,
    balanced_accuracy,
    bootstrap_intervals,
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
    experiment_row,
    known_classes,
    operating_point,
    reference_figures,
    resampled_aucs,
    resampled_balanced_accuracies,
)
from skin_lesion.evaluation.model_card import calibration_lines, class_recall_lines
from skin_lesion.evaluation.plots import pr_rows, roc_rows, roc_table, worst_misclassified_grid, write_plots
from skin_lesion.model.classifier import calibrated, external_class_recall
from skin_lesion.params import EvaluateParams
from skin_lesion.registry.registration import decide_promotion, register_version
from tests.conftest import point_mlflow_at, repo_params, write_image

CLASSES = ["melanoma", "nevus", "vascular lesion"]
# Six test images, two per class. Predictions: 0 right, 1 missed melanoma (said nevus),
# 2 right, 3 false melanoma alarm, 4 and 5 right.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.7, 0.2],
        [0.6, 0.3, 0.1],
        [0.1, 0.2, 0.7],
        [0.2, 0.1, 0.7],
    ]
)
SETTINGS = EvaluateParams.model_validate(repo_params()["evaluate"])


def test_headline_metrics_match_hand_computation() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    assert metrics["test_images"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    # AUCs: melanoma 7/8 pairs ranked right, nevus 7/8, vascular 8/8.
    assert metrics["macro_auc"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)


def test_melanoma_metrics_match_hand_computation() -> None:
    melanoma = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)["melanoma"]
    assert melanoma["sensitivity"] == 0.5
    assert melanoma["specificity"] == 0.75
    assert melanoma["auc"] == 7 / 8


def test_per_class_metrics_match_hand_computation() -> None:
    per_class = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)["per_class"]
    assert per_class["melanoma"] == {
        "precision": 0.5,
        "sensitivity": 0.5,
        "specificity": 0.75,
        "auc": 7 / 8,
        "support": 2,
    }
    assert per_class["nevus"]["specificity"] == 0.75  # row 1 said nevus
    assert per_class["vascular lesion"]["sensitivity"] == per_class["vascular lesion"]["specificity"] == 1.0


def test_class_absent_from_test_has_undefined_metrics() -> None:
    keep = Y_TRUE != 2
    metrics = compute_metrics(Y_TRUE[keep], PROBS[keep], CLASSES, melanoma=0)
    absent = metrics["per_class"]["vascular lesion"]
    assert absent["support"] == 0
    assert absent["sensitivity"] is None
    assert absent["auc"] is None
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)  # mean over the classes present


def test_metrics_agree_with_the_official_isic_scorer() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = pd.DataFrame(np.eye(3)[y_true], columns=CLASSES)
    predicted = pd.DataFrame(probabilities, columns=CLASSES)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    official = ClassificationScore(truth, predicted, weights, ClassificationMetric.BALANCED_ACCURACY)

    ours = compute_metrics(y_true, probabilities, CLASSES, melanoma=0)
    assert ours["balanced_accuracy"] == pytest.approx(official.aggregate["balanced_accuracy"])
    for name in CLASSES:
        assert ours["per_class"][name]["auc"] == pytest.approx(official.per_category.loc[name, "auc"])
    assert ours["melanoma"]["auc_sens_80"] == pytest.approx(
        official.per_category.loc["melanoma", "auc_sens_80"]
    )


def test_the_experiment_table_row_is_rounded_for_reading() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    metrics["melanoma"]["operating_point"] = operating_point(Y_TRUE == 0, PROBS[:, 0], 0.0123456)
    metrics["calibration_error"] = 0.1234567
    row = experiment_row(metrics, version=3)
    assert row["bal_acc"] == 0.667  # (1/2 + 1/2 + 1) / 3
    assert row["mel_thr"] == 0.0123  # three significant digits: a threshold can be small
    assert row["ece"] == 0.123
    assert row["version"] == 3


def test_partial_auc_integrates_tpr_where_it_reaches_the_sensitivity() -> None:
    is_positive = np.array([True, True, False, False])
    # Perfect ranking: TPR is 1 over the whole FPR range.
    assert auc_above_sensitivity(is_positive, np.array([0.9, 0.8, 0.2, 0.1]), 0.8) == pytest.approx(1.0)
    # One positive ranked last: TPR reaches 0.8 only at FPR 1, so nothing is above it.
    assert auc_above_sensitivity(is_positive, np.array([0.9, 0.05, 0.2, 0.1]), 0.8) == pytest.approx(0.0)


def test_threshold_is_the_highest_that_reaches_the_target() -> None:
    is_positive = np.array([True] * 5 + [False] * 3)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.5, 0.3, 0.1])
    assert choose_threshold(is_positive, scores, 0.8) == 0.6  # 4 of 5 melanomas at or above
    assert choose_threshold(is_positive, scores, 0.81) == 0.2  # needs all 5
    assert choose_threshold(is_positive, scores, 0.2) == 0.9


def test_worst_collection_rule_holds_the_target_in_every_collection_with_enough_melanomas() -> None:
    # Clinic a's 10 melanomas score high, clinic b's 5 low; clinic c's 2 are too few to count.
    a_scores, b_scores, c_scores = np.linspace(0.9, 0.6, 10), [0.5, 0.4, 0.3, 0.2, 0.1], [0.05, 0.04]
    scores = np.array([*a_scores, *b_scores, *c_scores, 0.45, 0.15])
    is_positive = np.array([True] * 17 + [False] * 2)
    collections = np.array(["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["a", "b"])
    thresholds = alert_thresholds(is_positive, scores, collections, 0.7)
    assert thresholds["overall"] == 0.4  # 12 of 17 melanomas at or above
    assert thresholds["worst_collection"] == 0.2  # b needs 0.2 for 4 of its 5; c (0.04) does not count


def test_threshold_needs_melanoma_in_validation() -> None:
    with pytest.raises(
        PipelineError, match=r"evaluate.target_sensitivity: the validation split has no melanoma"
    ):
        choose_threshold(np.zeros(4, dtype=bool), np.linspace(0, 1, 4), 0.9)


def test_operating_point_counts_alerts() -> None:
    is_positive = np.array([True, True, False, False, False])
    point = operating_point(is_positive, np.array([0.9, 0.4, 0.6, 0.2, 0.1]), threshold=0.5)
    assert point == {"threshold": 0.5, "sensitivity": 0.5, "specificity": 2 / 3, "alerts_per_100": 40.0}


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 120)
    probabilities = rng.dirichlet([1, 1, 1], 120) + 0.8 * np.eye(3)[y_true]
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    first = bootstrap_intervals(y_true, probabilities, 0, 0.5, resamples=200, seed=1)
    again = bootstrap_intervals(y_true, probabilities, 0, 0.5, resamples=200, seed=1)
    assert first == again
    low, high = first["balanced_accuracy"]
    assert low < compute_metrics(y_true, probabilities, CLASSES, 0)["balanced_accuracy"] < high
    assert 0 <= first["melanoma_auc"][0] < first["melanoma_auc"][1] <= 1


def test_the_resampled_figures_are_each_resamples_own() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 30)
    scores = rng.integers(0, 5, 30) / 4  # ties, which roc_auc_score counts a half
    y_pred = rng.integers(0, 3, 30)
    samples = rng.integers(0, 30, size=(40, 30))
    samples[0] = np.flatnonzero(y_true == 0)[0]  # one class only: no AUC
    aucs = resampled_aucs(y_true == 0, scores, samples)
    assert np.isnan(aucs[0])
    expected = [roc_auc_score(y_true[i] == 0, scores[i]) for i in samples[1:]]
    np.testing.assert_allclose(aucs[1:], expected, rtol=1e-12)
    accuracies = resampled_balanced_accuracies(y_true, y_pred, samples, n_classes=3)
    np.testing.assert_allclose(accuracies, [balanced_accuracy(y_true[i], y_pred[i]) for i in samples])


def test_an_alert_that_finds_every_melanoma_has_an_exact_interval_not_a_point() -> None:
    y_true = np.array([0] * 5 + [1] * 5)
    probabilities = np.array([[0.9, 0.1, 0.0]] * 5 + [[0.1, 0.9, 0.0]] * 5)
    intervals = bootstrap_intervals(y_true, probabilities, 0, 0.5, resamples=50, seed=1)
    assert intervals["melanoma_sensitivity"] == pytest.approx([0.4782, 1.0], abs=1e-4)  # 5 of 5


def test_calibration_error_matches_hand_computation() -> None:
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4]])
    # Bin 9 holds a right answer at 0.9, bin 6 a wrong one at 0.6.
    assert expected_calibration_error(np.array([0, 1]), probabilities, bins=10) == pytest.approx(0.35)


def test_temperature_scaling_lowers_the_nll_and_ece_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    logits = 2 * rng.normal(size=(3000, 3))
    labels = np.array([rng.choice(3, p=row) for row in softmax(logits, axis=1)])
    overconfident = softmax(3 * logits, axis=1)  # the right probabilities, sharpened threefold
    temperature = fit_temperature(labels, overconfident)
    assert temperature == pytest.approx(3, rel=0.1)
    figures = calibration_figures(labels, overconfident, temperature, bins=10)
    assert figures["nll_after"] < figures["nll_before"]
    assert figures["ece_after"] < figures["ece_before"] / 2


def test_an_external_images_calibration_is_judged_only_against_a_class_the_model_has() -> None:
    positions, labels = known_classes(["nevus", "other", "melanoma"], CLASSES)
    assert positions.tolist() == [0, 2]
    assert labels.tolist() == [1, 0]


def test_calibrated_probabilities_are_the_softmax_of_log_probabilities_over_the_temperature() -> None:
    probabilities = np.array([[0.8, 0.2]])
    # sqrt(0.8) : sqrt(0.2) = 2 : 1
    np.testing.assert_allclose(calibrated(probabilities, 2.0), [[2 / 3, 1 / 3]])
    assert calibrated(probabilities, 1.0) is probabilities  # older versions answer as they did


def test_the_experiment_table_row_shows_the_calibrated_ece() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    metrics["melanoma"]["operating_point"] = operating_point(Y_TRUE == 0, PROBS[:, 0], 0.5)
    metrics["calibration_error"] = 0.0412
    metrics["calibration"] = {"temperature": 0.61234, "test": {"ece_before": 0.1876}}
    row = experiment_row(metrics, version=1)
    assert row["ece"] == 0.041
    assert not {"ece_raw", "temp"} & row.keys()  # the details file has them: the table stays narrow


def _external_result() -> dict:
    # Two melanomas (one found), two nevi (both found), one `other`; no vascular lesion.
    targets = ["melanoma", "melanoma", "nevus", "nevus", "other"]
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.5, 0.4, 0.1]]
    )
    return score_external_set(targets, probabilities, CLASSES, "melanoma", {"overall": 0.5}, "overall", 0, 0)


def test_the_registered_figures_carry_each_external_sets_recall_of_the_classes_it_has() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    metrics["melanoma"]["operating_point"] = operating_point(Y_TRUE == 0, PROBS[:, 0], 0.5)
    metrics["confidence_intervals"] = {}
    figures = reference_figures(
        metrics, Y_TRUE, PROBS, np.zeros(6, bool), CLASSES, 0, {"isic2017": _external_result()}
    )
    assert figures["external"]["isic2017"]["class_recall"] == {
        "melanoma": {"recall": 0.5, "images": 2},
        "nevus": {"recall": 1.0, "images": 2},
    }


def test_a_classs_external_recall_is_pooled_over_the_sets_and_none_where_no_set_has_it() -> None:
    figures = {
        "external": {
            "a": {"class_recall": {"melanoma": {"recall": 0.5, "images": 2}}},
            "b": {
                "class_recall": {
                    "melanoma": {"recall": 1.0, "images": 6},
                    "nevus": {"recall": 0.25, "images": 4},
                }
            },
        }
    }
    assert external_class_recall(figures, CLASSES) == {
        "melanoma": 7 / 8,
        "nevus": 0.25,
        "vascular lesion": None,
    }
    assert external_class_recall({}, CLASSES) == dict.fromkeys(CLASSES)  # versions without figures


def test_the_model_card_marks_classes_no_external_set_measured() -> None:
    metrics = compute_metrics(Y_TRUE, PROBS, CLASSES, melanoma=0)
    lines = class_recall_lines(metrics, {"isic2017": _external_result()}, CLASSES)
    assert "| melanoma | 0.500 | 0.500 of 2 |" in lines
    assert "| vascular lesion | 1.000 | unmeasured |" in lines


def test_the_model_card_gives_the_calibration_error_before_and_after_the_temperature() -> None:
    row = {"images": 10, "ece_before": 0.2, "ece_after": 0.05, "nll_before": 1.5, "nll_after": 1.1}
    lines = calibration_lines({"temperature": 0.6, "val": row, "test": row}, {"clinic": {"calibration": row}})
    assert "temperature of 0.600" in " ".join(lines)
    assert "| clinic | 10 | 0.200 | 0.050 | 1.500 | 1.100 |" in lines
    assert calibration_lines(None, {}) == []  # details of versions evaluated before calibration


def test_curves_are_empty_without_positives() -> None:
    assert roc_rows(np.zeros(4, dtype=bool), np.linspace(0, 1, 4)).empty
    assert pr_rows(np.zeros(4, dtype=bool), np.linspace(0, 1, 4)).empty
    roc = roc_rows(Y_TRUE == 0, PROBS[:, 0])
    assert (roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (1.0, 1.0)


def test_precision_recall_curve_is_drawn_as_steps() -> None:
    # Two melanomas scored above 48 other images: precision is 1.0 all the way to recall 1.0.
    is_positive = np.array([True, True] + [False] * 48)
    scores = np.linspace(1, 0, 50)
    pr = pr_rows(is_positive, scores)
    points = list(zip(pr["recall"], pr["precision"], strict=True))
    assert (1.0, 1.0) in points
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        assert x0 == x1 or y0 == y1, f"a slanted segment from {(x0, y0)} to {(x1, y1)}"
    assert list(pr["step"]) == list(range(len(pr)))
    # Precision only falls below 1 once recall is 1: the drop is vertical, at recall 1.
    assert all(y == 1.0 for x, y in points if x < 1.0)


def test_roc_table_holds_one_curve_per_class_in_drawing_order() -> None:
    table = roc_table(Y_TRUE, PROBS, CLASSES)
    assert list(table["class"].unique()) == CLASSES
    for _, curve in table.groupby("class"):
        assert curve["fpr"].is_monotonic_increasing
        assert curve["tpr"].is_monotonic_increasing
        assert list(curve["step"]) == list(range(len(curve)))


def test_write_plots_writes_the_charts_data_and_readable_images(tmp_path: Path) -> None:
    for index in range(len(Y_TRUE)):
        write_image(tmp_path / "images" / f"{index}.jpg", (120, 80, 60), seed=index)
    rows = pd.DataFrame({"path": [str(tmp_path / "images" / f"{k}.jpg") for k in range(len(Y_TRUE))]})
    settings = EvaluateParams.model_validate(repo_params()["evaluate"])
    write_plots(tmp_path / "plots", rows, Y_TRUE, PROBS, CLASSES, 0, settings, stress={})
    names = {path.name for path in (tmp_path / "plots").iterdir()}
    assert {"roc.csv", "pr_melanoma.csv", "confusion.csv", "reliability.csv"} <= names
    for image in ("roc.png", "pr_melanoma.png", "confusion.png", "reliability.png", "stress.png"):
        with Image.open(tmp_path / "plots" / image) as figure:
            assert figure.width >= 600, image


# --- registry and promotion ---------------------------------------------------------------------


@pytest.fixture
def registry(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite registry in tmp_path holding one logged model; returns its URI."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    point_mlflow_at(uri, monkeypatch)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    with mlflow.start_run():
        return mlflow.keras.log_model(model, name="model", pip_requirements=["keras"]).model_uri


def _register(model_uri: str, accuracy: float, split: str = "s1") -> str:
    tags = {"test_balanced_accuracy": str(accuracy), "test_split": split}
    return register_version(model_uri, "lesions", tags=tags, description="card")


def _metrics(accuracy: float) -> dict:
    return {
        "balanced_accuracy": accuracy,
        "accuracy": accuracy,
        "macro_auc": None,
        "melanoma": {"auc": None, "auc_sens_80": None},
    }


def test_register_version_sets_challenger_alias_and_description(registry: str) -> None:
    first, second = _register(registry, 0.5), _register(registry, 0.6)
    challenger = mlflow.MlflowClient().get_model_version_by_alias("lesions", "challenger")
    assert (first, second, str(challenger.version)) == ("1", "2", "2")
    assert challenger.tags["test_balanced_accuracy"] == "0.6"
    assert challenger.description == "card"


def test_manual_promotion_never_moves_champion(registry: str) -> None:
    version = _register(registry, 0.9)
    promoted, reason = decide_promotion(
        mlflow.MlflowClient(), "lesions", version, _metrics(0.9), "s1", SETTINGS
    )
    assert not promoted
    assert "manual" in reason


def test_auto_promotion_takes_the_first_champion(registry: str) -> None:
    auto = SETTINGS.model_copy(update={"promote": "auto"})
    version = _register(registry, 0.5)
    promoted, reason = decide_promotion(mlflow.MlflowClient(), "lesions", version, _metrics(0.5), "s1", auto)
    assert promoted
    assert reason.startswith("no champion yet")


def test_auto_promotion_needs_a_win_by_the_margin_on_the_same_split(registry: str) -> None:
    client = mlflow.MlflowClient()
    auto = SETTINGS.model_copy(update={"promote": "auto", "promote_margin": 0.05})
    client.set_registered_model_alias("lesions", "champion", _register(registry, 0.60))

    small_win = _register(registry, 0.62)
    assert decide_promotion(client, "lesions", small_win, _metrics(0.62), "s1", auto) == (
        False,
        "balanced_accuracy 0.6200 does not beat champion version 1 (0.6000) by more than 0.05",
    )
    big_win = _register(registry, 0.70)
    promoted, reason = decide_promotion(client, "lesions", big_win, _metrics(0.70), "s1", auto)
    assert promoted
    assert "beats champion version 1" in reason
    other_split = _register(registry, 0.90, split="s2")
    promoted, reason = decide_promotion(client, "lesions", other_split, _metrics(0.90), "s2", auto)
    assert not promoted
    assert "another test split" in reason


def test_worst_misclassified_grid_says_so_when_nothing_is_misclassified() -> None:
    rows = pd.DataFrame({"path": ["unused.jpg", "unused.jpg"]})
    y_true = np.array([0, 1])
    grid = worst_misclassified_grid(rows, y_true, np.eye(2), ["melanoma", "nevus"], count=16)
    pixels = np.asarray(grid)
    assert (pixels < 128).any(), "a blank image: the notice is missing"
