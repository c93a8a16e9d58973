"""`priority` and `timeout_us` from the Python client, the command line and bulk feeds onto
EmbedRequest / ClassifyRequest (issue 21), and the client's own check of them. No server: the
clients run against a fake stub that records what it is sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
from bertstream.client import AsyncBertClient, BertClient, cli
from bertstream.client import client as client_module
from bertstream.client.feed import _Feed
from bertstream.client.feed_input import Item
from bertstream.client.feed_options import FeedOptions, FeedReport
from bertstream.client.feed_work import Work
from bertstream.client.messages import classify_request, embed_request, schedule
from bertstream.v1 import bertstream_pb2 as pb

BUILDERS = [embed_request, classify_request]
BAD_PRIORITIES = [-1, 1.0, 1.5, "1", None, True, [1], 2**32]


# -- the request builders ------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDERS, ids=["embed", "classify"])
def test_builders_put_priority_and_timeout_on_the_message(build: Any) -> None:
    request = build(["今天股市大涨"], priority=1, timeout_us=250_000)
    assert (request.priority, request.timeout_us) == (1, 250_000)
    # survives the wire
    again = type(request).FromString(request.SerializeToString())
    assert (again.priority, again.timeout_us) == (1, 250_000)


@pytest.mark.parametrize("build", BUILDERS, ids=["embed", "classify"])
def test_builders_default_to_zero_the_server_decides(build: Any) -> None:
    request = build(["今天股市大涨"])
    assert (request.priority, request.timeout_us) == (0, 0)
    # proto3 scalars: 0 is not on the wire, so the server sees "unset" and decides
    assert type(request)(priority=0, timeout_us=0).SerializeToString() == b""


def test_largest_values_and_numpy_integers_are_accepted() -> None:
    request = embed_request("x", priority=np.int64(2), timeout_us=2**64 - 1)
    assert (request.priority, request.timeout_us) == (2, 2**64 - 1)
    assert schedule(2**32 - 1, 0) == {"priority": 2**32 - 1, "timeout_us": 0}


@pytest.mark.parametrize("bad", BAD_PRIORITIES)
@pytest.mark.parametrize("build", BUILDERS, ids=["embed", "classify"])
def test_bad_priority_is_a_value_error(build: Any, bad: object) -> None:
    with pytest.raises(ValueError, match="priority must be an int"):
        build(["x"], priority=bad)


@pytest.mark.parametrize("bad", [-1, 0.5, "100", True, 2**64])
def test_bad_timeout_us_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="timeout_us must be an int"):
        classify_request(["x"], timeout_us=bad)


# -- both clients, every call kind, against a fake stub ------------------------------------


class EchoCall:
    """A bidirectional call that answers every message at once with its request_id."""

    def __init__(self, answer: type, sent: list[Any]) -> None:
        self._answer = answer
        self._sent = sent
        self._answers: asyncio.Queue[Any] = asyncio.Queue()

    async def write(self, request: Any) -> None:
        self._sent.append(request)
        self._answers.put_nowait(self._answer(request_id=request.request_id))

    async def done_writing(self) -> None:
        self._answers.put_nowait(grpc.aio.EOF)

    async def read(self) -> Any:
        return await self._answers.get()

    def cancel(self) -> bool:
        return True


class FakeStub:
    """BertServiceStub's four embed / classify methods; unary ones answer at once (awaitable
    when the channel is a grpc.aio one), stream ones echo. Every request lands in `sent`."""

    sent: ClassVar[list[Any]] = []
    streams_opened: ClassVar[int] = 0

    def __init__(self, channel: Any) -> None:
        self._aio = isinstance(channel, FakeAioChannel)

    def _unary(self, answer: type) -> Any:
        def call(request: Any, timeout: float, metadata: Any) -> Any:
            FakeStub.sent.append(request)
            if not self._aio:
                return answer()

            async def later() -> Any:
                return answer()
            return later()
        return call

    def _stream(self, answer: type) -> Any:
        def call(timeout: float, metadata: Any) -> EchoCall:
            FakeStub.streams_opened += 1
            return EchoCall(answer, FakeStub.sent)
        return call

    def __getattr__(self, name: str) -> Any:
        kinds = {"Embed": (self._unary, pb.EmbedResponse),
                 "Classify": (self._unary, pb.ClassifyResponse),
                 "EmbedStream": (self._stream, pb.EmbedResponse),
                 "ClassifyStream": (self._stream, pb.ClassifyResponse)}
        if name not in kinds:
            raise AttributeError(name)
        make, answer = kinds[name]
        return make(answer)


class FakeAioChannel:
    """Stands in for a grpc.aio channel: no real one is opened in this process. grpc.aio
    keeps process-wide state tied to the event loop that first used it; a real channel here
    (the sync client's stream thread has a loop of its own, the async client another) left
    later tests' `asyncio.run` hanging now and then."""

    async def close(self, grace: float | None = None) -> None:
        return None

    async def channel_ready(self) -> None:
        return None


@pytest.fixture
def fake_stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeStub]]:
    monkeypatch.setattr(client_module, "open_aio_channel", lambda *a, **kw: FakeAioChannel())
    monkeypatch.setattr(client_module.pb_grpc, "BertServiceStub", FakeStub)
    FakeStub.sent = []
    FakeStub.streams_opened = 0
    yield FakeStub


KINDS = ["encode", "classify", "encode_stream", "classify_stream"]
REQUEST_TYPE = {"encode": pb.EmbedRequest, "classify": pb.ClassifyRequest,
                "encode_stream": pb.EmbedRequest, "classify_stream": pb.ClassifyRequest}


def _sync(kind: str, **kw: Any) -> None:
    with BertClient("127.0.0.1:1", model="m") as bc:
        if kind.endswith("_stream"):
            results = list(getattr(bc, kind)(["a", ["b", "c"]], **kw))
            assert [r.error for r in results] == [None, None]
        else:
            getattr(bc, kind)(["a", "b"], **kw)


def _async(kind: str, **kw: Any) -> None:
    async def run() -> None:
        async with AsyncBertClient("127.0.0.1:1", model="m") as bc:
            if kind.endswith("_stream"):
                results = [r async for r in getattr(bc, kind)(["a", ["b", "c"]], **kw)]
                assert [r.error for r in results] == [None, None]
            else:
                await getattr(bc, kind)(["a", "b"], **kw)
    asyncio.run(run())


CLIENTS = {"sync": _sync, "async": _async}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_call_kind_carries_priority(fake_stub: type[FakeStub], client: str,
                                          kind: str) -> None:
    CLIENTS[client](kind, priority=1, timeout_us=40_000)
    assert fake_stub.sent, "nothing was sent"
    for request in fake_stub.sent:
        assert isinstance(request, REQUEST_TYPE[kind])
        assert (request.model, request.priority, request.timeout_us) == ("m", 1, 40_000)
    assert len(fake_stub.sent) == (2 if kind.endswith("_stream") else 1)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_call_kind_defaults_to_zero(fake_stub: type[FakeStub], client: str,
                                          kind: str) -> None:
    CLIENTS[client](kind)
    assert [(r.priority, r.timeout_us) for r in fake_stub.sent] == \
        [(0, 0)] * len(fake_stub.sent)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_priority_fails_before_anything_is_sent(fake_stub: type[FakeStub], client: str,
                                                    kind: str) -> None:
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match="priority must be an int"):
            CLIENTS[client](kind, priority=bad)
    with pytest.raises(ValueError, match="timeout_us must be an int"):
        CLIENTS[client](kind, timeout_us=-5)
    assert fake_stub.sent == [] and fake_stub.streams_opened == 0


def test_sync_stream_checks_its_options_when_called(fake_stub: type[FakeStub]) -> None:
    """Not at the first item: a bad option is the caller's ValueError at once."""
    with BertClient("127.0.0.1:1") as bc, pytest.raises(ValueError, match="priority"):
        bc.encode_stream(["a"], priority=-1)


# -- the command line ----------------------------------------------------------------------


class FakeBertClient:
    """Stands in for BertClient in cli.main: builds each request as the real one would."""

    sent: ClassVar[list[Any]] = []

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.model = kw.get("model", "")

    def __enter__(self) -> FakeBertClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def encode(self, texts: list[str], **kw: Any) -> np.ndarray:
        FakeBertClient.sent.append(embed_request(texts, model=self.model, **kw))
        return np.zeros((len(texts), 2), np.float32)

    def classify(self, texts: list[str], **kw: Any) -> list[list[Any]]:
        FakeBertClient.sent.append(classify_request(texts, model=self.model, **kw))
        return [[] for _ in texts]


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeBertClient]:
    monkeypatch.setattr(cli, "BertClient", FakeBertClient)
    FakeBertClient.sent = []
    return FakeBertClient


@pytest.mark.parametrize("command,request_type", [("embed", pb.EmbedRequest),
                                                  ("classify", pb.ClassifyRequest)])
@pytest.mark.parametrize("flags,expected", [
    ((), (0, 0)),
    (("--priority", "1"), (1, 0)),
    (("--priority", "2", "--timeout-us", "150000"), (2, 150_000)),
], ids=["default", "priority", "priority-timeout"])
def test_cli_single_call_flags_reach_the_request(
        fake_client: type[FakeBertClient], capsys: pytest.CaptureFixture[str], command: str,
        request_type: type, flags: tuple[str, ...], expected: tuple[int, int]) -> None:
    cli.main([command, "今天股市大涨", "--timeout", "5", *flags])
    [request] = fake_client.sent
    assert isinstance(request, request_type)
    assert (request.priority, request.timeout_us) == expected
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_cli_tokenize_has_no_priority() -> None:
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["tokenize", "x", "--priority", "1"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("flags", [("--priority", "-1"), ("--priority", "high"),
                                   ("--priority", "1.5"), ("--timeout-us", "-1"),
                                   ("--priority", str(2**32))])
def test_cli_bad_flags_are_usage_errors(fake_client: type[FakeBertClient],
                                        capsys: pytest.CaptureFixture[str],
                                        flags: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["embed", "x", *flags])
    assert exit_.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert fake_client.sent == []


def _feed_messages(options: FeedOptions, texts: list[str]) -> list[Any]:
    """The stream messages one feed stream would send for `texts`."""
    async def run() -> list[Any]:
        items = iter([Item(key=str(i), id=i, text=t) for i, t in enumerate(texts)])
        feed = _Feed(options, output=None, work=Work(items, options.batch_size),  # type: ignore[arg-type]
                     report=FeedReport())
        messages = []
        async for batch, request in feed._requests(100, asyncio.Event()):
            messages.append(request)
            await feed.work.settle(batch)  # answered: the queue hands out the next batch
        return messages
    return asyncio.run(run())


@pytest.mark.parametrize("command,request_type", [("embed", pb.EmbedRequest),
                                                  ("classify", pb.ClassifyRequest)])
@pytest.mark.parametrize("flags,expected", [
    ((), (0, 0)),
    (("--priority", "3", "--timeout-us", "2000000"), (3, 2_000_000)),
], ids=["default-lowest-level", "priority-timeout"])
def test_cli_feed_flags_reach_every_stream_message(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        command: str, request_type: type, flags: tuple[str, ...],
        expected: tuple[int, int]) -> None:
    seen: list[FeedOptions] = []

    def run_feed(options: FeedOptions) -> FeedReport:
        seen.append(options)
        return FeedReport()

    monkeypatch.setattr(cli, "run_feed", run_feed)
    cli.main([command, "--input", str(tmp_path / "in.jsonl"), "--output",
              str(tmp_path / "out.jsonl"), "--batch-size", "2", "--model", "m", *flags])
    json.loads(capsys.readouterr().out)
    [options] = seen
    messages = _feed_messages(options, ["a", "b", "c", "d", "e"])
    assert [len(m.texts) for m in messages] == [2, 2, 1]
    for message in messages:
        assert isinstance(message, request_type)
        assert message.model == "m"
        assert (message.priority, message.timeout_us) == expected


def test_feed_options_check_priority(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="priority must be an int"):
        FeedOptions(input=tmp_path / "in", output=tmp_path / "out", request={"priority": -2})
    with pytest.raises(ValueError, match="timeout_us must be an int"):
        FeedOptions(input=tmp_path / "in", output=tmp_path / "out",
                    request={"timeout_us": "soon"})
