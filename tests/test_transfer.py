"""Transfer learning: a pretrained backbone's weights file, the warm-up and fine-tune phases, resume."""

from __future__ import annotations

import base64
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from skin_lesion.errors import PipelineError
from skin_lesion.params import TrainParams
from skin_lesion.training.architectures import BACKBONE_NAME, build_model
from skin_lesion.training.recipes import Phase, check_weights_file, train_model, training_phases
from tests.conftest import (
    CLASSES,
    draw_lesion,
    log_test_model,
    point_mlflow_at,
    small_params,
    tiny_backbone_weights,
)
from tests.test_train import SIZE, _data, _Epochs, _KillAfter, _params

pytestmark = pytest.mark.usefixtures("float32_policy_restored")


def _pretrained(weights: Path, **train: object):
    no_augmentation = {"flip": False, "rotation": 0, "zoom": 0, "contrast": 0, "brightness": 0}
    return _params(arch="mobilenet", weights=str(weights), augment=no_augmentation, **train)


def test_weights_file_sets_the_backbone_value_for_value(weights_file: Path) -> None:
    keras.utils.set_random_seed(5)
    expected = build_model("mobilenet", SIZE, 3, 0.0).get_layer(BACKBONE_NAME).get_weights()
    keras.utils.set_random_seed(99)  # another random start, which the file must overwrite
    loaded = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file)).get_layer(BACKBONE_NAME)
    assert len(loaded.get_weights()) == len(expected)
    for got, want in zip(loaded.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_missing_weights_file_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(PipelineError, match=rf"^train.weights: {missing}: file not found$"):
        build_model("mobilenet", SIZE, 3, 0.0, weights=str(missing))


def test_unreadable_weights_file_is_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an HDF5 file")
    with pytest.raises(PipelineError, match=rf"^train.weights: {junk}: not weights of a MobileNet") as err:
        build_model("mobilenet", SIZE, 3, 0.0, weights=str(junk))
    assert "\n" not in str(err.value)


def test_wrong_shape_weights_file_is_one_line_error(tmp_path: Path) -> None:
    # A MobileNet of half the width: same layers, other shapes.
    half = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.5)
    path = tmp_path / "half.weights.h5"
    half.save_weights(path)
    with pytest.raises(PipelineError, match=rf"^train.weights: {path}: not weights of a MobileNet") as err:
        build_model("mobilenet", SIZE, 3, 0.0, weights=str(path))
    assert "\n" not in str(err.value)


def test_imagenet_weights_would_download_and_tests_block_it() -> None:
    # The guard in conftest is what keeps every test offline; this shows that it bites.
    with pytest.raises(RuntimeError, match="download blocked in tests"):
        build_model("mobilenet", SIZE, 3, 0.0, weights="imagenet")


def test_imagenet_weights_offline_are_one_line_naming_the_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(fname: str, origin: str, *args: object, **kwargs: object) -> str:
        # What Keras's get_file raises when the download fails.
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] Temporary failure")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(PipelineError, match=r"^train\.weights=imagenet: Keras could not download") as err:
        build_model("mobilenet", SIZE, 3, 0.0, weights="imagenet")
    assert "\n" not in str(err.value)
    assert "-S train.weights=weights/<file>.weights.h5" in str(err.value)


def test_weights_must_be_a_keras_weights_file() -> None:
    values = {**small_params()["train"], "arch": "mobilenet", "weights": "weights/backbone.npz"}
    with pytest.raises(ValidationError, match=r"not none, imagenet or a Keras weights file"):
        TrainParams.model_validate(values)


def test_freeze_epochs_cannot_exceed_epochs() -> None:
    values = {
        **small_params()["train"],
        "arch": "mobilenet",
        "weights": "imagenet",
        "epochs": 2,
        "freeze_epochs": 3,
    }
    with pytest.raises(ValidationError, match=r"train.freeze_epochs=3 is more than train.epochs=2"):
        TrainParams.model_validate(values)


def test_weights_file_outside_the_tracked_folder_is_refused(tmp_path: Path) -> None:
    outside = tiny_backbone_weights(tmp_path / "elsewhere" / "b.weights.h5")
    with pytest.raises(PipelineError, match=r"put the file under .*weights/, which DVC tracks"):
        check_weights_file(str(outside), tmp_path / "weights")


def test_weights_file_missing_from_the_tracked_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"file not found$"):
        check_weights_file(str(tmp_path / "weights" / "gone.weights.h5"), tmp_path / "weights")


def test_pretrained_net_warms_up_then_fine_tunes() -> None:
    params = _params(arch="mobilenet", weights="imagenet", epochs=5, freeze_epochs=2, unfreeze=10)
    assert training_phases(params.train) == [
        Phase("warm_up", 0, 2, params.train.learning_rate, 0),
        Phase("fine_tune", 2, 5, params.train.fine_tune_learning_rate, 10),
    ]


def test_a_net_from_scratch_trains_in_one_phase() -> None:
    params = _params(arch="mobilenet", weights="none", epochs=5, freeze_epochs=2)
    assert training_phases(params.train) == [Phase("train", 0, 5, params.train.learning_rate, "all")]


def test_frozen_phase_leaves_the_backbone_unchanged_and_fine_tuning_changes_it(weights_file: Path) -> None:
    x, y = _data(n=16)
    keras.utils.set_random_seed(5)
    initial = build_model("mobilenet", SIZE, 3, 0.0).get_layer(BACKBONE_NAME).get_weights()
    seen: list[list[np.ndarray]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            # Without augmentation, the model trained is the model itself.
            seen.append(self.model.get_layer(BACKBONE_NAME).get_weights())

    params = _pretrained(weights_file, epochs=3, freeze_epochs=2, early_stopping_patience=0)
    model, _ = train_model(x, y, x, y, params.base, params.train, callbacks=[Record()])
    for epoch in (0, 1):  # warm-up: not one value of the backbone moves, batch norm statistics included
        for got, want in zip(seen[epoch], initial, strict=True):
            np.testing.assert_array_equal(got, want)
    changed = [not np.array_equal(a, b) for a, b in zip(seen[2], initial, strict=True)]
    assert sum(changed) > len(changed) // 2  # fine-tuning moved the kernels (not the BN statistics)
    assert model.get_layer("probs").trainable


def test_unfreeze_trains_only_the_top_layers(weights_file: Path) -> None:
    x, y = _data(n=16)
    params = _pretrained(weights_file, epochs=2, freeze_epochs=1, unfreeze=2, early_stopping_patience=0)
    keras.utils.set_random_seed(5)
    initial = build_model("mobilenet", SIZE, 3, 0.0).get_layer(BACKBONE_NAME)
    model, _ = train_model(x, y, x, y, params.base, params.train)
    backbone = model.get_layer(BACKBONE_NAME)
    weighted = [layer for layer in backbone.layers if layer.weights]
    for layer in weighted[:-2]:
        for got, want in zip(layer.get_weights(), initial.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)
    top = {id(weight) for layer in weighted[-2:] for weight in layer.trainable_weights}
    assert {id(weight) for weight in backbone.trainable_weights} == top


@pytest.mark.parametrize("killed_after", [1, 3], ids=["in-warm-up", "in-fine-tuning"])
def test_killed_run_resumes_in_the_right_phase(weights_file: Path, tmp_path: Path, killed_after: int) -> None:
    x, y = _data(n=32)
    x_val, y_val = _data(n=12, seed=1)
    params = _pretrained(weights_file, epochs=4, freeze_epochs=2, early_stopping_patience=4)
    uninterrupted, expected = train_model(x, y, x_val, y_val, params.base, params.train)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        train_model(x, y, x_val, y_val, params.base, params.train, [_KillAfter(killed_after)], checkpoints)
    logged = _Epochs()
    resumed, summary = train_model(x, y, x_val, y_val, params.base, params.train, [logged], checkpoints)
    assert [epoch for epoch, _ in logged.seen] == [0, 1, 2, 3]  # earlier epochs replayed, once each
    assert summary["best_epoch"] == expected["best_epoch"]
    for got, want in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not checkpoints.exists()


def test_registered_pyfunc_needs_no_preprocessing_of_its_own(
    weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The backbone's input scaling is a layer of the saved model: the pyfunc, given the image file,
    # returns what the train-time model returns for the same uint8 pixels.
    model = build_model("mobilenet", SIZE, 3, 0.0, weights=str(weights_file))
    model.save(tmp_path / "model.keras")
    pixels = np.asarray(draw_lesion(3, size=SIZE))
    Image.fromarray(pixels).save(tmp_path / "lesion.png")  # lossless: the pyfunc decodes the same pixels
    point_mlflow_at(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch)
    with mlflow.start_run():
        model_uri = log_test_model(tmp_path / "model.keras", CLASSES, SIZE, threshold=0.5, source="local")
    served = mlflow.pyfunc.load_model(model_uri)
    encoded = base64.b64encode((tmp_path / "lesion.png").read_bytes()).decode("ascii")
    out = served.predict(pd.DataFrame({"image": [encoded]}))
    expected = model.predict(pixels[None], verbose=0)[0]
    got = out[[f"p_{label.replace(' ', '_')}" for label in CLASSES]].to_numpy()[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert model.get_layer("mobilenet_preprocessing") is not None
