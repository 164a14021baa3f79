"""The registered pyfunc, the predict command, Grad-CAM, and `mlflow models serve` on 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from skin_lesion.app.gradcam import explain_alerts, explanation_figure, grad_cam
from skin_lesion.app.predict import collect_images, predict_files, render_summary
from skin_lesion.app.promotion import resolve_default_model
from skin_lesion.app.server import MISSING, images_of_request, score_images
from skin_lesion.errors import PipelineError
from skin_lesion.model.classifier import calibrated, prediction_frame
from skin_lesion.registry.model_contents import PACKAGE, model_code_files, pip_requirements
from skin_lesion.training.architectures import build_model
from tests.conftest import (
    CLASSES,
    REPO,
    draw_lesion,
    free_port,
    http_request,
    log_test_model,
    mlflow_pointed_at,
    point_mlflow_at,
    register_lesion_model,
    run_skin_lesion,
    running_server,
    tiny_backbone_weights,
    write_image,
)

SIZE = 32
NAME = "lesions"
SERVER_START_S = 180


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite MLflow store with one registered version, and high.png and low.png, two lesion images
    whose P(melanoma) lie on either side of its threshold."""
    root = tmp_path_factory.mktemp("store")
    with mlflow_pointed_at(f"sqlite:///{root / 'mlflow.db'}"):
        keras.utils.set_random_seed(0)
        # With the custom colour constancy layer, which the served model must find in its code.
        model = build_model("baseline_cnn", SIZE, len(CLASSES), 0.0, shades_of_gray=6)
        _, low, high = register_lesion_model(root, model, NAME, SIZE, 20)
        for name, seed in (("low.png", low), ("high.png", high)):
            draw_lesion(seed, SIZE).save(root / name)
        yield root


@pytest.fixture
def tracking(store: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI pointed at the store, for code that configures MLflow itself."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    point_mlflow_at(uri, monkeypatch)
    return uri


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _folder(tmp_path: Path) -> Path:
    for k in range(3):
        write_image(tmp_path / "imgs" / f"ok_{k}.jpg", (60 * k, 90, 120), size=40, seed=k)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return tmp_path / "imgs"


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".tiff", ".webp", ".png"])
def test_predict_takes_every_format_a_dermatoscope_writes(tracking: str, tmp_path: Path, suffix: str) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), (180, 90, 70), dtype=np.uint8)).save(folder / f"lesion{suffix}")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = predict_files(model, collect_images([folder]))
    assert [Path(p).name for p in table["path"]] == [f"lesion{suffix}"]
    assert table["error"].eq("").all()
    assert table["p_melanoma"].between(0, 1).all()


def test_pyfunc_returns_probabilities_and_alert(tracking: str, store: Path) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    out = model.predict(pd.DataFrame({"image": [_b64(store / "high.png"), _b64(store / "low.png")]}))
    columns = ["p_melanoma", "p_nevus", "p_vascular_lesion"]
    flags = ["melanoma_alert", "ood_score", "unlike_training", "model_warning"]
    assert list(out.columns) == ["predicted_label", "predicted_label_external_recall", *columns, *flags]
    assert out["predicted_label_external_recall"].isna().all()  # no external figures: unmeasured
    assert out["ood_score"].isna().all()  # registered without an OOD summary: no scores, no flags
    assert not out["unlike_training"].any()
    assert out["model_warning"].eq("").all()  # trained on real data (download.source local)
    np.testing.assert_allclose(out[columns].sum(axis=1), 1.0, rtol=1e-5)
    threshold = model.model_config["melanoma_threshold"]
    assert 0 < threshold < 1
    assert out["melanoma_alert"].tolist() == [True, False]  # the threshold travels with the model
    assert out.loc[0, "p_melanoma"] >= threshold > out.loc[1, "p_melanoma"]


def test_the_served_model_applies_the_temperature_of_its_config(tracking: str, store: Path) -> None:
    with mlflow.start_run():
        uri = log_test_model(
            store / "model.keras", CLASSES, SIZE, threshold=0.5, source="local", temperature=0.5
        )
    images = pd.DataFrame({"image": [_b64(store / "high.png"), _b64(store / "low.png")]})
    raw = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(images)  # registered with no temperature
    scaled = mlflow.pyfunc.load_model(uri).predict(images)
    columns = ["p_melanoma", "p_nevus", "p_vascular_lesion"]
    expected = calibrated(raw[columns].to_numpy(), 0.5)
    np.testing.assert_allclose(scaled[columns].to_numpy(), expected, rtol=1e-5)
    assert scaled["melanoma_alert"].tolist() == (expected[:, 0] >= 0.5).tolist()


def test_the_predicted_label_carries_its_external_recall_or_nan_where_unmeasured() -> None:
    frame = prediction_frame(
        np.array([[0.7, 0.3], [0.2, 0.8]]), ["melanoma", "nevus"], "melanoma", 0.5, "local",
        class_recall={"melanoma": 0.18, "nevus": None},
    )  # fmt: skip
    assert frame["predicted_label_external_recall"].iloc[0] == 0.18
    assert np.isnan(frame["predicted_label_external_recall"].iloc[1])


def test_the_terminal_summary_puts_the_alert_first_and_marks_an_unmeasured_class() -> None:
    table = pd.DataFrame({
        "path": ["a.jpg", "b.jpg", "c.jpg"], "p_melanoma": [0.6, 0.1, np.nan],
        "melanoma_alert": [True, False, np.nan],
        "predicted_label": ["nevus", "vascular lesion", np.nan],
        "predicted_label_external_recall": [0.29, np.nan, np.nan], "error": ["", "", "cannot decode image"],
    })  # fmt: skip
    header, first, second, failed = render_summary(table).splitlines()[:4]
    assert header.split() == ["path", "p_melanoma", "melanoma_alert", "predicted_label", "external_recall"]
    assert first.split() == ["a.jpg", "0.600", "True", "nevus", "0.290"]
    assert second.split()[-1] == "unmeasured"
    assert failed.split() == ["c.jpg"]  # an unreadable file has no prediction to qualify


def test_an_image_exactly_at_the_threshold_raises_the_alert() -> None:
    frame = prediction_frame(
        np.array([[0.3, 0.7], [0.29, 0.71]]), ["melanoma", "nevus"], "melanoma", 0.3, "local"
    )
    assert frame["melanoma_alert"].tolist() == [True, False]


def test_a_version_registered_before_the_model_folder_loads_where_the_package_is_imported(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Versions logged before skin_lesion/model/ existed name their class in skin_lesion.serving; the
    # predict, serve and review commands load them in a process that has imported this package.
    entry = tmp_path / "pyfunc_model.py"
    entry.write_text(
        "import mlflow\nfrom skin_lesion.serving import LesionClassifier\n"
        "mlflow.models.set_model(LesionClassifier())\n",
        encoding="utf-8",
    )
    monkeypatch.setattr("skin_lesion.registry.registration.ENTRY_FILE", entry)
    with mlflow.start_run():
        uri = log_test_model(store / "model.keras", CLASSES, SIZE, threshold=0.5, source="local")
    images = pd.DataFrame({"image": [_b64(store / "high.png"), _b64(store / "low.png")]})
    answers = mlflow.pyfunc.load_model(uri).predict(images)
    assert answers["p_melanoma"].between(0, 1).all()


def test_a_model_trained_on_synthetic_shapes_says_so_in_every_answer(store: Path, tmp_path: Path) -> None:
    with mlflow.start_run():
        uri = log_test_model(store / "model.keras", CLASSES, SIZE, threshold=0.5, source="synthetic")
    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.metadata == {"data_source": "synthetic"}
    image = write_image(tmp_path / "a.jpg", (200, 40, 40), size=50)
    table = predict_files(model, [image])
    assert table["model_warning"].str.startswith("TRAINED ON SYNTHETIC SHAPES").all()
    summary = render_summary(table).splitlines()
    assert summary[0].startswith("WARNING: TRAINED ON SYNTHETIC SHAPES")
    assert summary[-1] == summary[0]


def test_the_terminal_summary_caps_the_alert_lines_highest_first() -> None:
    p = np.linspace(0.5, 0.99, 25)
    table = pd.DataFrame({
        "path": [f"{k}.jpg" for k in range(25)], "predicted_label": "melanoma", "p_melanoma": p,
        "melanoma_alert": True, "error": "",
    })  # fmt: skip
    lines = render_summary(table).splitlines()
    alerts = [line for line in lines if line.startswith("MELANOMA ALERT")]
    assert len(alerts) == 20
    assert alerts[0] == "MELANOMA ALERT p=0.990  24.jpg"
    assert "... 5 more alerts (use --output for all)" in lines
    assert lines[-1] == "25 images, 25 melanoma alerts, 0 unreadable"


def test_the_terminal_summary_says_which_images_are_unlike_the_training_ones_and_what_that_catches() -> None:
    table = pd.DataFrame({
        "path": ["a.jpg", "b.jpg"], "predicted_label": "nevus", "p_melanoma": 0.1, "melanoma_alert": False,
        "ood_score": [12.0, 95.24], "unlike_training": [False, True], "error": "",
    })  # fmt: skip
    lines = render_summary(table).splitlines()
    checks = [line for line in lines if line.startswith("CHECK")]
    assert checks == [
        "CHECK b.jpg: unlike the training images (OOD score 95.2)",
        "CHECK: a flag that catches photos that are not dermoscopic or are badly degraded; it does not"
        " predict the model's errors",
    ]


def test_pyfunc_rejects_an_empty_batch_without_a_stack_trace(tracking: str) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    with pytest.raises(MlflowException, match=r"^no images: the request has no rows$"):
        model.predict(pd.DataFrame({"image": pd.Series([], dtype=str)}))


def test_pyfunc_rejects_a_non_image_as_bad_input(tracking: str) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    text = base64.b64encode(b"hello").decode()
    with pytest.raises(MlflowException, match=r"row 0: cannot decode image") as raised:
        model.predict(pd.DataFrame({"image": [text]}))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_predict_folder_keeps_going_past_a_corrupt_file(tracking: str, tmp_path: Path) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = predict_files(model, collect_images([_folder(tmp_path)]))
    assert [Path(p).name for p in table["path"]] == ["broken.jpg", "ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]
    broken = table.iloc[0]
    assert broken["error"].startswith("cannot decode image")
    assert table.iloc[1:]["error"].eq("").all()
    assert table.iloc[1:]["p_melanoma"].notna().all()


def test_a_file_over_the_size_limit_gets_an_error_row_and_the_rest_are_predicted(
    tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("skin_lesion.app.predict.MAX_IMAGE_BYTES", 2**20)
    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)  # noise: over 1 MiB
    small = write_image(tmp_path / "small.jpg", (200, 40, 40), size=50)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = predict_files(model, [big, small])
    assert list(table["path"]) == [str(big), str(small)]
    assert table.iloc[0]["error"] == "larger than the 1 MiB limit for one image"
    assert table.iloc[1]["error"] == ""
    assert table.iloc[1]["p_melanoma"] >= 0


def _within(seconds: float, work: Callable[[], Any], fifos: list[Path]) -> Any:
    """work() in a thread; past `seconds` (blocked opening a FIFO) the FIFOs are unblocked, the test fails."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(work).result(timeout=seconds)
    except TimeoutError:
        for fifo in fifos:
            with contextlib.suppress(OSError):  # a writer's open lets the blocked reader's open return
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {seconds} s: a FIFO was opened")
    finally:
        pool.shutdown(wait=False)


def test_a_fifo_named_on_the_command_line_gets_an_error_row_without_being_opened(
    tracking: str, store: Path, tmp_path: Path
) -> None:
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    files = collect_images([pipe, store / "high.png"])
    table = _within(60, lambda: predict_files(model, files), [pipe])
    assert list(table["error"]) == ["not a regular file but a named pipe (FIFO): not read", ""]
    assert table.iloc[1]["p_melanoma"] >= 0


def test_a_fifo_in_a_folder_is_reported_not_skipped(tracking: str, tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    os.mkfifo(folder / "pipe.jpg")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = _within(60, lambda: predict_files(model, collect_images([folder])), [folder / "pipe.jpg"])
    errors = dict(zip(table["path"].map(lambda path: Path(path).name), table["error"], strict=True))
    assert errors["pipe.jpg"] == "not a regular file but a named pipe (FIFO): not read"
    assert len(errors) == 5


def test_predict_with_no_readable_image_says_so_in_one_line_after_its_csv(
    tracking: str, tmp_path: Path
) -> None:
    (tmp_path / "empty.jpg").touch()
    result = run_skin_lesion(
        tmp_path, "predict", "empty.jpg", "--model", f"models:/{NAME}/1", "--output", "p.csv",
        PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=tracking,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("no image could be read: 1 file, all unreadable")
    assert "1 image, 0 melanoma alerts, 1 unreadable" in result.stdout
    assert "ERROR empty.jpg: cannot decode image" in result.stdout
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(table["path"]) == ["empty.jpg"]


def test_default_model_is_the_champion_and_none_is_refused(tracking: str, store: Path) -> None:
    client = mlflow.MlflowClient()
    # The newest version could be any experiment: predict, serve and review name one or refuse.
    with pytest.raises(
        PipelineError, match=r"promote 1` for the newest\), or name the version to use with --model"
    ):
        resolve_default_model(NAME)
    client.set_registered_model_alias(NAME, "champion", "1")
    try:
        assert resolve_default_model(NAME) == f"models:/{NAME}@champion"
    finally:
        client.delete_registered_model_alias(NAME, "champion")


def test_predict_command_writes_csv_and_alert_lines(tracking: str, store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("high.png", "low.png"):
        shutil.copy(store / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = run_skin_lesion(
        tmp_path, "predict", str(folder), "--model", f"models:/{NAME}/1", "--output", "p.csv",
        PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=tracking,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(table.columns)[:2] == ["path", "predicted_label"]
    assert {"p_melanoma", "melanoma_alert", "error"} <= set(table.columns)
    assert [line.split()[-1] for line in result.stdout.splitlines() if "MELANOMA ALERT" in line] == [
        str(folder / "high.png")
    ]
    assert "ERROR " in result.stdout
    assert "3 images, 1 melanoma alert, 1 unreadable" in result.stdout
    assert "Alert when P(melanoma) is at least" in result.stdout  # what an alert means, once


def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path: Path) -> None:
    write_image(tmp_path / "elsewhere.jpg", (10, 10, 10))
    result = run_skin_lesion(tmp_path, "predict", "", "--model", "models:/never-loaded/1")
    assert result.returncode == 2
    assert "argument paths: an empty path (an unset shell variable?)" in result.stderr.splitlines()[-1]


def test_no_registered_model_is_a_clear_error(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_mlflow_at(f"sqlite:///{in_tmp / 'empty.db'}", monkeypatch)
    with pytest.raises(PipelineError, match=r"no registered model 'lesions'"):
        resolve_default_model(NAME)


def test_grad_cam_reaches_inside_a_pretrained_backbone(tmp_path: Path) -> None:
    weights = tiny_backbone_weights(tmp_path / "mobilenet.weights.h5", size=64)
    model = build_model("mobilenet", 64, len(CLASSES), 0.0, weights=str(weights))
    heatmap = grad_cam(model, np.asarray(draw_lesion(0, 64)), class_index=0)
    assert heatmap.shape == (2, 2)  # MobileNet's last feature map at 64 px, not the pooled vector
    assert 0.0 <= heatmap.min() <= heatmap.max() <= 1.0


def test_grad_cam_overlays_are_written_for_alerts(tracking: str, store: Path, tmp_path: Path) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = predict_files(model, [store / "high.png", store / "low.png"])
    assert explain_alerts(model, table, tmp_path / "cams") == 1
    written = sorted(path.name for path in (tmp_path / "cams").iterdir())
    assert written == ["high_gradcam.png"]  # low.png raised no alert
    with Image.open(tmp_path / "cams" / "high_gradcam.png") as figure:
        assert figure.width >= 2 * 384  # the original and the overlay, each at a readable size


def test_explaining_predictions_without_an_alert_writes_nothing(tracking: str, tmp_path: Path) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    table = predict_files(model, collect_images([_folder(tmp_path)])).assign(melanoma_alert=False)
    assert explain_alerts(model, table, tmp_path / "cams") == 0
    assert not (tmp_path / "cams").exists()


def test_an_empty_grad_cam_map_is_said_in_words_without_a_colour_scale() -> None:
    image = np.asarray(draw_lesion(0, 64))
    empty = explanation_figure(image, np.zeros((2, 2)), "x.jpg")
    texts = [text.get_text() for axis in empty.axes for text in axis.texts]
    assert any(text.startswith("Grad-CAM map is empty") for text in texts)
    assert len(empty.axes) == 2  # no colour bar claiming a 0-1 scale
    assert len(explanation_figure(image, np.eye(2), "x.jpg").axes) == 3


@pytest.mark.slow
def test_served_model_answers_on_localhost(tracking: str, store: Path) -> None:
    port = free_port()
    command = [
        "mlflow", "models", "serve", "-m", f"models:/{NAME}/1",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with running_server(command, f"http://127.0.0.1:{port}/ping", path, SERVER_START_S):
        status, body = _post(port, [[_b64(store / "high.png")], [_b64(store / "low.png")]])
        assert status == 200, body
        high, low = json.loads(body)["predictions"]
        assert (high["melanoma_alert"], low["melanoma_alert"]) == (True, False)
        assert high["predicted_label"] in CLASSES
        status, body = _post(port, [[base64.b64encode(b"not an image").decode()]])
        assert status == 400, body
        assert "cannot decode image" in body


def test_a_registered_model_loads_from_its_own_code_and_needs_only_its_requirements(
    tracking: str, tmp_path: Path
) -> None:
    # What `mlflow models serve` builds an environment for, without installing one (no network): a
    # Python that sees this venv's packages, minus this project and every distribution the model's
    # requirements do not bring in, loads the model from its own code and predicts.
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    package = model / "code" / "skin_lesion"
    shipped = {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    assert shipped == {path.relative_to(PACKAGE).as_posix() for path in model_code_files()}
    requirements = (model / "requirements.txt").read_text(encoding="utf-8").split()
    assert requirements == pip_requirements(keras.backend.backend(), REPO / "requirements.lock")
    allowed = _with_dependencies([line.split("==")[0] for line in requirements])
    image = _b64(write_image(tmp_path / "x.jpg", (150, 60, 60), size=40))
    script = f"""
import importlib.metadata, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})  # without its .pth files: not this project
from packaging.utils import canonicalize_name
allowed = {sorted(allowed)!r}
owners = importlib.metadata.packages_distributions()
absent = {{top for top, dists in owners.items()
          if not any(canonicalize_name(d) in allowed for d in dists)}}
absent.discard("skin_lesion")  # the model's own copy

class Absent:  # as if not installed: optional imports fall back, required ones fail
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
import mlflow, pandas
frame = mlflow.pyfunc.load_model({str(model)!r}).predict(pandas.DataFrame({{"image": [{image!r}]}}))
import skin_lesion
print(frame.loc[0, "predicted_label"], skin_lesion.__file__, sep="\\n")
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "-S", "-c", script]
    result = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    label, code = result.stdout.splitlines()[-2:]
    assert label in CLASSES
    assert Path(code).is_relative_to(model / "code")  # the model's own copy, not this checkout


def _with_dependencies(names: list[str]) -> set[str]:
    """The distributions `names` need when installed, as pip would resolve them here (no extras)."""
    found, todo = set(), [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return found


def _post(port: int, rows: list[list[str]]) -> tuple[int, str]:
    return _post_body(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode())


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (pd.DataFrame({"image": [12345]}), r"^row 0: expected a base64-encoded image file, got a int$"),
        (pd.DataFrame({"img": ["abc"]}), r"^input needs a column 'image' of base64-encoded images$"),
        (pd.DataFrame({"image": [base64.b64encode(b"hello" * 60).decode()]}), r"^row 0: cannot decode image"),
    ],
)
def test_bad_requests_are_named_without_echoing_their_data(
    tracking: str, frame: pd.DataFrame, expected: str
) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    with pytest.raises(MlflowException, match=expected) as raised:
        model.predict(frame)
    message = str(raised.value)
    assert "aGVsbG8" not in message  # the request's base64 data
    assert "dtype" not in message  # a DataFrame's repr


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"dataframe_split": {"columns": ["image"], "data": 5}}',
            r"^dataframe_split: data must be a list of rows$",
        ),
        (
            b'{"dataframe_split": {"columns": {"image": 0}, "data": []}}',
            r"^dataframe_split needs a column 'image'",
        ),
        (b'{"dataframe_records": [{"img": "x"}, {}]}', r"^dataframe_records needs a column 'image'"),
        (b'{"dataframe_records": {"image": "x"}}', r"^dataframe_records must be a list of rows$"),
        (
            b'{"dataframe_split": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            r"^the request's JSON is nested too deeply$",
        ),
    ],
)
def test_requests_of_the_wrong_shape_are_named_as_bad_requests(body: bytes, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        images_of_request(body)


def test_a_record_without_an_image_gets_a_row_naming_the_column() -> None:
    body = json.dumps({"dataframe_records": [{"image": "aGk="}, {"img": "aGk="}, "not a row"]}).encode()
    assert images_of_request(body) == ["aGk=", MISSING, MISSING]
    classifier = SimpleNamespace(config={"image_size": SIZE})
    table = score_images(SimpleNamespace(unwrap_python_model=lambda: classifier), images_of_request(body))
    assert list(table["error"]) == [
        "row 0: cannot decode image (not a format Pillow reads)",
        "row 1: no 'image' column in this row",
        "row 2: no 'image' column in this row",
    ]


def _post_body(port: int, body: bytes) -> tuple[int, str]:
    return http_request(f"http://127.0.0.1:{port}/invocations", body)


def test_skin_lesion_serve_answers_every_image_of_a_batch(tracking: str, store: Path, tmp_path: Path) -> None:
    # Served from a downloaded copy: no tracking server needed while it runs.
    folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model"))
    port = free_port()
    command = [sys.executable, "-m", "skin_lesion.app.cli", "serve", "--model", folder, "--port", str(port)]
    with running_server(command, f"http://127.0.0.1:{port}/health", timeout_s=SERVER_START_S):
        good, low = _b64(store / "high.png"), _b64(store / "low.png")
        broken = base64.b64encode(b"not an image at all").decode()
        status, body = _post(port, [[good], [broken], ["%%% not base64"], [low]])
        assert status == 200, body
        rows = json.loads(body)["predictions"]
        assert [row["error"] for row in rows] == [
            "",
            "row 1: cannot decode image (not a format Pillow reads)",
            "row 2: not base64-encoded",
            "",
        ]
        assert rows[1]["p_melanoma"] is None
        assert (rows[0]["melanoma_alert"], rows[3]["melanoma_alert"]) == (True, False)
        for payload, expected in [
            (
                b'{"dataframe_split": {"columns": ["image"], "data": []}}',
                "no images: the request has no rows",
            ),
            (b"not json", "the request is not JSON"),
            (b'{"dataframe_split": {"columns": ["img"], "data": [["x"]]}}', "needs a column 'image'"),
            (b'{"dataframe_split": {"columns": ["image"], "data": 5}}', "data must be a list of rows"),
            (b'{"dataframe_records": [{"img": "x"}]}', "dataframe_records needs a column 'image'"),
            (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ]:
            status, body = _post_body(port, payload)
            assert status == 400, body
            assert expected in json.loads(body)["message"]
            assert "Traceback" not in body
            assert str(REPO) not in body


def test_serve_names_the_version_an_alias_pointed_at(tracking: str, store: Path, tmp_path: Path) -> None:
    mlflow.MlflowClient().set_registered_model_alias(NAME, "served", "1")  # not champion: other tests
    port = free_port()
    command = [
        sys.executable, "-m", "skin_lesion.app.cli", "serve", "--model", f"models:/{NAME}@served",
        "--port", str(port),
    ]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": tracking}
    with running_server(command, f"http://127.0.0.1:{port}/health", env=env, timeout_s=SERVER_START_S):
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
    assert health["model"] == f"models:/{NAME}@served (version 1)"
