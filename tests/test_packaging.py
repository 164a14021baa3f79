"""skin_lesion.registry.model_contents: the versions a logged model pins, read from the requirements lock."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from skin_lesion.errors import PipelineError
from skin_lesion.registry.model_contents import MODEL_PACKAGES, locked_versions, pip_requirements

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def _lock(tmp_path: Path, extra: str = "") -> Path:
    lines = [f"{name}==1.0 \\\n    --hash=sha256:00\n    # via skin-lesion-mlops" for name in MODEL_PACKAGES]
    path = tmp_path / "requirements.lock"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def test_each_package_gets_the_version_whose_marker_holds_here() -> None:
    lock = (
        f"numpy==2.4.6 ; python_full_version < '{HERE}' \\\n    --hash=sha256:aa\n"
        f"numpy==2.5.5 ; python_full_version >= '{HERE}' \\\n    --hash=sha256:bb\n"
        "PyYAML==6.0.4 \\\n    --hash=sha256:cc\n"
    )
    assert locked_versions(lock) == {"numpy": "2.5.5", "pyyaml": "6.0.4"}


def test_the_model_pins_its_packages_and_its_backend_from_the_lock(tmp_path: Path) -> None:
    lock = _lock(tmp_path, "jax==0.9 \\\n    --hash=sha256:00\njaxlib==0.9 \\\n    --hash=sha256:00\n")
    assert pip_requirements("jax", lock) == [
        *(f"{n}==1.0" for n in MODEL_PACKAGES),
        "jax==0.9",
        "jaxlib==0.9",
    ]


def test_a_backend_the_lock_does_not_hold_is_pinned_as_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def installed(name: str) -> str:  # torch 2.7.1 and the lock's versions of the rest
        return "2.7.1" if name == "torch" else "1.0"

    monkeypatch.setattr(importlib.metadata, "version", installed)
    assert pip_requirements("torch", _lock(tmp_path)) == [
        *(f"{name}==1.0" for name in MODEL_PACKAGES),
        "torch==2.7.1",
    ]


def test_a_lock_without_a_package_the_model_imports_is_named(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("keras==3.15.1\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"requirements.lock: pins no version of mlflow, numpy"):
        pip_requirements("tensorflow", lock)
