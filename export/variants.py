"""Faster graphs of a verified export: fused fp16 for GPUs, dynamic int8 for CPUs.

Both start from the fp32 graph that already passed parity, and use onnxruntime's own tools:
`onnxruntime.transformers.optimizer.optimize_model` fuses attention, layer norm and GELU;
`convert_float_to_float16(keep_io_types=True)` makes the fp16 graph (inputs and outputs stay
int64 / float32, so the server does not change); `quantize_dynamic` makes int8 weights
(on a fused graph it needs DefaultTensorType FLOAT, or it cannot type the fused nodes' outputs;
per-channel weight scales keep multilingual-e5-small at cosine >= 0.99, per-tensor ones did
not). Reduced precision cannot
match PyTorch to 1e-4, so a variant is checked by cosine similarity of every pooled vector to
PyTorch's fp32 ones, per text, at both parity lengths, and by the largest difference in
class probabilities. The OpenVINO IR variants (openvino_ir.py) go through the same check; only
the runner differs (`Runner`: onnxruntime here, OpenVINO there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
import tokenizers
from bertstream.server.version_format import (
    LOGITS,
    MODEL_DATA_FILE,
    MODEL_FILE,
    PROBABILITIES,
    TOKEN_OUTPUT_PREFIX,
)
from onnx import numpy_helper

from .graph import PoolingGraph
from .residuals import residual_adds, residual_sums
from .verify import (
    PARITY_TEXTS,
    ExportVerificationError,
    Item,
    _batches,
    check_external_data,
    encode,
    parity_lengths,
    run_torch,
)

# openvino, openvino-int8: an OpenVINO IR pair beside the fp32 graph (openvino_ir.py).
VARIANTS = ("fp32", "fp16", "int8", "openvino", "openvino-int8")
# openvino is the fp32 graph converted, f32 weights: only float rounding may differ.
MIN_COSINE = {"fp16": 0.999, "int8": 0.99, "openvino": 0.9999, "openvino-int8": 0.99}
# int8 moves probabilities more than cosines suggest (multilingual-e5-small news head: 0.058
# on the parity texts with per-channel weights, 0.19 without), so its bound is looser.
MAX_PROBABILITY_DIFF = {"fp16": 0.01, "int8": 0.1, "openvino": 0.001, "openvino-int8": 0.1}


class Runner(Protocol):
    """What a variant is checked on: named outputs for token arrays, and words for the record."""

    description: str

    def run(self, names: Sequence[str], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        ...


class OnnxRuntimeRunner:
    def __init__(self, onnx_path: Path, variant: str) -> None:
        check_external_data(onnx_path)
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=_providers(variant))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportVerificationError(
                f"onnxruntime cannot run the {variant} graph here ({exc}); fp16 graphs need a "
                "GPU build of onnxruntime to verify") from None
        self.description = f"onnxruntime {ort.__version__} {self.session.get_providers()[0]}"

    def run(self, names: Sequence[str], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(names), arrays)


@dataclass(frozen=True)
class VariantReport:
    variant: str
    runtime: str
    min_cosine: dict[str, float] = field(default_factory=dict)
    max_probability_diff: float | None = None
    top_labels_equal: bool | None = None  # None: an embed model

    def problems(self, min_cosine: float, max_probability_diff: float) -> str:
        """'' when every pooled output and the probabilities are within the bounds."""
        low = {n: c for n, c in self.min_cosine.items() if not c >= min_cosine}
        diff = self.max_probability_diff
        if not low and (diff is None or diff <= max_probability_diff):
            return ""
        return (f"cosine below {min_cosine} for {low or 'none'}; probability diff {diff} "
                f"(bound {max_probability_diff})")

    def to_dict(self) -> dict[str, object]:
        record: dict[str, object] = {"variant": self.variant, "runtime": self.runtime}
        if self.variant in MIN_COSINE:
            record["min_cosine_required"] = MIN_COSINE[self.variant]
        return record | {
            "min_cosine": {k: round(v, 6) for k, v in self.min_cosine.items()},
            "max_probability_diff": self.max_probability_diff,
            "top_labels_equal": self.top_labels_equal,
        }


def _single_axis_unsqueezes(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> None:
    """Unsqueeze(attention_mask, [1, 2]) -> two Unsqueezes of one axis each.

    The dynamo exporter merges `mask.unsqueeze(1).unsqueeze(2)` into one node; onnxruntime's
    attention fusion only knows the mask path with two.
    """
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        axes = constants.get(node.input[1]) if len(node.input) == 2 else None
        if (node.op_type != "Unsqueeze" or node.input[0] != "attention_mask" or axes is None
                or axes.size < 2 or (axes < 0).any()):
            nodes.append(node)
            continue
        current = node.input[0]
        for i, axis in enumerate(sorted(int(a) for a in axes.reshape(-1))):
            axis_name = f"{node.name}_axis{i}"
            graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axis_name))
            last = i == axes.size - 1
            output = node.output[0] if last else f"{node.output[0]}_step{i}"
            nodes.append(onnx.helper.make_node("Unsqueeze", [current, axis_name], [output],
                                               name=f"{node.name}_{i}"))
            current = output
    del graph.node[:]
    graph.node.extend(nodes)


def _scores_scaled_by_division(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> None:
    """MatMul(q, k) * c  ->  MatMul(q, k) / (1 / c), where the product is added to the mask.

    transformers 5 scales attention scores with a Mul; onnxruntime's matcher takes the first
    Mul above the mask Add, which is then the score's rather than the mask's, and gives up.
    """
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2:
            continue
        scores = [n for n in node.input if n in producers and producers[n].op_type == "MatMul"]
        scale = [n for n in node.input if n in constants and constants[n].size == 1]
        users = consumers.get(node.output[0], [])
        if len(scores) != 1 or len(scale) != 1 or [u.op_type for u in users] != ["Add"]:
            continue
        value = constants[scale[0]]
        if not np.issubdtype(value.dtype, np.floating) or not value.reshape(-1)[0]:
            continue
        name = f"{node.name}_divisor"
        divisor = np.array(1.0 / value.reshape(-1)[0].astype(np.float64), value.dtype)
        graph.initializer.append(numpy_helper.from_array(divisor.reshape(value.shape), name))
        node.op_type = "Div"
        node.input[:] = [scores[0], name]


def prepare_attention_fusion(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite two spots of the exported graph, each equivalent (the division up to float
    rounding, exact when the scale is a power of two), into the forms
    onnxruntime's BERT optimizer fuses into one Attention operator per layer (its pattern
    matcher, fusion_attention.py, predates transformers 5 and the dynamo exporter). Without
    them `optimize_model` still fuses layer norms and GELU but leaves attention as ~15 ops.
    """
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    _single_axis_unsqueezes(graph, constants)
    _scores_scaled_by_division(graph, constants)
    return model


def fused_attention_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type in ("Attention", "QAttention") for node in model.graph.node)


def make_variant(folder: Path, variant: str, num_heads: int, hidden_size: int) -> int:
    """Replace folder/model.onnx (+ .data) by the fused fp16 or int8 graph; return how many
    layers' attention was fused into one operator."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    source = folder / MODEL_FILE
    model = onnx.load(source)
    residual_adds(model)  # the fp32 graph's Sums (see residuals.py) back to fusable Adds
    fusions = FusionOptions("bert")
    if variant == "int8":
        # A CPU graph: SkipLayerNormalization's CPU kernel is slower than Add + LayerNorm
        # (residuals.py): without it int8 multilingual-e5-small runs 17 % faster.
        fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = False
    fused = optimize_model(prepare_attention_fusion(model), model_type="bert",
                           num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                           optimization_options=fusions)
    fused_layers = fused_attention_count(fused.model)  # int8 turns each into a QAttention
    if variant == "fp16":
        fused.convert_float_to_float16(keep_io_types=True)
    else:
        residual_sums(fused.model)  # or onnxruntime fuses them again at session load
    staged = folder / ".variant.onnx"
    fused.save_model_to_file(str(staged), use_external_data_format=False)
    if variant == "int8":
        quantized = folder / ".variant-int8.onnx"
        # Per-channel scales: per-tensor ones left multilingual-e5-small at cosine 0.958.
        quantize_dynamic(staged, quantized, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(quantized, staged)
    os.replace(staged, source)
    data = folder / MODEL_DATA_FILE
    if data.exists():
        data.unlink()  # the variant holds its weights inline (well under 2 GB)
    return fused_layers


def _providers(variant: str) -> list[str]:
    """fp16 kernels are a GPU's; int8 dynamic quantization is a CPU's."""
    available = ort.get_available_providers()
    if variant == "fp16" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cosines(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    expected = expected.reshape(expected.shape[0], -1).astype(np.float64)
    actual = actual.reshape(actual.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    return np.sum(expected * actual, axis=1) / np.maximum(norms, 1e-12)


def compare_variant(
    graph: PoolingGraph,
    runner: Runner,
    tokenizer: tokenizers.Tokenizer,
    max_sequence_length: int,
    variant: str,
    texts: Sequence[Item] = PARITY_TEXTS,
) -> VariantReport:
    """The runner's pooled outputs against PyTorch fp32's on the parity texts, at both parity
    lengths, one text at a time and all in one padded batch: the smallest cosine per output,
    the largest probability difference and whether every top label agrees. Judges nothing."""
    names = [n for n in graph.output_names()
             if not n.startswith(TOKEN_OUTPUT_PREFIX) and n != LOGITS]
    worst = dict.fromkeys([n for n in names if n != PROBABILITIES], 1.0)
    probability_diff = 0.0 if PROBABILITIES in names else None
    labels_equal = True if PROBABILITIES in names else None
    for batch_texts, length, pad in _batches(texts, parity_lengths(max_sequence_length)):
        arrays = encode(tokenizer, batch_texts, length, pad)
        expected = run_torch(graph, arrays)
        actual = dict(zip(names, runner.run(names, arrays), strict=True))
        for name in worst:
            worst[name] = min(worst[name], float(_cosines(expected[name], actual[name]).min()))
        if probability_diff is not None:
            want, got = expected[PROBABILITIES], actual[PROBABILITIES]
            probability_diff = max(probability_diff, float(np.max(np.abs(want - got))))
            labels_equal = labels_equal and bool(
                np.array_equal(want.argmax(axis=1), got.argmax(axis=1)))
    return VariantReport(variant, runner.description, worst, probability_diff, labels_equal)


def verify_variant(
    graph: PoolingGraph,
    onnx_path: Path,
    tokenizer: tokenizers.Tokenizer,
    max_sequence_length: int,
    variant: str,
    texts: Sequence[Item] = PARITY_TEXTS,
    runner: Runner | None = None,
) -> VariantReport:
    """Every pooled output at cosine >= MIN_COSINE[variant] to PyTorch fp32, per text, and
    probabilities within MAX_PROBABILITY_DIFF[variant]. `runner`: what runs the variant
    (default: onnxruntime on `onnx_path`; OpenVINO for the IR variants)."""
    runner = runner or OnnxRuntimeRunner(onnx_path, variant)
    report = compare_variant(graph, runner, tokenizer, max_sequence_length, variant, texts)
    why = report.problems(MIN_COSINE[variant], MAX_PROBABILITY_DIFF[variant])
    if why:
        raise ExportVerificationError(f"the {variant} graph drifts from PyTorch fp32: {why}")
    return report
