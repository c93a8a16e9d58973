"""Sources, heads, layer choice, the CLI, and a verification failure end to end."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from bertstream.export import (
    ClassificationHead,
    ExportOptions,
    ExportVerificationError,
    HeadError,
    RandomShape,
    export_model,
    load_head,
    random_checkpoint,
    random_head,
    read_model_config,
    resolve_pooling_layers,
    save_head,
)
from bertstream.export.cli import main, options_from_args, parse_args
from bertstream.export.verify import encode
from bertstream.v1 import model_config_pb2 as pb
from tokenizers import Tokenizer

FOLDER_SHAPE = RandomShape(
    num_layers=3, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=40
)


@pytest.mark.parametrize(
    ("layers", "num_layers", "expected"),
    [
        (None, 12, (11, 12)),
        (None, 1, (1,)),
        ((-1,), 3, (3,)),
        ((-1, -2), 2, (1, 2)),
        ((1, -1, 1), 4, (1, 4)),
        ((-12, 6), 12, (1, 6)),
    ],
)
def test_resolve_pooling_layers(
    layers: tuple[int, ...] | None, num_layers: int, expected: tuple[int, ...]
) -> None:
    assert resolve_pooling_layers(layers, num_layers) == expected


@pytest.mark.parametrize("layers", [(0,), (13,), (-13,), ()])
def test_resolve_pooling_layers_rejects(layers: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        resolve_pooling_layers(layers, 12)


def test_head_round_trip_and_errors(tmp_path: Path) -> None:
    head = random_head(["体育", "财经", "科技"], hidden_size=8, seed=1, pooling="mean")
    path = save_head(head, tmp_path / "head.safetensors")
    loaded = load_head(path)
    assert loaded.labels == ("体育", "财经", "科技") and loaded.pooling == "mean"
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert load_head(path, labels=["a", "b", "c"], pooling="cls").labels == ("a", "b", "c")
    with pytest.raises(HeadError, match="3 classes but 2 labels"):
        load_head(path, labels=["a", "b"])
    with pytest.raises(HeadError, match="unique"):
        random_head(["a", "a"], 8)
    with pytest.raises(HeadError, match="pooling"):
        random_head(["a"], 8, pooling="max")
    with pytest.raises(HeadError, match=r"\[C, H\]"):
        ClassificationHead(("a",), torch.zeros(1, 8), torch.zeros(2))


def test_cli_flags_map_to_options(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("正面\n中性\n\n负面\n", encoding="utf-8")
    args = parse_args(
        [
            "--model", "news", "--source", "hfl/rbt3", "--model-repository", str(tmp_path),
            "--version", "3", "--num-layers", "3", "--hidden-size", "48", "--num-heads", "3",
            "--intermediate-size", "96", "--seed", "7", "--max-sequence-length", "128",
            "--pooling-layers", "-1,-2,1", "--labels-file", str(labels), "--head-pooling",
            "mean", "--embed-prefix", "query: ", "--classify-prefix", "passage: ",
            "--tolerance", "1e-5", "--max-batch-size", "8",
        ]
    )  # fmt: skip
    options = options_from_args(args)
    assert options == ExportOptions(
        model="news",
        source="hfl/rbt3",
        model_repository=tmp_path,
        version=3,
        random_shape=RandomShape(3, 48, 3, 96, seed=7),
        max_sequence_length=128,
        pooling_layers=(-1, -2, 1),
        labels=("正面", "中性", "负面"),
        head_pooling="mean",
        max_batch_size=8,
        embed_prefix="query: ",
        classify_prefix="passage: ",
        tolerance=1e-5,
    )


def test_failed_verification_publishes_nothing(
    model_repository: Path, tmp_path: Path, make_tiny_options: Callable[..., ExportOptions]
) -> None:
    repository = Path(shutil.copytree(model_repository, tmp_path / "repo"))
    before = sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))
    options = make_tiny_options("tiny-embed", repository, tolerance=-1.0)
    with pytest.raises(ExportVerificationError, match="differ from PyTorch") as error:
        export_model(options)
    assert error.value.report is not None and error.value.report.texts >= 3
    after = sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))
    assert after == before, "no version 2, no temp folder"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = random_checkpoint(FOLDER_SHAPE)
    return checkpoint.save_pretrained(tmp_path_factory.mktemp("hf") / "rbt-tiny")


def test_export_from_local_folder_with_head_file(
    hf_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = random_head(["体育", "财经"], FOLDER_SHAPE.hidden_size, seed=5, pooling="mean")
    head_file = save_head(head, tmp_path / "head.safetensors")
    repository = tmp_path / "repo"
    argv = [
        "--source", str(hf_folder), "--model", "folder-news", "--model-repository",
        str(repository), "--pooling-layers", "-1,1", "--head", str(head_file),
        "--classify-prefix", "新闻：",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    version = repository / "folder-news" / "1"
    assert f"published {version}" in out and "logits" in out
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert record["source"] == str(hf_folder.resolve()) and record["source_kind"] == "folder"
    assert record["parity"]["sequence_lengths"] == [16, 40]
    assert (version / "labels.txt").read_text(encoding="utf-8") == "体育\n财经\n"
    config = read_model_config(repository / "folder-news")
    assert config is not None
    assert (config.task, config.num_labels, config.num_layers) == (pb.TASK_CLASSIFY, 2, 3)
    assert (config.max_sequence_length, config.embedding_dimension) == (40, 32)
    assert (list(config.pooling_layers), config.default_pooling_layer) == ([1, 3], 3)
    assert config.classify_prefix == "新闻：" and config.embed_prefix == ""
    _check_folder_outputs(version, head)


def _check_folder_outputs(version: Path, head: ClassificationHead) -> None:
    """The weights came from the folder (not a fresh random init), and the head file's
    mean-pooled logits are what the graph computes."""
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(version / "tokenizer.json"))
    batch = encode(tokenizer, ["苹果发布iPhone 15，售价5999元", "短讯"], 40, pad=True)
    tokens, mean, logits = session.run(["tokens_layer3", "mean_layer3", "logits"], batch)
    reference = random_checkpoint(FOLDER_SHAPE).model
    with torch.no_grad():
        expected = reference(
            input_ids=torch.from_numpy(batch["input_ids"]),
            attention_mask=torch.from_numpy(batch["attention_mask"]),
            token_type_ids=torch.from_numpy(batch["token_type_ids"]),
        ).last_hidden_state.numpy()
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(tokens[mask], expected[mask], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        logits, mean @ head.weight.numpy().T + head.bias.numpy(), atol=1e-5, rtol=0
    )
