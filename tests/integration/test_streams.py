"""Bidirectional streams: one response per message, same id, request order, errors per item."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
from bertstream.client import AsyncBertClient, BertClient
from bertstream.v1 import bertstream_pb2 as pb

NEWS = [
    "央行宣布降准，股市应声大涨",
    "今天股市大涨，沪指收复三千点",
    "台风“海葵”登陆福建，多地停课",
    "国家统计局：10月CPI同比上涨0.2%",
    "新能源汽车销量再创新高",
    "苹果发布iPhone 15，售价5999元",
    "世界杯预选赛：国足主场迎战韩国",
    "教育部发布高考报名通知",
    "颱風來襲，學校停課一天",
]


def feed(n: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"{rng.choice(NEWS)}（{i}）" for _ in range(rng.randint(1, 3))] for i in range(n)]


def test_thousand_message_stream_in_order_with_exact_values(stub, reference) -> None:  # type: ignore[no-untyped-def]
    messages = feed(1000)
    requests = (pb.EmbedRequest(request_id=f"id-{i}", model="tiny-embed", texts=texts)
                for i, texts in enumerate(messages))
    responses = list(stub.EmbedStream(requests, timeout=600))
    assert [r.request_id for r in responses] == [f"id-{i}" for i in range(1000)]
    ref = reference["tiny-embed"]
    checked = 0
    for texts, r in zip(messages, responses, strict=True):
        assert not r.HasField("error") and len(r.embeddings) == len(texts)
        for text, emb in zip(texts, r.embeddings, strict=True):
            if checked % 7 == 0:  # a spread sample: the reference runs one text at a time
                np.testing.assert_allclose(emb.values, ref.run(text, "mean_layer2"), atol=1e-4)
            checked += 1
    assert checked > 1000


def test_a_bad_message_gets_its_own_error_and_the_stream_goes_on(stub) -> None:  # type: ignore[no-untyped-def]
    requests = [
        pb.EmbedRequest(request_id="a", model="tiny-embed", texts=["好消息"]),
        pb.EmbedRequest(request_id="b", model="tiny-embed", texts=[""]),
        pb.EmbedRequest(request_id="c", model="no-such-model", texts=["x"]),
        pb.EmbedRequest(request_id="d", model="tiny-embed", texts=["长" * 100]),
        pb.EmbedRequest(request_id="e", model="tiny-embed", texts=["坏消息"]),
    ]
    responses = list(stub.EmbedStream(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == list("abcde")
    codes = [r.error.code if r.HasField("error") else 0 for r in responses]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                     grpc.StatusCode.NOT_FOUND.value[0],
                     grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "limit of 64" in responses[3].error.message
    assert len(responses[4].embeddings) == 1


def test_classify_stream(stub) -> None:  # type: ignore[no-untyped-def]
    requests = [pb.ClassifyRequest(request_id=str(i), model="tiny-news", texts=texts, top_k=1)
                for i, texts in enumerate(feed(50, seed=1))]
    responses = list(stub.ClassifyStream(iter(requests), timeout=120))
    assert [r.request_id for r in responses] == [str(i) for i in range(50)]
    assert all(len(res.labels) == 1 for r in responses for res in r.results)


def test_client_encode_stream_bounded_window(bc: BertClient) -> None:
    items = [t[0] for t in feed(200, seed=2)] + [""]
    results = list(bc.encode_stream(iter(items), window=8))
    assert [r.index for r in results] == list(range(201))
    error = results[-1].error
    assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_allclose(np.concatenate([r.value for r in results[:5]]),
                               bc.encode(items[:5]), atol=1e-4)


def test_async_client_stream_and_unary(address: str, bc: BertClient) -> None:
    items = [t[0] for t in feed(60, seed=3)]

    async def main() -> tuple[list, np.ndarray]:
        async with AsyncBertClient(address, model="tiny-embed") as client:
            streamed = [r async for r in client.encode_stream(items, window=4)]
            return streamed, await client.encode(items[:3])

    streamed, unary = asyncio.run(main())
    assert [r.index for r in streamed] == list(range(60))
    np.testing.assert_allclose(unary, bc.encode(items[:3]), atol=1e-4)
    np.testing.assert_allclose(streamed[1].value, bc.encode(items[1]), atol=1e-4)
