"""Bulk feeds: a JSONL file through bidirectional streams, every input id answered exactly once.

`bertstream-client embed|classify --input IN.jsonl --output OUT.jsonl` is bert-as-service's
"encode a million sentences" job made restartable:

- input lines are JSON objects with an id (`--id-field`, default "id"; the line number when
  absent) and a text: a record with a "title" is title + lead of "body" by the news policy,
  exactly as head training reads it (client/news.py `record_text`); otherwise `--text-field`
  (default "text"). Ids must be unique; this is checked before anything is sent;
- the output gets one line per id, in the order answers arrive: {"id", "embedding" | "labels",
  "version"} or, for an item the server refuses (a text over the model's limit, say),
  {"id", "error": {"code", "message"}}. An error line is an answer too: delete it to retry it;
- a rerun with the same output resumes: ids already in it are skipped, and a last line cut off
  by a crash is removed first;
- streams that drop (UNAVAILABLE, a replica killed or draining) are reopened with backoff and
  their unanswered items sent again; an id whose answer is already written is never written
  twice, whatever the servers do;
- memory stays bounded by the ids, not the texts or vectors: the input is read as it is sent,
  and at most streams x window x batch_size items are in flight. The ids themselves are held
  (to check they are unique, and to skip or drop answered ones): about 100 bytes each.

With several servers (or a DNS name with several records) the feed opens `streams` streams on
one round_robin channel (client/channels.py), so each stream lands on another replica; a stream
is also closed and reopened every `rotate_after` messages, so a replica that comes back gets
its share again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

from .channels import TlsFiles, call_metadata, open_aio_channel, split_servers
from .messages import ClientError, classify_request, embed_request, parse_classify, parse_embed
from .news import record_text

__all__ = ["FeedError", "FeedOptions", "FeedReport", "run_feed"]

# A stream or message that failed with one of these is sent again (to another replica, when
# there is one): the server did not look at the texts, or could not finish.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
})
# Server faults that one text may cause: a message failing so is split before it is retried.
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# Failures that belong to one text: a message that fails this way is split into single texts,
# and a single text that fails this way gets an error line.
ITEM_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
# Anything else (NOT_FOUND model, UNAUTHENTICATED, PERMISSION_DENIED, ...) stops the feed:
# every other message would fail the same way. What was written stays; a rerun resumes.
MAX_ITEM_ATTEMPTS = 8
DEFAULT_STREAMS = 4


class FeedError(Exception):
    """The feed cannot go on (bad input file, fatal server answer, no progress)."""


@dataclass(frozen=True)
class FeedOptions:
    input: Path
    output: Path
    task: str = "embed"  # embed | classify
    servers: tuple[str, ...] = ("localhost:8001",)
    model: str = ""
    version: int = 0
    request: dict[str, Any] = field(default_factory=dict)  # pooling, normalize, top_k, ...
    batch_size: int = 32  # texts per stream message
    window: int = 4  # messages in flight per stream
    streams: int = 0  # 0: one per server address, at least DEFAULT_STREAMS
    rotate_after: int = 64  # messages per stream before it is reopened (rebalancing)
    id_field: str = "id"
    text_field: str = "text"
    give_up_s: float = 300.0  # no answer at all for this long: stop (a rerun resumes)
    progress: bool = True
    tls: TlsFiles | None = None  # None: plaintext
    server_name: str | None = None  # the name in the server's certificate, when not dialled
    token: str | None = None  # bearer token (server/security.py)

    def __post_init__(self) -> None:
        if self.task not in ("embed", "classify"):
            raise ValueError(f"task must be embed or classify, not {self.task!r}")
        for name in ("batch_size", "window", "rotate_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.streams < 0:
            raise ValueError("streams must be >= 0 (0: the default)")
        if self.give_up_s <= 0:
            raise ValueError("give_up_s must be > 0")


@dataclass
class FeedReport:
    items: int = 0  # ids in the input
    already_done: int = 0  # skipped: answered by an earlier run
    answered: int = 0  # lines written by this run
    errors: int = 0  # of which error lines
    stream_retries: int = 0  # streams reopened after a failure
    duplicates_dropped: int = 0  # answers that arrived for an id already written
    seconds: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


@dataclass
class _Item:
    key: str  # the id as canonical JSON: what exactly-once is about
    id: Any
    text: str
    attempts: int = 0
    solo: bool = False  # send alone: it was in a message that failed for one of its texts


def _id_key(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _records(options: FeedOptions) -> Iterator[_Item]:
    """The input's items, in file order; FeedError names the line of any bad one."""
    with options.input.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeedError(f"{options.input}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise FeedError(f"{options.input}:{number}: not a JSON object")
            item_id = record.get(options.id_field, number)
            if isinstance(item_id, (dict, list)) or item_id is None:
                raise FeedError(f"{options.input}:{number}: id must be a string or a number")
            text = record_text(record, (options.text_field,))
            if text is None:
                raise FeedError(f"{options.input}:{number}: no {options.text_field!r} string "
                                "(nor a title, with an optional body)")
            yield _Item(_id_key(item_id), item_id, text)


def _check_input(options: FeedOptions, done: set[str]) -> tuple[int, int]:
    """Read the whole input once before sending: every line valid, every id unique.
    Returns (items, items not yet answered)."""
    seen: dict[str, int] = {}
    for count, item in enumerate(_records(options), 1):
        if item.key in seen:
            raise FeedError(f"{options.input}: id {item.key} appears twice "
                            f"(items {seen[item.key]} and {count})")
        seen[item.key] = count
    return len(seen), len(seen.keys() - done)


def _resume(path: Path) -> set[str]:
    """Ids already answered in `path`. A last line cut off mid-write (no newline) is truncated
    away; blank lines are skipped; any other line that is not an answer stops the feed, so a
    damaged output is never silently half-redone."""
    done: set[str] = set()
    if not path.exists():
        return done
    end = 0
    with path.open("rb+") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                f.truncate(end)
                break
            end += len(raw)
            if not raw.strip():
                continue
            try:
                done.add(_id_key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                raise FeedError(f"{path}:{number}: not an answer line; fix or delete it, then "
                                "rerun") from None
    return done


class _Work:
    """What is left to send: items sent back for a retry first, then the input, read lazily.

    Every sender awaits `take`; the feed is over when the input is exhausted and nothing is
    waiting for a retry or in flight."""

    def __init__(self, items: Iterator[_Item], batch_size: int) -> None:
        self._items = items
        self._batch_size = batch_size
        self._exhausted = False
        self._retry: deque[_Item] = deque()
        self._in_flight = 0
        self._changed = asyncio.Condition()

    async def take(self) -> list[_Item] | None:
        async with self._changed:
            while True:
                batch = self._take_now()
                if batch:
                    self._in_flight += len(batch)
                    return batch
                if self._exhausted and not self._retry and self._in_flight == 0:
                    return None
                await self._changed.wait()

    def _take_now(self) -> list[_Item]:
        if self._retry:
            batch = [self._retry.popleft()]
            while (not batch[0].solo and self._retry and not self._retry[0].solo
                   and len(batch) < self._batch_size):
                batch.append(self._retry.popleft())
            return batch
        batch = []
        while not self._exhausted and len(batch) < self._batch_size:
            item = next(self._items, None)
            if item is None:
                self._exhausted = True
            else:
                batch.append(item)
        return batch

    async def settle(self, items: list[_Item], retry: bool = False) -> None:
        """`items` left flight: answered, or (retry) to be sent again."""
        async with self._changed:
            self._in_flight -= len(items)
            if retry:
                self._retry.extend(items)
            self._changed.notify_all()


class _Backoff:
    """Exponential backoff with full jitter, reset by any answer."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.first * 2 ** self.failures))


class _OneStream:
    """One opened stream: its call, its messages in flight, and the window that bounds them."""

    def __init__(self, call: Any, window: int) -> None:
        self.call = call
        self._slots = asyncio.Semaphore(window)
        self._in_flight: dict[str, list[_Item]] = {}

    async def send(self, work: _Work, build: Any, limit: int) -> bool:
        """Write up to `limit` messages, then half-close; True when the work is all done."""
        for sent in range(limit):
            await self._slots.acquire()
            batch = await work.take()
            if batch is None:
                await self.call.done_writing()
                return True
            self._in_flight[str(sent)] = batch
            await self.call.write(build(batch, str(sent)))
        await self.call.done_writing()
        return False

    def answered(self, request_id: str) -> list[_Item] | None:
        items = self._in_flight.pop(request_id, None)
        if items is not None:
            self._slots.release()
        return items

    def unanswered(self) -> list[list[_Item]]:
        items = list(self._in_flight.values())
        self._in_flight.clear()
        return items


class _Feed:
    def __init__(self, options: FeedOptions, out: TextIO, done: set[str],
                 report: FeedReport, bar: Any) -> None:
        self.options = options
        self.out = out
        self.done = done
        self.report = report
        self.bar = bar
        self.last_progress = time.monotonic()
        self.embed = options.task == "embed"
        self.kw = {"model": options.model, "version": options.version, **options.request}

    def _request(self, items: list[_Item], request_id: str) -> Any:
        texts = [item.text for item in items]
        if self.embed:
            return embed_request(texts, request_id=request_id, **self.kw)
        return classify_request(texts, request_id=request_id, **self.kw)

    def _write(self, item: _Item, line: dict[str, Any]) -> None:
        if item.key in self.done:  # answered before (an earlier stream or run): drop it
            self.report.duplicates_dropped += 1
            return
        self.done.add(item.key)
        self.out.write(json.dumps({"id": item.id, **line}, ensure_ascii=False) + "\n")
        self.report.answered += 1
        self.report.errors += "error" in line
        self.last_progress = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)

    def _answer(self, items: list[_Item], response: Any) -> None:
        if self.embed:
            vectors = parse_embed(response)
            for item, vector in zip(items, vectors, strict=True):
                self._write(item, {"embedding": vector.tolist(), "version": response.version})
        else:
            for item, labels in zip(items, parse_classify(response), strict=True):
                self._write(item, {"labels": [{"label": x.label, "index": x.index,
                                               "probability": x.probability} for x in labels],
                                   "version": response.version})
        self.out.flush()

    async def _lost(self, work: _Work, items: list[_Item]) -> None:
        """Items of a stream that failed before answering them: sent again, alone after two
        such failures (a text that brings a replica down must not take its neighbours with
        it), and given an error line when their attempts run out."""
        for item in items:
            item.attempts += 1
            item.solo = item.solo or item.attempts >= 2
        spent = [item for item in items if item.attempts >= MAX_ITEM_ATTEMPTS]
        for item in spent:
            self._write(item, {"error": {"code": "UNAVAILABLE", "message": (
                f"no answer after {item.attempts} streams failed while it was in flight")}})
        self.out.flush()
        await work.settle([item for item in items if item.attempts < MAX_ITEM_ATTEMPTS],
                          retry=True)
        await work.settle(spent)

    async def _failed(self, work: _Work, items: list[_Item], error: ClientError) -> bool:
        """One message came back with an error: retry (True: after a backoff), split, record,
        or stop the feed."""
        if error.code in SERVER_FAULTS and len(items) > 1:  # maybe one text's fault: split
            for item in items:
                item.solo = True
            await work.settle(items, retry=True)
            return True
        if error.code in RETRYABLE:
            for item in items:
                item.attempts += 1
            again = [item for item in items if item.attempts < MAX_ITEM_ATTEMPTS]
            spent = [item for item in items if item.attempts >= MAX_ITEM_ATTEMPTS]
            for item in spent:
                self._write(item, {"error": {"code": error.code.name, "message": error.message}})
            self.out.flush()
            await work.settle(again, retry=True)
            await work.settle(spent)
            return True
        if error.code in ITEM_ERRORS and len(items) > 1:
            for item in items:
                item.solo = True
            await work.settle(items, retry=True)
        elif error.code in ITEM_ERRORS:
            self._write(items[0], {"error": {"code": error.code.name, "message": error.message}})
            self.out.flush()
            await work.settle(items)
        else:
            raise FeedError(f"server refused the feed: {error}; rerun to resume")
        return False

    async def stream(self, stub: pb_grpc.BertServiceStub, work: _Work) -> None:
        """One stream at a time, reopened until the work is done."""
        method = stub.EmbedStream if self.embed else stub.ClassifyStream
        backoff = _Backoff()
        # The first stream is short: round_robin puts the first calls on whichever replica
        # connected first, and the next streams spread once they all have.
        limit = min(self.options.rotate_after, 2 * self.options.window)
        while True:
            call = method(wait_for_ready=True, metadata=call_metadata(self.options.token))
            one = _OneStream(call, self.options.window)
            sender = asyncio.create_task(one.send(work, self._request, limit))
            limit = self.options.rotate_after
            code = None
            try:
                while (response := await one.call.read()) is not grpc.aio.EOF:
                    items = one.answered(response.request_id)
                    if items is None:
                        continue  # not ours (cannot happen with a bertstream server)
                    backoff.reset()
                    if not response.HasField("error"):
                        self._answer(items, response)
                        await work.settle(items)
                    elif await self._failed(work, items, ClientError.from_proto(response.error)):
                        await asyncio.sleep(backoff.next())
                if not sender.done():  # the server ended the stream before we half-closed
                    raise asyncio.InvalidStateError
                finished = sender.result()
            except asyncio.InvalidStateError:  # written to a call that had just ended
                code = grpc.StatusCode.UNAVAILABLE
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code not in RETRYABLE:
                    raise FeedError(f"server refused the feed: {code.name}: {err.details()}; "
                                    "rerun to resume") from None
            finally:
                if not sender.done():
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
                one.call.cancel()
            unanswered = one.unanswered()
            for items in unanswered:  # the stream ended before answering them: send again
                await self._lost(work, items)
            if code is None and not unanswered:
                if finished:
                    return
                continue  # rotated: open the next stream at once
            self.report.stream_retries += 1
            await asyncio.sleep(backoff.next())

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.options.give_up_s / 4))
            idle = time.monotonic() - self.last_progress
            if idle > self.options.give_up_s:
                raise FeedError(f"no answer for {idle:.0f} s (servers down?); what was "
                                "answered is saved: rerun to resume")


def _progress_bar(options: FeedOptions, total: int, initial: int) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="item", desc=options.task,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


async def _run(options: FeedOptions, report: FeedReport, done: set[str]) -> None:
    items = (item for item in _records(options) if item.key not in done)
    # A DNS name may stand for many replicas: streams are what spreads a feed over them.
    streams = options.streams or max(len(split_servers(options.servers)), DEFAULT_STREAMS)
    bar = _progress_bar(options, report.items, report.already_done)
    credentials = options.tls.credentials() if options.tls else None
    channel = open_aio_channel(options.servers, credentials, options.server_name)
    try:
        with options.output.open("a", encoding="utf-8") as out:
            feed = _Feed(options, out, done, report, bar)
            work = _Work(items, options.batch_size)
            stub = pb_grpc.BertServiceStub(channel)
            workers = [asyncio.create_task(feed.stream(stub, work)) for _ in range(streams)]
            watchdog = asyncio.create_task(feed.watchdog())
            try:
                pending = set(workers)
                while pending:  # the first failure (a FeedError) stops everything
                    finished, pending = await asyncio.wait(
                        pending | {watchdog}, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        task.result()
                    pending.discard(watchdog)
            finally:
                for task in [*workers, watchdog]:
                    task.cancel()
                await asyncio.gather(*workers, watchdog, return_exceptions=True)
                out.flush()
                os.fsync(out.fileno())
    finally:
        if bar is not None:
            bar.close()
        await channel.close()


def run_feed(options: FeedOptions) -> FeedReport:
    """Run the feed to the end; FeedError when it cannot finish (a rerun resumes)."""
    if not options.input.is_file():
        raise FeedError(f"input {options.input} is not a file")
    done = _resume(options.output)
    items, remaining = _check_input(options, done)
    report = FeedReport(items=items, already_done=items - remaining)
    start = time.perf_counter()
    try:
        if remaining:  # nothing left: no server needed
            asyncio.run(_run(options, report, done))
    finally:
        report.seconds = time.perf_counter() - start
    return report
