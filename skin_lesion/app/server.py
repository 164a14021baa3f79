"""`skin-lesion serve`: the registered model over HTTP, an answer row for every image of a batch.

`mlflow models serve` answers a batch holding one unreadable image with HTTP 400 for all of it, and
puts the request's data (the base64 images) into its error message. This server speaks the same
request format (`dataframe_split` or `dataframe_records` with an `image` column) to the same
`/invocations` path, but scores every readable image, gives each unreadable one a row with its
error, and names problems without echoing what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from starlette.requests import ClientDisconnect

from skin_lesion.model.classifier import IMAGE_COLUMN, MAX_IMAGE_BYTES, decode_base64_image

MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_BYTES = MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES * 4 // 3  # base64 of that many images
# The longest wait for the next part of a request body: uvicorn has no such limit, so a client that
# stops short of its Content-Length would hold the request open until it goes away. A pause between
# parts, not the whole upload, so that a large image over a slow link still arrives.
BODY_TIMEOUT_S = 30.0
MISSING = object()  # an image cell the request does not have: its row's error names the column

log = logging.getLogger("skin_lesion.app.server")


class IncompleteBodyError(Exception):
    """A request body that stopped short of its length: the client stalled or went away."""


def create_app(
    model: mlflow.pyfunc.PyFuncModel, model_uri: str, body_timeout_s: float = BODY_TIMEOUT_S
) -> FastAPI:
    """The HTTP app: GET /health, POST /invocations."""
    app = FastAPI(title="skin-lesion classifier", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": model_uri}

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        try:
            body = await read_limited(request, MAX_REQUEST_BYTES, body_timeout_s)
        except IncompleteBodyError as err:
            return incomplete_body_response(_error(408, str(err)))
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


async def read_limited(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes | None:
    """The request body, or None when it exceeds `limit` bytes (read to its end but not kept).

    IncompleteBodyError, logged in one line, when no more of it arrives for `timeout_s` seconds or the
    client goes away before sending all of it.
    """
    # Answering before the client has sent everything would reset its connection mid-upload, so
    # the rest is drained; holding at most `limit` bytes keeps a huge upload out of memory.
    chunks, size, stream = [], 0, request.stream()
    try:
        while True:
            async with asyncio.timeout(timeout_s):
                chunk = await anext(stream, None)
            if chunk is None:
                break
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
    except TimeoutError:
        problem = f"the request body stopped arriving ({size} bytes in, none for {timeout_s:g} s)"
    except ClientDisconnect:
        problem = f"the client went away before sending the whole request body ({size} bytes in)"
    else:
        return b"".join(chunks) if size <= limit else None
    log.warning("%s %s: %s", request.method, request.url.path, problem)
    raise IncompleteBodyError(problem)


def incomplete_body_response(response: JSONResponse) -> JSONResponse:
    """The answer to a request whose body stopped short, closing the connection: it is out of step."""
    response.headers["Connection"] = "close"
    return response


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; ValueError saying what it is instead."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request is not JSON") from None
    except RecursionError:  # arrays or objects nested thousands deep: no request of ours needs that
        raise ValueError("the request's JSON is nested too deeply") from None
    if not isinstance(payload, dict):
        raise ValueError("the request must be a JSON object")
    return payload


def images_of_request(body: bytes) -> list[Any]:
    """The `image` values of an MLflow-style JSON request (MISSING where a row has none); ValueError
    naming what is wrong."""
    payload = json_object(body)
    if "dataframe_split" in payload:
        images = _split_images(payload["dataframe_split"])
    elif "dataframe_records" in payload:
        images = _record_images(payload["dataframe_records"])
    else:
        raise ValueError("the request must hold dataframe_split or dataframe_records")
    if not images:
        raise ValueError("no images: the request has no rows")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{len(images)} images in one request; at most {MAX_IMAGES_PER_REQUEST}")
    return images


def _split_images(split: object) -> list[Any]:
    columns = split.get("columns", []) if isinstance(split, dict) else []
    if not isinstance(columns, list) or IMAGE_COLUMN not in columns:
        raise ValueError(f"dataframe_split needs a column {IMAGE_COLUMN!r} of base64-encoded images")
    rows = split.get("data", [])
    if not isinstance(rows, list):
        raise ValueError("dataframe_split: data must be a list of rows")
    position = columns.index(IMAGE_COLUMN)
    return [row[position] if isinstance(row, list) and len(row) > position else MISSING for row in rows]


def _record_images(records: object) -> list[Any]:
    if not isinstance(records, list):
        raise ValueError("dataframe_records must be a list of rows")
    if records and not any(isinstance(row, dict) and IMAGE_COLUMN in row for row in records):
        raise ValueError(f"dataframe_records needs a column {IMAGE_COLUMN!r} of base64-encoded images")
    return [row.get(IMAGE_COLUMN, MISSING) if isinstance(row, dict) else MISSING for row in records]


def score_images(model: mlflow.pyfunc.PyFuncModel, images: list[Any]) -> pd.DataFrame:
    """One row per image, in order: its prediction, or an `error` naming its problem."""
    classifier = model.unwrap_python_model()
    size = int(classifier.config["image_size"])
    decoded, errors = {}, {}
    for row, text in enumerate(images):
        if text is MISSING:
            errors[row] = f"row {row}: no {IMAGE_COLUMN!r} column in this row"
            continue
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
