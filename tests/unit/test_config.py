"""config.pbtxt parsing, defaults and validation (pure)."""

from pathlib import Path

import pytest
from bertstream.server import config
from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task
from google.protobuf import text_format

GOOD = """
name: "news"
task: TASK_CLASSIFY
num_labels: 3
embedding_dimension: 64
num_layers: 2
pooling_layers: [1, 2]
max_sequence_length: 128
"""


def write(tmp_path: Path, text: str, name: str = "news") -> Path:
    model = tmp_path / name
    model.mkdir()
    (model / config.CONFIG_FILE).write_text(text, encoding="utf-8")
    return model


def test_defaults_filled(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.version_policy.latest.num_versions == 1
    assert cfg.max_batch_size == 32
    assert cfg.default_pooling == Pooling.POOLING_MEAN
    assert cfg.default_pooling_layer == 2
    assert cfg.dynamic_batching.max_batch_tokens == 32 * 128
    assert cfg.instance_group[0].count == 1
    assert cfg.task == Task.TASK_CLASSIFY


def test_round_trips_through_text_format(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    again = ModelConfig()
    text_format.Parse(text_format.MessageToString(cfg), again)
    assert again == cfg


def test_unparsable_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not parse"):
        config.load(write(tmp_path, "name: news {"))


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not parse"):
        config.load(write(tmp_path, GOOD + "\nbackend: \"tensorrt\"\n"))


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(config.ConfigError, match="missing"):
        config.load(tmp_path / "m")


def test_validate_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """
    name: "other"
    platform: "tensorrt_plan"
    task: TASK_CLASSIFY
    num_layers: 2
    pooling_layers: [3]
    default_pooling_layer: 1
    max_sequence_length: 512
    dynamic_batching { max_batch_tokens: 100 }
    """
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text, name="news"))
    message = str(info.value)
    for fragment in ("differs from its folder", "platform", "num_labels", "embedding_dimension",
                     "outside 1..2", "default_pooling_layer", "max_batch_tokens"):
        assert fragment in message
