"""The out-of-distribution score, the image quality checks and the drift report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from skin_lesion.app.monitoring import alert_in_words, drift_report, render_drift, threshold_in_words
from skin_lesion.app.quality import quality_problems
from skin_lesion.evaluation.metrics import reference_figures
from skin_lesion.evaluation.ood_fitting import fit_ood
from skin_lesion.model.ood import OodModel
from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings
from skin_lesion.training.architectures import build_model
from tests.conftest import REPO, draw_lesion

CLASSES = ["melanoma", "nevus", "vascular lesion"]


def _gaussian(seed: int, n: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, (n, 8))


def test_new_images_like_the_validation_ones_are_flagged_at_the_chosen_rate() -> None:
    ood = fit_ood(_gaussian(0, 500), _gaussian(1, 400), quantile=0.9)
    flagged = ood.score(_gaussian(5, 4000)) > ood.threshold  # unseen, from the validation distribution
    assert abs(flagged.mean() - 0.1) <= 0.04  # the quantile of 400 images: about +-0.015 each way


def test_embeddings_far_from_training_are_flagged_and_near_ones_are_not() -> None:
    ood = fit_ood(_gaussian(0, 500), _gaussian(1, 200), quantile=0.99)
    assert (ood.score(_gaussian(2, 50, shift=6.0)) > ood.threshold).all()
    assert (ood.score(_gaussian(3, 200)) > ood.threshold).mean() < 0.05


def test_saved_model_scores_like_the_original(tmp_path: Path) -> None:
    ood = fit_ood(_gaussian(0, 100), _gaussian(1, 50), quantile=0.95)
    ood.save(tmp_path / "ood.npz")
    loaded = OodModel.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(loaded.score(_gaussian(4, 10)), ood.score(_gaussian(4, 10)), rtol=1e-5)
    assert loaded.threshold == ood.threshold


def test_embeddings_are_what_the_softmax_head_sees() -> None:
    keras.utils.set_random_seed(0)
    model = build_model("resnet_small", 32, 3, 0.0)
    images = np.stack([np.asarray(draw_lesion(seed, 32)) for seed in range(4)])
    probabilities, embeddings = predict_with_embeddings(with_embeddings(model), images, batch_size=2)
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)
    assert embeddings.shape == (4, model.get_layer("probs").input.shape[-1])


def test_embedding_under_op_determinism_logs_no_tensorflow_error() -> None:
    # train.deterministic turns on TensorFlow's op determinism, under which model.predict's tf.data
    # pipeline logs "E ... NodeDef mentions attribute use_unbounded_threadpool" (native stderr).
    script = (
        "import keras, numpy as np, tensorflow as tf\n"
        "from skin_lesion.training.architectures import build_model\n"
        "from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings\n"
        "tf.config.experimental.enable_op_determinism()\n"
        "network = with_embeddings(build_model('resnet_small', 32, 3, 0.0))\n"
        "probabilities, embeddings = predict_with_embeddings(network, np.zeros((10, 32, 32, 3)), 4, True)\n"
        "assert probabilities.shape == (10, 3) and len(embeddings) == 10\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NodeDef" not in result.stderr, result.stderr[-3000:]


def test_a_usual_lesion_photo_passes_the_quality_checks() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(90, 230, (180, 180, 3), dtype=np.uint8))
    assert quality_problems(photo) == []


def test_small_dark_and_blurred_images_are_named_as_such() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(90, 230, (180, 180, 3), dtype=np.uint8))
    assert quality_problems(photo.resize((60, 60)))[0].startswith("too small (60x60 px")
    dark = Image.fromarray((np.asarray(photo) * 0.2).astype(np.uint8))
    assert [p.split(" (")[0] for p in quality_problems(dark)] == ["too dark"]
    assert [p.split(" (")[0] for p in quality_problems(photo.filter(ImageFilter.GaussianBlur(3)))] == [
        "blurred"
    ]


def _metrics() -> dict:
    return {
        "melanoma": {
            "operating_point": {
                "threshold": 0.3,
                "sensitivity": 0.9,
                "specificity": 0.8,
                "alerts_per_100": 25.0,
            }
        },
        "confidence_intervals": {"melanoma_sensitivity": [0.75, 1.0]},
    }


def _figures() -> dict:
    return reference_figures(*_inputs())


def _inputs() -> tuple:
    y = np.array([0, 0, 1, 2])
    p = np.array([[0.9, 0.1, 0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    return _metrics(), y, p, np.array([False, False, False, True]), CLASSES, 0


def test_reference_figures_and_the_threshold_in_words() -> None:
    figures = _figures()
    assert figures["melanomas"] == 2
    assert figures["ood_rate"] == 0.25
    assert figures["class_mix"] == {"melanoma": 0.25, "nevus": 0.5, "vascular lesion": 0.25}
    words = threshold_in_words(figures, 0.3)
    assert "found 90% of the 2 melanomas in its test set (95 % CI 75% to 100%)" in words
    assert "with 20 alerts per 100 non-melanoma lesions" in words
    assert "outside its training data" not in words  # no external set was scored


def test_the_threshold_in_words_of_a_version_without_figures_says_they_are_not_recorded() -> None:
    assert threshold_in_words({}, 0.3).endswith("this version's test figures are not recorded.")
    no_melanoma = {**_figures(), "melanomas": 0, "melanoma_sensitivity": None}
    assert threshold_in_words(no_melanoma, 0.3).endswith("its test set had no melanoma to check it on.")


def test_the_threshold_in_words_marks_a_set_that_chose_the_recipe() -> None:
    alert = {"sensitivity": 0.5, "sensitivity_n": 40, "false_alert_rate": 0.25, "sensitivity_ci": None}
    external = {"isic2017": {"alert": alert, "recall": {}, "class_counts": {}}}
    figures = {**_figures(), "external": reference_figures(*_inputs(), external=external)["external"]}
    figures["external"]["isic2017"]["chose_recipe"] = True  # as evaluate.registered_figures flags it
    assert "the 40 melanomas of isic2017 (chose the recipe), with" in threshold_in_words(figures, 0.3)


def test_the_threshold_in_words_states_each_external_sets_alert() -> None:
    alert = {
        "sensitivity": 0.5,
        "sensitivity_n": 40,
        "false_alert_rate": 0.25,
        "sensitivity_ci": [0.34, 0.66],
    }
    recall = {"recall": {}, "class_counts": {}}
    external = {
        "clinic": {"alert": alert, **recall},
        "archive": {"alert": {**alert, "sensitivity": 0.8}, **recall},
    }
    figures = {**_figures(), "external": reference_figures(*_inputs(), external=external)["external"]}
    figures["external"]["archive"].pop("sensitivity_ci", None)  # as versions registered before it was
    words = threshold_in_words(figures, 0.3)
    assert words.endswith(
        " On images from outside its training data it found 50% of the 40 melanomas of clinic"
        " (95 % CI 34% to 66%), with 25 alerts per 100 non-melanoma lesions; and 80% of the 40 melanomas"
        " of archive, with 25 alerts per 100 non-melanoma lesions."
    )


def test_an_images_alert_is_worded_against_the_threshold() -> None:
    assert alert_in_words(0.31, 0.12) == "P(melanoma) 0.310, at or above the alert threshold 0.120"
    assert alert_in_words(0.12, 0.12) == "P(melanoma) 0.120, at or above the alert threshold 0.120"
    assert alert_in_words(0.05, 0.12) == "P(melanoma) 0.050, below the alert threshold 0.120"


def _log(labels: list[str], alerts: list[bool], unlike: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"predicted_label": labels, "melanoma_alert": alerts, "unlike_training": unlike})


def test_a_log_like_the_test_split_shows_no_drift() -> None:
    log = _log(
        ["melanoma", "nevus", "nevus", "vascular lesion"],
        [True, False, False, False],
        [True, False, False, False],
    )
    report = drift_report(log, _figures(), CLASSES, tolerance=0.1, min_predictions=4)
    assert report["drifted"] == []
    assert render_drift(report, "m").endswith("no drift beyond tolerance")


def test_a_shifted_class_mix_and_alert_rate_are_flagged_as_drift() -> None:
    log = _log(["melanoma"] * 8, [True] * 8, [False] * 8)
    report = drift_report(log, _figures(), CLASSES, tolerance=0.1, min_predictions=8)
    assert report["drifted"] == ["alert_rate", "ood_rate", "class_mix_distance"]
    assert "DRIFT in alert_rate, ood_rate, class_mix_distance" in render_drift(report, "m")


def test_a_handful_of_predictions_gets_no_verdict() -> None:
    log = _log(["melanoma"] * 8, [True] * 8, [False] * 8)  # drift, were there enough of them
    report = drift_report(log, _figures(), CLASSES, tolerance=0.1, min_predictions=9)
    assert report["drifted"] == []
    assert render_drift(report, "m").endswith("no verdict: fewer than 9 predictions, too few to judge drift")


def test_a_version_without_test_figures_has_nothing_to_compare_with() -> None:
    log = _log(["melanoma"] * 8, [True] * 8, [False] * 8)
    report = drift_report(log, {}, CLASSES, tolerance=0.1, min_predictions=1)
    assert report["drifted"] == []
    assert render_drift(report, "m").endswith(
        "no verdict: this version carries no test figures to compare with"
    )
