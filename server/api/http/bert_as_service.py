"""bert-as-service's HTTP proxy (`bert-serving-start -http_port`): `POST /encode`,
`GET /status/server`, `GET /status/client`, so its HTTP callers switch by changing the address.

`/encode` takes `{"id", "texts", "is_tokenized"}` and answers `{"id", "result", "status": 200}`
with the server's default model (`--default-model`) in its default pooling and layer, raw (not
normalized), as bert-as-service answers: `result` equals gRPC Embed's vectors. Errors are
Flask-JSON's, as bert-as-service raised them: `{"status", "description", "type"}`, with the
taxonomy's statuses (common.HTTP_STATUS; bert-as-service answered every failure 400).

A text `"a ||| b"` is the pair (a, b), split as bert-as-service split it (the last ` ||| `,
spaces included): `[CLS] a [SEP] b [SEP]` with type ids 0 and 1, as gRPC's `text_pairs`. A
call may mix pairs and single texts; each kind runs as one request and the answers keep the
call's order.

`is_tokenized: true` sends each text as a list of words. Each text's words are joined with
single spaces and tokenized: for BERT's pre-tokenizer (whitespace and punctuation splits) and
Metaspace with `prepend_scheme: always` (e5, XLM-R) that gives the ids `tokenizers` gives for
the same words with `is_pretokenized`; tests/rest/test_bert_as_service.py checks it on the
test model. bert-as-service looked each token up in the vocabulary instead, so WordPiece
continuations (`##ing`) are refused 400 rather than silently split.

Where this differs from bert-as-service, and why:
- A text over the model's `max_sequence_length` is refused 400 (bertstream never truncates
  unasked); send `"truncate": true`, a bertstream extension, to cut it as bert-as-service did.
- At most --max-texts-per-request texts per call (bert-as-service split any number into
  batches): more are refused 400.
- `id` is required, as bert-as-service required it, and echoed whatever JSON value it is.
- A form-encoded body is refused 400: only JSON is read.
"""

from __future__ import annotations

import asyncio
import re
import sys
from datetime import datetime
from typing import Any

from bertstream.v1.model_config_pb2 import Pooling
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ... import server_version
from ...errors import ModelNotReady
from ...pipeline.inference import (
    EmbedQuery,
    Pipeline,
    Result,
    Schedule,
    TextOptions,
    resolve_pooling,
)
from .common import Dialect, HttpContext, HttpError, json_response, read_json, schedule

__all__ = ["routes"]

_TYPES = {400: "ValueError", 401: "Unauthenticated", 403: "PermissionDenied",
          404: "ModelNotFound", 413: "ValueError", 429: "Overloaded", 503: "Unavailable",
          504: "TimeoutError"}
# bert-as-service's PoolingStrategy values, for /status/server.
_STRATEGIES = {Pooling.POOLING_MEAN: 2, Pooling.POOLING_MAX: 1, Pooling.POOLING_MEAN_MAX: 3,
               Pooling.POOLING_CLS: 4, Pooling.POOLING_TOKENS: 0}


def _error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "description": message, "type": _TYPES.get(status, "Error")}


DIALECT = Dialect("bert_as_service", _error)


def _invalid(message: str) -> HttpError:
    return HttpError(400, message)


def _texts(body: dict[str, Any], tokenized: bool) -> tuple[str, ...]:
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts:
        raise _invalid("texts must be a non-empty list of "
                       + ("lists of words" if tokenized else "strings"))
    if not tokenized:
        if not all(isinstance(t, str) for t in texts):
            raise _invalid("texts must be a list of strings (is_tokenized is false)")
        return tuple(texts)
    joined = []
    for i, words in enumerate(texts):
        if not isinstance(words, list) or not words or not all(
                isinstance(w, str) for w in words):
            raise _invalid(f"texts[{i}] must be a non-empty list of words (is_tokenized)")
        piece = next((w for w in words if w.startswith("##")), None)
        if piece is not None:
            raise _invalid(f"texts[{i}] has the word piece {piece!r}: is_tokenized takes "
                           "whole words, which the model's tokenizer splits itself")
        joined.append(" ".join(words))
    return tuple(joined)


# bert-as-service's read_examples: `^(.*) \|\|\| (.*)$`, the first part greedy.
_PAIR = re.compile(r"^(.*) \|\|\| (.*)$", re.DOTALL)


async def _embed(pipeline: Pipeline, texts: tuple[str, ...], text: TextOptions,
                 schedule: Schedule) -> tuple[Result, Any]:
    """Vectors in the call's order: single texts and `a ||| b` pairs each as one request."""
    matches = [_PAIR.match(t) for t in texts]
    pairs = [i for i, m in enumerate(matches) if m is not None]
    if not pairs:
        result = await pipeline.embed(EmbedQuery("", 0, texts, text=text, schedule=schedule),
                                      wait=False)
        return result, result.vectors
    singles = [i for i, m in enumerate(matches) if m is None]
    firsts = tuple(matches[i].group(1) for i in pairs)  # type: ignore[union-attr]
    seconds = tuple(matches[i].group(2) for i in pairs)  # type: ignore[union-attr]
    calls = [pipeline.embed(EmbedQuery("", 0, firsts, text=text, schedule=schedule,
                                       pairs=seconds), wait=False)]
    if singles:
        calls.append(pipeline.embed(EmbedQuery("", 0, tuple(texts[i] for i in singles),
                                               text=text, schedule=schedule), wait=False))
    results = await asyncio.gather(*calls)
    if len({(r.model, r.version) for r in results}) > 1:  # a rollout between the two
        raise ModelNotReady("the model's version changed during this call; retry")
    vectors: list[Any] = [None] * len(texts)  # rows, or per-text token arrays
    for indices, result in zip((pairs, singles), results, strict=False):
        for i, row in zip(indices, result.vectors, strict=True):  # type: ignore[arg-type]
            vectors[i] = row
    return results[0], vectors


def _flag(body: dict[str, Any], name: str) -> bool:
    """bert-as-service read flags with bool(): 0, 1 and null pass too."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool | int):
        raise _invalid(f"{name} must be true or false, got {value!r}")
    return bool(value)


def routes(context: HttpContext) -> list[Route]:
    started = str(datetime.now())
    counts = {"requests": 0, "pending": 0}

    @DIALECT.handler(context, "Encode")
    async def encode(request: Request) -> Response:
        """
        summary: "bert-as-service: vectors of the default model ({id, texts, is_tokenized,
          truncate} -> {id, result, status}); a text `a ||| b` is a pair"
        """
        body = await read_json(request, context)
        if not isinstance(body, dict) or "id" not in body:
            raise _invalid("the body must be a JSON object with id and texts")
        texts = _texts(body, _flag(body, "is_tokenized"))
        counts["requests"] += 1
        counts["pending"] += 1
        try:
            tokenized = _flag(body, "is_tokenized")
            text = TextOptions(truncate=_flag(body, "truncate"))
            if tokenized:  # words, never pairs
                result = await context.pipeline.embed(
                    EmbedQuery("", 0, texts, text=text, schedule=schedule(request)),
                    wait=False)
                vectors = result.vectors
            else:
                result, vectors = await _embed(context.pipeline, texts, text,
                                               schedule(request))
        finally:
            counts["pending"] -= 1
        record = request.state.record
        record.served(result.model, result.version, len(texts))
        return json_response({"id": body["id"], "result": vectors, "status": 200})

    @DIALECT.handler(context, "ServerStatus")
    async def server_status(request: Request) -> Response:
        """
        summary: "bert-as-service: the server's settings (model, max_seq_len, pooling)"
        """
        mv = context.models.resolve("", 0)
        assert mv.loaded is not None
        config = mv.loaded.config
        pooling, layer, _ = resolve_pooling(config, 0, None)
        request.state.record.served(mv.model, mv.version)
        return json_response({
            "model_dir": mv.model, "model_version": mv.version,
            "max_seq_len": config.max_sequence_length, "max_batch_size": config.max_batch_size,
            "num_worker": sum(max(g.count, 1) for g in config.instance_group) or 1,
            "pooling_strategy": _STRATEGIES.get(pooling, 0),
            "pooling_layer": [layer - config.num_layers - 1],
            "python_version": sys.version, "server_version": server_version(),
            "server_start_time": started, "server_current_time": str(datetime.now()),
            "num_request": counts["requests"], "status": 200})

    @DIALECT.handler(context, "ClientStatus")
    async def client_status(request: Request) -> Response:
        """
        summary: "bert-as-service: the HTTP proxy's own client (this front-end process)"
        """
        return json_response({
            "client_version": server_version(), "output_fmt": "list",
            "num_request": counts["requests"], "num_pending_request": counts["pending"],
            "pending_request": [], "timeout": -1, "status": 200})

    return [Route("/encode", encode, methods=["POST"]),
            Route("/status/server", server_status, methods=["GET"]),
            Route("/status/client", client_status, methods=["GET"])]

