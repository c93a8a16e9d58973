"""A sequence-pair classifier (BertForSequenceClassification, as fine-tuned on LCQMC or XNLI)
exported with `--text-pairs`: its ONNX graph answers the checkpoint's own logits on Chinese
pairs, truncated and not, and the published tokenizer pairs texts as Hugging Face does.

The checkpoint is a tiny random-init one written here (no hub), in a local folder laid out as
`save_pretrained` leaves it: what `--source` reads from a folder or the hub cache alike.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bertstream.export import (
    ConfigMismatchError,
    ExportOptions,
    RandomShape,
    export_model,
    random_checkpoint,
    read_model_config,
)
from bertstream.export.cli import main
from tokenizers import Tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

if TYPE_CHECKING:
    from conftest import ServerProcess

SHAPE = RandomShape(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                    max_position_embeddings=64, seed=3)
LABELS = ("不匹配", "匹配")  # LCQMC: 0 different, 1 same meaning
MODEL = "lcqmc"
FIRSTS = ["花呗怎么还款？", "今天北京天气怎么样", "他正在参加会议。", "苹果发布新手机"]
SECONDS = [
    "花呗如何还钱",
    "明天上海会下雨吗？会不会降温，出门要不要带伞呢",
    "他不在北京，也没有参加任何会议，据新华社报道，会议由国务院总理主持召开。",
    "苹果公司今天发布iPhone 15，售价5999元起；华为Mate 60 Pro同日开售！",
]


def _pair_checkpoint(folder: Path) -> Path:
    """A random BertForSequenceClassification with the generated Chinese vocabulary; the
    initializer range is wide so the logits differ visibly between pairs."""
    tokenizer = random_checkpoint(SHAPE).hf_tokenizer
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=SHAPE.hidden_size,
        num_hidden_layers=SHAPE.num_layers, num_attention_heads=SHAPE.num_heads,
        intermediate_size=SHAPE.intermediate_size,
        max_position_embeddings=SHAPE.max_position_embeddings, type_vocab_size=2,
        num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in
                                                                   enumerate(LABELS)},
        initializer_range=0.2,
    )
    torch.manual_seed(SHAPE.seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(checkpoint folder, published version, the CLI's stdout)."""
    root = tmp_path_factory.mktemp("pairs")
    folder = _pair_checkpoint(root / "checkpoint")
    repository = root / "repository"
    argv = ["--source", str(folder), "--model-repository", str(repository), "--model", MODEL,
            "--text-pairs", "--max-sequence-length", "48"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return folder, repository / MODEL / "1", out.getvalue()


def test_config_and_record_say_pairs(exported: tuple[Path, Path, str]) -> None:
    _, version, stdout = exported
    config = read_model_config(version.parent)
    assert config is not None and config.text_pairs and config.num_labels == 2
    assert (version / "labels.txt").read_text("utf-8").split() == list(LABELS)
    record = json.loads((version / "export.json").read_text("utf-8"))
    assert record["text_pairs"] is True and record["parity"]["passed"]
    assert record["parity"]["inputs"] == "text pairs"
    assert record["head"]["pooling"] == "pooler"
    assert record["checkpoint_logits_max_abs_diff"] <= 1e-4
    assert set(record["pair_encoding"]["type_ids"]) == {0, 1}
    assert "text pairs" in stdout and "checkpoint's own classifier" in stdout


@pytest.mark.parametrize(("truncation", "max_length"),
                         [(False, None), ("longest_first", 24), ("only_second", 24)])
def test_onnx_logits_equal_the_checkpoints(exported: tuple[Path, Path, str],
                                           truncation: str | bool, max_length: int | None) -> None:
    folder, version, _ = exported
    hf_tokenizer = BertTokenizerFast.from_pretrained(folder)
    inputs = hf_tokenizer(FIRSTS, SECONDS, truncation=truncation, max_length=max_length,
                          padding=True, return_tensors="np")
    assert set(np.unique(inputs["token_type_ids"][inputs["attention_mask"] == 1])) == {0, 1}
    lengths = inputs["attention_mask"].sum(axis=1)
    if max_length is None:
        assert lengths.max() > 24, "the untruncated case holds pairs the others cut"
    else:
        assert lengths.max() == max_length
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: inputs[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                     "token_type_ids")}
    logits, probabilities = session.run(["logits", "probabilities"], feeds)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(expected), -1),
                               atol=1e-5)
    assert np.ptp(expected[:, 1]) > 1e-2, "the pairs get different logits"


@pytest.mark.parametrize("strategy", ["longest_first", "only_second"])
def test_published_tokenizer_pairs_as_hugging_face(exported: tuple[Path, Path, str],
                                                   strategy: str) -> None:
    folder, version, _ = exported
    hf_tokenizer = BertTokenizerFast.from_pretrained(folder)
    published = Tokenizer.from_file(str(version / "tokenizer.json"))
    for first, second in zip(FIRSTS, SECONDS, strict=True):
        whole = published.encode(first, second)
        expected = hf_tokenizer(first, second)
        assert whole.ids == expected["input_ids"]
        assert whole.type_ids == expected["token_type_ids"]
    published.enable_truncation(20, strategy=strategy)
    for first, second in zip(FIRSTS, SECONDS, strict=True):
        cut = published.encode(first, second)
        expected = hf_tokenizer(first, second, truncation=strategy, max_length=20)
        assert (cut.ids, cut.type_ids) == (expected["input_ids"], expected["token_type_ids"])


def test_a_single_text_version_of_a_pair_model_is_refused(
        exported: tuple[Path, Path, str]) -> None:
    folder, version, _ = exported
    options = ExportOptions(model=MODEL, source=str(folder), model_repository=version.parents[1],
                            max_sequence_length=48, text_pairs=False)
    with pytest.raises(ConfigMismatchError, match="text_pairs"):
        export_model(options)
    assert sorted(p.name for p in version.parent.iterdir() if p.is_dir()) == ["1"]


def test_pairs_need_a_head(tmp_path: Path) -> None:
    options = ExportOptions(model="pairs", source="random", model_repository=tmp_path,
                            random_shape=SHAPE, text_pairs=True)
    with pytest.raises(ValueError, match="needs a classification head"):
        export_model(options)
    assert not (tmp_path / "pairs").exists()


def test_served_pairs_answer_the_checkpoint_s_logits(
        exported: tuple[Path, Path, str], start_server: Callable[..., ServerProcess]) -> None:
    """The exported pair model in a real server: Classify with text_pairs gives the
    checkpoint's own softmax, Rerank's raw scores its logit difference (label 1 = match), a
    single-text call is INVALID_ARGUMENT naming text_pairs."""
    import grpc
    from bertstream.v1 import bertstream_pb2 as pb
    from bertstream.v1 import bertstream_pb2_grpc as pb_grpc

    folder, version, _ = exported
    hf_tokenizer = BertTokenizerFast.from_pretrained(folder)
    inputs = hf_tokenizer(FIRSTS, SECONDS, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**inputs).logits.numpy()
    server = start_server(version.parents[1], default_model=MODEL)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.BertServiceStub(channel)
        reply = stub.Classify(pb.ClassifyRequest(texts=FIRSTS, text_pairs=SECONDS), timeout=30)
        served = np.zeros_like(logits)
        for row, result in zip(served, reply.results, strict=True):
            for label in result.labels:
                row[label.index] = label.probability
        np.testing.assert_allclose(served, torch.softmax(torch.from_numpy(logits), -1),
                                   atol=1e-5)
        ranked = stub.Rerank(pb.RerankRequest(query=FIRSTS[0], texts=SECONDS, raw_scores=True),
                             timeout=30)
        assert ranked.method == pb.RERANK_METHOD_CROSS_ENCODER
        with torch.no_grad():
            query = hf_tokenizer([FIRSTS[0]] * len(SECONDS), SECONDS, padding=True,
                                 return_tensors="pt")
            against = model(**query).logits.numpy()
        for result in ranked.results:
            expected = against[result.index, 1] - against[result.index, 0]
            assert result.score == pytest.approx(expected, abs=1e-4)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(texts=FIRSTS), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "text_pairs" in (info.value.details() or "")
    assert server.stop() == 0
