"""config.pbtxt parsing, defaults and validation (pure)."""

import re
from pathlib import Path

import pytest
from bertstream.server.repository import config
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
        config.load(write(tmp_path, GOOD + "\nmodel_warmup: 1\n"))


@pytest.mark.parametrize(("extra", "problem"), [
    ('backend: "tensorrt"', "backend 'tensorrt' is not supported"),
    ('backend: "openvino" parameters { key: "NUM_STREAMS" value { string_value: "0" } }',
     "parameter NUM_STREAMS must be a positive integer"),
    ('backend: "openvino" parameters { key: "INFERENCE_PRECISION_HINT" '
     'value { string_value: "fp8" } }', "INFERENCE_PRECISION_HINT must be one of"),
    ('backend: "openvino" parameters { key: "CACHE_DIR" value { string_value: "/tmp" } }',
     "'CACHE_DIR' is not an OpenVINO option bertstream knows"),
    ('parameters { key: "NUM_STREAMS" value { string_value: "2" } }',
     "need backend: \"openvino\""),
])
def test_engines_and_their_options_are_checked(tmp_path: Path, extra: str,
                                               problem: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(problem)):
        config.load(write(tmp_path, GOOD + extra + "\n"))


def test_an_openvino_config_loads(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD + 'backend: "openvino"\nparameters { key: '
                            '"INFERENCE_PRECISION_HINT" value { string_value: "bf16" } }\n'))
    assert cfg.backend == "openvino"
    assert cfg.parameters["INFERENCE_PRECISION_HINT"].string_value == "bf16"


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


PRIORITIES = GOOD + """
dynamic_batching {
  priority_levels: 3
  default_priority_level: 2
  max_batch_duration_microseconds: 30000
  max_skipped_batches: 4
  default_queue_policy { max_queue_size: 4096 }
  priority_queue_policy {
    key: 1
    value {
      default_timeout_microseconds: 200000 timeout_action: DELAY allow_timeout_override: true
    }
  }
}
"""


def test_priority_defaults_put_interactive_and_bulk_calls_apart(tmp_path: Path) -> None:
    batching = config.load(write(tmp_path, GOOD)).dynamic_batching
    assert (batching.priority_levels, batching.default_priority_level) == (2, 2)
    assert batching.max_batch_duration_microseconds == 50_000
    assert batching.max_skipped_batches == 4


def test_triton_priority_settings_parse_into_batcher_options(tmp_path: Path) -> None:
    """The operators guide's example, through to what the scheduler gets."""
    from bertstream.server.engine.loader import _batcher_options

    options = _batcher_options(config.load(write(tmp_path, PRIORITIES)))
    assert (options.levels, options.default_level) == (3, 2)
    assert options.max_batch_duration_s == pytest.approx(0.03)
    first = options.policy(1)
    assert (first.timeout_s, first.delay, first.allow_override) == (0.2, True, True)
    assert options.policy(2).max_queue_size == options.policy(3).max_queue_size == 4096


@pytest.mark.parametrize(("batching", "problem"), [
    ("priority_levels: 2 default_priority_level: 3", "default_priority_level 3 is outside 1..2"),
    ("priority_levels: 2 priority_queue_policy { key: 5 value {} }",
     "priority_queue_policy has levels [5] outside 1..2"),
    ("priority_levels: 99", "priority_levels 99 is over the limit"),
    ("max_batch_duration_microseconds: 999999999", "max_batch_duration_microseconds"),
])
def test_bad_priority_settings_are_refused(tmp_path: Path, batching: str, problem: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(problem)):
        config.load(write(tmp_path, GOOD + f"dynamic_batching {{ {batching} }}"))
