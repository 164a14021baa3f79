"""train: architectures, the training recipe, the decoded-image cache, determinism, atomic save."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from dvclive import Live
from pydantic import ValidationError
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_sample_weight

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.metrics import capped_balanced_accuracy
from skin_lesion.model.network import ShadesOfGray, load_model
from skin_lesion.params import TrainParams
from skin_lesion.training.architectures import (
    BACKBONES,
    RandomAffine,
    build_model,
    save_model_atomic,
    with_augmentation,
)
from skin_lesion.training.batching import ShuffledBatches, cut_and_mix, load_cached_images
from skin_lesion.training.callbacks import MONITOR, EpochLogger, ResumableCheckpoint, StopOnNonFiniteLoss
from skin_lesion.training.recipes import (
    build_trainer,
    compile_phase,
    configure_determinism,
    detect_device,
    make_optimizer,
    train_model,
    training_phases,
)
from stages.train import training_rows
from tests.conftest import REPO, as_params, point_mlflow_at, small_params, write_image

SIZE = 32


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # Class k is bright in channel k: learnable in a few steps.
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, SIZE, SIZE, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 180
    return x, y


def _params(**train: object):
    overrides = {"epochs": 1, "batch_size": 8, "precision": "float32", **train}
    return as_params(small_params(base={"image_size": SIZE}, train=overrides))


# Some tests set the dtype policy globally; training itself restores it.
pytestmark = pytest.mark.usefixtures("float32_policy_restored")


def test_baseline_cnn_matches_the_reference_notebooks() -> None:
    model = build_model("baseline_cnn", 180, 9, 0.25)
    layers = model.layers
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    dense = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.filters for layer in convs] == [32, 64, 128]
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in layers) == 3
    assert [layer.units for layer in dense] == [128, 9]
    assert any(isinstance(layer, keras.layers.Dropout) for layer in layers)
    assert model.output_shape == (None, 9)


def test_augmentation_is_left_out_of_the_trained_model() -> None:
    x, y = _data(n=8)
    params = _params()
    model, _ = train_model(x, y, x, y, params.base, params.train)
    assert params.train.augment.rotation > 0
    random_layers = (RandomAffine, keras.layers.RandomContrast, keras.layers.RandomBrightness)
    assert not any(isinstance(layer, random_layers) for layer in model._flatten_layers())
    assert model.input.dtype == "float32"


def test_augmentation_wraps_the_model_and_shares_its_weights() -> None:
    model = build_model("baseline_cnn", SIZE, 3, 0.0)
    trainer = with_augmentation(model, _params().train.augment)
    assert trainer.input.dtype == "uint8"
    assert [type(layer) for layer in trainer.get_layer("augment").layers] == [
        RandomAffine,
        keras.layers.RandomContrast,
        keras.layers.RandomBrightness,
    ]
    assert trainer.get_layer(model.name) is model


def test_no_augmentation_trains_the_model_itself() -> None:
    off = {"flip": False, "rotation": 0.0, "zoom": 0.0, "contrast": 0.0, "brightness": 0.0}
    model = build_model("baseline_cnn", SIZE, 3, 0.0)
    assert with_augmentation(model, _params(augment=off).train.augment) is model


def _asymmetric_images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, size=(n, SIZE, SIZE, 3)).astype("float32")


def test_random_affine_only_acts_in_training() -> None:
    images = _asymmetric_images()
    layer = RandomAffine(flip=True, rotation=0.2, zoom=0.2, seed=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    assert not np.allclose(keras.ops.convert_to_numpy(layer(images, training=True)), images)


def test_random_affine_without_rotation_or_zoom_flips_exactly() -> None:
    images = _asymmetric_images(n=16)
    out = keras.ops.convert_to_numpy(
        RandomAffine(flip=True, rotation=0.0, zoom=0.0, seed=3)(images, training=True)
    )
    flips = [lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1, :], lambda a: a[::-1, ::-1]]
    seen = set()
    for image, result in zip(images, out, strict=True):
        matches = [k for k, flip in enumerate(flips) if np.allclose(flip(image), result, atol=1e-3)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}  # 16 images: every flip turns up


def test_random_affine_rotates_and_zooms_within_bounds() -> None:
    # A bright dot at the centre stays there; one off-centre moves, but no farther than rotation allows.
    image = np.zeros((1, 33, 33, 3), dtype="float32")
    image[0, 16, 16], image[0, 16, 26] = 255, 255
    layer = RandomAffine(flip=False, rotation=0.05, zoom=0.1, seed=5)
    for _ in range(8):
        out = keras.ops.convert_to_numpy(layer(image, training=True))[0, ..., 0]
        assert out[16, 16] > 100
        right = out[:, 20:]  # where the off-centre dot can land
        spot = np.argwhere(right == right.max())[0] + [0, 20]
        angle = np.degrees(np.arctan2(spot[0] - 16, spot[1] - 16))
        assert abs(angle) <= 0.05 * 360 + 8  # the bound, plus a pixel's worth at radius 10
        assert 7 <= np.hypot(*(spot - 16)) <= 13


def _illuminant(images: np.ndarray, power: float) -> np.ndarray:
    return np.mean((images / 255.0) ** power, axis=(1, 2)) ** (1 / power)


def test_shades_of_gray_leaves_grey_lit_images_unchanged() -> None:
    grey = np.repeat(_asymmetric_images()[..., :1], 3, axis=-1)  # equal channels: a grey illuminant
    out = keras.ops.convert_to_numpy(ShadesOfGray(6)(grey))
    np.testing.assert_allclose(out, grey, atol=1e-2)


def test_shades_of_gray_makes_the_illuminant_grey() -> None:
    images = _asymmetric_images() * 0.5 * np.array([1.0, 0.7, 0.4], dtype="float32")  # a warm cast
    out = keras.ops.convert_to_numpy(ShadesOfGray(6)(images))
    assert out.max() < 255  # no clipping, so the correction is exact
    before, after = _illuminant(images, 6), _illuminant(out, 6)
    assert np.all(before[:, 0] > 2 * before[:, 2])
    np.testing.assert_allclose(after, after[:, :1].repeat(3, axis=1), rtol=1e-3)


def test_shades_of_gray_keeps_a_black_image_black() -> None:
    out = keras.ops.convert_to_numpy(ShadesOfGray(6)(np.zeros((1, SIZE, SIZE, 3), dtype="float32")))
    np.testing.assert_array_equal(out, 0)


def test_shades_of_gray_is_saved_with_the_model(tmp_path: Path) -> None:
    model = build_model("baseline_cnn", SIZE, 3, 0.0, shades_of_gray=6)
    save_model_atomic(model, tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert loaded.get_layer("shades_of_gray").power == 6
    x, _ = _data(n=2)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_batches_cover_every_image_once_per_epoch_in_a_new_order() -> None:
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    batches = ShuffledBatches(x, np.eye(10)[np.arange(10)], batch_size=4, seed=7)
    assert batches.batches_per_epoch == 3
    assert batches.num_batches is None  # endless: one iterator for the whole fit
    epochs = [np.concatenate([batches[3 * e + k][0].ravel() for k in range(3)]) for e in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert list(epochs[0]) != list(epochs[1])
    again = ShuffledBatches(x, np.eye(10), batch_size=4, seed=7)
    np.testing.assert_array_equal(again[4][0], batches[4][0])


def test_a_batch_made_again_out_of_order_is_the_same() -> None:
    # Resuming, and a distribution strategy's first look at the data, ask for batches out of order.
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    batches = ShuffledBatches(x, np.eye(10), batch_size=4, seed=7)
    first_epoch = [batches[k][0].ravel().tolist() for k in range(3)]
    second_epoch_batch = batches[4][0].ravel().tolist()
    assert [batches[k][0].ravel().tolist() for k in (2, 0, 1)] == [first_epoch[k] for k in (2, 0, 1)]
    assert batches[4][0].ravel().tolist() == second_epoch_batch


def test_balanced_sample_weights_give_each_class_the_same_total() -> None:
    y = np.array([0] * 9 + [2] * 3)
    weights = compute_sample_weight("balanced", y)
    assert weights[y == 0].sum() == pytest.approx(weights[y == 2].sum())
    batches = ShuffledBatches(
        np.zeros((12, 1, 1, 3)), np.eye(3)[y], batch_size=12, seed=0, sample_weight=weights
    )
    _, labels, batch_weights = batches[0]
    by_class = {0: weights[0], 2: weights[-1]}
    np.testing.assert_allclose(batch_weights, [by_class[k] for k in labels.argmax(axis=1)])


def test_cutmix_pastes_a_box_of_a_partner_and_mixes_labels_by_its_area() -> None:
    # Image i is filled with the value i, so every pixel tells which image it came from.
    images = np.repeat(np.arange(8, dtype=np.uint8), 20 * 30 * 3).reshape(8, 20, 30, 3)
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
    mixed, mixed_labels = cut_and_mix(images, labels, 1.0, np.random.default_rng(3))
    assert mixed.dtype == np.uint8
    assert mixed.shape == images.shape
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
    changed = 0
    for i in range(8):
        box = mixed[i, :, :, 0] != i
        if not box.any():
            np.testing.assert_array_equal(mixed_labels[i], labels[i])
            continue
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        assert box.sum() == len(rows) * len(cols)  # the pasted pixels form one box
        (partner,) = np.unique(mixed[i][box])  # ... all from one other image
        share = box.mean()
        expected = labels[i] * (1 - share) + labels[partner] * share
        np.testing.assert_allclose(mixed_labels[i], expected, rtol=1e-6)
        changed += 1
    assert changed > 0


def test_cutmix_batches_are_reproducible_by_index() -> None:
    x = np.arange(16, dtype=np.uint8).repeat(8 * 8 * 3).reshape(16, 8, 8, 3)
    batches = ShuffledBatches(x, np.eye(16), batch_size=4, seed=5, cutmix=1.0)
    again = ShuffledBatches(x, np.eye(16), batch_size=4, seed=5, cutmix=1.0)
    plain = ShuffledBatches(x, np.eye(16), batch_size=4, seed=5)
    for index in (6, 1):
        np.testing.assert_array_equal(again[index][0], batches[index][0])
        np.testing.assert_array_equal(again[index][1], batches[index][1])
    assert any(not np.array_equal(batches[k][0], plain[k][0]) for k in range(4))


def test_capped_balanced_accuracy_with_cap_1_is_balanced_accuracy() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 2, 1, 0, 2])
    expected = balanced_accuracy_score(y_true, y_pred)
    assert capped_balanced_accuracy(y_true, y_pred, 1) == pytest.approx(expected)


def test_capped_balanced_accuracy_weighs_a_one_image_class_by_its_count() -> None:
    # Classes 0 and 1 have 4 images each (recall 1/2 and 1), class 2 one image (recall 1).
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1, 1, 1, 2])
    assert capped_balanced_accuracy(y_true, y_pred, 4) == pytest.approx((4 * 0.5 + 4 * 1 + 1 * 1) / 9)
    assert capped_balanced_accuracy(y_true, y_pred, 2) == pytest.approx((2 * 0.5 + 2 * 1 + 1 * 1) / 5)


def test_weight_decay_shrinks_kernels_only() -> None:
    # One step from the same start: AdamW's decoupled decay moves each kernel by -lr * decay * start
    # on top of Adam's step, and leaves biases and batch norm where Adam puts them.
    x, y = _data(n=8)
    learning_rate, decay = 0.01, 0.5
    configure_determinism(0, deterministic=True)  # else two runs' gradients differ in rounding
    start = build_model("resnet_small", SIZE, 3, 0.0).get_weights()

    def one_step(weight_decay: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
        model = build_model("resnet_small", SIZE, 3, 0.0)
        model.set_weights(start)
        before = [variable.numpy() for variable in model.trainable_variables]
        optimizer = make_optimizer(learning_rate, weight_decay)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        return [(v.name, old, v.numpy()) for v, old in zip(model.trainable_variables, before, strict=True)]

    plain, decayed = one_step(0.0), one_step(decay)
    names = {name for name, _, _ in plain}
    assert {"kernel", "bias", "gamma", "beta"} <= names
    for (name, before, after_plain), (_, _, after_decayed) in zip(plain, decayed, strict=True):
        expected = after_plain - learning_rate * decay * before if name == "kernel" else after_plain
        np.testing.assert_allclose(after_decayed, expected, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_architecture_builds_and_trains_a_step(arch: str) -> None:
    x, y = _data(n=8)
    params = _params(arch=arch)
    model, summary = train_model(x, y, x, y, params.base, params.train)
    assert model.output_shape == (None, 3)
    assert summary["epochs"] == 1
    assert np.isfinite(summary["loss"])


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_the_output_in_float32(precision: str) -> None:
    x, y = _data(n=8)
    params = _params(precision=precision)
    model, summary = train_model(x, y, x, y, params.base, params.train)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].compute_dtype == precision.removeprefix("mixed_")
    assert model.get_layer("probs").compute_dtype == "float32"
    assert model.predict(x[:2], verbose=0).dtype == np.float32
    assert np.isfinite(summary["loss"])


def test_float16_training_scales_the_loss() -> None:
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none.
    params = _params(precision="mixed_float16")
    model, trainer = build_trainer(params.base, params.train)
    compile_phase(model, trainer, params.train, training_phases(params.train)[0], steps=1)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)


def test_imagenet_weights_need_a_pretrainable_arch() -> None:
    values = {**small_params()["train"], "arch": "resnet_small", "weights": "imagenet"}
    with pytest.raises(
        ValidationError, match=r"train.weights=imagenet needs train.arch in mobilenet, efficientnet_b0"
    ):
        TrainParams.model_validate(values)


def test_short_fit_returns_model_and_summary() -> None:
    x, y = _data()
    params = _params()
    model, summary = train_model(x, y, x, y, params.base, params.train)
    probabilities = model.predict(x[:4], verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert summary["device"] == detect_device()  # whichever this machine trains on
    assert summary["train_images"] == 24
    assert {"loss", "accuracy", "val_loss", "val_accuracy", MONITOR} <= summary.keys()


def test_train_cutmix_mixes_the_training_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []

    def recording(images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple:
        calls.append(alpha)
        return cut_and_mix(images, labels, alpha, rng)

    monkeypatch.setattr("skin_lesion.training.batching.cut_and_mix", recording)
    x, y = _data()
    params = _params(cutmix=0.5)
    train_model(x, y, x, y, params.base, params.train)
    assert calls
    assert set(calls) == {0.5}


@pytest.mark.parametrize("arch", ["baseline_cnn", "resnet_small"])
def test_model_learns_a_separable_task(arch: str) -> None:
    x, y = _data(n=48)
    params = _params(arch=arch, epochs=8, early_stopping_patience=0)
    model, summary = train_model(x, y, x, y, params.base, params.train)
    assert (model.predict(x, verbose=0).argmax(axis=1) == y).mean() > 0.8
    assert summary["best_val_balanced_accuracy"] > 0.8


def test_early_stopping_restores_the_best_epoch() -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    seen: list[tuple[float, list[np.ndarray]]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seen.append((logs[MONITOR], [w.copy() for w in self.model.get_weights()]))

    # A learning rate this high makes validation scores jump around, so the last epoch is rarely best.
    params = _params(epochs=6, early_stopping_patience=6, learning_rate=0.05, schedule="constant")
    model, summary = train_model(x, y, x_val, y_val, params.base, params.train, callbacks=[Record()])
    scores = [score for score, _ in seen]
    best = int(np.argmax(scores))
    assert summary["best_epoch"] == best + 1
    for restored, expected in zip(model.get_weights(), seen[best][1], strict=True):
        np.testing.assert_array_equal(restored, expected)


def test_same_seed_gives_same_weights() -> None:
    x, y = _data()
    params = _params()
    first, _ = train_model(x, y, x, y, params.base, params.train)
    second, _ = train_model(x, y, x, y, params.base, params.train)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


class _KillAfter(keras.callbacks.Callback):
    """Stands in for kill -9: aborts training after an epoch, before Keras can clean up."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


class _Epochs(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seen.append((epoch, logs[MONITOR]))


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=5, early_stopping_patience=5)
    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [_KillAfter(3)], checkpoint_dir=tmp_path)
    logged = _Epochs()
    _, summary = train_model(x, y, x_val, y_val, params.base, params.train, [logged], tmp_path)
    # Epochs 0-2 come back from the checkpoint (replayed to the loggers); only 3 and 4 are trained.
    assert [epoch for epoch, _ in logged.seen] == [0, 1, 2, 3, 4]
    assert summary["epochs"] == 5
    scores = [score for _, score in logged.seen]
    assert summary["best_epoch"] == int(np.argmax(scores)) + 1
    assert not tmp_path.exists()  # a finished run deletes its checkpoint


def test_resumed_run_trains_like_an_uninterrupted_one(tmp_path: Path) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=0)
    uninterrupted, _ = train_model(x, y, x_val, y_val, params.base, params.train)
    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [_KillAfter(2)], checkpoint_dir=tmp_path)
    resumed, _ = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    # Same weights, optimizer state, augmentation seeds and batch order from epoch 3 on.
    for got, expected in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_resumed_run_restores_early_stopping_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=4, learning_rate=0.05, schedule="constant")
    weights: list[list[np.ndarray]] = []

    class RecordWeights(_Epochs):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            super().on_epoch_end(epoch, logs)
            weights.append([w.copy() for w in self.model.get_weights()])

    first = RecordWeights()
    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [first, _KillAfter(2)], tmp_path)
    restored: dict = {}
    original = ResumableCheckpoint.on_train_begin

    def spy(self: ResumableCheckpoint, logs: dict | None = None) -> None:
        original(self, logs)
        restored.update(best=self.early_stopping.best, weights=self.early_stopping.best_weights)

    monkeypatch.setattr(ResumableCheckpoint, "on_train_begin", spy)
    train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    scores = [score for _, score in first.seen]
    assert restored["best"] == pytest.approx(max(scores))
    for got, expected in zip(restored["weights"], weights[int(np.argmax(scores))], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_without_a_checkpoint_dir_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    x, y = _data()
    params = _params(epochs=1)
    train_model(x, y, x, y, params.base, params.train)
    assert list(tmp_path.iterdir()) == []


def test_epoch_logger_writes_dvclive_and_mlflow(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_mlflow_at(f"sqlite:///{in_tmp / 'mlflow.db'}", monkeypatch)
    x, y = _data()
    params = _params(epochs=2, early_stopping_patience=0)
    live = Live(dir=str(in_tmp / "live"), save_dvc_exp=False, dvcyaml=None)
    with mlflow.start_run() as run:
        train_model(x, y, x, y, params.base, params.train, callbacks=[EpochLogger(live)])
    live.end()
    curve = pd.read_csv(in_tmp / "live" / "plots" / "metrics" / f"{MONITOR}.tsv", sep="\t")
    assert curve["step"].tolist() == [0, 1]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [point.step for point in history] == [0, 1]


def test_decoded_cache_is_reused_when_inputs_are_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [str(write_image(tmp_path / f"{k}.jpg", (40 * k, 90, 90), seed=k)) for k in range(3)]
    caplog.set_level(logging.INFO, logger="skin_lesion.training.batching")
    first, first_key = load_cached_images(paths, 16, tmp_path / "cache")
    second, second_key = load_cached_images(paths, 16, tmp_path / "cache")
    np.testing.assert_array_equal(first, second)
    assert first_key == second_key
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert "reusing decoded images" in caplog.text


def test_decoded_cache_is_rebuilt_when_an_image_changes(tmp_path: Path) -> None:
    paths = [str(write_image(tmp_path / f"{k}.jpg", (40 * k, 90, 90), seed=k)) for k in range(3)]
    first, first_key = load_cached_images(paths, 16, tmp_path / "cache")
    write_image(Path(paths[1]), (250, 250, 250), seed=9)
    second, second_key = load_cached_images(paths, 16, tmp_path / "cache")
    assert first_key != second_key
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert not np.array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


# Two logical CPU devices, set up each backend's way. The JAX run blocks `import tensorflow`, as on a
# GPU machine with JAX and no TensorFlow: the model and training loop must not need it.
_TWO_DEVICES = {
    "tensorflow": """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
def device_count():
    return len(tf.config.list_logical_devices("CPU"))
""",
    "jax": """
import importlib.abc
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTensorFlow())
import jax
def device_count():
    return len(jax.devices("cpu"))
""",
}


@pytest.mark.parametrize("backend", sorted(_TWO_DEVICES))
def test_data_parallel_matches_single_device_on_two_cpus(backend: str) -> None:
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
{_TWO_DEVICES[backend]}
import numpy as np
from tests.test_train import _data, _params
from skin_lesion.training.recipes import train_model
x, y = _data(n=32)
results = []
for distribution in ("none", "data_parallel"):
    params = _params(arch="baseline_cnn", distribution=distribution, epochs=2, batch_size=16, augment=dict(
        flip=False, rotation=0, zoom=0, contrast=0, brightness=0), dropout=0.0, deterministic=False)
    model, summary = train_model(x, y, x, y, params.base, params.train)
    assert summary["backend"] == {backend!r}, summary["backend"]
    results.append(model.predict(x, verbose=0))
assert device_count() == 2
print("max difference", np.abs(results[0] - results[1]).max())
np.testing.assert_allclose(results[0], results[1], atol=2e-3)
# The default recipe (augmentation, mixed bfloat16, the residual net) trains on this backend too.
params = _params(arch="resnet_small", precision="mixed_bfloat16", epochs=1)
model, summary = train_model(x, y, x, y, params.base, params.train)
assert summary["backend"] == {backend!r} and np.isfinite(summary["loss"])
# A pretrained backbone's two phases, data parallel in mixed bfloat16, on this backend too.
import tempfile
from pathlib import Path
from tests.conftest import tiny_backbone_weights
weights = tiny_backbone_weights(Path(tempfile.mkdtemp()) / "backbone.weights.h5")
params = _params(arch="mobilenet", weights=str(weights), precision="mixed_bfloat16",
                 distribution="data_parallel", epochs=2, freeze_epochs=1, batch_size=16)
model, summary = train_model(x, y, x, y, params.base, params.train)
assert summary["epochs"] == 2 and np.isfinite(summary["loss"]), summary
# LP-FT, whose probe is fitted into the net it fine-tunes, under one data-parallel scope.
from skin_lesion.training.recipes import ImageSet, fit_recipe
params = _params(arch="mobilenet", weights=str(weights), recipe="lp_ft", interpolation=0.5,
                 distribution="data_parallel", epochs=1, batch_size=16)
images = ImageSet(x, y, "images")
model, summary = fit_recipe(images, images, params.base, params.train, Path(tempfile.mkdtemp()))
assert summary["epochs"] == 1 and np.isfinite(summary["val_loss"]), summary
print("data parallel matches")
"""
    env = {**os.environ, "KERAS_BACKEND": backend, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel matches" in result.stdout


def test_saved_model_loads_safely_and_leaves_no_temp(tmp_path: Path) -> None:
    model = build_model("resnet_small", SIZE, 3, 0.0)
    save_model_atomic(model, tmp_path / "models" / "model.keras")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.keras"]
    loaded = load_model(tmp_path / "models" / "model.keras")
    x, _ = _data(n=2)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5)


def test_a_loss_that_becomes_nan_stops_training_with_the_epoch_named() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    # log(-1): a loss that is NaN from the first batch on.
    model.compile(optimizer="sgd", loss=lambda y_true, y_pred: keras.ops.log(y_pred * 0 - 1))
    x, y = np.ones((8, 2)), np.ones((8, 1))
    with pytest.raises(PipelineError, match=r"train: the loss became nan in epoch 1, batch 1; no model"):
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[StopOnNonFiniteLoss()])


def test_a_batch_larger_than_the_training_set_is_refused() -> None:
    x, y = _data(n=6)
    params = _params(batch_size=8)
    with pytest.raises(PipelineError, match=r"train.batch_size: 8 is more than the 6 training images"):
        train_model(x, y, x, y, params.base, params.train)


def test_a_resumed_run_reports_the_time_of_the_whole_training(tmp_path: Path) -> None:
    x, y = _data(n=48)
    x_val, y_val = _data(n=24, seed=1)
    params = _params(epochs=4, early_stopping_patience=0)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [_KillAfter(3)], checkpoint_dir=tmp_path)
    killed_run = time.perf_counter() - started
    started = time.perf_counter()
    _, summary = train_model(x, y, x_val, y_val, params.base, params.train, [], checkpoint_dir=tmp_path)
    resumed_run = time.perf_counter() - started
    # Three epochs came from the killed run: the reported time counts them, the resumed run alone not.
    assert summary["seconds"] > resumed_run
    assert summary["seconds"] < killed_run + resumed_run


def _split_and_augmented(source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    split = pd.DataFrame(
        {"path": ["a.jpg", "b.jpg"], "label": ["nevus", "melanoma"], "collection": ["HAM10000", "BCN"]}
    )
    augmented = pd.DataFrame({"path": ["b_aug.jpg"], "label": ["melanoma"], "source_path": [source]})
    return split, augmented


def test_an_augmented_image_has_the_collection_of_the_image_it_was_made_from() -> None:
    rows = training_rows(*_split_and_augmented("b.jpg"), "data/rebalanced/manifest.csv")
    assert rows["collection"].tolist() == ["HAM10000", "BCN", "BCN"]


def test_an_augmented_image_of_an_image_the_split_no_longer_holds_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"^data/rebalanced/manifest.csv: an image made from gone.jpg"):
        training_rows(*_split_and_augmented("gone.jpg"), "data/rebalanced/manifest.csv")
