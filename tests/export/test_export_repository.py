"""The shared repository's two tiny models: files, config.pbtxt, export.json, ONNX outputs.

Read-only use of the session fixture; nothing here exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bertstream.export import layer_output_names, reference_graph
from bertstream.export.verify import check_external_data, encode, run_torch
from bertstream.v1 import model_config_pb2 as pb
from google.protobuf import text_format
from tokenizers import Tokenizer

TEXTS = [
    "今天股市大涨，沪指收复三千点。",
    "苹果发布iPhone 15，售价5999元",
    "颱風來襲，學校停課一天😀",
    "短讯",
]
LABELS = ("positive", "neutral", "negative")
EMBED_OUTPUTS = layer_output_names(1) + layer_output_names(2)


def _session(version: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])


def _tokenizer(version: Path) -> Tokenizer:
    return Tokenizer.from_file(str(version / "tokenizer.json"))


def _config(repository: Path, model: str) -> pb.ModelConfig:
    text = (repository / model / "config.pbtxt").read_text(encoding="utf-8")
    return text_format.Parse(text, pb.ModelConfig())


def test_version_folders_hold_every_file(model_repository: Path) -> None:
    for model in ("tiny-embed", "tiny-news"):
        entries = {p.name for p in (model_repository / model).iterdir()}
        assert entries == {"config.pbtxt", "1"}, "no temp folders or stray files"
    embed = {p.name for p in (model_repository / "tiny-embed" / "1").iterdir()}
    assert embed == {"model.onnx", "model.onnx.data", "tokenizer.json", "export.json"}
    news = model_repository / "tiny-news" / "1"
    assert {p.name for p in news.iterdir()} == embed | {"labels.txt"}
    assert (news / "labels.txt").read_text(encoding="utf-8").splitlines() == list(LABELS)
    assert check_external_data(news / "model.onnx") == ["model.onnx.data"]


def test_config_pbtxt_parses_back(model_repository: Path) -> None:
    embed = _config(model_repository, "tiny-embed")
    assert embed.name == "tiny-embed"
    assert embed.platform == "onnxruntime_onnx"
    assert embed.max_batch_size == 32
    assert embed.version_policy.WhichOneof("policy_choice") == "latest"
    assert embed.version_policy.latest.num_versions == 1
    assert embed.dynamic_batching.max_queue_delay_microseconds == 0
    assert len(embed.instance_group) == 1
    assert embed.instance_group[0].count == 1
    assert embed.instance_group[0].kind == pb.ModelInstanceGroup.KIND_AUTO
    assert embed.task == pb.TASK_EMBED
    assert embed.max_sequence_length == 64
    assert embed.embedding_dimension == 64
    assert embed.default_pooling == pb.POOLING_MEAN
    assert list(embed.pooling_layers) == [1, 2]
    assert embed.default_pooling_layer == 2
    assert embed.num_layers == 2
    assert embed.num_labels == 0
    assert (embed.embed_prefix, embed.classify_prefix) == ("", "")
    news = _config(model_repository, "tiny-news")
    assert (news.name, news.task, news.num_labels) == ("tiny-news", pb.TASK_CLASSIFY, 3)


def test_export_json_records_parity_and_provenance(model_dir: Callable[..., Path]) -> None:
    record = json.loads((model_dir("tiny-news") / "export.json").read_text(encoding="utf-8"))
    parity = record["parity"]
    assert parity["passed"] is True
    assert parity["tolerance"] == 1e-4
    assert set(parity["max_abs_diff"]) == {*EMBED_OUTPUTS, "logits", "probabilities"}
    assert all(0 <= diff <= 1e-4 for diff in parity["max_abs_diff"].values())
    assert parity["texts"] >= 3
    assert len(parity["sequence_lengths"]) >= 2 and max(parity["sequence_lengths"]) == 64
    assert 1 in parity["batch_sizes"] and max(parity["batch_sizes"]) >= 3
    assert record["source"] == "random"
    assert (record["num_layers"], record["hidden_size"]) == (2, 64)
    assert record["pooling_layers"] == [1, 2]
    assert set(record["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "tokenizers"}
    assert record["head"]["labels"] == list(LABELS)
    assert record["head"]["pooling"] == "cls"
    assert record["created"].endswith("+00:00")


def test_onnx_output_names_and_shapes(model_dir: Callable[..., Path]) -> None:
    session = _session(model_dir("tiny-news"))
    assert [i.name for i in session.get_inputs()] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert all(i.type == "tensor(int64)" for i in session.get_inputs())
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(outputs) == [*EMBED_OUTPUTS, "logits", "probabilities"]
    assert outputs["mean_layer2"][1] == 64 and outputs["mean_max_layer1"][1] == 128
    assert outputs["tokens_layer2"][2] == 64 and outputs["logits"][1] == 3
    embed = {o.name for o in _session(model_dir("tiny-embed")).get_outputs()}
    assert embed == set(EMBED_OUTPUTS)


@pytest.fixture(scope="module")
def news_graph(model_repository: Path, make_tiny_options: Callable[..., object]) -> object:
    options = make_tiny_options("tiny-news", model_repository, labels=LABELS)
    return reference_graph(options)


def test_onnx_matches_torch_batched_and_single(
    model_dir: Callable[..., Path], news_graph: torch.nn.Module
) -> None:
    version = model_dir("tiny-news")
    session, tokenizer = _session(version), _tokenizer(version)
    batch = encode(tokenizer, TEXTS, 64, pad=True)
    names = news_graph.output_names()
    batched = dict(zip(names, session.run(names, batch), strict=True))
    for name, value in run_torch(news_graph, batch).items():
        np.testing.assert_allclose(batched[name], value, atol=1e-4, rtol=0)
    pooled = [n for n in names if not n.startswith("tokens_")]
    for row, text in enumerate(TEXTS):
        single = encode(tokenizer, [text], 64, pad=False)
        alone = dict(zip(pooled, session.run(pooled, single), strict=True))
        reference = run_torch(news_graph, single)
        for name in pooled:
            np.testing.assert_allclose(alone[name][0], reference[name][0], atol=1e-4, rtol=0)
            np.testing.assert_allclose(batched[name][row], alone[name][0], atol=1e-4, rtol=0)


def test_poolings_agree_with_numpy_on_padded_batch(model_dir: Callable[..., Path]) -> None:
    version = model_dir("tiny-news")
    session, tokenizer = _session(version), _tokenizer(version)
    batch = encode(tokenizer, TEXTS, 48, pad=True)
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all(), "the batch must contain padding"
    for layer in (1, 2):
        names = layer_output_names(layer)
        mean, maximum, cls, mean_max, tokens = session.run(names, batch)
        for row in range(len(TEXTS)):
            real = tokens[row][mask[row]]
            np.testing.assert_allclose(maximum[row], real.max(axis=0), atol=1e-6, rtol=0)
            np.testing.assert_allclose(mean[row], real.mean(axis=0), atol=1e-5, rtol=0)
            np.testing.assert_allclose(cls[row], tokens[row, 0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(mean_max, np.concatenate([mean, maximum], axis=1))
        # The check has teeth: taken over padding too, the max would differ.
        padded = [row for row in range(len(TEXTS)) if not mask[row].all()]
        assert any(not np.allclose(tokens[row].max(axis=0), maximum[row]) for row in padded)
    logits, probabilities = session.run(["logits", "probabilities"], batch)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
