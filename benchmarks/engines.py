"""CPU engines side by side on one model: raw onnxruntime and OpenVINO (f32, bf16) on the same
length-sorted batches, then the service on each engine fed by the same streams, in one run.

    .venv/bin/python benchmarks/engines.py --model-repository model_repository --model news-zh

Raw rows: `--rounds` alternating rounds over `--texts` news texts in batches of
`--batch-size`, median texts/s, and the smallest cosine of each engine's pooled vectors to
onnxruntime fp32's. Service rows: a bertstream-server per engine (`--cpu-engine`), `--feeds`
EmbedStream feeds of `--per-message` texts a message (bench.py's stream_throughput), texts/s;
service / raw of the same engine says what the server costs around the graph. Writes
results/YYYYMMDD-HHMMSS-cpuN-MODEL-engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from bench import RESULTS, Raw, device_name, news_texts, stream_throughput
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.backends.openvino import OpenVinoPool
from bertstream.server.engine.batch import Batch
from bertstream.server.version_format import MODEL_FILE
from server_process import ServerProcess

ENGINES = ("onnxruntime", "openvino-f32", "openvino-bf16")


def raw_rows(version_dir: Path, texts: list[str], batch_size: int, rounds: int,
             threads: int) -> dict[str, Any]:
    raw = Raw(version_dir, RuntimeOptions(intra_op_threads=threads))
    encoded = raw.encode(texts)
    order = sorted(range(len(encoded)), key=encoded.lengths.__getitem__)
    batches = [Batch.of(encoded, order[i:i + batch_size])
               for i in range(0, len(order), batch_size)]
    runners = {"onnxruntime": raw.runtime.run}
    for precision in ("f32", "bf16"):
        pool = OpenVinoPool(version_dir / MODEL_FILE,
                            {"INFERENCE_PRECISION_HINT": precision}, threads)
        runners[f"openvino-{precision}"] = pool.run
    vectors = {name: np.concatenate([run(b, [raw.output])[raw.output] for b in batches])
               for name, run in runners.items()}  # also each shape's first run
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for batch in batches:
                run(batch, [raw.output])
            speeds[name].append(len(texts) / (time.perf_counter() - start))
    reference = vectors["onnxruntime"]
    rows = {}
    for name in runners:
        got = vectors[name]
        cosine = (got * reference).sum(1) / (np.linalg.norm(got, axis=1)
                                              * np.linalg.norm(reference, axis=1))
        rows[name] = {"texts_per_s": statistics.median(speeds[name]),
                      "min_cosine_to_onnxruntime": float(cosine.min())}
    return rows


def service_rows(repository: Path, model: str, texts: list[str], feeds: int,
                 per_message: int) -> dict[str, Any]:
    rows = {}
    for engine in ("onnxruntime", "openvino"):
        server = ServerProcess(repository, ["--cpu-engine", engine], "engines")
        try:
            stream_throughput(server.address, model, texts[:64], feeds, per_message)  # warm
            rows[engine] = {"texts_per_s": stream_throughput(server.address, model, texts,
                                                             feeds, per_message)}
        finally:
            server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the cores available")
    parser.add_argument("--feeds", type=int, default=4)
    parser.add_argument("--per-message", type=int, default=8)
    parser.add_argument("--service-texts", type=int, default=512)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    folder = args.model_repository / args.model
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    texts = news_texts(max(args.texts, args.service_texts))
    raw = raw_rows(folder / str(version), texts[:args.texts], args.batch_size, args.rounds,
                   args.threads)
    service = service_rows(args.model_repository, args.model, texts[:args.service_texts],
                           args.feeds, args.per_message)
    print(f"{args.model}: raw, {args.texts} texts in length-sorted batches of "
          f"{args.batch_size}, median of {args.rounds} rounds")
    for name, row in raw.items():
        ratio = row["texts_per_s"] / raw["onnxruntime"]["texts_per_s"]
        print(f"  {name:<16}{row['texts_per_s']:>8.1f} texts/s  {ratio:.2f}x  "
              f"min cosine {row['min_cosine_to_onnxruntime']:.6f}")
    print(f"service, {args.feeds} streams x {args.per_message} a message, "
          f"{args.service_texts} texts")
    for name, row in service.items():
        print(f"  {name:<16}{row['texts_per_s']:>8.1f} texts/s")
    record = {"date": datetime.now(timezone.utc).isoformat(), "device": device_name("cpu"),
              "cpu_count": os.cpu_count(), "model": args.model, "version": version,
              "settings": vars(args) | {"model_repository": str(args.model_repository),
                                        "output": str(args.output or "")},
              "raw": raw, "service": service}
    output = args.output or RESULTS / (
        f"{datetime.now():%Y%m%d-%H%M%S}-cpu{os.cpu_count()}-{args.model}-engines.json")
    output.write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
