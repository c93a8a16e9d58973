"""SIGTERM under load: nothing new is admitted, everything admitted is answered, exit 0 well
within the grace period; a caller that goes away mid-stream leaves nothing behind."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import ServerProcess

TEXTS = [f"第{i}条：央行宣布降准，股市应声大涨，沪指收复三千点。" for i in range(32)]
GRACE = 20.0


class UnaryLoad(threading.Thread):
    """Embed calls of 32 texts back to back until the server stops answering."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.codes: list[grpc.StatusCode] = []
        self.bad_answers = 0

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            while True:
                try:
                    response = stub.Embed(pb.EmbedRequest(model="tiny-embed", texts=TEXTS),
                                          timeout=60)
                    self.bad_answers += len(response.embeddings) != len(TEXTS)
                    self.codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    self.codes.append(err.code())
                    return


class StreamLoad(threading.Thread):
    """One EmbedStream sending messages without end; keeps every response and the final
    status."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.ids: list[int] = []
        self.errors: list[str] = []
        self.status: grpc.StatusCode | None = None
        self.details = ""
        self._finished = threading.Event()

    def _requests(self) -> Iterator[pb.EmbedRequest]:
        n = 0
        while not self._finished.is_set():
            n += 1
            yield pb.EmbedRequest(request_id=str(n), model="tiny-embed", texts=TEXTS[:8])

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = pb_grpc.BertServiceStub(channel).EmbedStream(self._requests(), timeout=120)
            try:
                for response in call:
                    self.ids.append(int(response.request_id))
                    if response.HasField("error"):
                        self.errors.append(response.error.message)
                self.status = grpc.StatusCode.OK
            except grpc.RpcError as err:
                self.status, self.details = err.code(), err.details() or ""
            finally:
                self._finished.set()


def test_sigterm_under_load_answers_what_it_admitted_and_exits_0(
    model_repository: Path, start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server(model_repository, "--grace-period", str(GRACE))
    unary = [UnaryLoad(server.address) for _ in range(4)]
    streams = [StreamLoad(server.address) for _ in range(2)]
    for load in [*unary, *streams]:
        load.start()
    deadline = time.monotonic() + 60
    while not (all(load.codes for load in unary) and all(len(load.ids) > 5 for load in streams)):
        assert time.monotonic() < deadline, "the load never got going"
        time.sleep(0.1)
    sent_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(GRACE + 30)
    took = time.monotonic() - sent_at
    for load in [*unary, *streams]:
        load.join(30)
    log = "".join(server.lines)
    assert code == 0, log[-3000:]
    assert took < GRACE, f"exit took {took:.1f} s: in-flight work kept it until the grace end"
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 500):][:4000]
    for load in unary:
        # Every call ran to its answer, except the last one, refused once the server stopped
        # admitting calls.
        assert load.codes[:-1] == [grpc.StatusCode.OK] * (len(load.codes) - 1)
        assert load.codes[-1] == grpc.StatusCode.UNAVAILABLE
        assert load.bad_answers == 0
    for load in streams:
        # Each message the server read got its answer, in order, with no gap; then the stream
        # ended UNAVAILABLE, telling the caller to send the rest elsewhere.
        assert load.ids == list(range(1, len(load.ids) + 1))
        assert not load.errors
        assert load.status == grpc.StatusCode.UNAVAILABLE, (load.status, load.details)
        assert "shutting down" in load.details


def _metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_callers_that_vanish_mid_stream_leave_nothing_queued(
    model_repository: Path, start_server: Callable[..., ServerProcess],
) -> None:
    """Ten callers each send a burst of big messages, read one answer and cancel: their
    queued texts are dropped (not computed), gauges return to zero, and the server's threads
    and open files are what they were."""
    server = start_server(model_repository, "--metrics-port", "0")
    metrics_address = next(line.split(" on ", 1)[1].strip() for line in server.lines
                           if line.startswith("bertstream metrics on "))
    pid = server.proc.pid

    def resources() -> tuple[int, int]:
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        return threads, len(os.listdir(f"/proc/{pid}/fd"))

    with grpc.insecure_channel(server.address) as channel:  # warm up: threads, sessions
        pb_grpc.BertServiceStub(channel).Embed(
            pb.EmbedRequest(model="tiny-embed", texts=TEXTS), timeout=30)
    before = resources()
    sent = 0
    for _ in range(10):
        with grpc.insecure_channel(server.address) as channel:
            requests = [pb.EmbedRequest(request_id=str(i), model="tiny-embed", texts=TEXTS * 8)
                        for i in range(16)]
            sent += sum(len(r.texts) for r in requests)
            call = pb_grpc.BertServiceStub(channel).EmbedStream(iter(requests), timeout=60)
            next(call)
            call.cancel()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        values = _metrics(metrics_address)
        if (values.get("bertstream_queue_texts", 0) == 0
                and values.get("bertstream_requests_in_flight", 0) == 0):
            break
        time.sleep(0.2)
    assert values.get("bertstream_queue_texts", 0) == 0
    assert values.get("bertstream_requests_in_flight", 0) == 0
    answered = values.get("bertstream_texts_total", 0)
    assert answered < sent / 2, f"{answered} of {sent} texts computed for callers who left"
    threads, files = resources()
    # The tokenizer pool starts its threads as work comes (up to one per core): allow those.
    assert threads <= before[0] + (os.cpu_count() or 2) and files <= before[1] + 2, \
        (before, (threads, files))
    assert server.stop() == 0
    log = "".join(server.lines)
    assert "Traceback" not in log
    # Reads and queue waits left behind by cancelled streams are dropped, not orphaned.
    assert "never retrieved" not in log and "Task was destroyed" not in log, log[-3000:]
