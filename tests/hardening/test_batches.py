"""One bad file must not sink a batch: `skin-lesion predict` on a folder gives every file a row.

Served batches get the same treatment from `skin-lesion serve` (tests/test_serving.py).
"""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_lesion.training.architectures import build_model
from tests.conftest import CLASSES, REPO, log_test_model, point_mlflow_at, run_skin_lesion, write_image


def test_predict_on_a_folder_with_an_oversized_and_a_corrupt_file_gives_every_file_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keras.utils.set_random_seed(0)
    build_model("baseline_cnn", 32, len(CLASSES), 0.0).save(tmp_path / "model.keras")
    point_mlflow_at(f"sqlite:///{tmp_path / 'mlflow.db'}", monkeypatch)
    with mlflow.start_run():
        uri = log_test_model(tmp_path / "model.keras", CLASSES, 32, threshold=0.5, source="local")
    folder = tmp_path / "clinic"
    write_image(folder / "a_ok.jpg", (160, 90, 70), size=60)
    noise = np.random.default_rng(0).integers(0, 256, (2900, 2900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "b_huge.png", compress_level=0)  # over 20 MiB
    (folder / "c_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"))
    result = run_skin_lesion(tmp_path, "predict", str(folder), "--model", uri, "--output", "p.csv")
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("path")
    assert [Path(path).name for path in rows.index] == ["a_ok.jpg", "b_huge.png", "c_broken.jpg"]
    assert rows.loc[str(folder / "b_huge.png"), "error"] == "larger than the 20 MiB limit for one image"
    assert rows.loc[str(folder / "c_broken.jpg"), "error"].startswith("cannot decode image")
    assert rows.loc[str(folder / "a_ok.jpg"), "error"] == ""
    assert f"ERROR {folder / 'b_huge.png'}: larger than the 20 MiB limit" in result.stdout
    assert "Traceback" not in result.stderr
