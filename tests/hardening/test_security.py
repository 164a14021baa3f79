"""Security: unsafe zips, untrusted model files, oversized payloads (credentials: test_tracking_server.py)."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path
from types import SimpleNamespace

import keras
import pytest
from mlflow.exceptions import MlflowException

from skin_lesion.data.sources.local import extract_zip_safely
from skin_lesion.errors import PipelineError
from skin_lesion.model.classifier import LesionClassifier, decode_base64_image


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "Train/../../evil.jpg"])
def test_zip_with_unsafe_path_is_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(name, b"x")
    with pytest.raises(PipelineError, match=r"evil.zip has unsafe entry"):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "evil.jpg").exists()


def test_zip_with_symlink_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    entry = zipfile.ZipInfo("Train/melanoma/link.jpg")
    entry.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(entry, "/etc/passwd")
    with pytest.raises(PipelineError, match=r"link.zip has symbolic link 'Train/melanoma/link.jpg'"):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=2**20)


def test_oversized_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("Train/melanoma/a.jpg", b"\0" * (2 * 2**20))
    with pytest.raises(PipelineError, match=r"big.zip unpacks to more than download.local.max_extract_mb=1"):
        extract_zip_safely(archive, tmp_path / "out", max_bytes=2**20)
    assert not (tmp_path / "out").exists()


def test_model_with_arbitrary_code_is_refused(tmp_path: Path) -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "lambda.keras")
    context = SimpleNamespace(artifacts={"keras_model": str(tmp_path / "lambda.keras")}, model_config={})
    with pytest.raises(ValueError, match="safe_mode"):
        LesionClassifier().load_context(context)


def test_oversized_image_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("skin_lesion.model.classifier.MAX_IMAGE_BYTES", 10)
    with pytest.raises(MlflowException, match=r"row 3: larger than the 0 MiB limit") as raised:
        decode_base64_image("A" * 100, 32, row=3)
    assert raised.value.get_http_status_code() == 400
