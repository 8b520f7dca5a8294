"""The HTTP API of ``fedcrypt serve``: ``POST /predict``, ``GET /health``, ``GET /metadata``.

Bad requests get a 4xx with ``{"error": "..."}`` naming what is wrong; inputs are never logged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fedcrypt import __version__
from fedcrypt.serving.model import InputError, ServedModel, parse_inputs

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["inputs"], "additionalProperties": False,
            "properties": {"inputs": {"type": "array", "minItems": 1, "description":
                                      "A batch: each item has the model's input shape (see /metadata) or is flat."}},
        }}},
    }
}


def create_app(served: ServedModel, *, max_batch: int = 1024, max_body_bytes: int | None = None) -> FastAPI:
    """An app serving ``served``; a body over ``max_body_bytes`` (default: room for ``max_batch``
    inputs written out in full) is refused with 413 before it is read in full."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    body_limit = max_body_bytes or max(1 << 20, 32 * max_batch * served.flat_length)
    class_names = served.spec.class_names
    app = FastAPI(title=f"fedcrypt serve: {served.run.get('job') or served.spec.name}", version=__version__,
                  description="Predictions from a fedcrypt run's final model.")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        return {**served.metadata(), "max_batch": max_batch, "fedcrypt": __version__}

    @app.post("/predict", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request) -> JSONResponse:
        """Class, label and probabilities for each input of the batch."""
        try:
            body = await _read_body(request, body_limit)
            inputs = parse_inputs(body, served.spec, max_batch=max_batch)
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        probabilities = await run_in_threadpool(served.predict, inputs)
        classes = probabilities.argmax(axis=1)
        return JSONResponse({
            "predictions": classes.tolist(),
            "labels": [class_names[i] for i in classes],
            "probabilities": probabilities.astype(np.float64).round(6).tolist(),
        })

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"body of {int(declared)} bytes exceeds the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)
