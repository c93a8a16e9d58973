"""The two graph rewrites that let onnxruntime fuse attention compute what the export does.

The fusion itself ignores the rewritten scale (its Attention operator scales by 1/sqrt(head
size) on its own), so only running the rewritten, unfused graph can catch a wrong divisor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from bertstream.export import export_model
from bertstream.export.variants import prepare_attention_fusion


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_rewrites_keep_every_output(tmp_path: Path,
                                    make_tiny_options: Callable[..., Any]) -> None:
    # Two heads of 32: the score scale 1/sqrt(32) is not a power of two, so the division
    # differs from the product by rounding only.
    version = export_model(make_tiny_options("heads32", tmp_path, num_heads=2,
                                             labels=("a", "b", "c")))
    original = onnx.load(version / "model.onnx")
    rewritten = prepare_attention_fusion(onnx.load(version / "model.onnx"))

    before = Counter(node.op_type for node in original.graph.node)
    after = Counter(node.op_type for node in rewritten.graph.node)
    layers = 2
    assert after["Div"] - before["Div"] == layers, "one score scaling per layer"
    assert after["Mul"] == before["Mul"] - layers
    assert after["Unsqueeze"] == before["Unsqueeze"] + 1, "the mask's [1, 2] split in two"

    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, size=(3, 40), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    expected, got = _run(original, feeds), _run(rewritten, feeds)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=2e-5, err_msg=name)
