"""train: the baseline architecture, a short fit, per-epoch logging, determinism, atomic save."""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from dvclive import Live

from stages.architectures import build_model
from stages.train import EpochLogger, detect_device, save_model_atomic, train_model
from tests.conftest import as_params, small_params

SIZE = 16


def _data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # Class k is bright in channel k: learnable in a few steps.
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 60, size=(n, SIZE, SIZE, 3)).astype(np.uint8)
    x[np.arange(n), :, :, y] += 180
    return x, y


def _params(**train: object):
    return as_params(small_params(base={"image_size": SIZE}, train={"epochs": 1, "batch_size": 8, **train}))


def test_baseline_cnn_matches_the_reference_notebooks() -> None:
    model = build_model("baseline_cnn", image_size=180, num_classes=9, dropout=0.25)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert isinstance(model.layers[1], keras.layers.Rescaling)
    assert [layer.filters for layer in convs] == [32, 64, 128]
    assert len(pools) == 3
    assert [layer.units for layer in dense] == [128, 9]
    assert any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert model.output_shape == (None, 9)
    assert dense[-1].dtype_policy.compute_dtype == "float32"


def test_short_fit_returns_model_and_summary() -> None:
    x, y = _data()
    model, summary = train_model(x, y, x, y, _params().base, _params().train)
    probabilities = model.predict(x[:4], verbose=0)
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert summary["device"] == detect_device() == "cpu"
    assert summary["epochs"] == 1
    assert summary["train_images"] == 24
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= summary.keys()


def test_model_learns_a_separable_task() -> None:
    x, y = _data(n=48)
    params = _params(epochs=8)
    model, _ = train_model(x, y, x, y, params.base, params.train)
    accuracy = (model.predict(x, verbose=0).argmax(axis=1) == y).mean()
    assert accuracy > 0.8


def test_same_seed_gives_same_weights() -> None:
    x, y = _data()
    params = _params()
    first, _ = train_model(x, y, x, y, params.base, params.train)
    second, _ = train_model(x, y, x, y, params.base, params.train)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_epoch_logger_writes_dvclive_and_mlflow(in_tmp: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{in_tmp / 'mlflow.db'}")
    x, y = _data()
    params = _params(epochs=2)
    live = Live(dir=str(in_tmp / "live"), save_dvc_exp=False, dvcyaml=None)
    with mlflow.start_run() as run:
        train_model(x, y, x, y, params.base, params.train, callbacks=[EpochLogger(live)])
    live.end()
    curve = pd.read_csv(in_tmp / "live" / "plots" / "metrics" / "val_accuracy.tsv", sep="\t")
    assert curve["step"].tolist() == [0, 1]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [point.step for point in history] == [0, 1]


def test_saved_model_loads_safely_and_leaves_no_temp(tmp_path: Path) -> None:
    model = build_model("baseline_cnn", image_size=SIZE, num_classes=3, dropout=0.0)
    save_model_atomic(model, tmp_path / "models" / "model.keras")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.keras"]
    loaded = keras.saving.load_model(tmp_path / "models" / "model.keras", safe_mode=True)
    x, _ = _data(n=2)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
