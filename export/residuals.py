"""Residual sums before layer norms as ONNX `Sum`: keeps onnxruntime's CPU graph fast.

At session load (ORT_ENABLE_ALL) onnxruntime fuses `Add(residual) -> LayerNormalization`
into its SkipLayerNormalization operator whenever it can prove both Add inputs share one
shape, which it can in the dynamo exporter's graph (symbolic batch and sequence axes) and not
in optimum's (shapes computed at run time). The CPU kernel of that operator is a scalar loop
(onnxruntime 1.32, contrib_ops/cpu/skip_layer_norm.cc): on multilingual-e5-small, batches of
32 news texts, 2 cores, its 24 nodes took 4.2 ms each where a plain LayerNormalization takes
0.7, and the graph ran 10 % faster with the Sums (int8: 17 %; docs/speed.md, "Against
infinity"). A two-input `Sum` is the same computation (same broadcasting, the same
float result), runs as fast as Add on the CPU, and matches no fusion pattern.

The fused GPU variant wants the fusion (there SkipLayerNormalization is the fast form), so
`residual_adds` restores the Adds before onnxruntime's BERT optimizer sees the graph.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def _residuals(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    """`op_type` nodes of two computed inputs (no weight) whose output only feeds the first
    input of a LayerNormalization: the residual connections of a BERT encoder (and the
    embeddings' sum)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producers = {output: node for node in model.graph.node for output in node.output}
    graph_outputs = {o.name for o in model.graph.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or node.input[0] not in producers:
            continue
        residual = producers[node.input[0]]
        if (residual.op_type == op_type and len(residual.input) == 2
                and not constants.intersection(residual.input)
                and residual.output[0] not in graph_outputs
                and len(users.get(residual.output[0], [])) == 1):
            found.append(residual)
    return found


def residual_sums(model: onnx.ModelProto) -> int:
    """Turn each residual Add before a LayerNormalization into a Sum; returns how many."""
    nodes = _residuals(model, "Add")
    for node in nodes:
        node.op_type = "Sum"
    return len(nodes)


def residual_adds(model: onnx.ModelProto) -> int:
    """The inverse of `residual_sums`, for onnxruntime's BERT optimizer; returns how many."""
    nodes = _residuals(model, "Sum")
    for node in nodes:
        node.op_type = "Add"
    return len(nodes)


def rewrite_file(path: Path) -> int:
    """`residual_sums` on a saved graph in place; weights in external files stay untouched."""
    model = onnx.load(str(path), load_external_data=False)
    count = residual_sums(model)
    if count:
        onnx.save(model, str(path))
    return count
