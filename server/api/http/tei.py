"""Hugging Face text-embeddings-inference (TEI): `POST /embed`, `/predict`, `/rerank`,
`/tokenize`, `GET /info`, `/health`, in TEI's request and response shapes, so TEI callers
switch by changing the address: those that add the route to a base URL (LlamaIndex's
TextEmbeddingsInference) and those given the route's whole URL (huggingface_hub's
InferenceClient, which LangChain uses).

TEI serves one model: these routes serve the server's default model (`--default-model`, else
the first READY model by name). The same routes under `/tei/{model}/` (`/tei/tiny-news/predict`)
serve any other model; a TEI caller points its base URL there.

Errors are TEI's `{"error": ..., "error_type": ...}` with TEI's statuses, which differ from the
taxonomy's (common.HTTP_STATUS) for caller input:

| what | TEI status, error_type | taxonomy |
| --- | --- | --- |
| empty `inputs` (`[]`, `""`) | 400 Empty | 400 |
| other bad input: types, JSON, too many texts, too long, direction | 422 Validation | 400 |
| a body over --max-receive-mb | 413 Validation | 413 |
| /predict on a model without a classification head | 424 Backend, as TEI | 400 |
| /rerank with empty `texts` | 400 Empty, as TEI | 400 |
| queue full | 429 Overloaded | 429 |
| draining, model or engine not ready | 503 Unhealthy | 503 |
| no or unknown token, wrong scope (TEI: bare 401) | 401 / 403 Unauthorized | 401 / 403 |
| `/tei/{model}` names no model | 404 Validation | 404 |

Where this differs from TEI, and why:
- `prompt_name` is refused (422), as TEI refuses it for a model without prompts: the model's own
  text prefix (config.pbtxt `embed_prefix`, `classify_prefix`) is always applied.
- `inputs` as token ids is refused (422): the pipeline takes text.
- Unknown fields are ignored, as TEI ignores them; `null` means the default for every option.
- `truncate` defaults to false (TEI's `--auto-truncate` off): a text over the model's limit is
  refused 422, as TEI does. `/tokenize` never truncates and refuses such a text too (TEI lists
  all its tokens).
- /predict `raw_scores: true` gives log-probabilities (the logits less their log-sum-exp: the
  same order and the same differences between labels as the logits). As in TEI, `["a"]` is
  one text, `["a", "b"]` a pair, and a batch is a list of lists: `[["a"], ["b"]]` or
  `[["a", "b"], ["c", "d"]]`. A pair model (config.pbtxt `text_pairs: true`) takes pairs only
  and a single-text model single texts only (422 naming the model).
- /rerank on a pair model scores each (query, text) with its head, as TEI's cross-encoders do
  (`raw_scores`: the logit, or a multi-label head's log-odds of its last label); on any other
  model, where TEI answers 424, it ranks by the cosine of the query's and each text's
  embedding, so an embedding model serves a retrieval pipeline's rerank step. /info says
  which (`rerank`: "cross-encoder" or "cosine"). Pairs are cut `only_second` when `truncate`.
- /tokenize `start`/`stop` are UTF-8 byte offsets, as TEI's are (Rust strings), into the text
  with the prefix of the model's task; special tokens have none.
- /info: `model_dtype` is float32 (what the graph outputs), `max_concurrent_requests` the
  queue bound past which calls get 429, `tokenization_workers` null.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from bertstream.v1.model_config_pb2 import Task
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tokenizers import Encoding

from ... import server_version
from ...errors import BertstreamError, EngineUnavailable
from ...pipeline.inference import (
    ClassifyQuery,
    EmbedQuery,
    RerankQuery,
    TextOptions,
    l2_normalize,
)
from ...version_format import POOLING_NAMES, text_prefix
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

Endpoint = Callable[[Request], Awaitable[Response]]

_TYPES = {400: "Empty", 401: "Unauthorized", 403: "Unauthorized", 404: "Validation",
          413: "Validation", 422: "Validation", 424: "Backend", 429: "Overloaded",
          503: "Unhealthy"}
# The taxonomy's codes whose TEI status differs from common.HTTP_STATUS.
_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 422, grpc.StatusCode.OUT_OF_RANGE: 422,
           grpc.StatusCode.FAILED_PRECONDITION: 422}
_DIRECTIONS = {"right": "right", "Right": "right", "left": "left", "Left": "left"}


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": message, "error_type": _TYPES.get(status, "Backend")}


DIALECT = Dialect("tei", _error)


class _Empty(HttpError):
    """TEI's one 400: nothing to embed."""

    def __init__(self, message: str = "`inputs` cannot be empty") -> None:
        super().__init__(400, message)


def _invalid(message: str) -> HttpError:
    return HttpError(422, message)


def _as_tei(exc: BertstreamError) -> BertstreamError:
    """The same refusal with TEI's status; metrics keep the taxonomy's code."""
    if isinstance(exc, HttpError):
        if exc.status != 400 or isinstance(exc, _Empty):
            return exc
        status = 422  # JSON that does not parse: a validation error to TEI's callers
    else:
        status = _STATUS.get(exc.code, 0)
        if not status:
            return exc  # common.HTTP_STATUS already says what TEI says
    tei = HttpError(status, str(exc))
    tei.code = exc.code
    return tei


def _handler(context: HttpContext, rpc: str) -> Callable[[Endpoint], Endpoint]:
    """DIALECT.handler, with the taxonomy's statuses turned into TEI's on the way out."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def tei(request: Request) -> Response:
            try:
                return await endpoint(request)
            except BertstreamError as exc:
                raise _as_tei(exc) from None

        return DIALECT.handler(context, rpc)(tei)

    return wrap


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object with `inputs`")
    return body


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(f"`{name}` must be true or false, got {value!r}")
    return value


def _text_options(body: dict[str, Any], strategy: str = "longest_first") -> TextOptions:
    direction = body.get("truncation_direction")
    if direction is not None and (not isinstance(direction, str)
                                  or direction not in _DIRECTIONS):
        raise _invalid(f"`truncation_direction` must be 'Right' or 'Left', got {direction!r}")
    return TextOptions(truncate=_flag(body, "truncate", False),
                       direction=_DIRECTIONS[direction or "right"], strategy=strategy)


def _no_prompt(body: dict[str, Any]) -> None:
    if body.get("prompt_name") is not None:
        raise _invalid("`prompt_name` is not supported: this server applies the model's own "
                       "text prefix (config.pbtxt) to every text")


def _ids(given: Any) -> bool:
    """A token id, or a list of them (TEI takes both in `inputs`)."""
    return type(given) is int or (isinstance(given, list) and bool(given)
                                  and all(type(i) is int for i in given))


def _texts(inputs: Any) -> tuple[str, ...]:
    """/embed's and /tokenize's `inputs`: a string or a list of strings."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        if not inputs or not all(inputs):
            raise _Empty()
        return tuple(inputs)
    if isinstance(inputs, list) and inputs and all(_ids(t) for t in inputs):
        raise _invalid("`inputs` as token ids is not supported; send text")
    raise _invalid("`inputs` must be a string or a list of strings")


def _predict_texts(inputs: Any) -> tuple[tuple[str, ...], tuple[str, ...] | None, bool]:
    """/predict's `inputs` as TEI reads them: (texts, second texts of pairs or None, whether a
    batch). "a" and ["a"] are one text, ["a", "b"] a pair, [["a"], ["b"]] a batch of texts,
    [["a", "b"], ["c", "d"]] a batch of pairs."""
    if isinstance(inputs, str):
        rows, batch = [[inputs]], False
    elif inputs == []:
        raise _Empty()
    elif isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        if len(inputs) > 2:
            raise _invalid(f"`inputs` of {len(inputs)} strings: one text is \"a\" or [\"a\"], "
                           "a pair [\"a\", \"b\"], a batch a list of those [[\"a\"], [\"b\"]]")
        rows, batch = [inputs], False
    elif isinstance(inputs, list) and all(isinstance(s, list) for s in inputs):
        if not all(len(s) in (1, 2) and all(isinstance(t, str) for t in s) for s in inputs):
            raise _invalid("a batch is a list of one-text or two-text lists: [[\"a\"], [\"b\"]] "
                           "or [[\"a\", \"b\"], [\"c\", \"d\"]]")
        rows, batch = inputs, True
    else:
        raise _invalid("`inputs` must be a string, a pair [\"a\", \"b\"], or a batch of them "
                       "[[\"a\"], [\"b\"]]")
    sizes = {len(row) for row in rows}
    if len(sizes) > 1:
        raise _invalid("a batch mixes single texts and pairs: send one kind per request")
    if not all(all(row) for row in rows):
        raise _Empty()
    texts = tuple(row[0] for row in rows)
    return texts, (tuple(row[1] for row in rows) if sizes == {2} else None), batch


def _predictions(row: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    order = np.argsort(-row, kind="stable")
    return [{"score": float(row[i]), "label": labels[i]} for i in order]


def _byte_offsets(text: str) -> list[int]:
    """Character index -> UTF-8 byte offset, one past the end included."""
    if text.isascii():
        return list(range(len(text) + 1))
    offsets = [0]
    for char in text:
        offsets.append(offsets[-1] + len(char.encode()))
    return offsets


def _tokens(text: str, encoding: Encoding, special_tokens: bool) -> list[dict[str, Any]]:
    """TEI's SimpleToken list. Without `special_tokens`, the template's tokens (those of no
    sequence) are left out; a special token typed in the text stays, as in TEI."""
    offsets = _byte_offsets(text)
    tokens = []
    for token_id, token, (start, stop), special, sequence in zip(
            encoding.ids, encoding.tokens, encoding.offsets, encoding.special_tokens_mask,
            encoding.sequence_ids, strict=True):
        if sequence is None and not special_tokens:
            continue
        if special:
            tokens.append({"id": token_id, "text": token, "special": True, "start": None,
                           "stop": None})
        else:
            tokens.append({"id": token_id, "text": text[start:stop], "special": False,
                           "start": offsets[start], "stop": offsets[stop]})
    return tokens


def _model(request: Request) -> str:
    """The model a route serves: `/tei/{model}/...`, else the default ("")."""
    return str(request.path_params.get("model", ""))


def routes(context: HttpContext) -> list[Route]:
    @_handler(context, "Embed")
    async def embed(request: Request) -> Response:
        """
        summary: "TEI: pooled vectors, one list per text (inputs a string or a list; normalize
          (default true), truncate, truncation_direction Right|Left, dimensions)"
        """
        body = _object(await read_json(request, context))
        _no_prompt(body)
        texts = _texts(body.get("inputs"))
        normalize = _flag(body, "normalize", True)
        dimensions = body.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
            raise _invalid(f"`dimensions` must be a positive integer, got {dimensions!r}")
        result = await context.pipeline.embed(
            EmbedQuery(_model(request), 0, texts, normalize=normalize and dimensions is None,
                       text=_text_options(body), schedule=schedule(request)),
            wait=False)
        record = request.state.record
        record.served(result.model, result.version, len(texts))
        vectors = pooled(result, "/embed", 424)  # TEI answers a model's failure 424
        if dimensions is not None:
            if dimensions > vectors.shape[1]:
                raise _invalid(f"`dimensions` {dimensions} is over the model's "
                               f"{vectors.shape[1]}")
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
            vectors = l2_normalize(vectors) if normalize else vectors
        return json_response(vectors.astype(np.float32, copy=False))

    @_handler(context, "Predict")
    async def predict(request: Request) -> Response:
        """
        summary: 'TEI: labels and scores, best first (inputs "a" or ["a"]: one list; a batch
          [["a"], ["b"]]: a list of lists; raw_scores, truncate)'
        """
        body = _object(await read_json(request, context))
        texts, pairs, batch = _predict_texts(body.get("inputs"))
        raw = _flag(body, "raw_scores", False)
        mv = context.models.resolve(_model(request), 0)
        assert mv.loaded is not None
        if mv.loaded.config.task != Task.TASK_CLASSIFY:
            raise HttpError(424, f"model {mv.model!r} has no classification head: /predict "
                            "needs a classification model")
        result = await context.pipeline.classify(
            ClassifyQuery(mv.model, 0, texts, text=_text_options(body),
                          schedule=schedule(request), pairs=pairs), wait=False)
        record = request.state.record
        record.served(result.model, result.version, len(texts))
        scores = result.probabilities
        assert scores is not None
        if raw:
            scores = np.log(np.maximum(scores, np.finfo(np.float32).tiny))
        answers = [_predictions(row, list(result.labels)) for row in scores]
        return json_response(answers if batch else answers[0])

    @_handler(context, "Rerank")
    async def rerank(request: Request) -> Response:
        """
        summary: "TEI: texts ranked against a query, best first, each with its index and
          score (query, texts, raw_scores, return_text, truncate, truncation_direction); a
          pair model's head, else the cosine of embeddings (/info `rerank`)"
        """
        body = _object(await read_json(request, context))
        query, texts = body.get("query"), body.get("texts")
        if not isinstance(query, str):
            raise _invalid("`query` must be a string")
        if texts == []:
            raise _Empty("`texts` cannot be empty")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise _invalid("`texts` must be a list of strings")
        if not query or not all(texts):
            raise _Empty("`query` and every text must be non-empty")
        return_text = _flag(body, "return_text", False)
        ranked = await context.pipeline.rerank(RerankQuery(
            _model(request), 0, query, tuple(texts), _flag(body, "raw_scores", False),
            _text_options(body, "only_second"), schedule(request)))
        request.state.record.served(ranked.model, ranked.version, len(texts))
        order = np.argsort(-ranked.scores, kind="stable").tolist()
        scores = ranked.scores.tolist()
        return json_response([
            {"index": i, "score": scores[i], **({"text": texts[i]} if return_text else {})}
            for i in order])

    @_handler(context, "Tokenize")
    async def tokenize(request: Request) -> Response:
        """
        summary: "TEI: each text's tokens as the model's task sees them: id, text, special,
          start and stop (UTF-8 byte offsets) (inputs a string or a list; add_special_tokens)"
        """
        body = _object(await read_json(request, context))
        _no_prompt(body)
        texts = _texts(body.get("inputs"))
        special_tokens = _flag(body, "add_special_tokens", True)
        latest = context.models.resolve(_model(request), 0)
        assert latest.loaded is not None
        task = latest.loaded.config.task
        mv, encoded = await context.pipeline.tokenize(
            latest.model, latest.version, texts, TextOptions(), task)
        record = request.state.record
        record.served(mv.model, mv.version, len(texts))
        assert encoded.encodings is not None and mv.loaded is not None
        prefix = text_prefix(mv.loaded.config, task)
        return json_response([_tokens(prefix + text, enc, special_tokens)
                              for text, enc in zip(texts, encoded.encodings, strict=True)])

    @_handler(context, "Info")
    async def info(request: Request) -> Response:
        """
        summary: "TEI: the served model (model_id, model_type, max_input_length, limits)"
        """
        mv = context.models.resolve(_model(request), 0)
        assert mv.loaded is not None
        request.state.record.served(mv.model, mv.version)
        return json_response(_info(context, mv.model, mv.loaded.config, mv.loaded.labels))

    @_handler(context, "Health")
    async def health(request: Request) -> Response:
        """
        summary: "TEI: 200 with an empty body while the model serves, else 503 (its error)"
        """
        if not context.models.connected:
            raise EngineUnavailable()
        mv = context.models.resolve(_model(request), 0)  # ModelNotReady: 503
        request.state.record.served(mv.model, mv.version)
        return Response(status_code=200)

    endpoints = [("/embed", embed, "POST"), ("/predict", predict, "POST"),
                 ("/rerank", rerank, "POST"),
                 ("/tokenize", tokenize, "POST"), ("/info", info, "GET"),
                 ("/health", health, "GET")]
    return [Route(prefix + path, endpoint, methods=[method])
            for prefix in ("", "/tei/{model}") for path, endpoint, method in endpoints]


def _info(context: HttpContext, model: str, config: Any, labels: list[str]) -> dict[str, Any]:
    """TEI's Info from the model's config.pbtxt and the server's limits."""
    if config.task == Task.TASK_CLASSIFY:
        kind = "reranker" if config.text_pairs else "classifier"
        model_type: dict[str, Any] = {kind: {
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}}
    else:
        model_type = {"embedding": {"pooling": POOLING_NAMES.get(config.default_pooling, "")}}
    batching = config.dynamic_batching
    return {
        "model_id": model, "model_sha": None, "model_dtype": "float32",
        "served_model_name": model, "model_type": model_type,
        "max_concurrent_requests": batching.max_queue_size or 64 * config.max_batch_size,
        "max_input_length": config.max_sequence_length,
        "max_batch_tokens": (batching.max_batch_tokens
                             or config.max_batch_size * config.max_sequence_length),
        "max_batch_requests": config.max_batch_size,
        "max_client_batch_size": context.pipeline.limits.max_texts_per_request,
        "auto_truncate": False, "tokenization_workers": None,
        "version": server_version(), "sha": None, "docker_label": None,
        # bertstream's own: what /rerank ranks by, and whether /predict takes pairs
        "rerank": "cross-encoder" if config.text_pairs else "cosine",
        "text_pairs": bool(config.text_pairs),
    }

