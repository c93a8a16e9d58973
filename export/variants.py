"""Faster graphs of a verified export: fused fp16 for GPUs, dynamic int8 for CPUs.

Both start from the fp32 graph that already passed parity, and use onnxruntime's own tools:
`onnxruntime.transformers.optimizer.optimize_model` fuses attention, layer norm and GELU;
`convert_float_to_float16(keep_io_types=True)` makes the fp16 graph (inputs and outputs stay
int64 / float32, so the server does not change); `quantize_dynamic` makes int8 weights
(on a fused graph it needs DefaultTensorType FLOAT, see FACTS.md; per-channel weight scales
keep multilingual-e5-small at cosine >= 0.99, per-tensor ones did not). Reduced precision cannot
match PyTorch to 1e-4, so a variant is checked by cosine similarity of every pooled vector to
PyTorch's fp32 ones, per text, at both parity lengths, and by the largest difference in
class probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tokenizers

from .graph import PoolingGraph
from .verify import (
    PARITY_TEXTS,
    ExportVerificationError,
    _batches,
    check_external_data,
    encode,
    parity_lengths,
    run_torch,
)

VARIANTS = ("fp32", "fp16", "int8")
MIN_COSINE = {"fp16": 0.999, "int8": 0.99}
# int8 moves probabilities more than cosines suggest (multilingual-e5-small news head: 0.058
# on the parity texts with per-channel weights, 0.19 without), so its bound is looser.
MAX_PROBABILITY_DIFF = {"fp16": 0.01, "int8": 0.1}


@dataclass(frozen=True)
class VariantReport:
    variant: str
    provider: str
    min_cosine: dict[str, float] = field(default_factory=dict)
    max_probability_diff: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "runtime": f"onnxruntime {ort.__version__} {self.provider}",
            "min_cosine_required": MIN_COSINE[self.variant],
            "min_cosine": {k: round(v, 6) for k, v in self.min_cosine.items()},
            "max_probability_diff": self.max_probability_diff,
        }


def make_variant(folder: Path, variant: str, num_heads: int, hidden_size: int) -> None:
    """Replace folder/model.onnx (+ .data) by the fused fp16 or int8 graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    source = folder / "model.onnx"
    fused = optimize_model(str(source), model_type="bert", num_heads=num_heads,
                           hidden_size=hidden_size, opt_level=0)
    if variant == "fp16":
        fused.convert_float_to_float16(keep_io_types=True)
    staged = folder / ".variant.onnx"
    fused.save_model_to_file(str(staged), use_external_data_format=False)
    if variant == "int8":
        quantized = folder / ".variant-int8.onnx"
        # Per-channel scales: per-tensor ones left multilingual-e5-small at cosine 0.958.
        quantize_dynamic(staged, quantized, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(quantized, staged)
    os.replace(staged, source)
    data = folder / "model.onnx.data"
    if data.exists():
        data.unlink()  # the variant holds its weights inline (well under 2 GB)


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


def verify_variant(
    graph: PoolingGraph,
    onnx_path: Path,
    tokenizer: tokenizers.Tokenizer,
    max_sequence_length: int,
    variant: str,
    texts: Sequence[str] = PARITY_TEXTS,
) -> VariantReport:
    """Every pooled output at cosine >= MIN_COSINE[variant] to PyTorch fp32, per text."""
    check_external_data(onnx_path)
    try:
        session = ort.InferenceSession(str(onnx_path), providers=_providers(variant))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportVerificationError(
            f"onnxruntime cannot run the {variant} graph here ({exc}); fp16 graphs need a GPU "
            "build of onnxruntime to verify") from None
    names = [n for n in graph.output_names() if not n.startswith("tokens_") and n != "logits"]
    worst = dict.fromkeys([n for n in names if n != "probabilities"], 1.0)
    probability_diff = 0.0 if "probabilities" in names else None
    for batch_texts, length, pad in _batches(texts, parity_lengths(max_sequence_length)):
        arrays = encode(tokenizer, batch_texts, length, pad)
        expected = run_torch(graph, arrays)
        actual = dict(zip(names, session.run(names, arrays), strict=True))
        for name in worst:
            worst[name] = min(worst[name], float(_cosines(expected[name], actual[name]).min()))
        if probability_diff is not None:
            diff = float(np.max(np.abs(expected["probabilities"] - actual["probabilities"])))
            probability_diff = max(probability_diff, diff)
    report = VariantReport(variant, session.get_providers()[0], worst, probability_diff)
    low = {n: c for n, c in worst.items() if not c >= MIN_COSINE[variant]}
    if low or (probability_diff is not None
               and not probability_diff <= MAX_PROBABILITY_DIFF[variant]):
        raise ExportVerificationError(
            f"the {variant} graph drifts from PyTorch fp32: cosine below "
            f"{MIN_COSINE[variant]} for {low or 'none'}; probability diff {probability_diff}")
    return report
