"""`skin-lesion serve`: the registered model over HTTP, an answer row for every image of a batch.

`mlflow models serve` answers a batch holding one unreadable image with HTTP 400 for all of it, and
puts the request's data (the base64 images) into its error message. This server speaks the same
request format (`dataframe_split` or `dataframe_records` with an `image` column) to the same
`/invocations` path, but scores every readable image, gives each unreadable one a row with its
error, and names problems without echoing what it was sent.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException

from skin_lesion.serving import IMAGE_COLUMN, MAX_IMAGE_BYTES, decode_base64_image

MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_BYTES = MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES * 4 // 3  # base64 of that many images


def create_app(model: mlflow.pyfunc.PyFuncModel, model_uri: str) -> FastAPI:
    """The HTTP app: GET /health, POST /invocations."""
    app = FastAPI(title="skin-lesion classifier", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": model_uri}

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        body = await read_limited(request, MAX_REQUEST_BYTES)
        if body is None:
            return _error(413, f"request larger than {MAX_REQUEST_BYTES // 2**20} MiB; send fewer images")
        try:
            images = images_of_request(body)
        except ValueError as err:
            return _error(400, str(err))
        # The model is CPU-bound: scoring off the event loop keeps /health answering meanwhile.
        table = await run_in_threadpool(score_images, model, images)
        return JSONResponse({"predictions": json.loads(table.to_json(orient="records"))})

    return app


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it exceeds `limit` bytes (read to its end but not kept)."""
    # Answering before the client has sent everything would reset its connection mid-upload, so
    # the rest is drained; holding at most `limit` bytes keeps a huge upload out of memory.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    return b"".join(chunks) if size <= limit else None


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; ValueError saying what it is instead."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request is not JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("the request must be a JSON object")
    return payload


def images_of_request(body: bytes) -> list[Any]:
    """The `image` values of an MLflow-style JSON request; ValueError naming what is wrong."""
    payload = json_object(body)
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        columns = split.get("columns", []) if isinstance(split, dict) else []
        if IMAGE_COLUMN not in columns:
            raise ValueError(f"dataframe_split needs a column {IMAGE_COLUMN!r} of base64-encoded images")
        position = columns.index(IMAGE_COLUMN)
        rows = split.get("data", [])
        images = [row[position] if isinstance(row, list) and len(row) > position else None for row in rows]
    elif "dataframe_records" in payload and isinstance(payload["dataframe_records"], list):
        images = [
            row.get(IMAGE_COLUMN) if isinstance(row, dict) else None for row in payload["dataframe_records"]
        ]
    else:
        raise ValueError("the request must hold dataframe_split or dataframe_records")
    if not images:
        raise ValueError("no images: the request has no rows")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{len(images)} images in one request; at most {MAX_IMAGES_PER_REQUEST}")
    return images


def score_images(model: mlflow.pyfunc.PyFuncModel, images: list[Any]) -> pd.DataFrame:
    """One row per image, in order: its prediction, or an `error` naming its problem."""
    classifier = model.unwrap_python_model()
    size = int(classifier.config["image_size"])
    decoded, errors = {}, {}
    for row, text in enumerate(images):
        try:
            decoded[row] = decode_base64_image(text, size, row)
        except MlflowException as err:
            errors[row] = err.message
    frames = []
    if decoded:
        scored = classifier.score(np.stack(list(decoded.values())))
        frames.append(scored.assign(row=list(decoded), error=""))
    if errors:
        frames.append(pd.DataFrame({"row": list(errors), "error": list(errors.values())}))
    table = pd.concat(frames, ignore_index=True).sort_values("row", ignore_index=True)
    return table.drop(columns="row")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": "BAD_REQUEST", "message": message}, status_code=status)
