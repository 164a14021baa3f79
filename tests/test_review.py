"""The review page: its JSON API with good and hostile uploads, diagnoses, export, monitor, and a browser."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import mlflow
import pandas as pd
import pytest
import uvicorn
from fastapi import Request
from mlflow import MlflowClient
from PIL import Image
from playwright.sync_api import sync_playwright

from skin_lesion.app.feedback import Diagnosis, FeedbackStore, export_feedback
from skin_lesion.app.monitoring import OOD_FLAG_MEANING
from skin_lesion.app.promotion import describe_version, full_model_card, promotion_warning, whole_card
from skin_lesion.app.review import DISCLAIMER, MAX_DIAGNOSIS_BYTES, MAX_REQUEST_BYTES, create_review_app
from skin_lesion.app.server import read_limited
from skin_lesion.errors import PipelineError
from skin_lesion.training.architectures import build_model
from tests.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CLASSES,
    REPO,
    as_params,
    draw_lesion,
    fetch_local_source,
    free_port,
    make_isic_folder,
    mlflow_pointed_at,
    point_mlflow_at,
    register_lesion_model,
    run_skin_lesion,
    small_params,
)

SIZE = 32
FULL_CARD = (
    "# Model card\n\n**Trained** on <script>x</script>.\n\n| set | AUC |\n| --- | --- |\n| test | 0.9 |\n\n"
    "## Threshold rules\n\n| rule | threshold |\n| --- | --- |\n| overall | 0.3 |\n"
)
# The version's description: the card less a section left out for length, and the provenance.
CARD = (
    FULL_CARD.split("\n## Threshold rules", maxsplit=1)[0]
    + "\n*Left out here for length: threshold rules.*\n\n## Provenance\n\n- git commit: `abc123`\n"
)
NAME = "lesions"
FIGURES = {
    "images": 40,
    "melanomas": 12,
    "melanoma_sensitivity": 0.75,
    "melanoma_sensitivity_ci": [0.5, 1.0],
    "alerts_per_100_benign": 17.0,
    "alert_rate": 0.3,
    "ood_rate": 0.01,
    "class_mix": {"melanoma": 0.3, "nevus": 0.5, "vascular lesion": 0.2},
    "external": {
        "isic2017": {
            "melanomas": 117,
            "sensitivity": 0.8,
            "false_alert_rate": 0.4,
            "class_recall": {
                "melanoma": {"recall": 0.18, "images": 117},
                "nevus": {"recall": 0.29, "images": 393},
            },
        }
    },
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registered version with an OOD summary, and two lesion images on either side of its threshold."""
    root = tmp_path_factory.mktemp("review")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_pointed_at(uri):
        keras.utils.set_random_seed(0)
        model = build_model("resnet_small", SIZE, len(CLASSES), 0.0)
        threshold, low, high = register_lesion_model(
            root, model, NAME, SIZE, 40, ood=True, card=FULL_CARD, description=CARD, test_figures=FIGURES
        )
        images = {
            name: _png(draw_lesion(seed, SIZE).resize((180, 180), Image.Resampling.NEAREST))
            for name, seed in (("low.png", low), ("high.png", high))
        }
        yield {"root": root, "uri": uri, "images": images, "threshold": threshold}


@pytest.fixture(scope="module")
def review(registered: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The review app on 127.0.0.1 in a thread, with its own feedback database."""
    version = describe_version(MlflowClient(), f"models:/{NAME}/1")
    store = FeedbackStore(registered["root"] / "feedback" / "review.db")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    app = create_review_app(model, version, store, "http://127.0.0.1:5000")
    with _serving(app) as url:
        yield {**registered, "url": url, "store": store}


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # in a thread: leave pytest's handlers alone
        pass


@contextmanager
def _serving(app: Any) -> Iterator[str]:
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "review app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get_content_type()
    return status, json.loads(raw) if kind == "application/json" else raw.decode("utf-8", "replace")


def _score(url: str, uploads: list[tuple[str, bytes]]) -> tuple[int, Any]:
    images = [{"name": name, "data": base64.b64encode(data).decode("ascii")} for name, data in uploads]
    return _request(f"{url}/api/score", json.dumps({"images": images}).encode())


def test_page_names_the_model_its_alert_and_that_it_is_no_diagnostic_device(review: dict) -> None:
    status, page = _request(f"{review['url']}/")
    assert status == 200
    assert f"<strong>{NAME}</strong> version <strong>1</strong>" in page
    assert page.count(DISCLAIMER) >= 2  # banner and footer
    assert "found 75% of the 12 melanomas in its test set (95 % CI 50% to 100%)" in page
    assert "with 17 alerts per 100 non-melanoma lesions" in page
    assert "/#/experiments/" in page  # the link to the MLflow run
    status, card = _request(f"{review['url']}/model-card")
    assert status == 200
    assert DISCLAIMER in card


def test_class_bars_get_their_external_recall_or_none_and_the_alert_its_threshold(review: dict) -> None:
    _, page = _request(f"{review['url']}/")
    figures = re.search(r'<script id="class-figures" type="application/json">(.*?)</script>', page)
    assert json.loads(figures.group(1)) == {
        "threshold": review["threshold"],
        "recall": {"melanoma": 0.18, "nevus": 0.29, "vascular lesion": None},
    }


def test_the_model_card_is_rendered_not_shown_as_markdown(review: dict) -> None:
    status, card = _request(f"{review['url']}/model-card")
    assert status == 200
    assert "<h1>" in card
    assert "<table>" in card
    assert "| --- |" not in card
    assert "**" not in card
    assert "&lt;script&gt;" in card  # HTML inside the card is shown as text, never run


def test_the_model_card_page_shows_the_whole_card_logged_with_the_run_and_links_it(review: dict) -> None:
    status, card = _request(f"{review['url']}/model-card")
    assert status == 200
    assert "<h2>Threshold rules</h2>" in card  # left out of the description, kept in the whole card
    assert "Left out here for length" not in card
    assert "<code>abc123</code>" in card  # the description's provenance
    assert re.search(r'href="http://127.0.0.1:5000/#/experiments/\w+/runs/\w+/artifacts/model_card.md"', card)


def test_a_version_whose_run_logged_no_card_shows_its_description(registered: dict) -> None:
    with mlflow.start_run() as run:  # as runs registered before evaluate logged the card
        pass
    assert full_model_card(MlflowClient(), run.info.run_id) == ""
    assert whole_card("", CARD) == CARD


def test_a_version_nobody_promoted_is_named_so_on_every_screen(review: dict) -> None:
    expected = f"NOT PROMOTED: {NAME} version 1 is not a champion; it may be an experiment"
    for screen in ("/", "/model-card"):
        status, page = _request(f"{review['url']}{screen}")
        assert status == 200
        assert expected in page, screen


def test_only_a_champion_goes_without_the_not_promoted_banner() -> None:
    version = {"uri": f"models:/{NAME}/3", "name": NAME, "version": "3"}
    assert promotion_warning(version | {"aliases": ["champion"]}) == ""
    assert promotion_warning(version | {"aliases": ["champion-clinic"]}) == ""
    assert "skin-lesion promote 3" in promotion_warning(version | {"aliases": ["challenger"]})
    folder = {"uri": "served-model", "name": "", "version": "", "aliases": []}
    assert promotion_warning(folder).startswith("NOT PROMOTED: served-model is not a registered version")


def test_review_refuses_to_start_without_a_champion_naming_promote_and_model(
    registered: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_mlflow_at(registered["uri"], monkeypatch)
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text(encoding="utf-8").replace("skin-lesion-classifier", NAME),
        encoding="utf-8",
    )
    result = run_skin_lesion(tmp_path, "review", "--db", str(tmp_path / "review.db"))
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"{NAME} has no version aliased 'champion' in " in last_line
    assert last_line.endswith(
        ": promote one (`skin-lesion promote 1` for the newest), or name the version to use with "
        f"--model models:/{NAME}/1"
    )


def test_the_unlike_training_flag_says_what_was_measured_and_what_it_catches(review: dict) -> None:
    _, page = _request(f"{review['url']}/")
    assert "unlike the training images (OOD score" in page
    config = json.loads(re.search(r'<script id="config" type="application/json">(.*?)</script>', page)[1])
    assert config["ood_flag"] == OOD_FLAG_MEANING  # what the flag was shown to catch, and not to
    assert "badly degraded?" not in page  # no guessed cause


def test_an_alert_card_states_its_images_p_melanoma_against_the_threshold(review: dict) -> None:
    images = review["images"]
    _, body = _score(review["url"], [("high.png", images["high.png"]), ("low.png", images["low.png"])])
    high, low = body["cards"]
    threshold = f"the alert threshold {review['threshold']:.3f}"
    assert high["alert_text"] == f"P(melanoma) {high['p_melanoma']:.3f}, at or above {threshold}"
    assert low["alert_text"] == f"P(melanoma) {low['p_melanoma']:.3f}, below {threshold}"


def test_a_batch_gets_a_card_per_image_in_order_with_alert_by_the_threshold(review: dict) -> None:
    images = review["images"]
    status, body = _score(
        review["url"],
        [("high.png", images["high.png"]), ("bad.jpg", b"\xff\xd8\xff junk"), ("low.png", images["low.png"])],
    )
    assert status == 200
    high, bad, low = body["cards"]
    assert [high["filename"], bad["filename"], low["filename"]] == ["high.png", "bad.jpg", "low.png"]
    assert bad["error"].startswith("cannot decode image")
    assert high["melanoma_alert"]
    assert not low["melanoma_alert"]
    assert high["p_melanoma"] > review["threshold"] > low["p_melanoma"]
    assert sum(high["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert high["ood_score"] is not None


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("notes.txt", lambda: b"just some text", "not a JPEG, PNG, BMP, TIFF or WebP image"),
        ("truncated.png", lambda: _png(draw_lesion(1, 180))[:300], "cannot decode image"),
        ("bomb.png", lambda: _png(Image.new("1", (7100, 7100))), "is over the limit of 50000000"),
    ],
)
def test_bad_uploads_get_a_message_on_their_card_never_a_500(
    review: dict, name: str, make: Callable[[], bytes], message: str
) -> None:
    status, body = _score(review["url"], [(name, make())])
    assert status == 200
    assert message in body["cards"][0]["error"]


def test_a_file_name_with_path_characters_is_shown_as_its_last_part_only(review: dict) -> None:
    status, body = _score(review["url"], [("../../etc/passwd\x07.png", review["images"]["low.png"])])
    assert status == 200
    assert body["cards"][0]["filename"] == "passwd.png"


def test_an_upload_over_the_size_limit_is_413_with_a_message(review: dict) -> None:
    status, body = _request(f"{review['url']}/api/score", b"x" * (MAX_REQUEST_BYTES + 1))
    assert status == 413
    assert "MiB limit" in body["message"]


def test_a_diagnosis_over_its_size_limit_is_413(review: dict) -> None:
    status, body = _request(f"{review['url']}/api/diagnoses", b"x" * (MAX_DIAGNOSIS_BYTES + 1))
    assert status == 413
    assert body["message"] == "a diagnosis is at most 64 KiB"


def test_a_body_over_the_limit_is_read_to_its_end_but_not_kept() -> None:
    chunks = [b"x" * 10] * 5

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    assert asyncio.run(read_limited(request, 30)) is None
    assert chunks == []  # drained, so the client is not cut off mid-upload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"images": []}', '"images"'),
        (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_malformed_requests_are_400_without_a_traceback(review: dict, body: bytes, message: str) -> None:
    status, answer = _request(f"{review['url']}/api/score", body)
    assert status == 400
    assert message in answer["message"]
    assert "Traceback" not in json.dumps(answer)


def _review_app(registered: dict, folder: Path, **options: Any) -> Any:
    version = describe_version(MlflowClient(), f"models:/{NAME}/1")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    store = FeedbackStore(folder / "review.db")
    return create_review_app(model, version, store, "http://127.0.0.1:5000", **options)


def _send_short_body(url: str, sent: bytes, length: int) -> socket.socket:
    """A connection that has sent a POST to /api/score announcing `length` bytes of body, and only `sent`."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST /api/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    client.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode() + sent)
    return client


@contextmanager
def _server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    # uvicorn's loggers do not propagate to the root logger, where caplog listens: its tracebacks too.
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            yield caplog
    finally:
        uvicorn_log.removeHandler(caplog.handler)


def test_a_body_shorter_than_its_content_length_is_answered_408_after_the_read_timeout(
    registered: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = _review_app(registered, tmp_path, body_timeout_s=0.5)
    with _serving(app) as url, _server_log(caplog) as log:
        client = _send_short_body(url, b'{"images": [', 1000)
        with client:
            answer = b"".join(iter(lambda: client.recv(65536), b""))  # to the end: the server closes
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.splitlines()[0] == b"HTTP/1.1 408 Request Timeout"
    expected = "the request body stopped arriving (12 bytes in, none for 0.5 s)"
    assert json.loads(body) == {"message": expected}
    assert [record.getMessage() for record in log.records] == [f"POST /api/score: {expected}"]


def test_a_client_that_goes_away_mid_body_costs_one_log_line_not_a_traceback(
    registered: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _serving(_review_app(registered, tmp_path)) as url, _server_log(caplog) as log:
        _send_short_body(url, b'{"images": [', 1000).close()
        deadline = time.monotonic() + 10
        while not log.records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # anything logged after the first line would show here
    expected = "POST /api/score: the client went away before sending the whole request body (12 bytes in)"
    assert [record.getMessage() for record in log.records] == [expected]
    assert not any(record.exc_info for record in log.records)


def test_predictions_are_logged_without_images_and_images_stored_only_with_a_diagnosis(review: dict) -> None:
    before, stored = len(review["store"].predictions()), set(review["store"].images.glob("*"))
    _score(review["url"], [("low.png", review["images"]["low.png"])])
    logged = review["store"].predictions()
    assert len(logged) == before + 1
    assert logged.iloc[-1]["model_version"] == "1"
    assert set(logged.columns).isdisjoint({"image", "data"})
    assert set(review["store"].images.glob("*")) == stored  # no image written without a diagnosis


def test_a_diagnosis_is_recorded_with_the_image_named_by_its_sha256(review: dict) -> None:
    card = _score(review["url"], [("high.png", review["images"]["high.png"])])[1]["cards"][0]
    payload = {"sha256": card["sha256"], "diagnosis": "melanoma", "biopsy": "invasive, Breslow 0.4 mm"}
    status, _answer = _request(f"{review['url']}/api/diagnoses", json.dumps(payload).encode())
    assert status == 201
    stored = review["store"].images / f"{card['sha256']}.png"
    assert stored.read_bytes() == review["images"]["high.png"]
    records = _request(f"{review['url']}/api/diagnoses")[1]["diagnoses"]
    assert {"sha256": card["sha256"], "diagnosis": "melanoma", "model_version": "1"}.items() <= records[
        0
    ].items()


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"sha256": "0" * 64, "diagnosis": "melanoma"}, 404, "no longer held"),
        ({"sha256": "../x", "diagnosis": "melanoma"}, 400, "sha256"),
        ({"sha256": "0" * 64, "diagnosis": "psoriasis"}, 400, "diagnosis: expected one of"),
    ],
)
def test_bad_diagnosis_requests_are_refused_with_a_message(
    review: dict, payload: dict, status: int, message: str
) -> None:
    answer = _request(f"{review['url']}/api/diagnoses", json.dumps(payload).encode())
    assert answer[0] == status
    assert message in answer[1]["message"]


def test_grad_cam_of_an_uploaded_image_is_a_readable_png(review: dict) -> None:
    card = _score(review["url"], [("high.png", review["images"]["high.png"])])[1]["cards"][0]
    status, _ = _request(f"{review['url']}/api/gradcam/{'f' * 64}")
    assert status == 404
    with urllib.request.urlopen(f"{review['url']}/api/gradcam/{card['sha256']}", timeout=120) as response:
        figure = Image.open(io.BytesIO(response.read()))
    assert figure.width >= 2 * 384


def _record(review: dict, diagnoses: list[str]) -> list[dict]:
    cards = _score(review["url"], list(review["images"].items()))[1]["cards"]
    for card, diagnosis in zip(cards, diagnoses, strict=True):
        payload = {"sha256": card["sha256"], "diagnosis": diagnosis}
        assert _request(f"{review['url']}/api/diagnoses", json.dumps(payload).encode())[0] == 201
    return cards


def _ingest(folder: Path, out: Path) -> dict[str, str]:
    """The label of each image id the local source reads from `folder`, with the committed metadata keys."""
    params = small_params(download={"source": "local", "path": str(folder)})
    params["download"]["local"].update(metadata="index.csv")  # the committed default
    manifest = fetch_local_source(as_params(params), out)
    return dict(zip(manifest["isic_id"], manifest["label"], strict=True))


def test_exported_diagnoses_are_a_dataset_the_local_source_ingests(review: dict, tmp_path: Path) -> None:
    low, high = _record(review, ["nevus", "other/unknown"])
    local = as_params(small_params()).download.local
    export_feedback(review["store"], tmp_path / "export", CLASSES, local)
    labelled = _ingest(tmp_path / "export", tmp_path / "raw")
    assert labelled[low["sha256"][:20]] == "nevus"
    assert high["sha256"][:20] not in labelled  # other/unknown is no class to train on
    metadata = pd.read_csv(tmp_path / "export" / "index.csv", dtype=str, keep_default_na=False)
    assert set(metadata.columns) >= {"isic_id", local.lesion_column, "confirmed_diagnosis", "sha256"}


def test_an_export_with_a_base_dataset_trains_on_both(review: dict, tmp_path: Path) -> None:
    base = make_isic_folder(tmp_path / "base", train_per_class=2)
    (low, _) = _record(review, ["nevus", "other/unknown"])
    local = as_params(small_params()).download.local
    export_feedback(review["store"], tmp_path / "export", CLASSES, local, base=base)
    labelled = _ingest(tmp_path / "export", tmp_path / "raw")
    assert len(labelled) == 2 * len(CLASSES) + 1
    assert labelled[low["sha256"][:20]] == "nevus"


def test_an_export_with_a_base_that_does_not_exist_says_so(review: dict, tmp_path: Path) -> None:
    local = as_params(small_params()).download.local
    with pytest.raises(PipelineError, match=r"^--base: .*missing does not exist$"):
        export_feedback(review["store"], tmp_path / "export", CLASSES, local, base=tmp_path / "missing")
    assert not (tmp_path / "export").exists()


def _store_with_a_diagnosis(folder: Path) -> FeedbackStore:
    """A feedback database in `folder` holding one nevus diagnosis, recorded as the page records it."""
    store = FeedbackStore(folder / "review.db")
    image = _png(draw_lesion(7, SIZE))
    sha256 = hashlib.sha256(image).hexdigest()
    store.record_diagnosis(Diagnosis(sha256, "lesion.png", "nevus", "", "1", 0.2), image, ".png")
    return store


def test_an_export_refuses_a_folder_holding_files_it_did_not_write(tmp_path: Path) -> None:
    store = _store_with_a_diagnosis(tmp_path / "feedback")
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me", encoding="utf-8")
    (victim / "sub" / "more.txt").write_text("me too", encoding="utf-8")
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    result = run_skin_lesion(tmp_path, "export-feedback", "victim", "--db", str(store.path))
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "victim: holds files export-feedback did not write (precious.txt and 1 more), which writing the "
            "export would delete; name a new or empty folder"
        )
    )
    assert (victim / "precious.txt").read_text(encoding="utf-8") == "keep me"
    assert (victim / "sub" / "more.txt").read_text(encoding="utf-8") == "me too"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["feedback", "params.yaml", "victim"]


def test_an_export_replaces_an_earlier_export_but_not_a_file_added_to_it(tmp_path: Path) -> None:
    store = _store_with_a_diagnosis(tmp_path / "feedback")
    local = as_params(small_params()).download.local
    export_feedback(store, tmp_path / "export", CLASSES, local)
    assert len(export_feedback(store, tmp_path / "export", CLASSES, local)) == 1  # its own: replaced
    (tmp_path / "export" / "Train" / "nevus" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(
        PipelineError, match=r"export: holds files export-feedback did not write \(Train/nevus/notes.txt\)"
    ):
        export_feedback(store, tmp_path / "export", CLASSES, local)
    assert (tmp_path / "export" / "Train" / "nevus" / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_an_export_refuses_a_folder_it_cannot_list_all_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store_with_a_diagnosis(tmp_path / "feedback")
    (tmp_path / "export" / "locked").mkdir(parents=True)
    scandir = os.scandir

    def unreadable_locked(path: Any) -> Any:  # what a folder of another user's looks like (tests run as root)
        if isinstance(path, str | os.PathLike) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unreadable_locked)
    local = as_params(small_params()).download.local
    with pytest.raises(PipelineError, match=r"export/locked: cannot be listed \(Permission denied\)"):
        export_feedback(store, tmp_path / "export", CLASSES, local)
    assert (tmp_path / "export" / "locked").is_dir()


@pytest.mark.parametrize("command", [["export-feedback", "out"], ["monitor"]])
@pytest.mark.parametrize("database", ["missing", "empty"])
def test_commands_that_read_the_database_refuse_a_missing_or_empty_one(
    tmp_path: Path, command: list[str], database: str
) -> None:
    db = tmp_path / "feedback" / "reveiw.db"  # a typo
    if database == "empty":
        db.parent.mkdir()
        db.touch()
    (tmp_path / "params.yaml").write_text(
        (REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    result = run_skin_lesion(tmp_path, *command, "--db", str(db))
    assert result.returncode == 1, result.stderr
    expected = {
        "missing": "reveiw.db: no feedback database there (`skin-lesion review` creates one)",
        "empty": "reveiw.db: the file is empty (0 bytes), not a feedback database",
    }[database]
    assert result.stderr.strip().splitlines()[-1].endswith(expected)
    assert "Traceback" not in result.stderr
    assert db.exists() == (database == "empty")
    assert not (tmp_path / "out").exists()
    if database == "empty":
        assert db.stat().st_size == 0  # left as it was: no tables created in it


def test_a_token_guards_every_page_but_health(registered: dict) -> None:
    version = describe_version(MlflowClient(), f"models:/{NAME}/1")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    store = FeedbackStore(registered["root"] / "token" / "review.db")
    with _serving(create_review_app(model, version, store, "http://127.0.0.1:5000", token="s3cret")) as url:
        assert _request(f"{url}/health")[0] == 200
        assert _request(f"{url}/")[0] == 401
        assert _request(f"{url}/api/diagnoses")[0] == 401
        assert _request(f"{url}/?token=wrong")[0] == 401
        assert _request(f"{url}/?token=s3cret")[0] == 200
        assert _request(f"{url}/api/diagnoses", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_review_refuses_to_listen_beyond_localhost_without_a_token(tmp_path: Path) -> None:
    result = run_skin_lesion(tmp_path, "review", "--host", "0.0.0.0", SKIN_LESION_REVIEW_TOKEN="")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "--host 0.0.0.0 opens the page to other machines: set SKIN_LESION_REVIEW_TOKEN to an access token"
        )
    )


def test_monitor_compares_the_logged_predictions_with_the_test_split(
    review: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _score(review["url"], [("high.png", review["images"]["high.png"])] * 3)
    point_mlflow_at(review["uri"], monkeypatch)
    db = review["store"].path
    result = run_skin_lesion(
        review["root"], "monitor", "--model", f"models:/{NAME}/1", "--db", str(db), "--tolerance", "0.05",
        "--min-predictions", "3",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # drift: a cron job can act on it
    assert f"predictions by {NAME} version 1, against its test split" in result.stdout
    assert "DRIFT in" in result.stdout  # alerts on every image but one, against 30 % on test
    assert Image.open(db.with_name("monitor.png")).width >= 800


def test_monitor_names_the_versions_that_have_predictions_when_its_own_has_none(
    review: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    db = tmp_path / "review.db"
    shutil.copy(review["store"].path, db)
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM predictions")
    row = {
        "model": "m",
        "sha256": "a",
        "predicted_label": "nevus",
        "p_melanoma": 0.1,
        "melanoma_alert": False,
    }
    row |= {"ood_score": 1.0, "unlike_training": False, "problems": [], "probabilities": {}}
    FeedbackStore(db).log_predictions([row | {"model_version": "3"}] * 2)
    point_mlflow_at(review["uri"], monkeypatch)
    result = run_skin_lesion(review["root"], "monitor", "--model", f"models:/{NAME}/1", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert f"no predictions logged for {NAME} version 1" in result.stdout
    assert "by other versions (version 3: 2); --model picks one" in result.stdout


@pytest.mark.parametrize(("tolerance", "code"), [("1.0", 4), ("0.05", 5)])
def test_monitor_prints_its_report_when_its_figure_cannot_be_written_and_says_so_in_its_exit_code(
    registered: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: str, code: int
) -> None:
    store = FeedbackStore(tmp_path / "review.db")
    row = {
        "model": f"models:/{NAME}/1", "model_version": "1", "sha256": "0" * 64, "predicted_label": "melanoma",
        "p_melanoma": 0.9, "melanoma_alert": True, "ood_score": 0.1, "unlike_training": False,
        "problems": [], "probabilities": {},
    }  # fmt: skip
    store.log_predictions([row] * 3)
    (tmp_path / "blocker").write_text("a file where the figure's folder should be", encoding="utf-8")
    point_mlflow_at(registered["uri"], monkeypatch)
    plot = str(tmp_path / "blocker" / "monitor.png")
    result = run_skin_lesion(
        tmp_path, "monitor", "--model", f"models:/{NAME}/1", "--db", str(store.path), "--plot", plot,
        "--tolerance", tolerance, "--min-predictions", "3",
    )  # fmt: skip
    assert result.returncode == code, result.stderr  # 4: no drift, 5: drift; the figure failed either way
    assert f"predictions by {NAME} version 1, against its test split" in result.stdout
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert re.search(
        r"blocker/monitor.png: cannot write the figure \(.+\); the report above stands$", last_line
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blocker", "review.db"]


def test_in_a_browser_a_clinician_triages_records_and_finds_the_diagnosis_after_reload(
    review: dict, tmp_path: Path
) -> None:
    files = []
    for name in ("low.png", "high.png"):
        files.append(tmp_path / name)
        files[-1].write_bytes(review["images"][name])
    files.append(tmp_path / "corrupt.jpg")
    files[-1].write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(review["url"])
        page.set_input_files("#files", [str(path) for path in files])
        page.wait_for_function("document.querySelectorAll('[data-testid=card]').length === 3", timeout=60_000)
        page.wait_for_selector("#progress:has-text('Scored 3 images')")
        cards = page.locator("[data-testid=card]")
        # The worklist: the alert first, the unscored image last.
        assert cards.nth(0).locator("h3").inner_text() == "high.png"
        assert cards.nth(0).locator("[data-testid=alert]").inner_text() == "MELANOMA ALERT"
        # The version's figures once, in the header; each alert card its own image's P(melanoma).
        assert cards.nth(0).locator("[data-testid=alert-text]").inner_text().startswith("P(melanoma) ")
        assert page.get_by_text("in its test set").count() == 1
        assert cards.nth(1).locator("[data-testid=alert]").count() == 0
        assert "alert at" in cards.nth(1).locator("[data-testid=p-melanoma]").inner_text()
        # Every class bar says what the version earned on that class: a measured recall or nothing.
        recalls = cards.nth(1).locator("[data-testid=class-recall]").all_inner_texts()
        assert sorted(recalls) == ["found 18 % externally", "found 29 % externally", "unmeasured"]
        assert (
            "Not scored: cannot decode image" in cards.nth(2).locator("[data-testid=card-error]").inner_text()
        )
        rows = page.locator("[data-testid=worklist-row]")
        assert [rows.nth(k).locator("td").nth(1).inner_text() for k in range(3)] == [
            "high.png",
            "low.png",
            "corrupt.jpg",
        ]
        cards.nth(0).get_by_role("button", name="Show Grad-CAM").click()
        page.wait_for_function("document.querySelector('img.gradcam').naturalWidth > 0", timeout=60_000)
        # Shown at its own size across the row, so that its caption reads; not shrunk into the card.
        figure = page.locator("img.gradcam")
        shown, natural = figure.evaluate("image => [image.width, image.naturalWidth]")
        assert shown == natural, (shown, natural)
        page.screenshot(path=str(tmp_path / "gradcam.png"), full_page=True)
        cards.nth(0).locator("select").select_option("melanoma")
        cards.nth(0).get_by_placeholder("biopsy result (optional)").fill("melanoma in situ")
        cards.nth(0).get_by_role("button", name="Record diagnosis").click()
        page.wait_for_selector("[data-testid=recorded]:has-text('Recorded: melanoma')")
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        page.reload()
        page.wait_for_selector("[data-testid=diagnosis-row]:has-text('melanoma in situ')")
        page.goto(f"{review['url']}/model-card")
        assert page.locator("table td").first.inner_text() == "test"  # a table, not pipes
        page.screenshot(path=str(tmp_path / "model_card.png"), full_page=True)
        browser.close()
