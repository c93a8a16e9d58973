"""Check a fake device profile against a real device: raw onnxruntime time per batch shape,
the `a + b x padded_tokens` model fitted to it, and what the named profile predicts.

    .venv/bin/python benchmarks/calibrate.py --model-repository /tmp/repo --model bert-base-fp16 \
        --device gpu --profile h100-bert-base-fp16

Batches are synthetic (random ids of the model's vocabulary, every text exactly `tokens`
long, so padded = real); each shape runs `--runs` times after a warm-up and its median counts.
Prints one line per shape and writes JSON (the card's name, the measured points, the fitted
a and b: a profile to paste into server/engine/backends/fake.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from bench import device_name
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.backends.fake import PROFILES, Point, fit
from bertstream.server.engine.backends.onnxruntime import Runtime
from bertstream.server.engine.batch import Batch
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import MODEL_FILE, TOKENIZER_FILE, output_name
from tokenizers import Tokenizer

RESULTS = Path(__file__).parent / "results"
SHAPES = "1x16,1x32,8x64,32x64,32x128,128x64,128x128,256x64,256x128,512x32"


def synthetic(batch: int, tokens: int, vocab: int, rng: np.random.Generator) -> Batch:
    ids = rng.integers(min(1000, vocab // 2), vocab, size=(batch, tokens), dtype=np.int64)
    ones = np.ones_like(ids)
    return Batch(ids, ones, np.zeros_like(ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="named profile to compare")
    parser.add_argument("--shapes", default=SHAPES, help="batch x tokens, comma separated")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    model_dir = args.model_repository / args.model
    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    config = model_config.load(model_dir)
    runtime = Runtime(model_dir / str(version) / MODEL_FILE, RuntimeOptions(device=args.device))
    output = [output_name("mean", config.default_pooling_layer)]
    vocab = Tokenizer.from_file(str(model_dir / str(version) / TOKENIZER_FILE)).get_vocab_size()
    rng = np.random.default_rng(0)
    points = []
    for shape in args.shapes.split(","):
        batch_size, tokens = (int(n) for n in shape.split("x"))
        if tokens > config.max_sequence_length:
            continue
        batch = synthetic(batch_size, tokens, vocab, rng)
        runtime.run(batch, output)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            runtime.run(batch, output)
            times.append(time.perf_counter() - start)
        points.append(Point(batch_size, tokens, batch_size / statistics.median(times)))
    a, b = fit(points)
    named = PROFILES[args.profile] if args.profile else None
    device = device_name(args.device)
    print(f"{args.model} on {device} ({runtime.provider}); fitted a = {a * 1e3:.3f} ms, "
          f"b = {b * 1e6:.4f} us per padded token")
    header = f"{'batch x tokens':<16}{'measured /s':>13}{'fitted /s':>12}"
    print(header + (f"{args.profile + ' /s':>28}{'profile / real':>16}" if named else ""))
    for p in points:
        fitted = p.batch / (a + b * p.padded_tokens)
        line = f"{p.batch:>5} x {p.tokens:<8}{p.texts_per_s:>13,.0f}{fitted:>12,.0f}"
        if named:
            predicted = named.capacity(p.batch, p.tokens)
            line += f"{predicted:>28,.0f}{predicted / p.texts_per_s:>16.2f}"
        print(line)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device, "provider": runtime.provider, "model": args.model,
        "fitted": {"a_ms": a * 1e3, "b_us": b * 1e6},
        "profile": args.profile,
        "points": [{"batch": p.batch, "tokens": p.tokens, "texts_per_s": round(p.texts_per_s, 1),
                    "profile_texts_per_s": round(named.capacity(p.batch, p.tokens), 1)
                    if named else None} for p in points],
    }
    path = args.output or RESULTS / (
        f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-calibrate-{args.model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
