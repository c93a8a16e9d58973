"""OpenAI-compatible embeddings: `POST /v1/embeddings`, `GET /v1/models`.

So retrieval frameworks, vector databases' embedders and anything else built on the OpenAI
client call bertstream by changing `base_url`. Vectors are L2-normalized (as OpenAI's and
TEI's are); `encoding_format: base64` sends little-endian float32 bytes, which the official
client decodes by default; `user` is accepted and ignored; `usage` counts tokens as the
model's tokenizer does.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...pipeline.inference import EmbedQuery
from .common import (
    Dialect,
    HttpContext,
    HttpError,
    json_response,
    pooled,
    read_json,
    schedule,
)

__all__ = ["routes"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": None, "code": None}}


DIALECT = Dialect("openai", _error)


def _texts(body: Any) -> tuple[str, ...]:
    if not isinstance(body, dict):
        raise HttpError(400, "the body must be a JSON object")
    given = body.get("input")
    if isinstance(given, str):
        return (given,)
    if isinstance(given, list) and given and all(isinstance(t, str) for t in given):
        return tuple(given)
    if isinstance(given, list) and given and all(isinstance(t, int | list) for t in given):
        raise HttpError(400, "input: token arrays are not supported; send strings")
    raise HttpError(400, "input must be a string or a non-empty list of strings")


def routes(context: HttpContext) -> list[Route]:
    @DIALECT.handler(context, "Embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings: input a string or a list, encoding_format float or base64."""
        body = await read_json(request, context)
        texts = _texts(body)
        model = body.get("model", "")
        if not isinstance(model, str):
            raise HttpError(400, "model must be a string")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise HttpError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}")
        record = request.state.record
        record.model = model
        result = await context.pipeline.embed(
            EmbedQuery(model, 0, texts, normalize=True, schedule=schedule(request)),
            wait=False)
        record.served(result.model, result.version, len(texts))
        vectors = pooled(result, "/v1/embeddings", 400).astype(np.float32, copy=False)
        if encoding == "base64":
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(row.tobytes()).decode()}
                    for i, row in enumerate(vectors)]
        else:
            data = [{"object": "embedding", "index": i, "embedding": row}
                    for i, row in enumerate(vectors)]
        tokens = sum(result.token_counts)
        return json_response({"object": "list", "data": data, "model": result.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @DIALECT.handler(context, "Models")
    async def models(request: Request) -> Response:
        """The models with a READY version, as OpenAI lists them."""
        names = [m.name for m in context.models.snapshot.models if m.ready]
        return json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "bertstream"}
            for name in names]})

    return [Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"])]
