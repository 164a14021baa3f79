"""`skin-lesion review`: a web page where a clinician triages images with the registered model.

Each uploaded image gets a card: the class probabilities, P(melanoma) and the alert (that P(melanoma)
against the threshold; the version's own figures once, above the worklist), a Grad-CAM overlay on
demand, and a flag when the image is unlike the training data or unfit to judge. A clinician records
the confirmed diagnosis per image; those records
(skin_lesion/app/feedback.py) become training data through `skin-lesion export-feedback`.

Uploaded images stay in memory (the last SESSION_IMAGES of them, for Grad-CAM and diagnoses) and are
written to disk only when a diagnosis is recorded. Every prediction is logged without the image.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import jinja2
import markupsafe
import mlflow
import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from markdown_it import MarkdownIt
from PIL import Image

from skin_lesion.app.feedback import OTHER_DIAGNOSIS, Diagnosis, FeedbackStore
from skin_lesion.app.gradcam import EXPLANATION_DPI, FIGURE_IMAGE_PX, explanation_figure, grad_cam
from skin_lesion.app.monitoring import OOD_FLAG_MEANING, alert_in_words, threshold_in_words
from skin_lesion.app.promotion import MODEL_CARD_ARTIFACT, promotion_warning
from skin_lesion.app.quality import quality_problems
from skin_lesion.app.server import (
    BODY_TIMEOUT_S,
    IncompleteBodyError,
    incomplete_body_response,
    json_object,
    read_limited,
)
from skin_lesion.errors import PipelineError
from skin_lesion.images import FORMAT_NAMES, IMAGE_FORMATS, decode_image, decode_rgb, resize_rgb
from skin_lesion.model.classifier import (
    MAX_IMAGE_BYTES,
    MAX_PIXELS,
    external_class_recall,
    image_file_of_base64,
    probability_column,
    trained_on_warning,
)

MAX_IMAGES_PER_REQUEST = 16  # the page sends larger selections in chunks, showing progress
# One request carries at most one image's worth of base64 (plus JSON): the page sends a file near the
# limit alone, and a larger one is answered 413 without being read in full.
MAX_REQUEST_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 2**20
MAX_DIAGNOSIS_BYTES = 64 * 2**10  # a diagnosis and its biopsy note
SESSION_IMAGES = 256  # uploads kept in memory for Grad-CAM and diagnoses, oldest dropped first
TOKEN_COOKIE = "review_token"
DISCLAIMER = "Research tool, not a diagnostic device: every decision rests with a clinician."
# How JPEG, PNG, BMP, TIFF (both byte orders) and WebP (RIFF) files begin.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

# The model card is Markdown (headings, tables); raw HTML in it is escaped, not rendered.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("skin_lesion.app", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True)
class Upload:
    """An uploaded image held in memory: its bytes, file type and what the model said of it."""

    data: bytes
    suffix: str
    filename: str
    p_melanoma: float


class Session:
    """The uploads of this server's lifetime, newest last, at most SESSION_IMAGES of them."""

    def __init__(self) -> None:
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, sha256: str, upload: Upload) -> None:
        """Remember an upload, forgetting the oldest beyond SESSION_IMAGES."""
        with self._lock:
            self._uploads[sha256] = upload
            self._uploads.move_to_end(sha256)
            while len(self._uploads) > SESSION_IMAGES:
                self._uploads.popitem(last=False)

    def get(self, sha256: str) -> Upload | None:
        """The upload with this sha256, if still held."""
        with self._lock:
            return self._uploads.get(sha256)


def create_review_app(
    model: mlflow.pyfunc.PyFuncModel,
    version: dict[str, Any],
    store: FeedbackStore,
    mlflow_ui: str,
    token: str | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The review page and its JSON API, for one loaded model (`version` from promotion.describe_version)."""
    app = FastAPI(title="skin-lesion review", docs_url=None, redoc_url=None, openapi_url=None)
    routes = ReviewRoutes(model.unwrap_python_model(), version, store, mlflow_ui, token, body_timeout_s)
    app.middleware("http")(routes.require_token)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/", routes.index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/model-card", routes.model_card, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/api/score", routes.score, methods=["POST"])
    app.add_api_route("/api/gradcam/{sha256}", routes.gradcam, methods=["GET"])
    app.add_api_route("/api/diagnoses", routes.diagnoses, methods=["GET"])
    app.add_api_route("/api/diagnoses", routes.record, methods=["POST"])
    return app


class ReviewRoutes:
    """The page's routes over one model, its session of uploads and the feedback store."""

    def __init__(
        self,
        classifier: Any,
        version: dict[str, Any],
        store: FeedbackStore,
        mlflow_ui: str,
        token: str | None,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self.classifier, self.version, self.store, self.token = classifier, version, store, token
        self.session = Session()
        self.page = page_context(classifier.config, version, mlflow_ui)
        self.body_timeout_s = body_timeout_s

    async def require_token(self, request: Request, call_next: Any) -> Response:
        """Every route but /health needs the token when one is set (header, cookie or ?token=)."""
        if self.token is None or request.url.path == "/health":
            return await call_next(request)
        offered = request.headers.get("authorization", "").removeprefix("Bearer ")
        offered = offered or request.cookies.get(TOKEN_COOKIE, "") or request.query_params.get("token", "")
        if not secrets.compare_digest(offered.encode(), self.token.encode()):
            return _message(401, "this page needs its access token: open /?token=<SKIN_LESION_REVIEW_TOKEN>")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response

    def health(self) -> dict[str, str]:
        """Alive, and which model it serves."""
        return {"status": "ok", "model": self.version["uri"]}

    def index(self) -> str:
        """The review page."""
        return _TEMPLATES.get_template("review.html").render(**self.page)

    def model_card(self) -> str:
        """The version's model card, rendered."""
        return _TEMPLATES.get_template("model_card.html").render(**self.page)

    async def score(self, request: Request) -> JSONResponse:
        """A card per uploaded image; each prediction logged, without the image."""
        try:
            body = await read_limited(request, MAX_REQUEST_BYTES, self.body_timeout_s)
        except IncompleteBodyError as err:
            return incomplete_body_response(_message(408, str(err)))
        if body is None:
            limit = MAX_IMAGE_BYTES // 2**20
            return _message(413, f"upload larger than the {limit} MiB limit: send fewer or smaller images")
        try:
            uploads = uploads_of_request(body)
        except ValueError as err:
            return _message(400, str(err))
        # The model is CPU-bound: scoring off the event loop keeps the page and /health answering.
        cards = await run_in_threadpool(score_uploads, self.classifier, uploads, self.session)
        rows = [log_row(card, self.version) for card in cards if "error" not in card]
        if rows:
            await run_in_threadpool(self.store.log_predictions, rows)
        return JSONResponse({"cards": cards})

    async def gradcam(self, sha256: str) -> Response:
        """The Grad-CAM figure of an upload still held in this session."""
        upload = self.session.get(sha256)
        if upload is None:
            return _message(404, "that image is no longer held: upload it again")
        try:
            png = await run_in_threadpool(explanation_png, self.classifier, upload)
        except PipelineError as err:
            return _message(422, str(err))
        return Response(png, media_type="image/png")

    async def diagnoses(self) -> JSONResponse:
        """Every recorded diagnosis, without the images."""
        table = await run_in_threadpool(self.store.diagnoses)
        return JSONResponse({"diagnoses": table.drop(columns="image").to_dict(orient="records")})

    async def record(self, request: Request) -> JSONResponse:
        """Record a diagnosis of an upload still held, storing its image with it."""
        try:
            body = await read_limited(request, MAX_DIAGNOSIS_BYTES, self.body_timeout_s)
        except IncompleteBodyError as err:
            return incomplete_body_response(_message(408, str(err)))
        if body is None:
            return _message(413, f"a diagnosis is at most {MAX_DIAGNOSIS_BYTES // 2**10} KiB")
        try:
            sha256, diagnosis, biopsy = diagnosis_of_request(body, self.page["diagnoses"])
        except ValueError as err:
            return _message(400, str(err))
        upload = self.session.get(sha256)
        if upload is None:
            return _message(404, "that image is no longer held: upload it again, then record the diagnosis")
        version = self.version["version"]
        entry = Diagnosis(sha256, upload.filename, diagnosis, biopsy, version, upload.p_melanoma)
        await run_in_threadpool(self.store.record_diagnosis, entry, upload.data, upload.suffix)
        return JSONResponse({"recorded": sha256, "diagnosis": diagnosis}, status_code=201)


def page_context(config: dict[str, Any], version: dict[str, Any], mlflow_ui: str) -> dict[str, Any]:
    """What the page shows about the model: which version spoke, its alert and its classes."""
    threshold = float(config["melanoma_threshold"])
    run_link = ""
    if version.get("run_id"):
        experiment, run = version["experiment_id"], version["run_id"]
        run_link = f"{mlflow_ui.rstrip('/')}/#/experiments/{experiment}/runs/{run}"
    return {
        "version": version,
        "run_link": run_link,
        "classes": list(config["classes"]),
        "melanoma_class": config["melanoma_class"],
        # Beside each class bar: how often this version found the class on external sets, or unmeasured.
        "class_recall": external_class_recall(config.get("test_figures") or {}, list(config["classes"])),
        "diagnoses": [*config["classes"], OTHER_DIAGNOSIS],
        "threshold": threshold,
        "threshold_text": threshold_in_words(config.get("test_figures") or {}, threshold),
        "model_warning": trained_on_warning(str(config.get("data_source", ""))),
        "promotion_warning": promotion_warning(version),
        "ood_flag": OOD_FLAG_MEANING,
        "disclaimer": DISCLAIMER,
        "max_images": MAX_IMAGES_PER_REQUEST,
        "max_image_mib": MAX_IMAGE_BYTES // 2**20,
        "card_html": markupsafe.Markup(_MARKDOWN.render(version.get("card") or "")),
        "card_link": f"{run_link}/artifacts/{MODEL_CARD_ARTIFACT}" if version.get("card_is_whole") else "",
    }


def uploads_of_request(body: bytes) -> list[tuple[str, Any]]:
    """(file name, base64 data) of a `{"images": [{"name": ..., "data": ...}]}` request."""
    payload = json_object(body)
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError('the request needs "images": a list of {"name", "data"} objects')
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{len(images)} images in one request; at most {MAX_IMAGES_PER_REQUEST}")
    return [
        (safe_filename(item.get("name")), item.get("data")) if isinstance(item, dict) else ("", None)
        for item in images
    ]


def safe_filename(name: object) -> str:
    """The last part of an uploaded file's name, without control characters: shown, never used as a path."""
    text = str(name or "")
    text = PureWindowsPath(PurePosixPath(text).name).name
    text = re.sub(r"[\x00-\x1f\x7f]", "", text)[:200]
    return text or "unnamed image"


def score_uploads(classifier: Any, uploads: list[tuple[str, Any]], session: Session) -> list[dict[str, Any]]:
    """A card per upload, in order: the model's answer and any quality flags, or the upload's error."""
    size, threshold = int(classifier.config["image_size"]), float(classifier.config["melanoma_threshold"])
    cards: list[dict[str, Any]] = []
    decoded: dict[int, tuple[np.ndarray, bytes, str]] = {}
    for position, (filename, text) in enumerate(uploads):
        cards.append({"filename": filename})
        try:
            data, suffix, image = decode_upload(text)
        except ValueError as err:
            cards[-1]["error"] = str(err)
            continue
        cards[-1]["sha256"] = hashlib.sha256(data).hexdigest()
        cards[-1]["problems"] = quality_problems(image)
        decoded[position] = resize_rgb(image, size), data, suffix
    if decoded:
        frame = classifier.score(np.stack([pixels for pixels, _, _ in decoded.values()]))
        rows = frame.to_dict(orient="records")
        for (position, (_, data, suffix)), row in zip(decoded.items(), rows, strict=True):
            card = cards[position]
            card.update(card_of_prediction(row, classifier.config["classes"]))
            card["alert_text"] = alert_in_words(card["p_melanoma"], threshold)
            session.keep(card["sha256"], Upload(data, suffix, card["filename"], card["p_melanoma"]))
    return cards


def decode_upload(text: object) -> tuple[bytes, str, Image.Image]:
    """The bytes, file suffix and decoded image of one base64 upload; ValueError saying what is wrong."""
    data = image_file_of_base64(text)
    try:
        image, image_format = decode_image(io.BytesIO(data), max_pixels=MAX_PIXELS)
    except PipelineError as err:
        if not data.startswith(SIGNATURES):  # a damaged image of a known format says what failed
            raise ValueError(f"not a {FORMAT_NAMES} image") from None
        raise ValueError(str(err).split(": ", 1)[-1].replace("split.max_pixels=", "the limit of ")) from None
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"not a {FORMAT_NAMES} image")
    return data, IMAGE_FORMATS[image_format], image


def card_of_prediction(row: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The card fields of one prediction row."""
    score = row["ood_score"]
    return {
        "predicted_label": row["predicted_label"],
        "probabilities": {label: float(row[probability_column(label)]) for label in classes},
        "p_melanoma": float(row["p_melanoma"]),
        "melanoma_alert": bool(row["melanoma_alert"]),
        "ood_score": None if score is None or np.isnan(score) else float(score),
        "unlike_training": bool(row["unlike_training"]),
    }


def log_row(card: dict[str, Any], version: dict[str, Any]) -> dict[str, Any]:
    """The prediction log's row of a scored card."""
    fields = ("sha256", "predicted_label", "p_melanoma", "melanoma_alert", "ood_score", "unlike_training")
    return {
        "model": version["uri"],
        "model_version": version["version"],
        "problems": card["problems"],
        "probabilities": card["probabilities"],
        **{field: card[field] for field in fields},
    }


def explanation_png(classifier: Any, upload: Upload) -> bytes:
    """The Grad-CAM figure of an upload (original beside overlay), as PNG bytes."""
    config = classifier.config
    image = decode_rgb(io.BytesIO(upload.data), max_pixels=MAX_PIXELS)
    melanoma = config["classes"].index(config["melanoma_class"])
    heatmap = grad_cam(classifier.model, resize_rgb(image, int(config["image_size"])), melanoma)
    caption = f"{upload.filename}: P(melanoma) {upload.p_melanoma:.3f}"
    buffer = io.BytesIO()
    figure = explanation_figure(resize_rgb(image, FIGURE_IMAGE_PX), heatmap, caption)
    figure.savefig(buffer, format="png", dpi=EXPLANATION_DPI)
    return buffer.getvalue()


def diagnosis_of_request(body: bytes, allowed: list[str]) -> tuple[str, str, str]:
    """(sha256, diagnosis, biopsy) of a `{"sha256", "diagnosis", "biopsy"}` request."""
    payload = json_object(body)
    sha256, diagnosis = payload.get("sha256"), payload.get("diagnosis")
    biopsy = payload.get("biopsy") or ""
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError("sha256: expected the 64 hex digits of an uploaded image")
    if diagnosis not in allowed:
        raise ValueError(f"diagnosis: expected one of {', '.join(allowed)}")
    if not isinstance(biopsy, str) or len(biopsy) > 2000:
        raise ValueError("biopsy: expected text of at most 2000 characters")
    return sha256, diagnosis, biopsy


def _message(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)
