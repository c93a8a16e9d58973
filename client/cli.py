"""`bertstream-client embed|classify|tokenize|models`: one call, JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from .client import BertClient
from .messages import POOLINGS, ClientError

__all__ = ["main"]


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection options, valid before or after the subcommand; the subcommand's copies
    default to SUPPRESS so they only override what was given before it."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--server", default=default("localhost:8001"), help="HOST:PORT")
    parser.add_argument("--model", default=default(""),
                        help="default: the server's default model")
    parser.add_argument("--version", type=int, default=default(0),
                        help="0: the policy's default")
    parser.add_argument("--timeout", type=float, default=default(30.0),
                        help="deadline in seconds")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bertstream-client", description=__doc__)
    _add_common(p, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)
    texts = argparse.ArgumentParser(add_help=False)
    texts.add_argument("texts", nargs="+", help="texts to send")
    texts.add_argument("--truncate", action="store_true",
                       help="cut texts over the model's limit instead of refusing them")
    sub = p.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed", parents=[common, texts], help="one vector per text")
    embed.add_argument("--pooling", choices=[k for k in POOLINGS if k])
    embed.add_argument("--pooling-layer", type=int, help="1..num_layers, or -1 for the last")
    embed.add_argument("--normalize", action="store_true")
    classify = sub.add_parser("classify", parents=[common, texts], help="ranked labels")
    classify.add_argument("--top-k", type=int, default=0, help="0: all labels")
    sub.add_parser("tokenize", parents=[common, texts], help="the tokens the model sees")
    sub.add_parser("models", parents=[common], help="every model and version with its state")
    load = sub.add_parser("load", parents=[common],
                          help="explicit mode: (re)load a model from the repository")
    load.add_argument("name", help="model name")
    unload = sub.add_parser("unload", parents=[common], help="explicit mode: stop serving a model")
    unload.add_argument("name", help="model name")
    return p


def _run(args: argparse.Namespace, bc: BertClient) -> Any:
    if args.command == "models":
        rows = bc.models()
        return [asdict(m) for m in rows if not args.model or m.model == args.model]
    if args.command == "load":
        return [asdict(m) for m in bc.load_model(args.name)]
    if args.command == "unload":
        bc.unload_model(args.name)
        return {"unloaded": args.name}
    kw: dict[str, Any] = {"version": args.version, "truncate": args.truncate}
    if args.command == "embed":
        vectors = bc.encode(args.texts, pooling=args.pooling, pooling_layer=args.pooling_layer,
                            normalize=args.normalize, **kw)
        return [{"text": t, "embedding": v.tolist()}
                for t, v in zip(args.texts, vectors, strict=True)]
    if args.command == "classify":
        ranked = bc.classify(args.texts, top_k=args.top_k, **kw)
        return [{"text": t, "labels": [asdict(label) for label in labels]}
                for t, labels in zip(args.texts, ranked, strict=True)]
    return [{"text": t, **asdict(tok)}
            for t, tok in zip(args.texts, bc.tokenize(args.texts, **kw), strict=True)]


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        with BertClient(args.server, model=args.model, timeout=args.timeout) as bc:
            result = _run(args, bc)
    except ClientError as err:
        print(json.dumps({"error": {"code": err.code.name, "message": err.message}},
                         ensure_ascii=False), file=sys.stderr)
        sys.exit(1)
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
