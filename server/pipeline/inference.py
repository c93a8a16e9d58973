"""The request pipeline: validate -> tokenize -> batch -> pick outputs -> post-process.

The servicer turns protos into the queries below and awaits `Pipeline`; nothing here knows
about gRPC messages, and nothing in the servicer knows about onnxruntime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task

from ..engine.batch import Encoded
from ..engine.batcher import WorkItem
from ..engine.tokenizer import STRATEGIES
from ..engine.workers import Workers
from ..errors import InvalidInput, Overloaded
from ..repository.models import Models
from ..repository.versions import ModelVersion
from ..stages import CLOCK
from ..tracing import TRACE
from ..version_format import LOGITS, POOLING_NAMES, PROBABILITIES, output_name, text_prefix
from .validation import check_pairs, check_texts

__all__ = ["INTERACTIVE_TEXTS", "STRATEGIES", "ClassifyQuery", "EmbedQuery", "Limits", "Pipeline",
           "RerankQuery", "Reranked", "Result", "Schedule", "TextOptions", "Who",
           "check_timeout", "priority_level"]


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int = 256
    max_text_chars: int = 65_536
    max_request_chars: int = 1_048_576  # all texts of one message together
    # Texts one client (a token, else a host: Schedule.client) may have in flight at once,
    # over every model and connection; the excess is refused Overloaded at once. 0: no cap.
    max_client_texts: int = 0


@dataclass(frozen=True)
class TextOptions:
    truncate: bool = False
    direction: str = "right"  # right keeps the start, left keeps the end
    strategy: str = "longest_first"  # which half of a pair is cut (Hugging Face's names)


# A unary call or HTTP request of up to this many texts is someone waiting on an answer: it
# goes to priority level 1 unless it names a level. Stream messages and larger requests are
# bulk work (a feed, a file) and go to the model's default level, the lowest unless
# config.pbtxt says otherwise. 16 covers a page of search results or a chat turn's texts;
# a larger request takes long enough on a CPU that its caller is not waiting interactively.
INTERACTIVE_TEXTS = 16


@dataclass(frozen=True)
class Schedule:
    """How a request queues (scheduler.py): its level, its queue timeout, whose turn."""

    priority: int = 0  # 1 the highest; 0: the server decides (INTERACTIVE_TEXTS)
    timeout_s: float = 0.0  # 0: the level's queue policy
    caller: str | None = None  # a stream or a connection; None: the request alone
    client: str = ""  # who is charged for its texts in flight (Limits.max_client_texts)


class Who(NamedTuple):
    """Who sent a request, as the front end that took it names them."""

    turn: str  # whose turn its texts take in the scheduler: a stream, or a connection
    client: str  # who is charged for its texts in flight: a token, else a host


@dataclass(frozen=True)
class EmbedQuery:
    model: str
    version: int
    texts: tuple[str, ...]
    pooling: int = Pooling.POOLING_UNSPECIFIED
    pooling_layer: int | None = None
    normalize: bool = False
    text: TextOptions = TextOptions()
    schedule: Schedule = Schedule()
    pairs: tuple[str, ...] | None = None  # second segments, one per text


@dataclass(frozen=True)
class ClassifyQuery:
    model: str
    version: int
    texts: tuple[str, ...]
    top_k: int = 0
    embed: EmbedQuery | None = None  # set when the caller wants the embedding too
    text: TextOptions = TextOptions()
    schedule: Schedule = Schedule()
    pairs: tuple[str, ...] | None = None  # second segments: a pair model needs them


@dataclass(frozen=True)
class RerankQuery:
    """Texts ordered by relevance to a query (TEI's /rerank)."""

    model: str
    version: int
    query: str
    texts: tuple[str, ...]
    raw_scores: bool = False
    text: TextOptions = TextOptions(strategy="only_second")
    schedule: Schedule = Schedule()


@dataclass
class Reranked:
    """Each text's score against the query, in request order, and how it was scored."""

    model: str
    version: int
    scores: np.ndarray  # [texts]
    cross_encoder: bool  # a pair model's score, else cosine of embeddings
    token_counts: list[int]
    truncated_tokens: list[int]
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Result:
    """What a request's texts came to, as arrays with one row per text."""

    model: str
    version: int
    token_counts: list[int]
    truncated_tokens: list[int]
    vectors: np.ndarray | list[np.ndarray] | None = None  # [texts, dim]; tokens: per text
    probabilities: np.ndarray | None = None  # [texts, labels]
    logits: np.ndarray | None = None  # [texts, labels], when asked for (rerank's raw scores)
    pooling: int = Pooling.POOLING_UNSPECIFIED
    pooling_layer: int = 0
    labels: Sequence[str] = ()
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    total_s: float = 0.0

    def __len__(self) -> int:
        return len(self.token_counts)


def resolve_pooling(config: ModelConfig, pooling: int, layer: int | None) -> tuple[int, int, str]:
    """(pooling, absolute layer, output name) for a request, or InvalidInput saying why not."""
    pooling = pooling or config.default_pooling
    if pooling not in POOLING_NAMES:
        raise InvalidInput(f"unknown pooling {pooling}")
    absolute = config.default_pooling_layer if layer is None else layer
    if absolute < 0:
        absolute = config.num_layers + 1 + absolute
    if absolute not in config.pooling_layers:
        raise InvalidInput(
            f"pooling_layer {layer} is not exported by this model; it exports layers "
            f"{sorted(config.pooling_layers)} of {config.num_layers} (or -1 for the last)"
        )
    return pooling, absolute, output_name(POOLING_NAMES[pooling], absolute)


class Pipeline:
    """Runs queries against the manager's READY versions."""

    def __init__(self, models: Models, limits: Limits, tokenize_pool: Workers) -> None:
        self.models = models
        self.limits = limits
        self._pool = tokenize_pool
        self._client_texts: dict[str, int] = {}  # texts in flight per client

    @contextlib.contextmanager
    def _charged(self, client: str, texts: int) -> Iterator[None]:
        """Count a request's texts against its client's cap while it runs; refuse it at once
        (Overloaded: RESOURCE_EXHAUSTED, HTTP 429 with Retry-After) when they would pass it,
        so one client's flood leaves the queue to the others."""
        cap = self.limits.max_client_texts
        if not cap or not client:
            yield
            return
        now = self._client_texts.get(client, 0)
        if now + texts > cap:
            raise Overloaded(f"this client has {now} texts in flight; {texts} more would pass "
                             f"its cap of {cap}: retry when answers come back")
        self._client_texts[client] = now + texts
        try:
            yield
        finally:
            left = self._client_texts[client] - texts
            if left:
                self._client_texts[client] = left
            else:
                del self._client_texts[client]

    def _check(self, texts: Sequence[str], pairs: Sequence[str] | None) -> None:
        limits = self.limits
        check_texts(texts, limits.max_texts_per_request, limits.max_text_chars,
                    limits.max_request_chars)
        if pairs is not None:
            check_pairs(texts, pairs, limits.max_text_chars, limits.max_request_chars)

    async def tokenize(self, model: str, version: int, texts: Sequence[str], text: TextOptions,
                       task: int = Task.TASK_EMBED, pairs: Sequence[str] | None = None,
                       ) -> tuple[ModelVersion, Encoded]:
        self._check(texts, pairs)
        with self.models.lease(model, version) as mv:
            assert mv.loaded is not None
            prefix = text_prefix(mv.loaded.config, task)
            encoded = await mv.loaded.tokenizer.encode_async(
                self._pool, [prefix + t for t in texts], text.truncate, text.direction,
                keep_encoding=True, pairs=pairs, strategy=text.strategy,
            )
            return mv, encoded

    async def embed(self, query: EmbedQuery, wait: bool) -> Result:
        """Pooled (or token) vectors for each text; `wait` makes a full queue slow us down."""
        return await self._run(query.model, query.version, query.texts, query.text,
                               Task.TASK_EMBED, query, None, wait, query.schedule, query.pairs)

    async def classify(self, query: ClassifyQuery, wait: bool) -> Result:
        if query.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 = all labels), got {query.top_k}")
        return await self._run(query.model, query.version, query.texts, query.text,
                               Task.TASK_CLASSIFY, query.embed, query.top_k, wait,
                               query.schedule, query.pairs)

    async def rerank(self, query: RerankQuery) -> Reranked:
        """A pair model scores each (query, text) with its head: the last label's probability
        (label 1 = match), or a one-label head's sigmoid; `raw_scores` the logit (with several
        labels, the log-odds of the last: l_last - logsumexp(others), l1 - l0 for two). Any other
        model ranks by the cosine of the query's and each text's embedding (the default
        pooling), so an embedding model serves a retrieval pipeline's rerank step too."""
        self._check(query.texts, None)
        if not query.query or query.query.isspace():
            raise InvalidInput("query is empty or only whitespace")
        if len(query.query) > self.limits.max_text_chars:
            raise InvalidInput(f"query has {len(query.query)} characters, over the limit of "
                               f"{self.limits.max_text_chars}")
        total = len(query.query) * len(query.texts) + sum(len(t) for t in query.texts)
        if total > self.limits.max_request_chars:  # the query is read once per text
            raise InvalidInput(
                f"{total} characters to read (the query once per text, and the texts), over "
                f"the limit of {self.limits.max_request_chars}: send fewer texts or a "
                "shorter query")
        with self.models.lease(query.model, query.version) as mv:
            assert mv.loaded is not None
            config = mv.loaded.config
            cross = config.text_pairs and config.task == Task.TASK_CLASSIFY
            # Cosine needs one vector per text: a model whose default is token vectors is
            # ranked by their mean.
            pooling = (Pooling.POOLING_MEAN if config.default_pooling == Pooling.POOLING_TOKENS
                       else Pooling.POOLING_UNSPECIFIED)
        if cross:
            result = await self._run(
                query.model, query.version, (query.query,) * len(query.texts), query.text,
                Task.TASK_CLASSIFY, None, 0, False, query.schedule, query.texts,
                checked=True, logits=True)
            assert result.logits is not None and result.probabilities is not None
            logits, probabilities = result.logits, result.probabilities
            if logits.shape[1] == 1:
                scores = logits[:, 0] if query.raw_scores else 1 / (1 + np.exp(-logits[:, 0]))
            elif query.raw_scores:  # the log-odds of "match": orders as its probability does
                others = np.logaddexp.reduce(logits[:, :-1], axis=1)
                scores = logits[:, -1] - others
            else:
                scores = probabilities[:, -1]
            counts, cut = result.token_counts, result.truncated_tokens
        else:
            options = TextOptions(query.text.truncate, query.text.direction)
            result = await self._run(
                query.model, query.version, (query.query, *query.texts), options,
                Task.TASK_EMBED, EmbedQuery(query.model, query.version, (), pooling), None,
                False, query.schedule, None, checked=True)
            vectors = l2_normalize(result.vectors)  # type: ignore[arg-type]
            assert isinstance(vectors, np.ndarray)
            scores = vectors[1:] @ vectors[0]
            counts, cut = result.token_counts[1:], result.truncated_tokens[1:]
        return Reranked(result.model, result.version, np.asarray(scores, dtype=np.float32),
                        bool(cross), list(counts), list(cut), result.tokenize_s,
                        result.queue_s, result.infer_s, result.total_s)

    async def _run(self, model: str, version: int, texts: Sequence[str], text: TextOptions,
                   task: int, embed: EmbedQuery | None, top_k: int | None,
                   wait: bool, schedule: Schedule, pairs: Sequence[str] | None = None,
                   checked: bool = False, logits: bool = False) -> Result:
        start = time.perf_counter()
        started = CLOCK.start()
        if not checked:
            self._check(texts, pairs)
        with self._charged(schedule.client, len(texts)), \
                self.models.lease(model, version) as mv:
            loaded = mv.loaded
            assert loaded is not None
            config = loaded.config
            if task == Task.TASK_CLASSIFY and config.task != Task.TASK_CLASSIFY:
                raise InvalidInput(f"model {mv.model!r} has no classification head; use Embed")
            if task == Task.TASK_CLASSIFY:
                _check_pair_model(mv.model, config, pairs is not None)
            pooling, layer, vector_name = (0, 0, "") if embed is None else resolve_pooling(
                config, embed.pooling, embed.pooling_layer)
            wanted = {vector_name} if vector_name else set()
            if top_k is not None:
                wanted.add(PROBABILITIES)
            if logits:
                wanted.add(LOGITS)
            outputs = frozenset(wanted)
            level = priority_level(config, schedule.priority,
                                   interactive=not wait and len(texts) <= INTERACTIVE_TEXTS)
            prefix = text_prefix(config, task)
            # The model's prefix goes before the first half only ("query: a", b).
            prefixed = [prefix + t for t in texts] if prefix else list(texts)
            CLOCK.stop("validate", started)
            if TRACE.on:  # tracing.py: the stage spans of a sampled request
                TRACE.validated(mv.model, mv.version, len(texts))
            encoded = await loaded.tokenizer.encode_async(
                self._pool, prefixed, text.truncate, text.direction,
                pairs=pairs, strategy=text.strategy)
            tokenize_s = time.perf_counter() - start
            if TRACE.on:
                TRACE.tokenized(encoded.lengths)
            started = CLOCK.start()
            item = WorkItem(encoded, outputs, asyncio.get_running_loop().create_future(),
                            level, schedule.caller, schedule.timeout_s)
            CLOCK.stop("batch", started)
            try:
                await loaded.batcher.submit([item], wait=wait)
                rows = await item.future
            finally:
                item.future.cancel()  # no-op when done; drops queued texts otherwise
        started = CLOCK.start()
        vectors = rows.get(vector_name) if vector_name else None
        if vectors is not None and embed is not None and embed.normalize:
            vectors = l2_normalize(vectors)
        result = Result(mv.model, mv.version, encoded.lengths, encoded.truncated_tokens,
                        vectors, rows.get(PROBABILITIES), rows.get(LOGITS), pooling, layer,
                        loaded.labels, tokenize_s, item.queue_s, item.infer_s,
                        time.perf_counter() - start)
        CLOCK.stop("resolve", started)
        if TRACE.on:
            TRACE.answered()
        return result


def _check_pair_model(model: str, config: ModelConfig, has_pairs: bool) -> None:
    """A pair model classifies pairs only, a single-text model single texts only."""
    if config.text_pairs and not has_pairs:
        raise InvalidInput(f"model {model!r} classifies text pairs: send text_pairs, one "
                           "second text for each text")
    if has_pairs and not config.text_pairs:
        raise InvalidInput(f"model {model!r} classifies single texts: text_pairs is only for "
                           "pair models (its config.pbtxt would say text_pairs: true)")


def priority_level(config: ModelConfig, priority: int, interactive: bool) -> int:
    """The level a request queues at: its own (checked against the model's levels), else 1
    for an interactive call, else the model's default level."""
    levels = int(config.dynamic_batching.priority_levels) or 1
    if priority < 0 or priority > levels:
        raise InvalidInput(
            f"priority {priority} is outside 1..{levels}: model {config.name!r} has {levels} "
            "priority levels (1 is the highest; 0 lets the server choose)")
    if priority:
        return priority
    return 1 if interactive else int(config.dynamic_batching.default_priority_level) or levels


def check_timeout(seconds: float) -> float:
    if seconds < 0:
        raise InvalidInput(f"timeout must not be negative, got {seconds * 1e6:.0f} us")
    return seconds


def l2_normalize(vectors: np.ndarray | list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """Unit length along the last axis: one call for a request's pooled vectors, one per
    text for token vectors."""
    if isinstance(vectors, list):
        return [l2_normalize(v) for v in vectors]  # type: ignore[misc]
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norm, 1e-12)
