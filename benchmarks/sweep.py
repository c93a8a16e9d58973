"""Throughput and latency against texts per request and against concurrency: the curves
bert-as-service drew for its own server, for `make report`'s picture.

    .venv/bin/python benchmarks/sweep.py --model-repository model_repository --model news-zh

One server (bench.py's flags: one process, onnxruntime unless --cpu-engine), warmed up; then
unary `Embed` calls of news texts (bench.py's `news_texts`, `truncate`) from `concurrency`
client threads, each waiting for its answer before sending the next, for `--seconds` per
point: (1) texts per request 1, 2, 4 ... 32 at `--concurrency` callers; (2) concurrency 1,
2, 4 ... 16 callers at `--per-request` texts. Per point: texts/s, the call latency p50 / p99
as a caller sees it, and the calls refused RESOURCE_EXHAUSTED (more queued work than the
server admits: the caller waits REFUSED_BACKOFF_S and sends again, as a client honouring
Retry-After would; refused calls are not in the latency).
Writes `results/YYYYMMDD-HHMMSS-cpuN-MODEL-sweep.json`.

The callers are threads of this process: on a small machine they share its cores with the
server, as bench.py's feed processes do; read the shape of the curves, not one point.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench import RESULTS, device_name, news_texts
from bertstream.v1 import bertstream_pb2 as pb
from bertstream.v1 import bertstream_pb2_grpc as pb_grpc
from server_process import ServerProcess

TEXTS_PER_REQUEST = (1, 2, 4, 8, 16, 32)
CONCURRENCY = (1, 2, 4, 8, 16)
REFUSED_BACKOFF_S = 0.2


def point(address: str, model: str, texts: list[str], per_request: int, concurrency: int,
          seconds: float) -> dict[str, float | None]:
    """`concurrency` callers, one call in flight each, for `seconds`: texts/s and latency."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    answered, refused = [0] * concurrency, [0] * concurrency
    failures: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)
    deadline = 0.0

    def caller(index: int) -> None:
        try:
            calls(index)
        except BaseException as exc:  # re-raised by the main thread
            failures.append(exc)

    def calls(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.BertServiceStub(channel)
            offset = index * 997  # callers send different texts
            start.wait()
            while time.perf_counter() < deadline:
                batch = [texts[(offset + i) % len(texts)] for i in range(per_request)]
                offset += per_request
                sent = time.perf_counter()
                try:
                    stub.Embed(pb.EmbedRequest(model=model, texts=batch, raw_values=True,
                                               truncate=True), timeout=600)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refused[index] += 1  # more queued work than the server admits: back off
                    time.sleep(REFUSED_BACKOFF_S)
                    continue
                latencies[index].append(time.perf_counter() - sent)
                answered[index] += per_request

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    elapsed = time.perf_counter() - began  # until the last call in flight came back
    times = np.concatenate([np.asarray(t) for t in latencies]) * 1000
    return {"texts_per_request": per_request, "concurrency": concurrency,
            "texts_per_s": round(sum(answered) / elapsed, 3), "calls": int(times.size),
            "refused": sum(refused),
            "p50_ms": round(float(np.percentile(times, 50)), 3) if times.size else None,
            "p99_ms": round(float(np.percentile(times, 99)), 3) if times.size else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--seconds", type=float, default=6.0, help="per point")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="callers while texts per request vary")
    parser.add_argument("--per-request", type=int, default=8,
                        help="texts per request while concurrency varies")
    parser.add_argument("--cpu-engine", choices=["onnxruntime", "openvino", "auto"],
                        default="onnxruntime")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--fake-device", default="", metavar="SPEC")
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    args = parser.parse_args(argv)

    texts = news_texts(2048)
    flags = ["--default-model", args.model, "--device", args.device, "--log-level", "WARNING",
             "--frontends", "1", "--cpu-engine", args.cpu_engine]
    if args.fake_device:
        flags += ["--fake-device", args.fake_device]
    server = ServerProcess(args.model_repository, flags, "sweep")
    try:
        point(server.address, args.model, texts, 8, 2, 2.0)  # warm-up
        by_size, by_callers = [], []
        for size in TEXTS_PER_REQUEST:
            by_size.append(point(server.address, args.model, texts, size, args.concurrency,
                                 args.seconds))
            print(by_size[-1], flush=True)
        for callers in CONCURRENCY:
            by_callers.append(point(server.address, args.model, texts, args.per_request,
                                    callers, args.seconds))
            print(by_callers[-1], flush=True)
    finally:
        server.stop()
    cores = os.cpu_count()
    record: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"fake: {args.fake_device}" if args.fake_device else device_name(args.device),
        "cpu_count": cores, "model": args.model, "server_flags": flags,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "sweep": {"texts_per_request": by_size, "concurrency": by_callers},
    }
    output = args.output or RESULTS / (f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-cpu{cores}-"
                                       f"{args.model}-sweep.json")
    output.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
