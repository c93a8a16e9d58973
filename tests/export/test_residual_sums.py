"""The fp32 export's residual Sums (export/residuals.py): onnxruntime's CPU session then keeps
Add + LayerNormalization apart (its fused SkipLayerNormalization kernel is the slower one on a
CPU), and the outputs are those of the Adds, bit for bit."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from bertstream.export.residuals import residual_adds, residual_sums


def _session_ops(model: onnx.ModelProto,
                 tmp_path: Path) -> tuple[Counter[str], ort.InferenceSession]:
    """The op counts of the graph a CPU session runs after its own fusions, and the session."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return Counter(node.op_type for node in optimized.graph.node), session


def test_fp32_export_keeps_layer_norms_unfused(
    tmp_path: Path, model_dir: Callable[..., Path],
) -> None:
    folder = model_dir("tiny-news")
    layers = json.loads((folder / "export.json").read_text(encoding="utf-8"))["num_layers"]
    exported = onnx.load(folder / "model.onnx")  # a tiny model: weights in memory
    ops = Counter(node.op_type for node in exported.graph.node)
    # Two residuals per layer and the embeddings' sum.
    assert ops["Sum"] == ops["LayerNormalization"] == 2 * layers + 1, ops

    restored = onnx.load(folder / "model.onnx")
    assert residual_adds(restored) == 2 * layers + 1
    with_sums, sums = _session_ops(exported, tmp_path)
    with_adds, adds = _session_ops(restored, tmp_path)
    assert with_sums["SkipLayerNormalization"] == 0, with_sums
    # What the Sums are for: with Adds, onnxruntime fuses (all but the embeddings' one).
    assert with_adds["SkipLayerNormalization"] == 2 * layers, with_adds

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(3, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    names = [o.name for o in sums.get_outputs()]
    for name, got, expected in zip(names, sums.run(names, feeds), adds.run(names, feeds),
                                   strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


def test_rewrite_round_trips() -> None:
    residual = onnx.helper.make_node("Add", ["a", "b"], ["s"], name="residual")
    bias = onnx.helper.make_node("Add", ["s0", "bias"], ["a"], name="bias")
    norm = onnx.helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"])
    spec = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [bias, residual, norm], "g",
        [spec("s0", onnx.TensorProto.FLOAT, [2, 4]), spec("b", onnx.TensorProto.FLOAT, [2, 4])],
        [spec("y", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("bias", "gamma",
                                                                            "beta")])
    model = onnx.helper.make_model(graph)
    assert residual_sums(model) == 1, "the residual only: the bias Add has a weight"
    assert [n.op_type for n in model.graph.node] == ["Add", "Sum", "LayerNormalization"]
    assert residual_sums(model) == 0
    assert residual_adds(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add", "Add", "LayerNormalization"]
