"""`bertstream-client embed|classify|tokenize|rerank|models|load|unload`: one call, JSON on
stdout; or, with `--input FILE.jsonl --output FILE.jsonl`, a whole file streamed exactly once
(feed.py).

Texts are the arguments, or with `-` the lines of stdin (blank lines skipped). With `--pair`
(embed, classify, tokenize) each text is a pair: its two halves split at the first TAB (a
two-column TSV line, as LCQMC and XNLI ship), or else at the last ` ||| ` (bert-as-service's
`a ||| b`, split as it and the server's /encode split it). `rerank --query Q TEXT...` orders
the texts by relevance to Q.

`--server` takes one address, a DNS name whose records are the replicas, or several
comma-separated addresses: calls are then spread by gRPC's round_robin (channels.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .channels import TlsFiles, split_servers
from .client import BertClient
from .feed import FeedError, FeedOptions, run_feed
from .messages import MAX_PRIORITY, MAX_TIMEOUT_US, POOLINGS, STRATEGIES, ClientError

__all__ = ["main", "split_pair"]

PAIR_SEPARATOR = " ||| "  # bert-as-service's


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, valid before or after the subcommand; the subcommand's copies
    default to SUPPRESS so they only override what was given before it."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--server", default=default("localhost:8001"),
                        help="HOST:PORT, or several comma-separated (round robin)")
    parser.add_argument("--model", default=default(""),
                        help="default: the server's default model")
    parser.add_argument("--version", type=int, default=default(0),
                        help="0: the policy's default")
    parser.add_argument("--timeout", type=float, default=default(30.0),
                        help="deadline in seconds")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="TLS, trusting the system's CAs (implied by the --tls-* files)")
    parser.add_argument("--tls-ca", type=Path, default=default(None),
                        help="CA certificate (PEM) to trust for the server")
    parser.add_argument("--tls-cert", type=Path, default=default(None),
                        help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", type=Path, default=default(None),
                        help="client private key (PEM), for mutual TLS")
    parser.add_argument("--tls-server-name", default=default(None),
                        help="name to expect in the server's certificate")
    parser.add_argument("--token", default=default(os.environ.get("BERTSTREAM_TOKEN")),
                        help="bearer token (default: $BERTSTREAM_TOKEN)")


def _whole(top: int) -> Any:
    """An argparse type: an int from 0 to `top` (a usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 0 <= value <= top:
            raise argparse.ArgumentTypeError(f"must be from 0 to {top}, not {value}")
        return value
    return parse


def _add_schedule(parser: argparse.ArgumentParser,
                  title: str = "priority (embed and classify)") -> None:
    group = parser.add_argument_group(title)
    group.add_argument("--priority", type=_whole(MAX_PRIORITY), default=0, metavar="N",
                       help="queue level, 1 the highest (the model has priority_levels of "
                       "them, 2 by default). 0 (default): the server decides: level 1 for a "
                       "call of up to 16 texts; a larger call, and every message of a bulk "
                       "--input feed, the model's default level (the lowest), behind "
                       "interactive calls")
    group.add_argument("--timeout-us", type=_whole(MAX_TIMEOUT_US), default=0, metavar="N",
                       help="longest the texts may wait in the queue, in microseconds, "
                       "before the call (a feed: that message) fails DEADLINE_EXCEEDED; "
                       "0 (default): the level's queue policy")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertstream-client", description=__doc__)
    _add_common(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)
    texts = argparse.ArgumentParser(add_help=False)
    texts.add_argument("texts", nargs="*", help="texts to send; - reads them from stdin, one "
                       "per line")
    texts.add_argument("--truncate", action="store_true",
                       help="cut texts over the model's limit instead of refusing them")
    texts.add_argument("--pair", action="store_true",
                       help="each text is a pair, its halves split at the first TAB, or else "
                       "at the last ' ||| ' (bert-as-service's 'a ||| b'); a pair model's "
                       "classify needs them")
    _add_strategy(texts)
    feed = argparse.ArgumentParser(add_help=False)
    group = feed.add_argument_group("bulk feed (embed and classify)")
    group.add_argument("--input", type=Path, help="JSONL file, one {id, text} object per line")
    group.add_argument("--output", type=Path,
                       help="JSONL answers, one line per id; a rerun resumes it")
    group.add_argument("--batch-size", type=int, default=32, help="texts per stream message")
    group.add_argument("--window", type=int, default=4, help="messages in flight per stream")
    group.add_argument("--streams", type=int, default=0,
                       help="concurrent streams (default: one per server address, at least 4)")
    group.add_argument("--id-field", default="id")
    group.add_argument("--text-field", default="text")
    group.add_argument("--give-up-after", type=float, default=300.0,
                       help="seconds without any answer before the feed stops")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_schedule(feed)
    sub = p.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed", parents=[common, texts, feed], help="one vector per text")
    embed.add_argument("--pooling", choices=[k for k in POOLINGS if k])
    embed.add_argument("--pooling-layer", type=int, help="1..num_layers, or -1 for the last")
    embed.add_argument("--normalize", action="store_true")
    classify = sub.add_parser(
        "classify", parents=[common, texts, feed], help="ranked labels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ranked labels for each text. A pair model (sentence matching, NLI) "
        "classifies pairs:\n  bertstream-client classify --pair '今天股市大涨 ||| "
        "沪指收复三千点'\n  printf '今天股市大涨\\t沪指收复三千点\\n' | bertstream-client "
        "classify --pair -")
    classify.add_argument("--top-k", type=int, default=0, help="0: all labels")
    sub.add_parser("tokenize", parents=[common, texts], help="the tokens the model sees")
    _add_rerank(sub, common)
    sub.add_parser("models", parents=[common], help="every model and version with its state")
    load = sub.add_parser("load", parents=[common],
                          help="explicit mode: (re)load a model from the repository")
    load.add_argument("name", help="model name")
    unload = sub.add_parser("unload", parents=[common], help="explicit mode: stop serving a model")
    unload.add_argument("name", help="model name")
    return p


def _add_strategy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truncation-strategy", choices=[k for k in STRATEGIES if k],
                        help="with --truncate, which half of a pair is cut (default: "
                        "longest_first; rerank: only_second, keeping the query whole)")


def _add_rerank(sub: Any, common: argparse.ArgumentParser) -> None:
    rerank = sub.add_parser(
        "rerank", parents=[common], help="texts ordered by relevance to a query",
        description="Texts ordered by relevance to --query, best first: a pair model's score "
        "of (query, text) (method cross_encoder), or on an embedding model the cosine of "
        "their vectors (method cosine). Prints {model, version, method, results: [{index, "
        "score, text}]}, index being the text's position in the input.")
    rerank.add_argument("texts", nargs="*",
                        help="candidate texts; - reads them from stdin, one per line")
    rerank.add_argument("--query", required=True, help="what the texts are ranked against")
    rerank.add_argument("--top-n", type=_whole(2**31 - 1), default=0, metavar="N",
                        help="keep the best N (0, default: all)")
    rerank.add_argument("--raw-scores", action="store_true",
                        help="pair models: the logit (log-odds of a match), not a probability")
    rerank.add_argument("--truncate", action="store_true",
                        help="cut pairs over the model's limit instead of refusing them")
    _add_strategy(rerank)
    _add_schedule(rerank, "priority")


def split_pair(text: str) -> tuple[str, str]:
    """The two halves of a `--pair` text: split at the first TAB, or else at the last ` ||| `
    (spaces included, as bert-as-service and the server's /encode split `a ||| b`);
    ValueError when it has neither."""
    if "\t" in text:
        first, second = text.split("\t", 1)
        return first, second
    if PAIR_SEPARATOR in text:
        first, second = text.rsplit(PAIR_SEPARATOR, 1)
        return first, second
    raise ValueError(f"--pair: {text!r} has no TAB or ' ||| ' between its two halves")


def _read_texts(args: argparse.Namespace) -> None:
    """`-` as the texts: stdin's lines, blank ones skipped."""
    if args.texts == ["-"]:
        args.texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def _pairs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    if not getattr(args, "pair", False):
        return args.texts, None
    halves = [split_pair(text) for text in args.texts]
    return [a for a, _ in halves], [b for _, b in halves]


def _labelled(text: str, pair: str | None, **fields: Any) -> dict[str, Any]:
    return {"text": text, **({} if pair is None else {"text_pair": pair}), **fields}


def _run(args: argparse.Namespace, bc: BertClient) -> Any:
    if args.command == "models":
        rows = bc.models()
        return [asdict(m) for m in rows if not args.model or m.model == args.model]
    if args.command == "load":
        return [asdict(m) for m in bc.load_model(args.name)]
    if args.command == "unload":
        bc.unload_model(args.name)
        return {"unloaded": args.name}
    kw: dict[str, Any] = {"version": args.version, "truncate": args.truncate,
                          "truncation_strategy": args.truncation_strategy}
    if args.command == "rerank":
        ranking = bc.rerank(args.query, args.texts, top_n=args.top_n,
                            raw_scores=args.raw_scores, **_schedule(args), **kw)
        return {"model": ranking.model, "version": ranking.version, "method": ranking.method,
                "results": [{"index": r.index, "score": r.score, "text": args.texts[r.index]}
                            for r in ranking]}
    texts, pairs = _pairs(args)
    if pairs is not None:
        kw["pairs"] = pairs
    seconds = pairs or [None] * len(texts)
    if args.command == "embed":
        vectors = bc.encode(texts, pooling=args.pooling, pooling_layer=args.pooling_layer,
                            normalize=args.normalize, **_schedule(args), **kw)
        return [_labelled(t, p, embedding=v.tolist())
                for t, p, v in zip(texts, seconds, vectors, strict=True)]
    if args.command == "classify":
        ranked = bc.classify(texts, top_k=args.top_k, **_schedule(args), **kw)
        return [_labelled(t, p, labels=[asdict(label) for label in labels])
                for t, p, labels in zip(texts, seconds, ranked, strict=True)]
    return [_labelled(t, p, **asdict(tok))
            for t, p, tok in zip(texts, seconds, bc.tokenize(texts, **kw), strict=True)]


def _schedule(args: argparse.Namespace) -> dict[str, int]:
    return {"priority": args.priority, "timeout_us": args.timeout_us}


def _tls(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        return TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    return None


def _feed(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"truncate": args.truncate, **_schedule(args)}
    if args.command == "embed":
        request.update(pooling=args.pooling, pooling_layer=args.pooling_layer,
                       normalize=args.normalize)
    else:
        request["top_k"] = args.top_k
    options = FeedOptions(
        input=args.input, output=args.output, task=args.command,
        servers=tuple(split_servers(args.server)), model=args.model, version=args.version,
        request=request, batch_size=args.batch_size, window=args.window, streams=args.streams,
        id_field=args.id_field, text_field=args.text_field, give_up_s=args.give_up_after,
        progress=not args.no_progress, tls=_tls(args), server_name=args.tls_server_name,
        token=args.token)
    report = run_feed(options)
    return {**asdict(report), "items_per_s": round(report.items_per_s, 1),
            "output": str(args.output)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    feeding = getattr(args, "input", None) is not None
    if feeding and (args.texts or args.output is None):
        parser.error("--input needs --output and no texts on the command line")
    if feeding and args.pair:
        parser.error("--pair: a bulk --input feed sends single texts")
    if not feeding and getattr(args, "output", None) is not None:
        parser.error("--output needs --input")
    if hasattr(args, "texts"):
        _read_texts(args)
    if not feeding and args.command in ("embed", "classify", "tokenize", "rerank") \
            and not args.texts:
        parser.error(f"{args.command}: give texts, - to read them from stdin"
                     + ("" if args.command in ("tokenize", "rerank") else
                        ", or --input and --output"))
    try:
        if hasattr(args, "texts"):
            _pairs(args)  # a --pair text without its two halves is a usage error, before a call
    except ValueError as err:
        parser.error(str(err))
    if feeding:
        try:
            result: Any = _feed(args)
        except (FeedError, ValueError, OSError) as err:
            print(json.dumps({"error": {"code": "FEED", "message": str(err)}},
                             ensure_ascii=False), file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(json.dumps({"error": {"code": "INTERRUPTED",
                                        "message": "stopped; rerun to resume"}}), file=sys.stderr)
            sys.exit(130)
        _print_json(result)
        return
    try:
        tls = _tls(args)
        bc = BertClient(args.server, model=args.model, timeout=args.timeout,
                        credentials=tls.credentials() if tls else None,
                        server_name=args.tls_server_name, token=args.token)
    except (ValueError, OSError) as err:  # a malformed --server list, an unreadable PEM
        parser.error(str(err))
    try:
        with bc:
            result = _run(args, bc)
    except ClientError as err:
        print(json.dumps({"error": {"code": err.code.name, "message": err.message}},
                         ensure_ascii=False), file=sys.stderr)
        sys.exit(1)
    _print_json(result)


def _print_json(result: Any) -> None:
    """The answer on stdout. A reader that stops early (`| head`) is not an error: Python's
    advice (the signal module's note on SIGPIPE) is to point stdout at devnull, so the flush
    at exit does not fail again, and to leave quietly."""
    try:
        json.dump(result, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
