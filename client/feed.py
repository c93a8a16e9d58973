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

This module is the run loop: `streams` workers, each running one WindowedStream (windowed.py)
at a time until the work queue (feed_work.py) is empty, and a watchdog. The input and resume
are feed_input.py's, the lines feed_output.py's, and what a failure turns into retry.py's.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

from .channels import call_metadata, open_aio_channel, split_servers
from .feed_input import Item, check_input, read_items, resume
from .feed_options import DEFAULT_STREAMS, FeedError, FeedOptions, FeedReport
from .feed_output import Output, progress_bar
from .feed_work import Work
from .messages import ClientError, classify_request, embed_request
from .retry import RETRYABLE, Failure, RetryPolicy, Step, Verdict, aged_out, decide, item_step
from .windowed import WindowedStream

__all__ = ["FeedError", "FeedOptions", "FeedReport", "run_feed"]


def _stalled(idle_s: float) -> str:
    return (f"no answer for {idle_s:.0f} s (servers down?); what was answered is saved: "
            "rerun to resume")


class _Feed:
    """What every stream of one feed shares: the queue, the output and the retry policy."""

    def __init__(self, options: FeedOptions, output: Output, work: Work,
                 report: FeedReport) -> None:
        self.options = options
        self.output = output
        self.work = work
        self.report = report
        self.policy = RetryPolicy(give_up_s=options.give_up_s)
        self.embed = options.task == "embed"
        self.kw = {"model": options.model, "version": options.version, **options.request}

    async def stream(self, stub: pb_grpc.BertServiceStub) -> None:
        """One stream at a time, reopened until the work is done."""
        method = stub.EmbedStream if self.embed else stub.ClassifyStream
        failed = 0  # streams in a row that failed before answering anything
        # The first stream is short: round_robin puts the first calls on whichever replica
        # connected first, and the next streams spread once they all have.
        limit = min(self.options.rotate_after, 2 * self.options.window)
        while True:
            ran_out = asyncio.Event()
            call = method(wait_for_ready=True, metadata=call_metadata(self.options.token))
            stream = WindowedStream(call, self._requests(limit, ran_out), self.options.window)
            limit = self.options.rotate_after
            established = False
            try:
                async with stream:
                    async for items, response in stream:
                        established = True
                        await self._answered(items, response)
            except ClientError as error:
                # The server ageing the connection out of a stream that was answering is no
                # failure: no backoff, the streak of failed streams and the texts' attempts
                # stay as they were (retry.py). One that answered nothing in the connection's
                # life counts as failed: its messages are more than the server does in that
                # time, and the attempts that send lost texts alone are what gets them through.
                aged = established and aged_out(error.code, error.message)
                if not aged:
                    failed = 0 if established else failed + 1
                failure = Failure(error.code, established, failed, self.output.idle_s(), aged)
                await self._broken(stream.unanswered(), error, failure)
                continue
            if ran_out.is_set():
                return
            # Rotated after `limit` messages: open the next stream at once.

    async def _requests(self, limit: int,
                        ran_out: asyncio.Event) -> AsyncIterator[tuple[list[Item], Any]]:
        """Up to `limit` messages for one stream, taken as its window allows."""
        build = embed_request if self.embed else classify_request
        for sent in range(limit):
            items = await self.work.take()
            if items is None:
                ran_out.set()
                return
            yield items, build([item.text for item in items], request_id=str(sent), **self.kw)

    async def _answered(self, items: list[Item], response: Any) -> None:
        if not response.HasField("error"):
            self.output.answers(items, response)
            await self.work.settle(items)
            return
        error = ClientError.from_proto(response.error)
        if await self._failed(items, error):
            # The backoff grows with the texts' failed attempts: a server that refuses for a
            # while (an engine process restarting, a full queue) is waited out, not spent on
            # in a burst of attempts.
            attempts = max(item.attempts for item in items)
            await asyncio.sleep(self._backoff(
                Failure(error.code, attempts <= 1, attempts, self.output.idle_s()), error))

    async def _failed(self, items: list[Item], error: ClientError) -> bool:
        """One message came back with an error: its texts are retried, split or answered, or
        the feed stops (retry.item_step). True when a backoff should follow."""
        await self._settle_failed(items, error, lost=False)
        return error.code in RETRYABLE

    async def _broken(self, lost: list[list[Item]], error: ClientError,
                      failure: Failure) -> None:
        """The stream failed: the messages it had not answered go back to the queue, and the
        next stream opens after a backoff (or the feed stops: retry.decide)."""
        delay = self._backoff(failure, error)
        for items in lost:
            await self._settle_failed(items, error, lost=True, aged=failure.aged)
        self.report.stream_retries += 1
        if delay > 0:
            await asyncio.sleep(delay)

    def _backoff(self, failure: Failure, error: ClientError) -> float:
        decision = decide(failure, self.policy, random.random())
        if decision.verdict is Verdict.REFUSED:
            raise FeedError(f"server refused the feed: {error}; rerun to resume")
        if decision.verdict is Verdict.STALLED:
            raise FeedError(_stalled(failure.idle_s))
        return decision.delay_s

    async def _settle_failed(self, items: list[Item], error: ClientError, lost: bool,
                             aged: bool = False) -> None:
        """The one place failed texts are counted: each goes back to the queue (alone, when
        it may be the text at fault) or, its attempts spent, gets an error line."""
        steps = [item_step(error.code, lost=lost, texts=len(items), attempts=item.attempts,
                           policy=self.policy, aged=aged) for item in items]
        if any(step.step is Step.STOP for step in steps):
            raise FeedError(f"server refused the feed: {error}; rerun to resume")
        again: list[Item] = []
        spent: list[Item] = []
        for item, step in zip(items, steps, strict=True):
            item.attempts = step.attempts
            if step.step is Step.ANSWER:
                spent.append(item)
                if lost:
                    self.output.error(item, "UNAVAILABLE", f"no answer after {item.attempts} "
                                      "streams failed while it was in flight")
                else:
                    self.output.error(item, error.code.name, error.message)
            else:
                item.solo = item.solo or step.step is Step.ALONE
                again.append(item)
        self.output.flush()
        await self.work.settle(again, retry=True)
        await self.work.settle(spent)

    async def watchdog(self) -> None:
        """Stops a feed that waits without failing: wait_for_ready on servers that never
        come, or streams that hang."""
        while True:
            await asyncio.sleep(min(1.0, self.options.give_up_s / 4))
            idle = self.output.idle_s()
            if idle > self.options.give_up_s:
                raise FeedError(_stalled(idle))


async def _run(options: FeedOptions, report: FeedReport, done: set[str]) -> None:
    items = (item for item in read_items(options) if item.key not in done)
    # A DNS name may stand for many replicas: streams are what spreads a feed over them.
    streams = options.streams or max(len(split_servers(options.servers)), DEFAULT_STREAMS)
    bar = progress_bar(options, report.items, report.already_done)
    credentials = options.tls.credentials() if options.tls else None
    channel = open_aio_channel(options.servers, credentials, options.server_name)
    try:
        with options.output.open("a", encoding="utf-8") as out:
            output = Output(out, options.task == "embed", done, report, bar)
            feed = _Feed(options, output, Work(items, options.batch_size), report)
            stub = pb_grpc.BertServiceStub(channel)
            workers = [asyncio.create_task(feed.stream(stub)) for _ in range(streams)]
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
    done = resume(options.output)
    items, remaining = check_input(options, done)
    report = FeedReport(items=items, already_done=items - remaining)
    start = time.perf_counter()
    try:
        if remaining:  # nothing left: no server needed
            asyncio.run(_run(options, report, done))
    finally:
        report.seconds = time.perf_counter() - start
    return report
