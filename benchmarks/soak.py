"""Soak: many requests of mixed sizes against one server; does anything grow?

    .venv/bin/python benchmarks/soak.py                      # 200,000 requests (make soak)
    .venv/bin/python benchmarks/soak.py --requests 20000     # a quick look

A bertstream-server process on loopback gets `--requests` calls from load processes
(`--processes`, each with `--concurrency` calls in flight): unary Embed and Classify of 1 to 16
texts of 4 to 48 characters, and EmbedStream calls of a few messages, in a fixed random mix.
Once a second the server's resident memory, thread count and open files are read from /proc
(summed over its child processes with --frontends N).

The run is cut into four quarters by time. It passes when the median RSS of the last quarter is
within 5 % of the first's, threads and open files do not grow, p99 latency of the last quarter
is within 1.5x of the first's, and every call was answered correctly. Prints a table, writes JSON to
benchmarks/results/, exits 1 on a failed check. Bounded: `--max-seconds` stops the load early
(and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from server_process import ServerProcess, tree_pids

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Frequent CJK ideographs (the first block of U+4E00) and full-width punctuation.
CHARS = [chr(c) for c in range(0x4E00, 0x5200)] + list("，。！？、；：")


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(4, 48)))


def _load(address: str, model: str, labels_model: str, count: int, concurrency: int,
          seed: int, deadline: float, out: Any) -> None:
    """One load process: `count` calls, `concurrency` at a time; sends back (end time,
    latency, ok) per call."""
    import grpc
    from bertstream.v1 import bertstream_pb2 as pb
    from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

    async def main() -> list[tuple[float, float, bool]]:
        rng = random.Random(seed)
        done: list[tuple[float, float, bool]] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            left = count

            async def one_call() -> None:
                kind = rng.random()
                texts = [_text(rng) for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 4, 8, 16)))]
                start = time.perf_counter()
                ok = True
                try:
                    if kind < 0.6:
                        await stub.Embed(pb.EmbedRequest(model=model, texts=texts,
                                                         truncate=True, raw_values=True),
                                         timeout=60)
                    elif kind < 0.9:
                        await stub.Classify(pb.ClassifyRequest(model=labels_model, texts=texts,
                                                               truncate=True), timeout=60)
                    else:
                        requests = [pb.EmbedRequest(model=model, texts=texts[:4], truncate=True,
                                                    request_id=str(i)) for i in range(3)]
                        answers = [r async for r in stub.EmbedStream(iter(requests),
                                                                     timeout=60)]
                        ok = len(answers) == 3 and not any(a.HasField("error") for a in answers)
                except grpc.aio.AioRpcError:
                    ok = False
                end = time.perf_counter()
                done.append((time.time(), end - start, ok))

            async def worker() -> None:
                nonlocal left
                while left > 0 and time.time() < deadline:
                    left -= 1
                    await one_call()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done

    out.put(asyncio.run(main()))


def _proc_stats(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, threads, open files) of a live server, from /proc: the process and its
    children together (`--frontends N`: the supervisor, the engine and every front end)."""
    rss, threads, files = 0.0, 0, 0
    for each in tree_pids(pid):
        fields = {}
        try:
            with open(f"/proc/{each}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    fields[key] = value.split()
            files += len(os.listdir(f"/proc/{each}/fd"))
        except OSError:  # a child that just ended
            continue
        rss += int(fields.get("VmRSS", ["0"])[0]) / 1024
        threads += int(fields["Threads"][0])
    return rss, threads, files


def _ensure_repository(repository: Path, model: str, labels_model: str) -> None:
    """Tiny random models (2 layers, hidden 64, 64 tokens) unless the repository has them."""
    export = [sys.executable, "-m", "bertstream.export.cli", "--source", "random",
              "--model-repository", str(repository), "--num-layers", "2", "--hidden-size",
              "64", "--num-heads", "4", "--intermediate-size", "128",
              "--max-sequence-length", "64"]
    if not (repository / model).is_dir():
        subprocess.run([*export, "--model", model], check=True)
    if not (repository / labels_model).is_dir():
        subprocess.run([*export, "--model", labels_model, "--labels",
                        "positive,neutral,negative"], check=True)


def _quarters(times: np.ndarray, start: float, end: float) -> list[np.ndarray]:
    edges = np.linspace(start, end, 5)
    return [(times >= lo) & (times <= hi) for lo, hi in itertools.pairwise(edges)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--processes", type=int, default=2, help="load processes")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight per process")
    p.add_argument("--model-repository", type=Path, default=ROOT / "build" / "soak-repository")
    p.add_argument("--model", default="soak-embed")
    p.add_argument("--classify-model", default="soak-news")
    p.add_argument("--max-seconds", type=float, default=1800)
    p.add_argument("--server-flag", action="append", default=[],
                   help="extra flag for bertstream-server (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    a = p.parse_args(argv)

    _ensure_repository(a.model_repository, a.model, a.classify_model)
    server = ServerProcess(a.model_repository, a.server_flag, "soak")
    pid = server.proc.pid
    samples: list[tuple[float, float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.time(), *_proc_stats(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.time()
    deadline = start + a.max_seconds
    queue: Any = multiprocessing.get_context("spawn").Queue()
    per = [a.requests // a.processes + (i < a.requests % a.processes) for i in range(a.processes)]
    loaders = [multiprocessing.get_context("spawn").Process(
        target=_load, args=(server.address, a.model, a.classify_model, n, a.concurrency, i,
                            deadline, queue)) for i, n in enumerate(per)]
    sampler.start()
    for loader in loaders:
        loader.start()
    calls = [call for _ in loaders for call in queue.get()]
    for loader in loaders:
        loader.join()
    end = time.time()
    stop.set()
    sampler.join()
    exit_code = server.stop()

    ends = np.array([c[0] for c in calls])
    latency = np.array([c[1] for c in calls]) * 1000
    failed = int(sum(not c[2] for c in calls))
    rows = []
    stats = np.array([s[1:] for s in samples])
    sample_times = np.array([s[0] for s in samples])
    for q, (calls_in, samples_in) in enumerate(zip(_quarters(ends, start, end),
                                                   _quarters(sample_times, start, end),
                                                   strict=True), 1):
        rows.append({
            "quarter": q, "calls": int(calls_in.sum()),
            "p50_ms": float(np.percentile(latency[calls_in], 50)),
            "p99_ms": float(np.percentile(latency[calls_in], 99)),
            "rss_mib": float(np.median(stats[samples_in, 0])),
            "threads": int(stats[samples_in, 1].max()),
            "open_files": int(stats[samples_in, 2].max()),
        })
    first, last = rows[0], rows[-1]
    checks = {
        "every call answered correctly": failed == 0,
        "rss last quarter within 5% of first": last["rss_mib"] <= first["rss_mib"] * 1.05,
        "threads do not grow": last["threads"] <= first["threads"],
        "open files do not grow": last["open_files"] <= first["open_files"],
        "p99 last quarter within 1.5x of first": last["p99_ms"] <= first["p99_ms"] * 1.5,
        "server exited 0 on SIGTERM": exit_code == 0,
    }
    print(f"{len(calls)} calls ({failed} failed) in {end - start:.0f} s, "
          f"{len(calls) / (end - start):.0f} calls/s; {os.cpu_count()} CPUs")
    if len(calls) < a.requests:
        print(f"stopped early at --max-seconds {a.max_seconds:.0f}: {len(calls)} of "
              f"{a.requests} requests")
    print(f"{'quarter':>7} {'calls':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS MiB':>8} "
          f"{'threads':>7} {'files':>6}")
    for r in rows:
        print(f"{r['quarter']:>7} {r['calls']:>7} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['rss_mib']:>8.1f} {r['threads']:>7} {r['open_files']:>6}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    record = {
        "benchmark": "soak", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "cpus": os.cpu_count(), "requests": a.requests,
        "answered": len(calls), "failed": failed, "seconds": end - start,
        "processes": a.processes, "concurrency": a.concurrency, "quarters": rows,
        "checks": checks, "stopped_early": len(calls) < a.requests,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = a.out or RESULTS / f"soak-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
