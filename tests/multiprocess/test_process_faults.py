"""Faults of a `--frontends 2` server, each on a real server on loopback: SIGTERM under load,
a front end killed, the engine killed (under calls, and under a bulk feed), and a front end
that keeps dying. Calls carry deadlines and the tests poll for conditions, so a fault that
hangs a call fails a test instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from bertstream.client import BertClient
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from proclib import (
    alive,
    channel_to,
    child_pid,
    children,
    listening,
    open_channel,
    run_dir,
    spread_channels,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "feed"))

from feedlib import feed_command, news_items, read_jsonl, write_jsonl

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = [f"第{i}条：央行宣布降准，股市应声大涨，沪指收复三千点。" for i in range(32)]
STREAM_TEXTS = 8
GRACE = 20.0
BACK_WITHIN_S = 30.0  # a killed process's replacement serves within this
CRASH_LOOP = 5  # supervisor.CRASH_LOOP
BACKOFF_S = 6.0  # --restart-backoff: shorter than the default 30 s, long enough to observe
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class StreamLoad(threading.Thread):
    """One EmbedStream of 8-text messages, at most `window` unanswered, until `stop` is set
    (then it ends OK) or the server ends it. Keeps every answer: (request id, error code or
    0, error message, when)."""

    def __init__(self, channel: grpc.Channel, front: int = -1, window: int = 4,
                 pace_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.channel = channel
        self.front = front
        self.pace_s = pace_s
        self.answers: list[tuple[int, int, str, float]] = []
        self.bad_answers = 0  # OK answers with the wrong number of vectors
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self.stop = threading.Event()
        self._room = threading.Semaphore(window)

    def _requests(self) -> Iterator[pb.EmbedRequest]:
        n = 0
        while not self.stop.is_set():
            if not self._room.acquire(timeout=0.1):
                continue
            n += 1
            yield pb.EmbedRequest(request_id=str(n), model="tiny-embed",
                                  texts=TEXTS[:STREAM_TEXTS])
            time.sleep(self.pace_s)  # an error answers at once: do not spin on them

    def run(self) -> None:
        call = pb_grpc.BertServiceStub(self.channel).EmbedStream(self._requests(), timeout=90)
        try:
            for response in call:
                self._room.release()
                code = response.error.code if response.HasField("error") else 0
                self.bad_answers += code == 0 and len(response.embeddings) != STREAM_TEXTS
                self.answers.append((int(response.request_id), code, response.error.message,
                                     time.monotonic()))
            self.status = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.status, self.details = err.code(), err.details() or ""
        finally:
            self.stop.set()

    def ok_since(self, since: float) -> int:
        return sum(1 for _, code, _, at in self.answers if code == 0 and at > since)

    def check_ordered(self) -> None:
        """One answer per message read, in order, none twice, none skipped."""
        ids = [answer[0] for answer in self.answers]
        assert ids == list(range(1, len(ids) + 1)), ids
        assert self.bad_answers == 0


class UnaryLoad(threading.Thread):
    """Embed calls of 32 texts back to back; each outcome kept as (code, details, when).
    `until_error`: stop at the first failure (else retry after a short pause)."""

    def __init__(self, channel: grpc.Channel, front: int = -1, until_error: bool = True) -> None:
        super().__init__(daemon=True)
        self.channel = channel
        self.front = front
        self.until_error = until_error
        self.calls: list[tuple[grpc.StatusCode, str, float]] = []
        self.bad_answers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        stub = pb_grpc.BertServiceStub(self.channel)
        while not self.stop.is_set():
            try:
                response = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS),
                                      timeout=30)
                self.bad_answers += len(response.embeddings) != len(TEXTS)
                self.calls.append((grpc.StatusCode.OK, "", time.monotonic()))
            except grpc.RpcError as err:
                self.calls.append((err.code(), err.details() or "", time.monotonic()))
                if self.until_error:
                    return
                time.sleep(0.02)

    def ok_since(self, since: float) -> int:
        return sum(1 for code, _, at in self.calls if code == grpc.StatusCode.OK and at > since)


class HealthWatch(threading.Thread):
    """grpc.health.v1 Watch of one service: the statuses in the order they came."""

    def __init__(self, channel: grpc.Channel, service: str = "") -> None:
        super().__init__(daemon=True)
        self.statuses: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=120)

    def run(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    def close(self) -> None:
        self._call.cancel()
        self.join(10)


def embed_ok(channel: grpc.Channel) -> bool:
    """One Embed call answers (False when refused UNAVAILABLE, as while a process restarts)."""
    try:
        response = pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model="tiny-embed", texts=TEXTS[:2]), timeout=10)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return len(response.embeddings) == 2


def health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10).status


def frontends(supervisor: int) -> dict[int, int]:
    """Front-end index -> pid, once both run."""
    def both() -> dict[int, int]:
        found = {c.index: c.pid for c in children(supervisor) if c.role == "frontend"}
        return found if len(found) == 2 else {}

    return wait_for(both, 30, "two front-end processes")


def port_of(server: ServerProcess) -> int:
    return int(server.address.rsplit(":", 1)[1])


def log_of(server: ServerProcess) -> str:
    return "".join(server.lines)


def stop_cleanly(server: ServerProcess) -> float:
    """SIGTERM: exit 0, no child process and no run folder left, no traceback logged.
    Returns the seconds the server took to exit."""
    supervisor = server.proc.pid
    kids = children(supervisor)
    folder = run_dir(kids[0].pid)
    sent_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(GRACE + 40)
    took = time.monotonic() - sent_at
    log = log_of(server)
    assert code == 0, log[-3000:]
    wait_for(lambda: not any(alive(c.pid) for c in kids), 10, "every child process gone")
    assert not folder.exists(), f"run folder {folder} left behind"
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 500):][:4000]
    return took


@pytest.fixture
def launch(model_repository: Path,
           start_server: Callable[..., ServerProcess]) -> Iterator[Callable[..., ServerProcess]]:
    """`launch(*flags)`: a `--frontends 2` server over the shared repository, stopped after
    the test if the test did not stop it (a failed test leaves nothing running)."""
    started: list[ServerProcess] = []

    def start(*flags: str) -> ServerProcess:
        server = start_server(model_repository, "--frontends", "2", *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.stop()


def _close_all(channels: list[grpc.Channel]) -> None:
    for channel in channels:
        channel.close()


def test_sigterm_under_load_answers_what_both_front_ends_admitted(
    launch: Callable[..., ServerProcess],
) -> None:
    """Streams and unary calls on both front ends; SIGTERM to the supervisor: every message
    read is answered once, in order, every call after the last answered one is refused
    UNAVAILABLE, exit 0 within the grace period, and no process is left."""
    server = launch("--grace-period", str(GRACE))
    pinned = spread_channels(server.address, frontends(server.proc.pid), each=3)
    streams: list[StreamLoad] = []
    unary: list[UnaryLoad] = []
    for n, (channel, front) in enumerate(pinned):
        # Per front end: its first and third connections stream, its second calls Embed.
        nth = sum(1 for _, f in pinned[:n] if f == front)
        if nth % 2 == 0:
            streams.append(StreamLoad(channel, front))
        else:
            unary.append(UnaryLoad(channel, front))
    try:
        for load in [*streams, *unary]:
            load.start()
        wait_for(lambda: all(load.calls for load in unary)
                 and all(len(load.answers) > 5 for load in streams), 60, "load on both")
        took = stop_cleanly(server)
        for load in [*streams, *unary]:
            load.join(30)
            assert not load.is_alive(), "a call outlived the server"
    finally:
        _close_all([channel for channel, _ in pinned])
    assert took < GRACE, f"exit took {took:.1f} s: in-flight work kept it until the grace end"
    assert {load.front for load in streams} == {0, 1}
    assert {load.front for load in unary} == {0, 1}
    for load in unary:
        codes = [code for code, _, _ in load.calls]
        assert codes[:-1] == [grpc.StatusCode.OK] * (len(codes) - 1), codes
        assert codes[-1] == grpc.StatusCode.UNAVAILABLE, load.calls[-1]
        assert load.bad_answers == 0
    for load in streams:
        load.check_ordered()
        assert all(code == 0 for _, code, _, _ in load.answers), load.answers
        assert load.status == grpc.StatusCode.UNAVAILABLE, (load.status, load.details)
        assert "shutting down" in load.details


def test_killed_front_end_fails_its_calls_and_is_replaced(
    launch: Callable[..., ServerProcess],
) -> None:
    """SIGKILL of front end 0 while streams and calls run on both: its calls end UNAVAILABLE
    at once (no deadline reached), front end 1's go on untouched, and a new front end 0
    answers Embed within BACK_WITHIN_S."""
    server = launch()
    supervisor = server.proc.pid
    fronts = frontends(supervisor)
    pinned = spread_channels(server.address, fronts, each=3)
    streams = [StreamLoad(channel, front) for channel, front in pinned]
    unary = [UnaryLoad(channel, front) for channel, front in pinned]
    channels = [channel for channel, _ in pinned]
    try:
        for load in [*streams, *unary]:
            load.start()
        wait_for(lambda: all(load.calls for load in unary)
                 and all(len(load.answers) > 5 for load in streams), 60, "load on both")
        victim = fronts[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for load in [*streams, *unary]:
            if load.front == 0:
                load.join(BACK_WITHIN_S)
                assert not load.is_alive(), "a call on the killed front end hangs"
                load.channel.close()  # it must not reconnect while channels are pinned below
        replacement = child_pid(supervisor, "frontend", 0, other_than=victim,
                                timeout=BACK_WITHIN_S)
        wait_for(lambda: listening(replacement, port_of(server)), BACK_WITHIN_S,
                 "the new front end listening")
        channels.append(channel := channel_to(server.address,
                                              {0: replacement, 1: fronts[1]}, 0))
        wait_for(lambda: embed_ok(channel), BACK_WITHIN_S, "Embed on the new front end")
        back_s = time.monotonic() - killed_at
        # Front end 1's calls went on while front end 0 was away.
        survivors = [load for load in [*streams, *unary] if load.front == 1]
        back_at = time.monotonic()
        wait_for(lambda: all(load.ok_since(back_at) >= 3 for load in survivors), 60,
                 "calls on the surviving front end")
        for load in survivors:
            load.stop.set()
            load.join(30)
            assert not load.is_alive()
        stop_cleanly(server)
    finally:
        _close_all(channels)
    print(f"\nfront end 0 killed: a new one answered after {back_s:.2f} s")
    assert back_s < BACK_WITHIN_S, back_s
    assert "frontend-0 exited (killed by SIGKILL); starting it again" in log_of(server)
    for load in streams:
        load.check_ordered()
        assert all(code == 0 for _, code, _, _ in load.answers), load.answers
        if load.front == 0:  # the connection reset: not a deadline, not a hang
            assert load.status == grpc.StatusCode.UNAVAILABLE, (load.status, load.details)
        else:
            assert load.status == grpc.StatusCode.OK, (load.status, load.details)
            assert load.ok_since(killed_at) > 0
    for load in unary:
        codes = [code for code, _, _ in load.calls]
        assert load.bad_answers == 0
        if load.front == 0:
            assert codes[:-1] == [grpc.StatusCode.OK] * (len(codes) - 1), codes
            assert codes[-1] == grpc.StatusCode.UNAVAILABLE, load.calls[-1]
        else:
            assert set(codes) == {grpc.StatusCode.OK}, load.calls
            assert load.ok_since(killed_at) > 0


def test_killed_engine_fails_calls_in_flight_and_comes_back_with_its_models(
    launch: Callable[..., ServerProcess],
) -> None:
    """Explicit mode, tiny-news loaded by LoadModel; SIGKILL of the engine under streams and
    calls on both front ends: what was in flight or sent meanwhile is answered UNAVAILABLE
    (streams go on), health "" goes NOT_SERVING and back to SERVING on both front ends, Embed
    answers again within BACK_WITHIN_S, and tiny-news is still served."""
    server = launch("--model-control-mode", "explicit", "--load-model", "tiny-embed")
    supervisor = server.proc.pid
    pinned = spread_channels(server.address, frontends(supervisor), each=3)
    channels = [channel for channel, _ in pinned]
    first = {front: channel for channel, front in reversed(pinned)}  # each one's first
    classify = pb.ClassifyRequest(model="tiny-news", texts=TEXTS[:4])
    with pytest.raises(grpc.RpcError):  # explicit mode: only what was asked for is served
        pb_grpc.BertServiceStub(first[0]).Classify(classify, timeout=30)
    pb_grpc.BertServiceStub(first[0]).LoadModel(pb.LoadModelRequest(model="tiny-news"),
                                                timeout=60)
    for channel in first.values():
        assert len(pb_grpc.BertServiceStub(channel).Classify(classify, timeout=30).results) == 4
    watches = [HealthWatch(channel) for channel in first.values()]
    streams: list[StreamLoad] = []
    unary: list[UnaryLoad] = []
    for n, (channel, front) in enumerate(pinned):
        # Per front end: its first connection probes, then they stream and call in turn.
        nth = sum(1 for _, f in pinned[:n] if f == front)
        if nth % 2:
            streams.append(StreamLoad(channel, front))
        elif nth:
            unary.append(UnaryLoad(channel, front, until_error=False))
    loads: list[StreamLoad | UnaryLoad] = [*streams, *unary]
    try:
        for thread in [*watches, *loads]:
            thread.start()
        wait_for(lambda: all(w.statuses == [SERVING] for w in watches)
                 and all(load.ok_since(0) > 5 for load in loads), 60, "load on both")
        engine = child_pid(supervisor, "engine")
        os.kill(engine, signal.SIGKILL)
        killed_at = time.monotonic()
        child_pid(supervisor, "engine", other_than=engine, timeout=BACK_WITHIN_S)
        for channel in first.values():
            wait_for(lambda: embed_ok(channel), BACK_WITHIN_S,  # noqa: B023 (called here)
                     "Embed after the engine's restart")
        back_s = time.monotonic() - killed_at
        back_at = time.monotonic()
        wait_for(lambda: all(load.ok_since(back_at) >= 3 for load in loads), 60,
                 "load answered again")
        for load in loads:
            load.stop.set()
            load.join(30)
            assert not load.is_alive()
        wait_for(lambda: all(w.statuses[-1:] == [SERVING] for w in watches), 10,
                 "health SERVING again")
        for channel in first.values():  # LoadModel's result survived the engine
            results = pb_grpc.BertServiceStub(channel).Classify(classify, timeout=30).results
            assert len(results) == 4
        for watch in watches:
            watch.close()
        stop_cleanly(server)
    finally:
        _close_all(channels)
    print(f"\nengine killed: Embed answered again after {back_s:.2f} s")
    assert back_s < BACK_WITHIN_S, back_s
    for watch in watches:
        assert watch.statuses == [SERVING, NOT_SERVING, SERVING], watch.statuses
    refused = 0
    for stream in streams:
        stream.check_ordered()
        assert stream.status == grpc.StatusCode.OK, (stream.status, stream.details)
        for _, code, message, _ in stream.answers:
            assert code in (0, UNAVAILABLE), (code, message)
            assert code == 0 or "engine process is restarting" in message, message
            refused += code == UNAVAILABLE
    for load in unary:
        assert load.bad_answers == 0
        for code, details, _ in load.calls:
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (code, details)
            assert code == grpc.StatusCode.OK or "engine process is restarting" in details
            refused += code == grpc.StatusCode.UNAVAILABLE
    assert refused, "no call was in flight or refused while the engine was away"
    assert "engine exited (killed by SIGKILL); starting it again" in log_of(server)


FEED_ITEMS = 4000


def test_feed_through_an_engine_kill_writes_every_id_once(
    launch: Callable[..., ServerProcess], tmp_path: Path,
) -> None:
    """`bertstream-client embed --input --output` of 4,000 news items; the engine is killed
    mid-feed. The feed exits 0 with every id written once, no error line, and the vectors
    Embed returns for the same texts."""
    items = news_items(FEED_ITEMS)
    input_path = write_jsonl(tmp_path / "news.jsonl", items)
    output = tmp_path / "out.jsonl"
    server = launch()
    feed = subprocess.Popen(feed_command("embed", server.address, input_path, output),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _line_count(output) >= 500 or feed.poll() is not None, 120,
                 "the feed's first 500 answers")
        os.kill(child_pid(server.proc.pid, "engine"), signal.SIGKILL)
        killed_at_line = _line_count(output)
        running = feed.poll() is None
        stdout, stderr = feed.communicate(timeout=180)
    finally:
        if feed.poll() is None:
            feed.kill()
    assert running and killed_at_line < FEED_ITEMS, "the feed ended before the kill"
    assert feed.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["answered"] == FEED_ITEMS and report["errors"] == 0, report
    print(f"\nfeed of {FEED_ITEMS} items, engine killed at line {killed_at_line}: {report}")
    lines = read_jsonl(output)
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert set(ids) == {item["id"] for item in items}
    errors = [line for line in lines if "error" in line]
    assert not errors, errors[:3]
    with BertClient(server.address, model="tiny-embed") as client:
        texts = [str(item["text"]) for item in items]
        want = np.concatenate([client.encode(texts[i:i + 100])
                               for i in range(0, len(texts), 100)])
    got = {line["id"]: np.asarray(line["embedding"], np.float32) for line in lines}
    worst = max(float(np.abs(got[item["id"]] - want[i]).max()) for i, item in enumerate(items))
    assert worst < 1e-4, worst
    stop_cleanly(server)
    assert "engine exited (killed by SIGKILL)" in log_of(server)


def _line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def test_front_end_that_keeps_dying_is_reported_and_backed_off(
    launch: Callable[..., ServerProcess],
) -> None:
    """Front end 1 killed CRASH_LOOP times, each time as soon as its replacement answers:
    the log says it is crash-looping, health "bertstream.processes" is NOT_SERVING while it
    waits, no front end 1 runs during the backoff, front end 0 serves throughout, and after
    the backoff front end 1 is back and health SERVING."""
    server = launch("--restart-backoff", str(BACKOFF_S))
    supervisor = server.proc.pid
    port = port_of(server)
    fronts = frontends(supervisor)
    survivor = channel_to(server.address, fronts, 0)
    channels = [survivor]
    stream = StreamLoad(survivor, 0)
    try:
        stream.start()
        wait_for(lambda: len(stream.answers) > 5, 60, "a stream on front end 0")
        victim = fronts[1]
        for n in range(CRASH_LOOP):
            if n:
                victim = child_pid(supervisor, "frontend", 1, other_than=victim,
                                   timeout=BACK_WITHIN_S)
                wait_for(lambda: listening(victim, port), BACK_WITHIN_S,  # noqa: B023
                         "front end 1 listening")
                channel = channel_to(server.address, {0: fronts[0], 1: victim}, 1)
                try:
                    wait_for(lambda: embed_ok(channel), BACK_WITHIN_S,  # noqa: B023
                             "front end 1 answering")
                finally:
                    channel.close()
            os.kill(victim, signal.SIGKILL)
            last_kill = time.monotonic()
        wait_for(lambda: f"frontend-1 exited {CRASH_LOOP} times" in log_of(server), 10,
                 "the log saying front end 1 is crash-looping")
        wait_for(lambda: health(survivor, "bertstream.processes") == NOT_SERVING, 10,
                 "health bertstream.processes NOT_SERVING")
        # The backoff: no front end 1, health says so, front end 0 serves new connections.
        calls = 0
        while time.monotonic() < last_kill + BACKOFF_S - 1.0:
            assert not [c for c in children(supervisor) if c.role == "frontend"
                        and c.index == 1], "front end 1 restarted within the backoff"
            assert health(survivor, "bertstream.processes") == NOT_SERVING
            with open_channel(server.address) as channel:
                assert embed_ok(channel)
            calls += 1
            time.sleep(0.2)
        assert calls >= 3
        restarted = child_pid(supervisor, "frontend", 1, other_than=victim,
                              timeout=BACKOFF_S + BACK_WITHIN_S)
        assert time.monotonic() - last_kill > BACKOFF_S - 1.0
        wait_for(lambda: health(survivor, "bertstream.processes") == SERVING, BACK_WITHIN_S,
                 "health bertstream.processes SERVING after the restart")
        channels.append(channel_to(server.address, {0: fronts[0], 1: restarted}, 1))
        assert embed_ok(channels[-1])
        stream.stop.set()
        stream.join(30)
        assert not stream.is_alive()
        stop_cleanly(server)
    finally:
        _close_all(channels)
    assert stream.status == grpc.StatusCode.OK, (stream.status, stream.details)
    stream.check_ordered()
    assert all(code == 0 for _, code, _, _ in stream.answers), stream.answers
    assert stream.ok_since(last_kill) > 0
