"""The frozen probe on a tiny random encoder: what it records is what the exported graph does.

The encoder is the session's tiny-embed (random weights), so accuracy itself means little;
what must hold is that the head file, its recorded metrics and the ONNX graph with the head
agree exactly, and that a head trained on prefixed text is never exported without the prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bertstream.export import ExportOptions, export_model
from bertstream.export.head import HeadError, load_head
from bertstream.export.train_cli import main
from bertstream.export.training import EncoderFeatures
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.tokenizer import TextTokenizer

PREFIX = "新闻："
TOPICS = {"sport": "比赛球队进球冠军", "finance": "股市银行利率基金", "weather": "暴雨台风气温降雪"}


def _write_dataset(path: Path, count: int, seed: int) -> Path:
    """Texts built from each label's own characters, so even random features separate them."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        label = list(TOPICS)[i % len(TOPICS)]
        chars = rng.choice(list(TOPICS[label]), size=rng.integers(4, 12))
        lines.append(json.dumps({"text": "".join(chars), "label": label}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _graph_confusion(version: Path, test_file: Path, labels: tuple[str, ...], length: int) -> list:
    """Confusion matrix of the exported graph's `probabilities` on the test file's texts, fed
    the way the server feeds it (prefix, server tokenizer, padding)."""
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()]
    tokenizer = TextTokenizer(version / "tokenizer.json", length)
    batch = Batch.of(tokenizer.encode([PREFIX + row["text"] for row in rows], truncate=True))
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "token_type_ids": batch.token_type_ids}
    (probabilities,) = session.run(["probabilities"], feeds)
    truth = np.array([labels.index(row["label"]) for row in rows])
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (truth, probabilities.argmax(axis=1)), 1)
    return confusion.tolist()


@pytest.fixture(scope="module")
def trained(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict, Path]:
    folder = tmp_path_factory.mktemp("probe")
    train = _write_dataset(folder / "train.jsonl", 90, seed=1)
    dev = _write_dataset(folder / "dev.jsonl", 30, seed=2)
    test = _write_dataset(folder / "test.jsonl", 30, seed=3)
    head, report = folder / "head.safetensors", folder / "report.json"
    argv = ["--encoder", str(model_repository / "tiny-embed" / "1"), "--data", str(train),
            "--dev", str(dev), "--test", str(test), "--prefix", PREFIX,
            "--output", str(head), "--report", str(report),
            "--engine", "onnxruntime"]  # the engine _graph_confusion runs  # fmt: skip
    assert main(argv) == 0
    return head, json.loads(report.read_text(encoding="utf-8")), test


def test_probe_records_what_it_trained(trained: tuple[Path, dict, Path]) -> None:
    head_file, training, _ = trained
    head = load_head(head_file)
    assert head.labels == ("finance", "sport", "weather"), "sorted label order"
    assert head.pooling == "mean" and head.prefix == PREFIX
    assert training["data"]["sizes"] == {"train": 90, "dev": 30, "test": 30}
    assert training["fit"]["C"] in [row["C"] for row in training["fit"]["search"]]
    assert training["metrics"]["train"]["accuracy"] >= 0.9, training["metrics"]
    assert training["engine"] == "CPUExecutionProvider"


def test_probe_features_on_openvino_are_the_servers(
    trained: tuple[Path, dict, Path], model_repository: Path, tmp_path: Path
) -> None:
    """`--engine openvino`: the features come from the server's own OpenVINO load (bf16 where
    the CPU has it and the load check passes), agree with onnxruntime's, and the report says
    which engine and precision made them."""
    pytest.importorskip("openvino")
    from bertstream.server.engine.backends.base import RuntimeOptions
    from bertstream.server.engine.loader import open_version
    from bertstream.server.repository import config as model_config

    version = model_repository / "tiny-embed" / "1"
    texts = [row["text"] for row in map(json.loads, trained[2].read_text("utf-8").splitlines())]
    openvino = EncoderFeatures(version, PREFIX, engine="openvino")
    served, _ = open_version(version, model_config.load(version.parent),
                             RuntimeOptions(cpu_engine="openvino"))
    assert openvino.engine == served.provider and openvino.engine.startswith("OpenVINO CPU")
    got = openvino(texts, "mean")
    expected = EncoderFeatures(version, PREFIX, engine="onnxruntime")(texts, "mean")
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected,
                                                                                    axis=1)
    assert cosine.min() >= 0.999, cosine.min()

    folder = trained[2].parent
    report = tmp_path / "report.json"
    argv = ["--encoder", str(version), "--data", str(folder / "train.jsonl"),
            "--dev", str(folder / "dev.jsonl"), "--test", str(trained[2]), "--prefix", PREFIX,
            "--output", str(tmp_path / "head.safetensors"), "--report", str(report),
            "--engine", "openvino"]  # fmt: skip
    assert main(argv) == 0
    training = json.loads(report.read_text(encoding="utf-8"))
    assert training["engine"] == served.provider
    assert training["metrics"]["train"]["accuracy"] >= 0.9, training["metrics"]


def test_engine_flag_refuses_what_the_server_does_not_know(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        main(["--encoder", str(tmp_path), "--data", "x.jsonl", "--output", str(tmp_path / "h"),
              "--engine", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_exported_head_reproduces_the_recorded_test_metrics(
    trained: tuple[Path, dict, Path],
    tmp_path: Path,
    make_tiny_options: Callable[..., ExportOptions],
) -> None:
    head_file, training, test_file = trained
    options = make_tiny_options("probe-news", tmp_path, head=head_file, classify_prefix=PREFIX)
    version = export_model(options)  # same seed as tiny-embed: the same encoder weights
    record = json.loads((version / "export.json").read_text(encoding="utf-8"))
    assert record["head"]["training"]["metrics"] == training["metrics"]

    confusion = _graph_confusion(version, test_file, load_head(head_file).labels, 64)
    assert confusion == training["metrics"]["test"]["confusion"]



def test_head_trained_with_a_prefix_needs_the_same_classify_prefix(
    trained: tuple[Path, dict, Path],
    tmp_path: Path,
    make_tiny_options: Callable[..., ExportOptions],
) -> None:
    head_file, _, _ = trained
    options = make_tiny_options("probe-news", tmp_path, head=head_file)
    with pytest.raises(HeadError, match="--classify-prefix '新闻：'"):
        export_model(options)
    assert not (tmp_path / "probe-news").exists(), "refused before anything was written"


def test_train_head_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "无标签"}\n', encoding="utf-8")
    argv = ["--encoder", str(tmp_path), "--data", str(bad), "--output", str(tmp_path / "h")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1: no 'label'" in err and "Traceback" not in err


@pytest.mark.parametrize("train_layers", [None, 1])
def test_finetune_writes_encoder_and_head_that_export_reproduces(
    trained: tuple[Path, dict, Path], tmp_path: Path, train_layers: int | None
) -> None:
    """Fine-tuning (all layers, or the top one over cached lower states) on a tiny folder
    checkpoint: the tuned folder + head export to a graph that reproduces the recorded test
    confusion matrix."""
    from bertstream.export import RandomShape, random_checkpoint

    _, _, test_file = trained
    shape = RandomShape(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    source = random_checkpoint(shape).save_pretrained(tmp_path / "tiny-folder")
    folder = test_file.parent
    head_file, tuned = tmp_path / "ft-head.safetensors", tmp_path / "tuned"
    argv = ["--finetune", "--source", str(source), "--data", str(folder / "train.jsonl"),
            "--dev", str(folder / "dev.jsonl"), "--test", str(test_file), "--prefix", PREFIX,
            "--epochs", "2", "--learning-rate", "1e-3", "--max-tokens", "32",
            "--output", str(head_file), "--encoder-output", str(tuned)]  # fmt: skip
    if train_layers:
        argv += ["--train-layers", str(train_layers)]
    assert main(argv) == 0
    head = load_head(head_file)
    training = head.training
    assert training is not None and len(training["history"]) == 2
    expected_mode = "full" if train_layers is None else "fine-tuning of the top 1"
    assert training["mode"].startswith(expected_mode)

    options = ExportOptions(model="tuned", source=str(tuned), model_repository=tmp_path / "repo",
                            head=head_file, classify_prefix=PREFIX, max_sequence_length=32)
    version = export_model(options)
    confusion = _graph_confusion(version, test_file, head.labels, 32)
    assert confusion == training["metrics"]["test"]["confusion"]
