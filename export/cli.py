"""`bertstream-export`: flags -> ExportOptions -> export_model, with progress on stderr and the
published folder and parity figures on stdout (so scripts can capture the result)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from bertstream.server.version_format import RECORD_HEAD

from .head import HEAD_POOLINGS
from .metrics import rerank_lines
from .pipeline import ExportOptions, export_model, read_export_record
from .sources import RandomShape
from .variants import VARIANTS
from .verify import DEFAULT_TOLERANCE


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from error


def _labels(text: str) -> tuple[str, ...]:
    return tuple(label.strip() for label in text.split(",") if label.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertstream-export",
        description="Export a BERT checkpoint to a verified ONNX version folder.",
    )
    parser.add_argument(
        "--source",
        default="random",
        help="'random', a local Hugging Face folder, or a hub id such as hfl/chinese-bert-wwm-ext",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", required=True, help="model name (folder in the repository)")
    parser.add_argument("--version", type=int, help="default: highest existing version + 1")
    shape = parser.add_argument_group("random source only")
    defaults = RandomShape()
    shape.add_argument("--num-layers", type=int, default=defaults.num_layers)
    shape.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    shape.add_argument("--num-heads", type=int, default=defaults.num_heads)
    shape.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    shape.add_argument("--seed", type=int, default=defaults.seed, help="also seeds a random head")
    parser.add_argument(
        "--max-sequence-length", type=int, help="default: min(512, max_position_embeddings)"
    )
    parser.add_argument(
        "--pooling-layers",
        type=_int_list,
        help="layers to export poolings for, e.g. -1,-2 (negative counts from the end)",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=_labels, help="comma-separated labels: a classify model")
    labels.add_argument("--labels-file", type=Path, help="one label per line")
    parser.add_argument("--head", type=Path, help="classification head (.safetensors)")
    parser.add_argument("--head-pooling", choices=HEAD_POOLINGS,
                        help="default: cls (pooler: a sequence classification checkpoint's own)")
    parser.add_argument("--text-pairs", action=argparse.BooleanOptionalAction,
                        help="the model reads text pairs (config.pbtxt text_pairs: true), e.g. "
                        "a checkpoint fine-tuned on LCQMC or XNLI; parity is then checked on "
                        "Chinese pairs. Default: what the head's trainer recorded, else no")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--embed-prefix", default="")
    parser.add_argument("--classify-prefix", default="")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--variant", choices=VARIANTS, default="fp32",
                        help="fp16: fused fp16 graph for GPUs; int8: dynamic int8 for CPUs "
                        "(onnxruntime); openvino: an f32 OpenVINO IR (model.xml + model.bin) "
                        "beside model.onnx, served with backend openvino; openvino-int8: the "
                        "same, quantized by NNCF on news texts (all checked against PyTorch "
                        "fp32 by cosine)")
    return parser


_INT_LIST = re.compile(r"-?\d+(,\s*-?\d+)*")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse reads `--pooling-layers -1,-2` as two flags ('-1,-2' looks like an option), so
    such a value is glued to its flag first: `--pooling-layers=-1,-2`."""
    args = list(sys.argv[1:] if argv is None else argv)
    glued: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        value = args[index + 1] if index + 1 < len(args) else ""
        if arg == "--pooling-layers" and _INT_LIST.fullmatch(value):
            glued.append(f"{arg}={value}")
            index += 2
        else:
            glued.append(arg)
            index += 1
    return build_parser().parse_args(glued)


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    labels: tuple[str, ...] = args.labels or ()
    if args.labels_file is not None:
        lines = args.labels_file.read_text(encoding="utf-8").splitlines()
        labels = tuple(line.strip() for line in lines if line.strip())
    return ExportOptions(
        model=args.model,
        source=args.source,
        model_repository=args.model_repository,
        version=args.version,
        random_shape=RandomShape(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_heads=args.num_heads,
            intermediate_size=args.intermediate_size,
            seed=args.seed,
        ),
        max_sequence_length=args.max_sequence_length,
        pooling_layers=args.pooling_layers,
        labels=labels,
        head=args.head,
        head_pooling=args.head_pooling,
        max_batch_size=args.max_batch_size,
        embed_prefix=args.embed_prefix,
        classify_prefix=args.classify_prefix,
        tolerance=args.tolerance,
        variant=args.variant,
        text_pairs=args.text_pairs,
    )


def _progress(message: str) -> None:
    print(f"bertstream-export: {message}", file=sys.stderr, flush=True)


def _summary(target: Path) -> str:
    record = read_export_record(target)
    parity = record["parity"]
    assert isinstance(parity, dict)
    inputs = "text pairs" if record.get("text_pairs") else "texts"
    lines = [
        f"published {target}",
        f"parity: {parity['runs']} runs over {parity['texts']} {inputs}, lengths "
        f"{parity['sequence_lengths']}, batch sizes {parity['batch_sizes']}, "
        f"tolerance {parity['tolerance']:g}",
    ]
    for name, diff in parity["max_abs_diff"].items():
        lines.append(f"  {name:<24} max abs diff {diff:.3g}")
    if "checkpoint_logits_max_abs_diff" in record:
        lines.append(f"logits against the checkpoint's own classifier: max abs diff "
                     f"{record['checkpoint_logits_max_abs_diff']:.3g}")
    head = record.get(RECORD_HEAD)
    if isinstance(head, dict) and isinstance(head.get("training"), dict):
        lines += rerank_lines(head["training"])
    variant = read_export_record(target).get("variant_parity")
    if isinstance(variant, dict):
        lines.append(f"{variant['variant']} graph ({variant['runtime']}), min cosine to fp32:")
        for name, cosine in variant["min_cosine"].items():
            lines.append(f"  {name:<24} {cosine:.6f}")
    bf16 = read_export_record(target).get("bf16_parity")
    if isinstance(bf16, dict) and bf16.get("measured"):
        cosines = bf16["min_cosine"].values()
        lines.append(f"bf16 ({bf16['runtime']}): min cosine to fp32 {min(cosines):.6f}, top "
                     f"labels equal: {bf16['top_labels_equal']}")
    elif isinstance(bf16, dict):
        lines.append(f"bf16 not measured: {bf16['reason']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = options_from_args(args)
        target = export_model(options, log=_progress)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"bertstream-export: error: {error}", file=sys.stderr)
        return 1
    print(_summary(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
