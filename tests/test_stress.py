"""The acquisition stress test: deterministic transforms, monotone in strength, scored on a fixed model."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from skin_lesion.evaluation.metrics import compute_metrics
from skin_lesion.evaluation.stress import TRANSFORMS, stress_test, stressed_variants
from skin_lesion.params import EvaluateParams
from tests.conftest import draw_lesion, repo_params

STRENGTHS = repo_params()["evaluate"]["stress"]


def _images(count: int = 6, size: int = 48) -> np.ndarray:
    return np.stack([np.asarray(draw_lesion(seed, size=size)) for seed in range(count)])


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_is_deterministic(name: str) -> None:
    images = _images()
    strength = STRENGTHS[name][1]
    np.testing.assert_array_equal(TRANSFORMS[name](images, strength), TRANSFORMS[name](images, strength))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_changes_images_more_as_strength_grows(name: str) -> None:
    images = _images()
    changes = [
        np.abs(TRANSFORMS[name](images, strength).astype(float) - images).mean()
        for strength in STRENGTHS[name]
    ]
    assert changes[0] > 0
    assert changes == sorted(changes)
    assert changes[0] < changes[-1]


def _reddish_model(images: np.ndarray) -> np.ndarray:
    # A fixed "model": P(melanoma) grows with how much darker and bluer than red an image is.
    pixels = images.astype(float)
    score = 1 / (1 + np.exp((pixels[..., 0].mean(axis=(1, 2)) - pixels[..., 2].mean(axis=(1, 2))) / 20))
    return np.stack([score, 1 - score], axis=1)


def test_stress_test_reports_each_strength_and_its_drop() -> None:
    images = _images(8)
    y = np.array([0, 1] * 4)
    clean = compute_metrics(y, _reddish_model(images), ["melanoma", "nevus"], melanoma=0)
    first = stress_test(_reddish_model, images, y, 0, clean, STRENGTHS)
    second = stress_test(_reddish_model, images, y, 0, clean, STRENGTHS)
    assert first == second  # deterministic end to end
    assert list(first) == list(STRENGTHS)
    for name, rows in first.items():
        assert list(rows) == [f"{strength:g}" for strength in STRENGTHS[name]]
        for row in rows.values():
            assert row["balanced_accuracy_drop"] == pytest.approx(
                clean["balanced_accuracy"] - row["balanced_accuracy"]
            )


def test_a_stronger_colour_cast_moves_a_fixed_model_further() -> None:
    images = _images(8)
    clean = _reddish_model(images)
    shifts = [
        np.abs(_reddish_model(changed) - clean).mean()
        for _, _, changed in stressed_variants(images, {"colour_cast": STRENGTHS["colour_cast"]})
    ]
    assert shifts == sorted(shifts)
    assert shifts[0] > 0


def test_no_stress_strengths_run_nothing() -> None:
    assert list(stressed_variants(_images(), {})) == []


def test_strength_outside_a_transforms_range_is_refused() -> None:
    settings = {**repo_params()["evaluate"], "stress": {"darken": [1.5]}}
    with pytest.raises(ValidationError, match=r"evaluate.stress.darken: 1.5 is outside \(0, 1\)"):
        EvaluateParams.model_validate(settings)
