"""Interactive calls beside bulk feeds: what one short call waits while feeds fill the server.

    .venv/bin/python benchmarks/mixed.py --model-repository model_repository --model news-zh

One server process (ServerProcess), three phases, in this order:
  1. interactive alone: one caller sends ONE short text with unary Embed every
     --interactive-interval seconds for --interactive-seconds (never starting a call before
     the previous one returned, so each latency is the server's); p50, p99, max;
  2. feeds alone: --mixed-feeds bulk feeds, each one EmbedStream (in its own process, on its
     own connection) of --mixed-texts news texts, --per-message texts a message,
     --mixed-window messages in flight, truncate=True (what `bertstream-client embed --input
     news.jsonl --truncate` sends); each feed's texts/s and elapsed seconds;
  3. mixed: the same feeds again with the interactive caller running from their start to the
     last feed's end; interactive p50 / p99 / max under load, each feed's texts/s, and the
     ratios: feed throughput mixed / alone, interactive p99 mixed - alone, and (2+ feeds)
     the slowest feed's elapsed / the fastest's.
--interactive-priority / --feed-priority set EmbedRequest.priority (1 the highest) when not 0;
at 0 the field is left unset, so the script also runs against builds whose protos lack it.
bench.py --mixed runs the same phases on its own server after its other phases.
Prints a table and writes JSON to benchmarks/results/ (YYYYMMDD-HHMMSS-cpuN-MODEL-mixed.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from bench import (
    RESULTS,
    batch_counters,
    batch_figures,
    device_name,
    news_texts,
    open_channel,
    percentile,
)
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from placement import Placement
from server_process import ServerProcess

# Not a news text: the interactive caller's text is never one the feeds send.
INTERACTIVE_TEXT = "今天天气不错，下午去公园散步吧"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The mixed phase's own flags (bench.py --mixed takes them too)."""
    group = parser.add_argument_group("mixed load (interactive calls beside bulk feeds)")
    group.add_argument("--interactive-interval", type=float, default=0.25,
                       help="seconds from one interactive call's start to the next's (a call "
                       "that takes longer is followed at once)")
    group.add_argument("--interactive-seconds", type=float, default=15.0,
                       help="how long the interactive caller runs alone")
    group.add_argument("--mixed-feeds", type=int, default=1, help="concurrent bulk feeds")
    group.add_argument("--mixed-texts", type=int, default=1200, help="news texts per feed")
    group.add_argument("--mixed-window", type=int, default=4,
                       help="stream messages in flight per feed")
    group.add_argument("--interactive-priority", type=int, default=0,
                       help="EmbedRequest.priority of interactive calls (0: unset)")
    group.add_argument("--feed-priority", type=int, default=0,
                       help="EmbedRequest.priority of feed messages (0: unset)")


def _priority(level: int) -> dict[str, int]:
    """The request keyword for a priority flag: none at 0 (older protos have no field)."""
    return {"priority": level} if level else {}


def _feed(address: str, model: str, texts: list[str], setting: tuple[int, int, int],
          place: tuple[int | None, list[int]], barrier: Any, results: Any, index: int,
          finished: Any) -> None:
    """One bulk feed, in its own process on its own connection: an EmbedStream with at most
    `window` messages in flight. Writes its start, end (time.monotonic, one clock for every
    process here), failed messages and whether its connection landed where it was put, then
    counts itself in `finished` (the interactive caller stops when every feed has)."""
    per_message, window, priority = setting
    channel, landed = open_channel(address, *place)
    slots = threading.Semaphore(window)

    def requests() -> Iterator[pb.EmbedRequest]:
        for i in range(0, len(texts), per_message):
            slots.acquire()  # gRPC reads this iterator on its own thread: blocking is fine
            yield pb.EmbedRequest(request_id=str(i), model=model, texts=texts[i:i + per_message],
                                  raw_values=True, truncate=True, **_priority(priority))

    with channel:
        stub = pb_grpc.BertServiceStub(channel)
        failed = 0
        barrier.wait()
        start = time.monotonic()
        for response in stub.EmbedStream(requests(), timeout=3600):
            slots.release()
            failed += response.HasField("error")
        end = time.monotonic()
        results[4 * index:4 * index + 4] = [start, end, failed, float(landed)]
        with finished.get_lock():
            finished.value += 1


class Interactive:
    """The interactive caller: one short text, unary Embed, one call at a time."""

    def __init__(self, address: str, model: str, interval: float, priority: int,
                 place: tuple[int | None, list[int]]) -> None:
        self.channel, _ = open_channel(address, *place)
        self.stub = pb_grpc.BertServiceStub(self.channel)
        self.interval = interval
        self.request = pb.EmbedRequest(model=model, texts=[INTERACTIVE_TEXT], raw_values=True,
                                       **_priority(priority))

    def run(self, stop: Callable[[], bool]) -> tuple[list[float], int]:
        """Calls every `interval` seconds until `stop()`; the latencies in seconds and how
        many calls failed."""
        latencies: list[float] = []
        self.server_s: list[tuple[float, float]] = []  # per call: (total, queue) in the server
        failed = 0
        next_at = time.monotonic()
        while not stop():
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.05))
                continue
            start = time.monotonic()
            try:
                timings = self.stub.Embed(self.request, timeout=600).timings
                latencies.append(time.monotonic() - start)
                self.server_s.append((timings.total_us / 1e6, timings.queue_us / 1e6))
            except grpc.RpcError as error:
                failed += 1
                print(f"mixed: interactive call failed: {error.code()}", file=sys.stderr)
            next_at = start + self.interval
        return latencies, failed

    def close(self) -> None:
        self.channel.close()


def run_feeds(address: str, model: str, feeds: list[list[str]], args: argparse.Namespace,
              placement: Placement, interactive: Interactive | None = None
              ) -> dict[str, Any]:
    """The feeds, started together; with `interactive`, its calls run until the last ends."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(feeds) + 1), context.Array("d", 4 * len(feeds))
    finished = context.Value("i", 0)
    setting = (args.per_message, args.mixed_window, args.feed_priority)
    workers = [context.Process(target=_feed, args=(
        address, model, texts, setting, (placement.target(i), placement.pids), barrier,
        results, i, finished)) for i, texts in enumerate(feeds)]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=600)  # every feed connected: go
    go = time.monotonic()
    calls: tuple[list[float], int] = ([], 0)
    if interactive is not None:
        calls = interactive.run(lambda: finished.value >= len(feeds)
                                or not any(w.is_alive() for w in workers))
    for worker in workers:
        worker.join()
    if any(worker.exitcode for worker in workers):
        sys.exit("mixed: a feed died")
    rows = [results[4 * i:4 * i + 4] for i in range(len(feeds))]
    if any(row[2] for row in rows):
        sys.exit(f"mixed: {sum(row[2] for row in rows):.0f} feed messages failed")
    placement.missed += sum(placement.target(i) is not None and not row[3]
                            for i, row in enumerate(rows))
    elapsed = [end - start for start, end, _, _ in rows]
    return {"go": go, "end": max(row[1] for row in rows), "elapsed_s": elapsed,
            "texts_per_s": [len(t) / e for t, e in zip(feeds, elapsed, strict=True)],
            "latencies": calls[0], "failed": calls[1]}


def _latency_figures(latencies: list[float], failed: int, prefix: str) -> dict[str, float]:
    if not latencies:
        sys.exit(f"mixed: no interactive call answered in the {prefix} phase")
    return {f"{prefix}_p50_ms": percentile(latencies, 50) * 1e3,
            f"{prefix}_p99_ms": percentile(latencies, 99) * 1e3,
            f"{prefix}_max_ms": max(latencies) * 1e3,
            f"{prefix}_calls": len(latencies), f"{prefix}_failed": failed}


def _server_figures(server_s: list[tuple[float, float]], prefix: str) -> dict[str, float]:
    """What the server says the interactive calls spent inside it (EmbedResponse.timings):
    the rest of their latency is the client, the network stack and the CPU queue."""
    totals, queues = [t for t, _ in server_s], [q for _, q in server_s]
    return {f"{prefix}_server_total_p50_ms": percentile(totals, 50) * 1e3,
            f"{prefix}_server_total_p99_ms": percentile(totals, 99) * 1e3,
            f"{prefix}_server_queue_p50_ms": percentile(queues, 50) * 1e3,
            f"{prefix}_server_queue_p99_ms": percentile(queues, 99) * 1e3}


def _feed_figures(phase: dict[str, Any], texts: int, prefix: str) -> dict[str, float]:
    elapsed, speeds = phase["elapsed_s"], phase["texts_per_s"]
    figures = {f"{prefix}_texts_per_s": texts / (phase["end"] - phase["go"]),
               f"{prefix}_slowest_elapsed_s": max(elapsed)}
    for i, (seconds, speed) in enumerate(zip(elapsed, speeds, strict=True)):
        figures[f"{prefix}_{i}_texts_per_s"] = speed
        figures[f"{prefix}_{i}_elapsed_s"] = seconds
    if len(elapsed) > 1:
        figures[f"{prefix}_slowest_vs_fastest"] = max(elapsed) / min(elapsed)
    return figures


def measure(server: ServerProcess, placement: Placement, model: str,
            args: argparse.Namespace) -> dict[str, float]:
    """The three phases on a running server (warmed here); their figures."""
    count = args.mixed_feeds
    texts = news_texts(args.mixed_texts * count)
    feeds = [texts[i * args.mixed_texts:(i + 1) * args.mixed_texts] for i in range(count)]
    interactive = Interactive(server.address, model, args.interactive_interval,
                              args.interactive_priority,
                              (placement.target(count), placement.pids))
    try:
        # Warm: every front end's stream path, and the interactive text's shape.
        warm = args.per_message * args.mixed_window * 2
        run_feeds(server.address, model, [texts[:warm]] * max(count, len(placement.pids)),
                  args, placement)
        for _ in range(3):
            interactive.stub.Embed(interactive.request, timeout=600)
        figures: dict[str, float] = {}

        def counted(phase: Callable[[], dict[str, Any]], prefix: str) -> dict[str, Any]:
            before, start = batch_counters(server.metrics_url), time.monotonic()
            result = phase()
            figures.update(batch_figures(before, batch_counters(server.metrics_url),
                                         time.monotonic() - start, f"{prefix}_server"))
            return result

        deadline = time.monotonic() + args.interactive_seconds
        alone = counted(lambda: dict(zip(("latencies", "failed"), interactive.run(
            lambda: time.monotonic() >= deadline), strict=True)), "interactive_alone")
        figures.update(_latency_figures(alone["latencies"], alone["failed"],
                                        "interactive_alone"))
        figures.update(_server_figures(interactive.server_s, "interactive_alone"))
        feeds_alone = counted(lambda: run_feeds(server.address, model, feeds, args, placement),
                              "feeds_alone")
        figures.update(_feed_figures(feeds_alone, len(texts), "feeds_alone"))
        mixed = counted(lambda: run_feeds(server.address, model, feeds, args, placement,
                                          interactive), "mixed")
        figures.update(_latency_figures(mixed["latencies"], mixed["failed"],
                                        "interactive_mixed"))
        figures.update(_server_figures(interactive.server_s, "interactive_mixed"))
        figures.update(_feed_figures(mixed, len(texts), "feeds_mixed"))
    finally:
        interactive.close()
    figures["feed_throughput_mixed_vs_alone"] = (figures["feeds_mixed_texts_per_s"]
                                                 / figures["feeds_alone_texts_per_s"])
    figures["interactive_p99_added_ms"] = (figures["interactive_mixed_p99_ms"]
                                           - figures["interactive_alone_p99_ms"])
    figures["interactive_p50_added_ms"] = (figures["interactive_mixed_p50_ms"]
                                           - figures["interactive_alone_p50_ms"])
    return figures


def table(figures: dict[str, float], feeds: int) -> str:
    """The phases side by side: interactive latency and feed throughput, then the ratios."""
    def latency(prefix: str) -> str:
        return (f"{figures[prefix + '_p50_ms']:>10.1f}{figures[prefix + '_p99_ms']:>10.1f}"
                f"{figures[prefix + '_max_ms']:>10.1f}{figures[prefix + '_calls']:>7.0f}")

    def feed(prefix: str) -> str:
        each = ", ".join(f"{figures[f'{prefix}_{i}_texts_per_s']:.1f}/"
                         f"{figures[f'{prefix}_{i}_elapsed_s']:.2f} s" for i in range(feeds))
        return f"{figures[prefix + '_texts_per_s']:>10.1f}   {each}"

    head = (f"{'phase':<20}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'calls':>7}"
            f"{'texts/s':>10}   each feed (texts/s / elapsed)")
    blank = " " * 37
    lines = [head, f"{'interactive alone':<20}{latency('interactive_alone')}",
             f"{'feeds alone':<20}{blank}{feed('feeds_alone')}",
             f"{'mixed':<20}{latency('interactive_mixed')}{feed('feeds_mixed')}",
             f"feed throughput mixed / alone {figures['feed_throughput_mixed_vs_alone']:.3f}; "
             f"interactive p99 mixed - alone {figures['interactive_p99_added_ms']:.1f} ms"]
    lines.append("inside the server, interactive p50 / p99 ms: total " + ", ".join(
        f"{phase} {figures[f'interactive_{phase}_server_total_p50_ms']:.1f} / "
        f"{figures[f'interactive_{phase}_server_total_p99_ms']:.1f} (queue "
        f"{figures[f'interactive_{phase}_server_queue_p50_ms']:.1f} / "
        f"{figures[f'interactive_{phase}_server_queue_p99_ms']:.1f})"
        for phase in ("alone", "mixed")))
    if feeds > 1:
        lines[-2] += (f"; slowest / fastest feed elapsed: alone "
                      f"{figures['feeds_alone_slowest_vs_fastest']:.2f}, mixed "
                      f"{figures['feeds_mixed_slowest_vs_fastest']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--per-message", type=int, default=8, help="texts per stream message")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--cpu-engine", choices=["onnxruntime", "openvino", "auto"],
                        default="onnxruntime",
                        help="the server's CPU engine (default onnxruntime: the engine of the "
                        "results recorded so far)")
    parser.add_argument("--fake-device", default="", metavar="SPEC",
                        help="time batches with a fake device profile "
                        "(server/engine/backends/fake.py)")
    parser.add_argument("--frontends", type=int, default=1,
                        help="the server's front-end processes (1: one process)")
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if min(args.frontends, args.mixed_feeds, args.mixed_texts, args.per_message,
           args.mixed_window) < 1:
        parser.error("--frontends, --mixed-feeds, --mixed-texts, --per-message and "
                     "--mixed-window must be >= 1")

    flags = ["--default-model", args.model, "--device", args.device, "--log-level", "WARNING",
             "--frontends", str(args.frontends), "--cpu-engine", args.cpu_engine]
    if args.threads:
        flags += ["--intra-op-threads", str(args.threads)]
    if args.fake_device:
        flags += ["--fake-device", args.fake_device]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    print(f"{args.model}: {args.mixed_feeds} feeds x {args.mixed_texts} texts, "
          f"{args.per_message} a message, {args.mixed_window} in flight; interactive every "
          f"{args.interactive_interval} s{', ' + args.fake_device if args.fake_device else ''}",
          flush=True)
    server = ServerProcess(args.model_repository, flags, "mixed")
    try:
        processes = server.processes()
        placement = Placement({pid: name for pid, name in processes.items()
                               if name.startswith("frontend-")}, even=True)
        version = _served_version(server.address, args.model)
        figures = measure(server, placement, args.model, args)
        if server.processes() != processes:
            sys.exit("mixed: a server process was restarted during the run:\n"
                     + "".join(server.lines[-30:]))
    finally:
        server.stop()
    version_dir = args.model_repository / args.model / str(version)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"fake: {args.fake_device}" if args.fake_device else device_name(args.device),
        "cpu_count": cores, "model": args.model, "version": version,
        "export": _export_source(version_dir),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_flags": flags, "interactive_text": INTERACTIVE_TEXT,
        "placement": "even" if not placement.missed
        else f"even ({placement.missed} connections missed)",
        "figures": {k: round(v, 3) for k, v in figures.items()},
    }
    print(table(figures, args.mixed_feeds))
    tag = f"-{args.tag}" if args.tag else ""
    output = args.output or RESULTS / (f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-cpu{cores}-"
                                       f"{args.model}-mixed{tag}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


def _served_version(address: str, model: str) -> int:
    with grpc.insecure_channel(address) as channel:
        found = pb_grpc.BertServiceStub(channel).GetModel(pb.GetModelRequest(model=model),
                                                          timeout=30)
    return int(found.version)


def _export_source(version_dir: Path) -> Any:
    from bertstream.server.version_format import EXPORT_RECORD, RECORD_SOURCE
    try:
        return json.loads((version_dir / EXPORT_RECORD).read_text("utf-8")).get(RECORD_SOURCE)
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
