"""`BertClient` (blocking) and `AsyncBertClient` (asyncio): bert-as-service's three lines.

    from bertstream.client import BertClient
    bc = BertClient()
    vecs = bc.encode(["今天股市大涨"])

Every call carries a deadline. gRPC failures are raised as `ClientError` with `.code`.

encode, classify, encode_stream and classify_stream take the request's fields as keywords,
built into messages by messages.py for both clients: among them `priority` (the queue level,
1 the highest; 0, the default, lets the server decide: level 1 for a unary call of up to 16
texts, the model's default, lowest, level for stream messages and larger calls) and
`timeout_us` (the longest the texts may wait in the queue before DEADLINE_EXCEEDED; 0: the
level's queue policy). See messages.embed_request.

Text pairs: `encode`, `classify` and `tokenize` take `pairs` (one second segment per text) and
`truncation_strategy`; the streams take `pairs` as an iterable beside the items. `rerank(query,
texts)` orders texts by a pair model's score, or by cosine on an embedding model.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

from .channels import call_metadata, open_aio_channel, open_channel
from .messages import (
    ClientError,
    Label,
    ModelStatus,
    Ranking,
    StreamResult,
    Tokens,
    classify_request,
    embed_request,
    parse_classify,
    parse_embed,
    parse_models,
    parse_rerank,
    parse_tokenize,
    rerank_request,
    tokenize_request,
)
from .windowed import BlockingStreams, WindowedStream

__all__ = ["AsyncBertClient", "BertClient"]


def _checked(build: Callable[..., Any], kw: dict[str, Any]) -> None:
    """A stream's options checked before it opens: a bad pooling, priority or timeout_us is
    the caller's ValueError now, not a failure at the first item."""
    build([], **kw)


def _stream_result(index: int, response: Any, parse: Any) -> StreamResult:
    if response.HasField("error"):
        error = ClientError.from_proto(response.error)
        return StreamResult(index, response.request_id, error=error)
    return StreamResult(index, response.request_id, parse(response), version=response.version)


Item = str | Sequence[str]


def _requests(items: Iterable[Item], build: Callable[..., Any], kw: dict[str, Any],
              pairs: Iterable[Item] | None = None) -> Iterator[tuple[int, Any]]:
    """(index, request) for each item (a text, or a list of texts), built as it is sent;
    with `pairs`, each item's second segments (the same shape) go beside it. Items and pairs
    of different lengths are a ValueError where the stream is read."""
    zipped: Iterable[tuple[Item, Item | None]] = (
        ((item, None) for item in items) if pairs is None else zip(items, pairs, strict=True))
    for index, (item, pair) in enumerate(zipped):
        second = None if pair is None else _listed(pair)
        yield index, build(_listed(item), request_id=str(index), pairs=second, **kw)


def _listed(item: Item) -> list[str]:
    return [item] if isinstance(item, str) else list(item)


class BertClient:
    """A blocking client of one server, or of several replicas ("a:1,b:2" or a list; see
    channels.py); safe to share between threads.

    TLS: `credentials=tls_credentials(ca=..., cert=..., key=...)` (cert and key for mutual TLS),
    `server_name` when the certificate's name is not the address dialled. `token`: sent as
    `authorization: Bearer <token>` on every call."""

    def __init__(self, server: str | Sequence[str] = "localhost:8001", model: str = "",
                 timeout: float = 30.0,
                 stream_timeout: float = 3600.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, server_name: str | None = None) -> None:
        self.model = model
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._metadata = call_metadata(token)
        self._channel = open_channel(server, credentials, server_name)
        self._stub = pb_grpc.BertServiceStub(self._channel)
        # Streams run on windowed.py's event loop, over a grpc.aio channel opened at the first.
        self._open_streams = lambda: open_aio_channel(server, credentials, server_name)
        self._streams: BlockingStreams | None = None
        self._streams_lock = threading.Lock()

    def __enter__(self) -> BertClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        with self._streams_lock:
            if self._streams is not None:
                self._streams.close()
                self._streams = None

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None

    def encode(self, texts: str | Sequence[str], **kw: Any) -> np.ndarray | list[np.ndarray]:
        """Vectors [n, dim] (pooling, pooling_layer, normalize, truncate, version, priority,
        timeout_us, pairs, truncation_strategy: see messages.embed_request); token vectors
        come back as a list of [tokens, dim] arrays. `priority=1` puts the texts in the
        highest level; the default 0 lets the server decide (level 1 for up to 16 texts,
        else the lowest). `pairs=[...]`: one vector per (text, pair)."""
        kw.setdefault("model", self.model)
        return parse_embed(self._call(self._stub.Embed, embed_request(texts, **kw)))

    def classify(self, texts: str | Sequence[str], **kw: Any) -> list[list[Label]]:
        """Ranked labels with probabilities for each text (top_k: 0 = all; priority and
        timeout_us as in encode). A pair model takes `pairs=[...]`, one second text per
        text, and `truncation_strategy` for `truncate`."""
        kw.setdefault("model", self.model)
        return parse_classify(self._call(self._stub.Classify, classify_request(texts, **kw)))

    def tokenize(self, texts: str | Sequence[str], **kw: Any) -> list[Tokens]:
        """The tokens, ids and (with `pairs`) type ids the model would see."""
        kw.setdefault("model", self.model)
        return parse_tokenize(self._call(self._stub.Tokenize, tokenize_request(texts, **kw)))

    def rerank(self, query: str, texts: Sequence[str], **kw: Any) -> Ranking:
        """`texts` ordered by relevance to `query`, best first: a Ranking of (index, score,
        text) and its method ("cross_encoder" on a pair model, "cosine" on an embedding
        model). top_n, raw_scores, return_text, truncate, truncation_strategy, priority,
        timeout_us: see messages.rerank_request."""
        kw.setdefault("model", self.model)
        return parse_rerank(self._call(self._stub.Rerank, rerank_request(query, texts, **kw)))

    def models(self) -> list[ModelStatus]:
        return parse_models(self._call(self._stub.ListModels, pb.ListModelsRequest()))

    def load_model(self, model: str) -> list[ModelStatus]:
        """Explicit mode: (re)load a model from the repository; its version rows after."""
        response = self._call(self._stub.LoadModel, pb.LoadModelRequest(model=model))
        return parse_models(pb.ListModelsResponse(models=response.versions))

    def unload_model(self, model: str) -> None:
        """Explicit mode: stop serving a model (running requests finish)."""
        self._call(self._stub.UnloadModel, pb.UnloadModelRequest(model=model))

    def model_info(self, model: str | None = None, version: int = 0) -> pb.GetModelResponse:
        request = pb.GetModelRequest(model=self.model if model is None else model,
                                     version=version)
        return self._call(self._stub.GetModel, request)

    def encode_stream(self, items: Iterable[Item], window: int = 64,
                      pairs: Iterable[Item] | None = None, **kw: Any) -> Iterator[StreamResult]:
        """Stream items (a text, or a list of texts) through EmbedStream; yield one result per
        item, in order, with at most `window` items in flight. The keywords go on every
        message, as in encode; without `priority` (0) stream messages wait in the model's
        default level, the lowest: give `priority=1` for an interactive stream. `pairs`: an
        iterable beside `items`, each item's second segments (the same shape)."""
        kw.setdefault("model", self.model)
        _checked(embed_request, kw)
        return self._stream("EmbedStream", embed_request, parse_embed, items, window, kw,
                            pairs)

    def classify_stream(self, items: Iterable[Item], window: int = 64,
                        pairs: Iterable[Item] | None = None,
                        **kw: Any) -> Iterator[StreamResult]:
        """As encode_stream, through ClassifyStream (top_k, priority, timeout_us, pairs, ...)."""
        kw.setdefault("model", self.model)
        _checked(classify_request, kw)
        return self._stream("ClassifyStream", classify_request, parse_classify, items, window,
                            kw, pairs)

    def _stream(self, method: str, build: Callable[..., Any], parse: Callable[[Any], Any],
                items: Iterable[Item], window: int, kw: dict[str, Any],
                pairs: Iterable[Item] | None) -> Iterator[StreamResult]:
        with self._streams_lock:
            if self._streams is None:
                self._streams = BlockingStreams(self._open_streams)
            streams = self._streams

        def start(channel: grpc.aio.Channel) -> Any:
            call = getattr(pb_grpc.BertServiceStub(channel), method)
            return call(timeout=self.stream_timeout, metadata=self._metadata)

        for index, response in streams.stream(start, _requests(items, build, kw, pairs),
                                              window):
            yield _stream_result(index, response, parse)


class AsyncBertClient:
    """The asyncio twin of BertClient; same arguments, awaitable results."""

    def __init__(self, server: str | Sequence[str] = "localhost:8001", model: str = "",
                 timeout: float = 30.0,
                 stream_timeout: float = 3600.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, server_name: str | None = None) -> None:
        self.model = model
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._metadata = call_metadata(token)
        self._channel = open_aio_channel(server, credentials, server_name)
        self._stub = pb_grpc.BertServiceStub(self._channel)

    async def __aenter__(self) -> AsyncBertClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise ClientError.from_rpc(err) from None

    async def encode(self, texts: str | Sequence[str], **kw: Any) -> np.ndarray | list[np.ndarray]:
        kw.setdefault("model", self.model)
        return parse_embed(await self._call(self._stub.Embed, embed_request(texts, **kw)))

    async def classify(self, texts: str | Sequence[str], **kw: Any) -> list[list[Label]]:
        kw.setdefault("model", self.model)
        return parse_classify(await self._call(self._stub.Classify,
                                               classify_request(texts, **kw)))

    async def tokenize(self, texts: str | Sequence[str], **kw: Any) -> list[Tokens]:
        kw.setdefault("model", self.model)
        return parse_tokenize(await self._call(self._stub.Tokenize,
                                               tokenize_request(texts, **kw)))

    async def rerank(self, query: str, texts: Sequence[str], **kw: Any) -> Ranking:
        """As BertClient.rerank."""
        kw.setdefault("model", self.model)
        return parse_rerank(await self._call(self._stub.Rerank,
                                             rerank_request(query, texts, **kw)))

    async def models(self) -> list[ModelStatus]:
        return parse_models(await self._call(self._stub.ListModels, pb.ListModelsRequest()))

    async def load_model(self, model: str) -> list[ModelStatus]:
        response = await self._call(self._stub.LoadModel, pb.LoadModelRequest(model=model))
        return parse_models(pb.ListModelsResponse(models=response.versions))

    async def unload_model(self, model: str) -> None:
        await self._call(self._stub.UnloadModel, pb.UnloadModelRequest(model=model))

    async def encode_stream(self, items: Iterable[Item], window: int = 64,
                            pairs: Iterable[Item] | None = None,
                            **kw: Any) -> AsyncIterator[StreamResult]:
        """As BertClient.encode_stream; the window bounds what the server holds for us."""
        kw.setdefault("model", self.model)
        async for result in self._stream("EmbedStream", embed_request, parse_embed, items,
                                         window, kw, pairs):
            yield result

    async def classify_stream(self, items: Iterable[Item], window: int = 64,
                              pairs: Iterable[Item] | None = None,
                              **kw: Any) -> AsyncIterator[StreamResult]:
        """As BertClient.classify_stream."""
        kw.setdefault("model", self.model)
        async for result in self._stream("ClassifyStream", classify_request, parse_classify,
                                         items, window, kw, pairs):
            yield result

    async def _stream(self, method: str, build: Callable[..., Any],
                      parse: Callable[[Any], Any], items: Iterable[Item],
                      window: int, kw: dict[str, Any],
                      pairs: Iterable[Item] | None) -> AsyncIterator[StreamResult]:
        _checked(build, kw)  # before the call opens
        call = getattr(self._stub, method)(timeout=self.stream_timeout, metadata=self._metadata)
        async with WindowedStream(call, _requests(items, build, kw, pairs), window) as stream:
            async for index, response in stream:
                yield _stream_result(index, response, parse)
