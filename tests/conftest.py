"""Fixtures shared by the tests: tiny images and params written to tmp_path, never ../shared."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from scripts.team_stack import free_port, wait_for_http
from skin_lesion.data.sources.isic import fetch_isic
from skin_lesion.data.sources.local import fetch_local
from skin_lesion.params import Params
from skin_lesion.registry.model_contents import pip_requirements
from skin_lesion.registry.registration import log_servable_model, register_version

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["melanoma", "nevus", "vascular lesion"]


def repo_params() -> dict[str, Any]:
    """The committed params.yaml, as a dict."""
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


# Tests never download weights: whatever the committed default, they train this net from scratch.
OFFLINE_TRAIN = {"arch": "resnet_small", "weights": "none", "recipe": "fine_tune"}


def small_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """The committed params shrunk for tests (3 classes, 32 px), with per-section overrides.

    A download override may name a source's keys directly (`path`, `api_url`, ...): each goes to
    its source's subsection (download.local.path, download.isic.api_url, ...).
    """
    params = copy.deepcopy(repo_params())
    params["base"].update(classes=CLASSES, image_size=32)
    params["train"].update(OFFLINE_TRAIN)
    params["download"]["local"].update(metadata="")
    sections = dict(sections)
    for key, value in sections.pop("download", {}).items():
        source = next((name for name in ("isic", "local") if key in params["download"][name]), None)
        if source is None:
            params["download"][key] = value
        else:
            params["download"][source][key] = value
    mapping = params["split"]["diagnosis_classes"]
    params["split"]["diagnosis_classes"] = {
        dx: [c for c in labels if c in CLASSES] for dx, labels in mapping.items()
    }
    for name, values in sections.items():
        params[name].update(values)
    return params


def fetch_local_source(params: Params, out: Path) -> pd.DataFrame:
    """The local source as the download stage runs it."""
    return fetch_local(params.download.local, params.base.classes, out)


def fetch_isic_source(params: Params, out: Path, cache: Path) -> pd.DataFrame:
    """The isic source as the download stage runs it."""
    return fetch_isic(params.download.isic, params.base.classes, out, cache)


def as_params(raw: dict[str, Any]) -> Params:
    """Validate a params dict the way stages do."""
    return Params.model_validate(raw)


def write_image(path: Path, colour: tuple[int, int, int], size: int = 24, seed: int = 0) -> Path:
    """Write a small noisy JPEG of one colour (noise makes each file's bytes distinct per seed)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def draw_lesion(seed: int, size: int = 64, mode: str = "RGB") -> Image.Image:
    """A lesion-like picture, unique per seed: a few coloured blobs on a skin tone."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (225, 180, 160))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 8, size // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(30, 200, 3)))
    return image.convert(mode)


def run_stage(cwd: Path, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m stages.<module>` in `cwd` as DVC would: DVC_ROOT there, the embedded MLflow store."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "DVC_ROOT": str(cwd)}
    environment.pop("MLFLOW_TRACKING_URI", None)
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )


def run_skin_lesion(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the `skin-lesion` command in `cwd` as a user would, with extra environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "skin_lesion.app.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def make_isic_folder(root: Path, train_per_class: int = 6, test_per_class: int = 0) -> Path:
    """An ISIC-layout folder: root/Train/<class>/*.jpg and optionally root/Test/<class>/*.jpg."""
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split_index, (split, count) in enumerate((("Train", train_per_class), ("Test", test_per_class))):
        for index, label in enumerate(CLASSES):
            for k in range(count):
                seed = split_index * 100_000 + index * 1000 + k
                write_image(
                    root / split / label / f"ISIC_{split}_{index}_{k:03d}.jpg", colours[index], seed=seed
                )
    return root


def manifest_of(
    rows: list[tuple[str, str, str, str]],
    lesions: dict[str, str] | None = None,
    diagnoses: dict[str, str] | None = None,
    collections: dict[str, str] | None = None,
) -> pd.DataFrame:
    """A raw manifest plus image features from (path, label, split, sha256) rows.

    Every distinct sha256 gets its own random perceptual hash (random 64-bit hashes sit about 32 bits
    apart), so only rows that share a sha256 are duplicates.
    """
    frame = pd.DataFrame(rows, columns=["path", "label", "split", "sha256"])
    rng = np.random.default_rng(0)
    phash = {digest: f"{int(rng.integers(0, 2**63)):016x}" for digest in sorted(set(frame["sha256"]))}
    lesions, diagnoses, collections = lesions or {}, diagnoses or {}, collections or {}
    return frame.assign(
        source="test",
        isic_id=[Path(path).stem for path in frame["path"]],
        lesion_id=[lesions.get(path, "") for path in frame["path"]],
        diagnosis=[diagnoses.get(path, "") for path in frame["path"]],
        collection=[collections.get(path, "one clinic") for path in frame["path"]],
        rejected="",
        pixel_sha256=frame["sha256"],
        phash=frame["sha256"].map(phash),
    )


def assert_no_group_straddles(splits: dict[str, pd.DataFrame], key: str = "group") -> None:
    """Fail if any group (or any other `key`) appears in more than one split."""
    seen: dict[str, str] = {}
    for name, frame in splits.items():
        for value in frame[key]:
            assert seen.setdefault(value, name) == name, f"{key} {value} is in {seen[value]} and {name}"


def log_test_model(
    keras_path: Path, classes: list[str], size: int, threshold: float, source: str, **extra: Any
) -> str:
    """Log the pyfunc of a saved Keras model in the active MLflow run, as evaluate does; its URI.

    `extra`: log_servable_model's optional ood_path and test_figures.
    """
    import keras  # noqa: PLC0415 - only the tests that log models pay for importing Keras here

    requirements = pip_requirements(keras.backend.backend(), REPO / "requirements.lock")
    return log_servable_model(
        keras_path, classes, size, "melanoma", threshold, requirements, data_source=source, **extra
    )


def register_lesion_model(
    root: Path,
    model: Any,
    name: str,
    size: int,
    lesions: int,
    ood: bool = False,
    card: str = "",
    description: str = "",
    **extra: Any,
) -> tuple[float, int, int]:
    """Save `model` in `root` and register it as a version of `name` in the store MLflow points at.

    Its threshold lies between the P(melanoma) of two of the draw_lesion images 0..`lesions`-1 at
    `size` px; returns it and those two seeds, lower P(melanoma) first. `ood`: with an OOD summary
    fitted on the images' embeddings (the first three quarters; the rest held out). `card`: logged
    with the run as model_card.md, as evaluate logs the whole card. `extra`: log_test_model's.
    """
    from skin_lesion.evaluation.ood_fitting import fit_ood  # noqa: PLC0415 - Keras
    from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings  # noqa: PLC0415 - Keras

    experiment = mlflow.create_experiment(root.name, artifact_location=(root / "artifacts").as_uri())
    model.save(root / "model.keras")
    pixels = np.stack([np.asarray(draw_lesion(seed, size)) for seed in range(lesions)])
    probabilities, embeddings = predict_with_embeddings(with_embeddings(model), pixels, batch_size=16)
    if ood:
        fitted = lesions * 3 // 4
        fit_ood(embeddings[:fitted], embeddings[fitted:], quantile=0.9).save(root / "ood.npz")
        extra["ood_path"] = root / "ood.npz"
    low, high = (int(seed) for seed in np.argsort(probabilities[:, 0])[[0, -1]])
    threshold = float(probabilities[[low, high], 0].mean())
    with mlflow.start_run(experiment_id=experiment):
        model_uri = log_test_model(root / "model.keras", CLASSES, size, threshold, "local", **extra)
        if card:
            (root / "model_card.md").write_text(card, encoding="utf-8")
            mlflow.log_artifact(str(root / "model_card.md"))
    register_version(model_uri, name, tags={}, description=description)
    return threshold, low, high


def point_mlflow_at(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracking and registry at `uri`, for this process and the commands it starts, until the test ends.

    The environment goes back with `monkeypatch`, MLflow's own URIs with `_mlflow_uris_restored`.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def mlflow_pointed_at(uri: str | None) -> Iterator[None]:
    """Tracking and registry at `uri` (None: left as they are) until the block ends, then as before it.

    mlflow.set_tracking_uri and set_registry_uri set a module global and an environment variable
    each; both are put back (mlflow.get_tracking_uri would resolve an unset URI to a default instead).
    """
    from mlflow.tracking._model_registry import utils as registry  # noqa: PLC0415 - private, by need
    from mlflow.tracking._tracking_service import utils as tracking  # noqa: PLC0415

    tracking_uri, registry_uri = tracking._tracking_uri, registry._registry_uri
    variables = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    if uri is not None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking_uri)
        registry._registry_uri = registry_uri  # set_registry_uri(None) would keep the variable
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(autouse=True)
def _mlflow_uris_restored() -> Iterator[None]:
    """Whatever a test (or the code it calls) points MLflow at, the next test starts where it started."""
    with mlflow_pointed_at(None):
        yield


@pytest.fixture
def float32_policy_restored() -> Iterator[None]:
    """Keras' global dtype policy back to float32 after the test, for tests that set it themselves."""
    yield
    import keras  # noqa: PLC0415 - only the tests that use it pay for importing Keras here

    keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    """A tiny MobileNet backbone's weights file (seed 5) in tmp_path: the tests' 'ImageNet' weights."""
    return tiny_backbone_weights(tmp_path / "weights" / "mobilenet.weights.h5", seed=5)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside tmp_path, with MLflow pointed at a SQLite file there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


SERVER_START_S = 120


@contextmanager
def running_server(
    command: list[str],
    ready_url: str,
    env: dict[str, str] | None = None,
    timeout_s: float = SERVER_START_S,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """A server process in its own session, once `ready_url` answers; stopped when the block ends."""
    server = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_for_http(ready_url, server, timeout_s=timeout_s)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def http_request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """GET `url`, or POST `body` as JSON; the status and the body's text, for error statuses too."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


@contextmanager
def mlflow_server(folder: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifact root); yields its URI."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--default-artifact-root", (folder / "artifacts").as_uri(),
        "--host", "127.0.0.1", "--port", str(port), *options,
    ]  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    with running_server(command, f"{uri}/health", env):
        yield uri


@pytest.fixture(autouse=True)
def _no_weight_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that makes Keras download weights (this machine is offline, and tests are hermetic)."""

    def refuse(fname: str, *args: Any, **kwargs: Any) -> str:
        raise RuntimeError(f"download blocked in tests: {fname}")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", refuse)


def tiny_backbone_weights(path: Path, arch: str = "mobilenet", size: int = 32, seed: int = 0) -> Path:
    """A weights file of the `arch` backbone at `size` px, random from `seed`: the tests' 'ImageNet'."""
    import keras  # noqa: PLC0415 - only the tests that make weights pay for importing Keras here

    from skin_lesion.training.architectures import BACKBONE_NAME, build_model  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    backbone = build_model(arch, size, 3, 0.0).get_layer(BACKBONE_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(path)
    return path
