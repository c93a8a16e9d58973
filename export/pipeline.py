"""Checkpoint -> verified version folder: the one function the CLI, the Makefile and tests call.

Order matters: everything that can be refused cheaply (model name, existing version, a
contradicting config.pbtxt) is checked before the export, which is the slow part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bertstream.server.version_format import (
    EXPORT_RECORD,
    IR_FILE,
    LABELS_FILE,
    MODEL_FILE,
    RECORD_FUSED_ATTENTION,
    RECORD_HEAD,
    RECORD_SOURCE,
    RECORD_SOURCE_KIND,
    TOKENIZER_FILE,
)

from .graph import PoolingGraph, export_onnx, resolve_pooling_layers
from .head import ClassificationHead, HeadError, load_head, random_head
from .model_config import ConfigFields, build_model_config, read_model_config
from .openvino_ir import (
    BACKEND,
    OPENVINO_VARIANTS,
    OpenVinoRunner,
    bf16_parity,
    calibration_inputs,
    make_ir,
)
from .publish import plan_version, publish_version
from .residuals import rewrite_file
from .sources import Checkpoint, RandomShape, load_checkpoint
from .variants import VARIANTS, make_variant, verify_variant
from .verify import (
    DEFAULT_TOLERANCE,
    PARITY_PAIRS,
    ParityReport,
    parity_items,
    verify_checkpoint_head,
    verify_export,
)

ONNX_FILE, EXPORT_FILE = MODEL_FILE, EXPORT_RECORD
_VERSIONED_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers")
_OPTIONAL_PACKAGES = ("openvino", "nncf")  # recorded where installed


@dataclass(frozen=True)
class ExportOptions:
    """Everything `bertstream-export` takes; tests build this directly."""

    model: str
    source: str = "random"  # "random", a local Hugging Face folder, or a hub id
    model_repository: Path = Path("model_repository")
    version: int | None = None  # None: highest existing + 1
    random_shape: RandomShape = field(default_factory=RandomShape)  # only for source "random"
    max_sequence_length: int | None = None  # None: min(512, max_position_embeddings)
    pooling_layers: tuple[int, ...] | None = None  # None: last and second to last
    labels: tuple[str, ...] = ()  # a classify model when given (or when head is given)
    head: Path | None = None  # safetensors with weight [C, H] and bias [C]
    head_pooling: str | None = None  # "cls" (default) or "mean"
    max_batch_size: int = 32
    embed_prefix: str = ""
    classify_prefix: str = ""
    tolerance: float = DEFAULT_TOLERANCE
    # fp32 | fp16 (fused, for GPUs) | int8 (dynamic, for CPUs) | openvino (an f32 IR beside
    # model.onnx) | openvino-int8 (NNCF int8 IR): openvino_ir.py
    variant: str = "fp32"
    # The model reads text pairs (config.pbtxt text_pairs). None: as the head's trainer
    # recorded (a checkpoint cannot say whether it was fine-tuned on pairs: pass True).
    text_pairs: bool | None = None


@dataclass(frozen=True, eq=False)
class _Prepared:
    checkpoint: Checkpoint
    layers: tuple[int, ...]
    head: ClassificationHead | None
    max_sequence_length: int
    text_pairs: bool
    head_from_checkpoint: bool  # the checkpoint's own classifier (its logits are checked)


def _max_sequence_length(options: ExportOptions, checkpoint: Checkpoint) -> int:
    positions = checkpoint.max_position_embeddings
    length = options.max_sequence_length or min(512, positions)
    if not 2 <= length <= positions:
        raise ValueError(f"max sequence length {length} is outside 2..{positions} (positions)")
    return length


def _head(options: ExportOptions, checkpoint: Checkpoint) -> ClassificationHead | None:
    labels = options.labels or None
    if options.head is None and checkpoint.head is not None:
        if options.head_pooling not in (None, checkpoint.head.pooling):
            raise HeadError(f"{checkpoint.source}'s own head reads BERT's pooler; "
                            f"--head-pooling {options.head_pooling} does not apply")
        if labels is None:
            return checkpoint.head
        if len(labels) != checkpoint.head.num_labels:
            raise HeadError(f"{checkpoint.source} has {checkpoint.head.num_labels} labels, "
                            f"{len(labels)} were given")
        return dataclasses.replace(checkpoint.head, labels=tuple(labels))
    if options.head is not None:
        head = load_head(options.head, labels=labels, pooling=options.head_pooling)
        if head.prefix is not None and head.prefix != options.classify_prefix:
            raise HeadError(
                f"{options.head} was trained on texts prefixed {head.prefix!r}; export with "
                f"--classify-prefix {head.prefix!r} (now {options.classify_prefix!r}) so the "
                "server feeds it the same texts"
            )
        return head
    if labels is None:
        return None
    seed = options.random_shape.seed
    return random_head(labels, checkpoint.hidden_size, seed, options.head_pooling or "cls")


def _text_pairs(options: ExportOptions, head: ClassificationHead | None) -> bool:
    """Whether the model reads pairs; refuses a head trained on one kind fed the other."""
    trained_on = None if head is None or head.training is None else head.text_pairs
    pairs = options.text_pairs if options.text_pairs is not None else bool(trained_on)
    if pairs and head is None:
        raise ValueError("a pair model needs a classification head (--head, --labels, or a "
                         "sequence classification checkpoint)")
    if trained_on is not None and trained_on != pairs:
        trained, asked = ("text pairs", "single texts") if trained_on else ("single texts",
                                                                            "text pairs")
        raise HeadError(f"the head was trained on {trained}; a model of {asked} would feed it "
                        "inputs unlike its training")
    return pairs


def _prepare(options: ExportOptions, log: Callable[[str], None]) -> _Prepared:
    log(f"loading {options.source}")
    checkpoint = load_checkpoint(options.source, options.random_shape)
    log(
        f"encoder: {checkpoint.num_layers} layers, hidden {checkpoint.hidden_size}, "
        f"vocab {checkpoint.config.vocab_size}"
        + (f"; its own head: {list(checkpoint.head.labels)}" if checkpoint.head else "")
    )
    head = _head(options, checkpoint)
    return _Prepared(
        checkpoint=checkpoint,
        layers=resolve_pooling_layers(options.pooling_layers, checkpoint.num_layers),
        head=head,
        max_sequence_length=_max_sequence_length(options, checkpoint),
        text_pairs=_text_pairs(options, head),
        head_from_checkpoint=head is not None and options.head is None
        and checkpoint.head is not None,
    )


def _config_fields(options: ExportOptions, prepared: _Prepared) -> ConfigFields:
    return ConfigFields(
        name=options.model,
        num_layers=prepared.checkpoint.num_layers,
        embedding_dimension=prepared.checkpoint.hidden_size,
        max_sequence_length=prepared.max_sequence_length,
        pooling_layers=prepared.layers,
        labels=prepared.head.labels if prepared.head else (),
        max_batch_size=options.max_batch_size,
        embed_prefix=options.embed_prefix,
        classify_prefix=options.classify_prefix,
        backend=BACKEND if options.variant in OPENVINO_VARIANTS else "",
        text_pairs=prepared.text_pairs,
    )


def _versions() -> dict[str, str]:
    versions = {name: metadata.version(name) for name in _VERSIONED_PACKAGES}
    for name in _OPTIONAL_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _provenance(
    options: ExportOptions, prepared: _Prepared, graph: PoolingGraph, report: ParityReport
) -> dict[str, object]:
    checkpoint, config = prepared.checkpoint, prepared.checkpoint.config
    return {
        RECORD_SOURCE: checkpoint.source,
        RECORD_SOURCE_KIND: checkpoint.kind,
        "random_shape": vars(options.random_shape) if checkpoint.kind == "random" else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "exporter": "torch.onnx.export(dynamo=True)",
        "num_layers": checkpoint.num_layers,
        "hidden_size": checkpoint.hidden_size,
        "num_attention_heads": int(config.num_attention_heads),
        "intermediate_size": int(config.intermediate_size),
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": checkpoint.max_position_embeddings,
        "max_sequence_length": prepared.max_sequence_length,
        "pooling_layers": list(prepared.layers),
        "outputs": graph.output_names(),
        RECORD_HEAD: prepared.head.describe() if prepared.head else None,
        "text_pairs": prepared.text_pairs,
        "pair_encoding": _pair_encoding(checkpoint) if prepared.text_pairs else None,
        "parity": report.to_dict(),
    }


def _pair_encoding(checkpoint: Checkpoint) -> dict[str, object]:
    """How the folder's tokenizer.json encodes a pair (what the server will feed the graph)."""
    encoding = checkpoint.tokenizer.encode(*PARITY_PAIRS[0])
    return {"pair": list(PARITY_PAIRS[0]), "tokens": encoding.tokens,
            "type_ids": encoding.type_ids}


def _builder(
    options: ExportOptions, prepared: _Prepared, log: Callable[[str], None]
) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        graph = PoolingGraph(prepared.checkpoint.model, prepared.layers, prepared.head)
        log(f"exporting {len(graph.output_names())} outputs for layers {list(prepared.layers)}")
        export_onnx(graph, folder / ONNX_FILE)
        rewrite_file(folder / ONNX_FILE)  # before parity, which so checks the graph served
        prepared.checkpoint.tokenizer.save(str(folder / TOKENIZER_FILE))
        if prepared.head is not None:
            labels = "".join(f"{label}\n" for label in prepared.head.labels)
            (folder / LABELS_FILE).write_text(labels, encoding="utf-8")
        items = parity_items(prepared.text_pairs)
        log(f"verifying the ONNX graph against PyTorch on {len(items)} "
            f"{'text pairs' if prepared.text_pairs else 'texts'}")
        report = verify_export(
            graph,
            folder / ONNX_FILE,
            prepared.checkpoint.tokenizer,
            prepared.max_sequence_length,
            options.tolerance,
            items,
        )
        provenance = _provenance(options, prepared, graph, report)
        if prepared.head_from_checkpoint and prepared.checkpoint.classifier is not None:
            log("checking the head's logits against the checkpoint's own classifier")
            provenance["checkpoint_logits_max_abs_diff"] = verify_checkpoint_head(
                graph, prepared.checkpoint.classifier, prepared.checkpoint.tokenizer,
                prepared.max_sequence_length, options.tolerance, items)
        provenance["variant"] = options.variant
        if options.variant in ("fp16", "int8"):
            provenance.update(_onnxruntime_variant(options, prepared, graph, folder, log))
        elif options.variant in OPENVINO_VARIANTS:
            provenance.update(_openvino_variant(options, prepared, graph, folder, log))
        log("measuring OpenVINO bf16 against PyTorch fp32")
        provenance["bf16_parity"] = bf16_parity(graph, folder, prepared.checkpoint.tokenizer,
                                                prepared.max_sequence_length, items)
        text = json.dumps(provenance, indent=2, ensure_ascii=False) + "\n"
        (folder / EXPORT_FILE).write_text(text, encoding="utf-8")

    return build


def _onnxruntime_variant(options: ExportOptions, prepared: _Prepared, graph: PoolingGraph,
                         folder: Path, log: Callable[[str], None]) -> dict[str, object]:
    config = prepared.checkpoint.config
    log(f"making the {options.variant} graph (fusion"
        f"{', fp16' if options.variant == 'fp16' else ', int8 weights'})")
    fused = make_variant(folder, options.variant, int(config.num_attention_heads),
                         prepared.checkpoint.hidden_size)
    if fused != int(config.num_hidden_layers):
        log(f"warning: attention fused in {fused} of {config.num_hidden_layers} layers; "
            "the graph is right but slower than it could be")
    log(f"verifying the {options.variant} graph against PyTorch fp32")
    report = verify_variant(graph, folder / ONNX_FILE, prepared.checkpoint.tokenizer,
                            prepared.max_sequence_length, options.variant,
                            parity_items(prepared.text_pairs))
    return {RECORD_FUSED_ATTENTION: fused, "variant_parity": report.to_dict()}


def _openvino_variant(options: ExportOptions, prepared: _Prepared, graph: PoolingGraph,
                      folder: Path, log: Callable[[str], None]) -> dict[str, object]:
    """The IR beside the verified model.onnx (openvino_ir.py says why both stay)."""
    tokenizer = prepared.checkpoint.tokenizer
    calibration: list = []
    if options.variant == "openvino-int8":
        prefix = options.classify_prefix if prepared.head else options.embed_prefix
        calibration = calibration_inputs(tokenizer, prepared.max_sequence_length, prefix,
                                         text_pairs=prepared.text_pairs)
        log(f"quantizing with NNCF, calibrated on {len(calibration)} news texts")
    else:
        log("converting the fp32 graph to OpenVINO IR")
    record = make_ir(folder, options.variant, calibration)
    log(f"verifying the {options.variant} IR against PyTorch fp32")
    report = verify_variant(graph, folder / ONNX_FILE, tokenizer, prepared.max_sequence_length,
                            options.variant, parity_items(prepared.text_pairs),
                            runner=OpenVinoRunner(folder / IR_FILE, "f32"))
    return {"openvino_ir": record, "variant_parity": report.to_dict()}


def _warn_on_backend(options: ExportOptions, log: Callable[[str], None]) -> None:
    """config.pbtxt is the model's: a later version's variant does not change its backend."""
    existing = read_model_config(options.model_repository / options.model)
    if existing is None:
        return
    if options.variant in OPENVINO_VARIANTS and existing.backend != BACKEND:
        log(f"warning: {options.model}'s config.pbtxt names backend {existing.backend!r}, not "
            f"{BACKEND!r}: the IR is served only where the server picks OpenVINO for it "
            "(--cpu-engine auto|openvino); edit config.pbtxt to serve it everywhere")
    elif options.variant == "int8" and existing.backend == BACKEND:
        log(f"warning: {options.model}'s config.pbtxt names backend {BACKEND!r}, which cannot "
            "run the int8 graph's QAttention: that version will not load")


def reference_graph(options: ExportOptions) -> PoolingGraph:
    """The PyTorch graph `export_model` exports for these options (deterministic for the random
    source and a random head: same seed, same weights), for comparisons outside the export."""
    prepared = _prepare(options, _quiet)
    return PoolingGraph(prepared.checkpoint.model, prepared.layers, prepared.head)


def _quiet(_: str) -> None:
    pass


def export_model(options: ExportOptions, log: Callable[[str], None] = _quiet) -> Path:
    """Export, verify and publish one version; returns the published version folder."""
    if options.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {options.variant!r}")
    plan_version(options.model_repository, options.model, options.version)  # fail fast
    _warn_on_backend(options, log)
    prepared = _prepare(options, log)
    config = build_model_config(_config_fields(options, prepared))
    plan = plan_version(options.model_repository, options.model, options.version)
    target = publish_version(
        plan,
        _builder(options, prepared, log),
        config=config,
        max_positions=prepared.checkpoint.max_position_embeddings,
    )
    log(f"published {target}")
    return target


def read_export_record(version_dir: Path) -> dict[str, object]:
    """export.json of a published version (for the CLI summary and for tests)."""
    return json.loads((version_dir / EXPORT_FILE).read_text(encoding="utf-8"))
