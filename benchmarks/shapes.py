"""What a (batch, length) shape an engine has not seen yet costs, on a stream of batch shapes
like the batcher's: OpenVINO (f32, bf16) beside onnxruntime, on one model.

    .venv/bin/python benchmarks/shapes.py --model-repository model_repository --model news-zh

The stream: news texts in arrival order, cut in batches the way a busy batcher cuts them
(`--full-share` of them full at the config's max_batch_size, the rest 1 to max_batch_size
texts, never over max_batch_tokens), each padded to its longest text. Each engine gets a fresh
compiled model (one warm-up batch of a shape outside the stream), runs the stream once (every
shape new to it the first time it comes), then once more (every shape seen); the first pass
over the second is what first-seen shapes cost on that stream; medians of `--repeats` fresh
engines. Per batch whose shape was new: its first time over its seen time. `--bucket N` adds
a row for OpenVINO bf16 with every batch's length rounded up to a multiple of N (fewer
distinct shapes, more padding), against the unrounded seen pass. Writes
results/YYYYMMDD-HHMMSS-cpuN-MODEL-shapes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from bench import RESULTS, device_name, news_texts
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.backends.onnxruntime import Runtime
from bertstream.server.engine.backends.openvino import OpenVinoPool
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.tokenizer import TextTokenizer
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import MODEL_FILE, TOKENIZER_FILE, output_name

Run = Callable[[Batch, Sequence[str]], dict[str, np.ndarray]]


def stream_batches(version_dir: Path, texts: list[str], full_share: float,
                   seed: int) -> list[Batch]:
    """Arrival-order news texts cut the way a busy batcher cuts them (see the module doc)."""
    config = model_config.load(version_dir.parent)
    tokenizer = TextTokenizer(version_dir / TOKENIZER_FILE, config.max_sequence_length)
    encoded = tokenizer.encode([config.embed_prefix + t for t in texts], truncate=True)
    size_cap = config.max_batch_size
    budget = config.dynamic_batching.max_batch_tokens or size_cap * config.max_sequence_length
    rng = random.Random(seed)
    batches, start = [], 0
    while start < len(encoded):
        wanted = size_cap if rng.random() < full_share else rng.randint(1, size_cap)
        rows: list[int] = []
        longest = 0
        for i in range(start, min(start + wanted, len(encoded))):
            if rows and max(longest, encoded.lengths[i]) * (len(rows) + 1) > budget:
                break
            rows.append(i)
            longest = max(longest, encoded.lengths[i])
        batches.append(Batch.of(encoded, rows))
        start += len(rows)
    return batches


def rounded(batch: Batch, bucket: int) -> Batch:
    """The batch with its length padded up to a multiple of `bucket` (masked pad tokens)."""
    extra = -batch.input_ids.shape[1] % bucket
    widths = ((0, 0), (0, extra))
    return Batch(np.pad(batch.input_ids, widths), np.pad(batch.attention_mask, widths),
                 np.pad(batch.token_type_ids, widths))


def timed_pass(run: Run, batches: list[Batch], output: str) -> list[float]:
    times = []
    for batch in batches:
        start = time.perf_counter()
        run(batch, [output])
        times.append(time.perf_counter() - start)
    return times


def engine_row(make: Callable[[], Run], batches: list[Batch], output: str, repeats: int,
               warm: Batch, baseline: list[float] | None = None) -> dict[str, Any]:
    """`repeats` fresh engines, each: one warm-up batch, the first pass over `batches`, then
    a seen pass; medians over the repeats (one noisy pass on a shared machine moves a single
    ratio a lot)."""
    loads, firsts, seens, ratios = [], [], [], []
    new_ratio: list[float] = []
    new_extra_ms: list[float] = []
    shapes: set[tuple[int, ...]] = set()
    for _ in range(repeats):
        started = time.perf_counter()
        run = make()
        loads.append(time.perf_counter() - started)
        run(warm, [output])
        first = timed_pass(run, batches, output)
        seen = timed_pass(run, batches, output)
        del run
        firsts.append(sum(first))
        seens.append(sum(seen))
        ratios.append(sum(first) / sum(seen))
        shapes = set()
        for batch, t_first, t_seen in zip(batches, first, seen, strict=True):
            shape = tuple(batch.input_ids.shape)
            if shape not in shapes:
                shapes.add(shape)
                new_ratio.append(t_first / t_seen)
                new_extra_ms.append((t_first - t_seen) * 1e3)
    row = {
        "load_s": round(statistics.median(loads), 3),
        "first_pass_s": round(statistics.median(firsts), 4),
        "seen_pass_s": round(statistics.median(seens), 4),
        "first_vs_seen": round(statistics.median(ratios), 4),
        "first_vs_seen_each": [round(r, 4) for r in ratios],
        "distinct_shapes": len(shapes),
        "new_shape_first_vs_seen_p50": round(statistics.median(new_ratio), 3),
        "new_shape_first_vs_seen_p90": round(float(np.percentile(new_ratio, 90)), 3),
        "new_shape_extra_ms_p50": round(statistics.median(new_extra_ms), 2),
    }
    if baseline is not None:  # a rounded stream against the unrounded seen pass
        row["first_vs_unrounded_seen"] = round(row["first_pass_s"] / baseline[1], 4)
        row["seen_vs_unrounded_seen"] = round(row["seen_pass_s"] / baseline[1], 4)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="news-zh")
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--full-share", type=float, default=0.5,
                        help="share of batches cut at max_batch_size")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh engines per row (first pass, then a seen pass); medians")
    parser.add_argument("--bucket", type=int, default=32,
                        help="also round OpenVINO bf16's lengths up to this multiple (0: no row)")
    parser.add_argument("--threads", type=int, default=0, help="0: the cores available")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    folder = args.model_repository / args.model
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    version_dir = folder / str(version)
    config = model_config.load(folder)
    output = output_name("mean", config.default_pooling_layer)
    batches = stream_batches(version_dir, news_texts(args.texts), args.full_share, args.seed)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    padded = sum(b.padded_tokens for b in batches)
    warm = Batch(np.ones((1, 3), np.int64), np.ones((1, 3), np.int64), np.zeros((1, 3), np.int64))
    model_file = version_dir / MODEL_FILE

    def openvino(precision: str) -> Callable[[], Run]:
        return lambda: OpenVinoPool(model_file, {"INFERENCE_PRECISION_HINT": precision},
                                    args.threads).run

    makers: dict[str, Callable[[], Run]] = {
        "onnxruntime": lambda: Runtime(model_file,
                                       RuntimeOptions(intra_op_threads=args.threads)).run,
        "openvino-f32": openvino("f32"),
        "openvino-bf16": openvino("bf16"),
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():
        rows[name] = engine_row(make, batches, output, args.repeats, warm)
        if args.bucket and name == "openvino-bf16":
            bucketed = [rounded(b, args.bucket) for b in batches]
            unrounded = (rows[name]["first_pass_s"], rows[name]["seen_pass_s"])
            rows[f"{name}-bucket{args.bucket}"] = engine_row(
                make, bucketed, output, args.repeats, warm, unrounded)
    print(f"{args.model}/{version}: {len(batches)} batches of {args.texts} arrival-order news "
          f"texts ({args.full_share:.0%} full at {config.max_batch_size}), "
          f"{len({b.input_ids.shape for b in batches})} distinct shapes, real/padded tokens "
          f"{tokens / padded:.2f}")
    print(f"  {'engine':<24}{'shapes':>7}{'first s':>9}{'seen s':>9}{'first/seen':>11}"
          f"{'new p50':>9}{'new p90':>9}{'extra ms p50':>13}{'vs unrounded':>13}")
    for name, row in rows.items():
        versus = row.get("first_vs_unrounded_seen")
        print(f"  {name:<24}{row['distinct_shapes']:>7}{row['first_pass_s']:>9.3f}"
              f"{row['seen_pass_s']:>9.3f}{row['first_vs_seen']:>11.3f}"
              f"{row['new_shape_first_vs_seen_p50']:>9.3f}"
              f"{row['new_shape_first_vs_seen_p90']:>9.3f}{row['new_shape_extra_ms_p50']:>13.2f}"
              f"{'' if versus is None else f'{versus:.3f}':>13}")
    record = {"date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": device_name("cpu"), "cpu_count": os.cpu_count(), "model": args.model,
              "version": version, "settings": vars(args) | {
                  "model_repository": str(args.model_repository),
                  "output": str(args.output or "")},
              "batches": len(batches), "padding_efficiency": round(tokens / padded, 4),
              "rows": rows}
    result = args.output or RESULTS / (
        f"{datetime.now():%Y%m%d-%H%M%S}-cpu{os.cpu_count()}-{args.model}-shapes.json")
    result.write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
