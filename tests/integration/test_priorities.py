"""Interactive calls beside a bulk feed on a real server (scheduler.py): a unary call is
answered while a stream keeps the queue full, in one process and across front ends; the
measured cost model is visible; priorities and queue timeouts are checked at the edge.
(KServe's priority and timeout, through tritonclient: test_kserve.py.)"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from conftest import ServerProcess

# Every batch takes 40 ms on the fake device, whatever its size: the feed below is 50 full
# batches (2 s), and a call that waited behind it would wait that long.
SLOW_DEVICE = "custom,a_ms=40,slots=1"
MESSAGES, PER_MESSAGE = 100, 16


def _feed(stub: pb_grpc.BertServiceStub, received: list[pb.EmbedResponse],
          started: threading.Event) -> None:
    def requests() -> Iterator[pb.EmbedRequest]:
        for i in range(MESSAGES):
            yield pb.EmbedRequest(model="tiny-embed", request_id=str(i), raw_values=True,
                                  texts=[f"新闻 {i} 第 {j} 条" for j in range(PER_MESSAGE)])

    for response in stub.EmbedStream(requests(), timeout=120):
        received.append(response)
        started.set()


@pytest.mark.parametrize("frontends", [1, 2])
def test_a_unary_call_is_answered_while_a_stream_keeps_the_queue_full(
    model_repository: Path, start_server: Callable[..., ServerProcess], frontends: int
) -> None:
    server = start_server(model_repository, "--fake-device", SLOW_DEVICE,
                          "--frontends", str(frontends))
    with grpc.insecure_channel(server.address) as feed_channel, \
            grpc.insecure_channel(server.address) as channel:
        received: list[pb.EmbedResponse] = []
        started = threading.Event()
        feed = threading.Thread(target=_feed, args=(pb_grpc.BertServiceStub(feed_channel),
                                                    received, started))
        feed.start()
        assert started.wait(60)
        stub = pb_grpc.BertServiceStub(channel)
        answers = [stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=["央行宣布降准"]),
                              timeout=30) for _ in range(3)]
        during = len(received)
        feed.join(120)
    assert len(received) == MESSAGES and not any(r.HasField("error") for r in received)
    assert [r.request_id for r in received] == [str(i) for i in range(MESSAGES)]
    # Answered with most of the feed still to come, each after at most a batch or two.
    assert during < MESSAGES // 2, during
    for answer in answers:
        assert len(answer.embeddings) == 1
        assert answer.timings.queue_us < 500_000, answer.timings


def test_the_measured_cost_model_and_levels_are_shown(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(model_repository, "--fake-device", "custom,a_ms=3,b_us=2",
                          "--metrics-port", "0")
    with grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.BertServiceStub(channel).GetModel(
            pb.GetModelRequest(model="tiny-embed"), timeout=10)
    assert info.priority_levels == 2
    cost = info.batch_cost
    assert len(cost.points) >= 4
    # The warm-up measured the fake device's own model (3 ms + 2 us a token), roughly: the
    # host's padding and copies add to both, more so on a busy machine.
    assert 2_000 < cost.fixed_us < 8_000 and 1.5 < cost.per_token_us < 8.0, cost
    line = next(line for line in server.lines if line.startswith("bertstream metrics on "))
    with urllib.request.urlopen(f"http://{line.split()[-1]}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'bertstream_batch_cost_fixed_seconds{model="tiny-embed",version="1"}' in text
    assert 'bertstream_queue_level_texts{model="tiny-embed",priority="2",version="1"}' in text


def test_priority_is_checked_against_the_models_levels(
        stub: pb_grpc.BertServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=["a"], priority=3), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "priority 3 is outside 1..2" in err.value.details()
    for level in (1, 2):
        ok = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=["a"], priority=level),
                        timeout=10)
        assert len(ok.embeddings) == 1


def test_a_stream_message_past_its_queue_timeout_fails_alone(
    model_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    """Behind a full slow queue, a message with a 1 ms timeout fails DEADLINE_EXCEEDED in
    its own response; the stream and the messages around it go on."""
    server = start_server(model_repository, "--fake-device", SLOW_DEVICE)
    texts = [f"新闻 {j}" for j in range(PER_MESSAGE)]
    requests = [pb.EmbedRequest(model="tiny-embed", request_id=str(i), texts=texts,
                                timeout_us=1_000 if i == 5 else 0) for i in range(8)]
    with grpc.insecure_channel(server.address) as channel:
        responses = list(pb_grpc.BertServiceStub(channel).EmbedStream(iter(requests),
                                                                        timeout=60))
    assert [r.request_id for r in responses] == [str(i) for i in range(8)]
    failed = [r for r in responses if r.HasField("error")]
    assert [r.request_id for r in failed] == ["5"]
    assert failed[0].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "past its timeout" in failed[0].error.message
