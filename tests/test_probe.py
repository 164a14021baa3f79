"""Linear probing, LP-FT and WiSE-FT: the probe as a Keras head, its embedding cache, the interpolation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from skin_lesion.evaluation.metrics import capped_balanced_accuracy
from skin_lesion.images import load_images
from skin_lesion.model.network import OUTPUT_LAYER
from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings
from skin_lesion.params import Params, TrainParams
from skin_lesion.training import recipes
from skin_lesion.training.architectures import BACKBONE_NAME, build_model
from skin_lesion.training.batching import load_cached_images
from skin_lesion.training.callbacks import MONITOR
from skin_lesion.training.linear_head import fit_probe
from skin_lesion.training.probe import (
    EmbeddingCache,
    backbone_key,
    cached_embeddings,
    collection_projection,
    interpolate_weights,
)
from skin_lesion.training.recipes import (
    ImageSet,
    Phase,
    fit_recipe,
    train_linear_probe,
    training_phases,
)
from tests.conftest import draw_lesion, small_params, tiny_backbone_weights
from tests.test_train import SIZE, _data
from tests.test_transfer import _pretrained

pytestmark = pytest.mark.usefixtures("float32_policy_restored")


def _probe_params(weights: Path, **train: object):
    return _pretrained(weights, **{"recipe": "linear_probe", "probe_c": 0.5, **train})


def _sets(n: int = 24) -> tuple[ImageSet, ImageSet]:
    (x, y), (x_val, y_val) = _data(n=n), _data(n=12, seed=1)
    return ImageSet(x, y, "train-key"), ImageSet(x_val, y_val, "val-key")


def _regression(embeddings: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", solver="newton-cg", max_iter=1000).fit(
        embeddings.astype(float), labels
    )


@pytest.mark.parametrize("mirror", [False, True], ids=["plain", "mirror-averaged"])
def test_probe_model_answers_what_the_regression_answers(
    weights_file: Path, tmp_path: Path, mirror: bool
) -> None:
    params = _probe_params(weights_file)
    base = params.base.model_copy(update={"mirror_average": mirror})
    train_set, val_set = _sets()
    model, summary = train_linear_probe(train_set, val_set, base, params.train, tmp_path / "cache")

    # The regression scikit-learn fits on the backbone's own embeddings of the same images.
    frozen = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    network = with_embeddings(frozen)
    _, plain = predict_with_embeddings(network, train_set.images, 8)
    _, flipped = predict_with_embeddings(network, train_set.images[:, :, ::-1], 8)
    embeddings = (plain + flipped) / 2 if mirror else plain
    expected = _regression(embeddings, train_set.labels, 0.5).predict_proba(embeddings)

    got, _ = predict_with_embeddings(with_embeddings(model), train_set.images, 8, mirror_average=mirror)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert summary["recipe"] == "linear_probe"
    assert summary["epochs"] == 0
    assert 0 <= summary["val_balanced_accuracy"] <= 1


def test_the_probe_logs_its_one_fit_as_the_first_step_of_its_curves(
    weights_file: Path, tmp_path: Path
) -> None:
    params = _probe_params(weights_file)
    train_set, val_set = _sets()
    logged: list[tuple[int, dict]] = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logged.append((epoch, dict(logs or {})))

    model, _ = fit_recipe(train_set, val_set, params.base, params.train, tmp_path / "cache", [Recorder()])
    # One step, with the names a fine-tuning epoch logs, so that dvc.yaml's training charts draw it.
    assert [epoch for epoch, _ in logged] == [0]
    logs = logged[0][1]
    assert set(logs) == {"loss", "accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy"}
    mirror = params.base.mirror_average
    network = with_embeddings(model)
    for prefix, image_set in (("", train_set), ("val_", val_set)):
        probabilities, _ = predict_with_embeddings(network, image_set.images, 8, mirror_average=mirror)
        loss = log_loss(image_set.labels, probabilities, labels=[0, 1, 2])
        assert logs[f"{prefix}loss"] == pytest.approx(loss, rel=1e-3)
        accuracy = (probabilities.argmax(axis=1) == image_set.labels).mean()
        assert logs[f"{prefix}accuracy"] == pytest.approx(accuracy)


def test_two_class_probe_is_the_logistic_unit_as_a_softmax() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 5)).astype(np.float32)
    labels = np.where(embeddings[:, 0] + 0.3 * rng.normal(size=40) > 0, 2, 0)  # classes 0 and 2 of 3
    kernel, bias = fit_probe(embeddings, labels, 3, c=1.0, class_weight="balanced", seed=0)
    logits = embeddings @ kernel + bias
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = _regression(embeddings, labels, 1.0).predict_proba(embeddings)
    np.testing.assert_allclose(softmax[:, [0, 2]], expected, rtol=1e-5, atol=1e-6)
    assert softmax[:, 1].max() < 1e-9  # a class with no training image is never predicted


def test_embeddings_are_computed_once_per_backbone_and_image_set(weights_file: Path, tmp_path: Path) -> None:
    params = _probe_params(weights_file)
    train_set, val_set = _sets()
    cache = tmp_path / "cache"
    train_linear_probe(train_set, val_set, params.base, params.train, cache)
    files = sorted(cache.glob("embeddings-*.npy"))
    assert len(files) == 2
    stamps = [path.stat().st_mtime_ns for path in files]
    other_c = params.train.model_copy(update={"probe_c": 0.01})
    train_linear_probe(train_set, val_set, params.base, other_c, cache)  # another C: same embeddings
    assert sorted(cache.glob("embeddings-*.npy")) == files
    assert [path.stat().st_mtime_ns for path in files] == stamps


def test_embedding_cache_key_follows_the_backbone_weights_and_mirroring(tmp_path: Path) -> None:
    first = build_model(
        "mobilenet", SIZE, 3, 0.0, weights=str(tiny_backbone_weights(tmp_path / "a.weights.h5", seed=1))
    )
    second = build_model(
        "mobilenet", SIZE, 3, 0.0, weights=str(tiny_backbone_weights(tmp_path / "b.weights.h5", seed=2))
    )
    before = backbone_key(first, False)
    assert before != backbone_key(second, False)
    assert before != backbone_key(first, True)
    first.get_layer(OUTPUT_LAYER).set_weights(
        [np.ones((first.get_layer(OUTPUT_LAYER).input.shape[-1], 3)), np.ones(3)]
    )
    assert backbone_key(first, False) == before  # the head is not part of it


def test_a_net_trained_from_scratch_is_keyed_by_its_own_layers_below_the_head() -> None:
    keras.utils.set_random_seed(0)
    model = build_model("resnet_small", SIZE, 3, 0.0, weights="none")
    before = backbone_key(model, False)
    model.get_layer(OUTPUT_LAYER).set_weights([w * 0 for w in model.get_layer(OUTPUT_LAYER).get_weights()])
    assert backbone_key(model, False) == before
    conv = next(layer for layer in model.layers if layer.weights and layer.name != OUTPUT_LAYER)
    conv.set_weights([w + 1 for w in conv.get_weights()])
    assert backbone_key(model, False) != before


def test_cached_embeddings_are_the_networks_embeddings(weights_file: Path, tmp_path: Path) -> None:
    model = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    images, _ = _data(n=6)
    got = cached_embeddings(model, images, "key", tmp_path, 4, mirror_average=False)
    np.testing.assert_allclose(got, predict_with_embeddings(with_embeddings(model), images, 4)[1], rtol=1e-6)


def _image_files(folder: Path, count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(count):
        draw_lesion(seed, size=SIZE).save(folder / f"{seed}.png")
    return [str(folder / f"{seed}.png") for seed in range(count)]


def test_embeddings_of_files_that_train_cached_are_reused_without_decoding_the_files(
    weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    paths, cache = _image_files(tmp_path / "images"), tmp_path / "cache"
    images, key = load_cached_images(paths, SIZE, cache)  # as train embeds its split
    trained = cached_embeddings(model, images, key, cache, 4, mirror_average=False)

    def refuse(*_: object) -> None:
        raise AssertionError("the files were decoded again")

    monkeypatch.setattr("skin_lesion.training.probe.load_cached_images", refuse)
    embedder = EmbeddingCache(model, cache, 4, mirror_average=False)
    np.testing.assert_array_equal(embedder.embed_files(paths, SIZE, cache), trained)


def test_embeddings_of_files_not_cached_yet_are_the_networks(weights_file: Path, tmp_path: Path) -> None:
    model = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    paths = _image_files(tmp_path / "images")
    got = EmbeddingCache(model, tmp_path / "cache", 4, mirror_average=False).embed_files(
        paths, SIZE, tmp_path / "cache"
    )
    expected = predict_with_embeddings(with_embeddings(model), load_images(paths, SIZE), 4)[1]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_wise_ft_at_zero_and_one_is_the_probe_and_the_fine_tuned_model(weights_file: Path) -> None:
    keras.utils.set_random_seed(1)
    probe = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    keras.utils.set_random_seed(2)
    tuned = build_model("mobilenet", SIZE, 3, 0.0)
    images, _ = _data(n=4)
    expected = {0.0: probe.predict(images, verbose=0), 1.0: tuned.predict(images, verbose=0)}
    tuned_weights = tuned.get_weights()
    for interpolation, want in expected.items():
        tuned.set_weights(tuned_weights)
        mixed = interpolate_weights(probe.get_weights(), tuned, interpolation)
        np.testing.assert_allclose(mixed.predict(images, verbose=0), want, rtol=1e-6, atol=1e-7)
    tuned.set_weights(tuned_weights)
    halfway = interpolate_weights(probe.get_weights(), tuned, 0.5).get_weights()
    for got, a, b in zip(halfway, probe.get_weights(), tuned_weights, strict=True):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-6, atol=1e-7)


def _informative_backbone_weights(path: Path, images: np.ndarray) -> Path:
    """A backbone file whose batch norms hold `images`' statistics, as a pretrained one's hold its data's.

    tiny_backbone_weights's random net shrinks every image to an embedding of about 1e-21, on which
    every image gets the same answer, mirrored or not, from any mix of weights.
    """
    keras.utils.set_random_seed(5)
    model = build_model("mobilenet", SIZE, 3, 0.0)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # its moving statistics become this batch's
    model(images.astype(np.float32), training=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.get_layer(BACKBONE_NAME).save_weights(path)
    return path


@dataclass(frozen=True)
class LpFtRun:
    """One LP-FT run halfway between the probe and the model fine-tuned from it, and what it went through."""

    params: Params
    sets: tuple[ImageSet, ImageSet]
    cache: Path
    model: keras.Model
    summary: dict[str, Any]
    fine_tuning_ends: list[list[np.ndarray]]  # the trained model's weights as fine-tuning began and ended
    fine_tuning_scores: list[float]  # its epochs' val_balanced_accuracy
    builds: int  # the nets build_model built
    policies: tuple[str, str]  # Keras's global dtype policy before and after the run


@pytest.fixture(scope="module")
def lp_ft_run(tmp_path_factory: pytest.TempPathFactory) -> LpFtRun:
    # One run for the tests below: fine-tuning is the slow part of this file.
    tmp = tmp_path_factory.mktemp("lp_ft")
    (x, y), (x_val, y_val) = _data(n=24), _data(n=30, seed=1)  # 30: balanced accuracies rarely tie
    sets = ImageSet(x, y, "train-key"), ImageSet(x_val, y_val, "val-key")
    weights = _informative_backbone_weights(tmp / "weights" / "mobilenet.weights.h5", sets[0].images)
    # Mixed bfloat16, the committed precision, so that a policy left set would show.
    params = _probe_params(
        weights, recipe="lp_ft", epochs=2, freeze_epochs=1, interpolation=0.5, precision="mixed_bfloat16"
    )
    params = params.model_copy(update={"base": params.base.model_copy(update={"mirror_average": True})})
    ends: list[list[np.ndarray]] = []
    scores: list[float] = []

    class Ends(keras.callbacks.Callback):
        # Without augmentation the model trained is the model itself; these run after early stopping's.
        def on_train_begin(self, logs: dict | None = None) -> None:
            ends.append(self.model.get_weights())

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            scores.append((logs or {})[MONITOR])

        def on_train_end(self, logs: dict | None = None) -> None:
            ends.append(self.model.get_weights())

    built: list[keras.Model] = []

    def counted_build_model(*args: Any, **kwargs: Any) -> keras.Model:
        built.append(build_model(*args, **kwargs))
        return built[-1]

    before = keras.config.dtype_policy().name
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipes, "build_model", counted_build_model)
        model, summary = fit_recipe(*sets, params.base, params.train, tmp / "cache", [Ends()])
    after = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("float32")  # whatever happened, not for the tests after
    return LpFtRun(params, sets, tmp / "cache", model, summary, ends, scores, len(built), (before, after))


def test_lp_ft_fine_tunes_from_the_probe_without_a_warm_up(lp_ft_run: LpFtRun) -> None:
    params = lp_ft_run.params
    assert training_phases(params.train) == [
        Phase("fine_tune", 0, 2, params.train.fine_tune_learning_rate, params.train.unfreeze)
    ]
    probe, _ = train_linear_probe(*lp_ft_run.sets, params.base, params.train, lp_ft_run.cache)
    for got, want in zip(lp_ft_run.fine_tuning_ends[0], probe.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert lp_ft_run.summary["recipe"] == "lp_ft"
    assert lp_ft_run.summary["epochs"] == 2
    assert "probe_val_balanced_accuracy" in lp_ft_run.summary


def test_lp_ft_returns_the_interpolation_of_the_probe_and_the_fine_tuned_model(lp_ft_run: LpFtRun) -> None:
    probe, fine_tuned = lp_ft_run.fine_tuning_ends
    # The two ends differ, so a model left at either fails the check below.
    assert any(not np.allclose(start, end) for start, end in zip(probe, fine_tuned, strict=True))
    assert lp_ft_run.summary["interpolation"] == 0.5
    for got, start, end in zip(lp_ft_run.model.get_weights(), probe, fine_tuned, strict=True):
        want = 0.5 * start + 0.5 * end if np.issubdtype(got.dtype, np.floating) else end
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_lp_ft_records_the_validation_figures_of_the_model_it_returns(lp_ft_run: LpFtRun) -> None:
    _, val_set = lp_ft_run.sets
    probabilities, _ = predict_with_embeddings(
        with_embeddings(lp_ft_run.model), val_set.images, 8, mirror_average=True
    )
    predicted = probabilities.argmax(axis=1)
    summary = lp_ft_run.summary
    cap = lp_ft_run.params.train.val_class_cap
    score = capped_balanced_accuracy(val_set.labels, predicted, cap)
    # The fine-tuning's own figures differ, so a summary that kept them fails the checks below.
    assert score not in lp_ft_run.fine_tuning_scores
    assert summary["val_balanced_accuracy"] == summary["best_val_balanced_accuracy"] == score
    assert summary["val_accuracy"] == pytest.approx((predicted == val_set.labels).mean())
    loss = log_loss(val_set.labels, probabilities, labels=[0, 1, 2])
    assert summary["val_loss"] == pytest.approx(loss, rel=1e-6)


def test_lp_ft_builds_and_loads_the_backbone_once(lp_ft_run: LpFtRun) -> None:
    assert lp_ft_run.builds == 1


def test_training_leaves_the_global_dtype_policy_as_it_was(lp_ft_run: LpFtRun) -> None:
    before, after = lp_ft_run.policies
    assert after == before == "float32"
    convs = [layer for layer in lp_ft_run.model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].compute_dtype == "bfloat16"  # trained in the precision asked for all the same


def test_a_probe_needs_a_pretrained_backbone() -> None:
    values = {**small_params()["train"], "recipe": "linear_probe", "weights": "none", "arch": "mobilenet"}
    with pytest.raises(ValidationError, match=r"train.recipe=linear_probe needs a pretrained backbone"):
        TrainParams.model_validate(values)


def test_collection_projection_removes_a_classs_collection_shift_and_keeps_the_rest() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    collections = np.array(["old", "new"] * 20 + ["old"] * 40)  # class 0 from two collections
    embeddings = rng.normal(size=(80, 6))
    embeddings[:, 0] += 3 * labels  # the lesion: class 1 is high on feature 0
    embeddings[(labels == 0) & (collections == "new"), 1] += 5  # the look of the "new" collection
    projection = collection_projection(embeddings, labels, collections)
    np.testing.assert_allclose(projection, projection.T, atol=1e-6)
    projected = embeddings @ projection
    zero = labels == 0
    gap = projected[zero & (collections == "new")].mean(axis=0) - projected[
        zero & (collections == "old")
    ].mean(axis=0)
    np.testing.assert_allclose(gap, 0, atol=1e-5)  # no collection difference left within class 0
    lesion = projected[labels == 1, 0].mean() - projected[labels == 0, 0].mean()
    assert lesion > 2.5  # the class difference survives
    assert round(6 - float(np.trace(projection))) == 1  # one direction removed


def test_collection_projection_is_the_identity_where_each_class_has_one_collection() -> None:
    embeddings = np.random.default_rng(1).normal(size=(20, 4))
    projection = collection_projection(embeddings, np.repeat([0, 1], 10), np.repeat(["a", "b"], 10))
    np.testing.assert_array_equal(projection, np.eye(4, dtype=np.float32))
