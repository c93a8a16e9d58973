"""config.pbtxt -> `ModelConfig`, read with protobuf text_format (no hand-written parser).

`load()` parses, `normalize()` fills defaults, `validate()` returns every problem at once so an
operator fixes a config in one round.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task
from google.protobuf import text_format

from ..engine.backends.openvino import check_parameters
from ..version_format import CONFIG_FILE

__all__ = ["CONFIG_FILE", "ConfigError", "load", "load_with_digest", "normalize", "validate"]

PLATFORM = "onnxruntime_onnx"
BACKENDS = ("", "onnxruntime", "openvino")  # "": the server's --cpu-engine decides
# Upper bounds on values that cost the server at load time or while serving: sessions are built
# one per instance, the warm-up runs a text of max_sequence_length tokens, and a batch's first
# text waits up to max_queue_delay. Past these a config is a mistake, not a setting.
MAX_INSTANCES = 64
MAX_SEQUENCE_LENGTH = 65_536
MAX_QUEUE_DELAY_US = 10_000_000
MAX_PRIORITY_LEVELS = 16
MAX_BATCH_DURATION_US = 60_000_000
# Defaults of the scheduler's settings (scheduler.py says what each does and why).
DEFAULT_PRIORITY_LEVELS = 2
DEFAULT_MAX_BATCH_DURATION_US = 50_000
# What a unary call may be predicted to wait before it is refused (scheduler.py): long enough
# for a burst to queue and batch well, short enough that under overload the excess hears
# RESOURCE_EXHAUSTED at once and the queue drains within seconds of the load stopping.
DEFAULT_MAX_QUEUE_WAIT_US = 2_000_000
DEFAULT_MAX_SKIPPED_BATCHES = 4


class ConfigError(Exception):
    """config.pbtxt is missing, does not parse, or contradicts itself."""


def load(model_dir: Path) -> ModelConfig:
    """Parse, normalise and validate `<model_dir>/config.pbtxt`."""
    return load_with_digest(model_dir)[0]


def load_with_digest(model_dir: Path) -> tuple[ModelConfig, str]:
    """`load`, plus the sha256 of the very bytes parsed: the lifecycle compares digests to
    notice edits, and a digest read separately could belong to a later edit than the config."""
    path = model_dir / CONFIG_FILE
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path} does not parse: {exc}") from None
    config = normalize(config, default_name=model_dir.name)
    problems = validate(config, folder_name=model_dir.name)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config, hashlib.sha256(raw).hexdigest()


def normalize(config: ModelConfig, default_name: str) -> ModelConfig:
    """Return a copy with Triton-like defaults filled in."""
    out = ModelConfig()
    out.CopyFrom(config)
    if not out.name:
        out.name = default_name
    if not out.platform:
        out.platform = PLATFORM
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    # Only 0 means "the default": a negative value is left for validate() to refuse.
    if out.max_batch_size == 0:
        out.max_batch_size = 32
    if out.max_sequence_length == 0:
        out.max_sequence_length = 512
    if out.default_pooling == Pooling.POOLING_UNSPECIFIED:
        out.default_pooling = Pooling.POOLING_MEAN
    if out.num_layers and not out.pooling_layers:
        out.pooling_layers.append(out.num_layers)
    if out.default_pooling_layer == 0 and out.pooling_layers:
        out.default_pooling_layer = max(out.pooling_layers)
    if not out.instance_group:
        out.instance_group.add(count=1)
    batching = out.dynamic_batching
    if batching.max_batch_tokens == 0:
        batching.max_batch_tokens = max(out.max_batch_size, 1) * max(out.max_sequence_length, 1)
    if batching.max_queue_size == 0:
        batching.max_queue_size = 64 * max(out.max_batch_size, 1)
    if batching.priority_levels == 0:  # interactive calls and bulk feeds, apart
        batching.priority_levels = DEFAULT_PRIORITY_LEVELS
    if batching.default_priority_level == 0:
        batching.default_priority_level = batching.priority_levels
    if batching.max_batch_duration_microseconds == 0:
        batching.max_batch_duration_microseconds = DEFAULT_MAX_BATCH_DURATION_US
    if batching.max_skipped_batches == 0:
        batching.max_skipped_batches = DEFAULT_MAX_SKIPPED_BATCHES
    if batching.max_queue_wait_microseconds == 0:
        batching.max_queue_wait_microseconds = DEFAULT_MAX_QUEUE_WAIT_US
    return out


def validate(config: ModelConfig, folder_name: str) -> list[str]:
    """Every problem with a normalised config, in words an operator can act on."""
    problems: list[str] = []
    if config.name != folder_name:
        problems.append(f"name {config.name!r} differs from its folder {folder_name!r}")
    if config.platform != PLATFORM:
        problems.append(f"platform {config.platform!r} is not supported (only {PLATFORM!r})")
    if config.backend not in BACKENDS:
        problems.append(f"backend {config.backend!r} is not supported (one of "
                        f"{', '.join(repr(b) for b in BACKENDS[1:])}, or none)")
    elif config.backend == "openvino":
        problems += check_parameters({k: v.string_value for k, v in config.parameters.items()})
    elif config.parameters:
        problems.append(f"parameters {sorted(config.parameters)} are OpenVINO options: they "
                        "need backend: \"openvino\"")
    if config.task not in (Task.TASK_EMBED, Task.TASK_CLASSIFY):
        problems.append("task must be TASK_EMBED or TASK_CLASSIFY")
    if config.task == Task.TASK_CLASSIFY and config.num_labels <= 0:
        problems.append("a TASK_CLASSIFY model needs num_labels > 0")
    if config.embedding_dimension <= 0:
        problems.append("embedding_dimension must be > 0")
    if config.num_layers <= 0:
        problems.append("num_layers must be > 0")
    bad_layers = [n for n in config.pooling_layers if not 1 <= n <= config.num_layers]
    if bad_layers:
        problems.append(f"pooling_layers {bad_layers} are outside 1..{config.num_layers}")
    if config.default_pooling_layer not in config.pooling_layers:
        problems.append(
            f"default_pooling_layer {config.default_pooling_layer} is not among the exported "
            f"pooling_layers {list(config.pooling_layers)}"
        )
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        problems.append("version_policy latest needs num_versions >= 1")
    if policy.WhichOneof("policy_choice") == "specific" and any(
        v < 1 for v in policy.specific.versions
    ):
        problems.append("version_policy specific versions must be positive integers")
    problems += _check_limits(config)
    if config.dynamic_batching.max_batch_tokens < config.max_sequence_length:
        problems.append(
            f"dynamic_batching max_batch_tokens {config.dynamic_batching.max_batch_tokens} is "
            f"smaller than max_sequence_length {config.max_sequence_length}: a long text could "
            "never be batched"
        )
    problems += _check_priorities(config)
    return problems


def _check_priorities(config: ModelConfig) -> list[str]:
    """Levels, the default level and per-level queue policies must agree."""
    batching = config.dynamic_batching
    levels = batching.priority_levels
    problems: list[str] = []
    if levels > MAX_PRIORITY_LEVELS:
        problems.append(f"dynamic_batching priority_levels {levels} is over the limit of "
                        f"{MAX_PRIORITY_LEVELS}")
    if not 1 <= batching.default_priority_level <= levels:
        problems.append(f"dynamic_batching default_priority_level "
                        f"{batching.default_priority_level} is outside 1..{levels} "
                        "(priority_levels)")
    outside = sorted(n for n in batching.priority_queue_policy if not 1 <= n <= levels)
    if outside:
        problems.append(f"dynamic_batching priority_queue_policy has levels {outside} outside "
                        f"1..{levels} (priority_levels)")
    if batching.max_batch_duration_microseconds > MAX_BATCH_DURATION_US:
        problems.append(f"dynamic_batching max_batch_duration_microseconds "
                        f"{batching.max_batch_duration_microseconds} is over the limit of "
                        f"{MAX_BATCH_DURATION_US}")
    return problems


def _check_limits(config: ModelConfig) -> list[str]:
    """Sizes that are negative or too large to load or serve."""
    problems: list[str] = []
    for field in ("max_batch_size", "max_sequence_length"):
        if getattr(config, field) < 0:
            problems.append(f"{field} must not be negative (0 means the default)")
    if config.max_sequence_length > MAX_SEQUENCE_LENGTH:
        problems.append(f"max_sequence_length {config.max_sequence_length} is over the limit "
                        f"of {MAX_SEQUENCE_LENGTH} tokens")
    if any(group.count < 0 for group in config.instance_group):
        problems.append("instance_group count must not be negative")
    instances = sum(max(group.count, 1) for group in config.instance_group)
    if instances > MAX_INSTANCES:
        problems.append(f"instance_group asks for {instances} sessions per version, over the "
                        f"limit of {MAX_INSTANCES}")
    batching = config.dynamic_batching
    for field in ("max_batch_tokens", "max_queue_size"):
        if getattr(batching, field) < 0:
            problems.append(f"dynamic_batching {field} must not be negative (0 means the "
                            "default)")
    if batching.max_queue_delay_microseconds > MAX_QUEUE_DELAY_US:
        problems.append(
            f"dynamic_batching max_queue_delay_microseconds "
            f"{batching.max_queue_delay_microseconds} is over the limit of {MAX_QUEUE_DELAY_US} "
            "(the first text of every batch would wait that long)")
    return problems
