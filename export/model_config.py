"""The model-level config.pbtxt: written once per model, checked against every later version.

config.pbtxt belongs to the model, not to a version, so the server can swap versions without
re-reading it. A new version must therefore fit the config already there: a different task,
width, label count, layer set or input kind (texts or text pairs) would break clients
mid-swap, so the export refuses it and says which fields differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bertstream.server.repository.config import PLATFORM
from bertstream.server.version_format import CONFIG_FILE
from bertstream.v1 import model_config_pb2 as pb
from google.protobuf import text_format


class ConfigMismatchError(ValueError):
    """The model's config.pbtxt contradicts the version being exported."""


@dataclass(frozen=True)
class ConfigFields:
    """What the export knows about the model; everything else in the config gets a default."""

    name: str
    num_layers: int
    embedding_dimension: int
    max_sequence_length: int
    pooling_layers: tuple[int, ...]  # absolute, ascending
    labels: tuple[str, ...] = ()  # non-empty for classify models
    max_batch_size: int = 32
    embed_prefix: str = ""
    classify_prefix: str = ""
    backend: str = ""  # "": the server's --cpu-engine decides; "openvino" for the IR variants
    text_pairs: bool = False  # the model reads text pairs (a pair classifier / cross-encoder)

    @property
    def task(self) -> int:
        return pb.TASK_CLASSIFY if self.labels else pb.TASK_EMBED


def build_model_config(fields: ConfigFields) -> pb.ModelConfig:
    config = pb.ModelConfig(
        name=fields.name,
        platform=PLATFORM,
        max_batch_size=fields.max_batch_size,
        task=fields.task,
        max_sequence_length=fields.max_sequence_length,
        embedding_dimension=fields.embedding_dimension,
        default_pooling=pb.POOLING_MEAN,
        pooling_layers=list(fields.pooling_layers),
        default_pooling_layer=max(fields.pooling_layers),
        num_layers=fields.num_layers,
        num_labels=len(fields.labels),
        embed_prefix=fields.embed_prefix,
        classify_prefix=fields.classify_prefix,
        backend=fields.backend,
        text_pairs=fields.text_pairs,
    )
    config.version_policy.latest.num_versions = 1
    # 0: a batch leaves as soon as an instance is free (as TEI does); under load the queue
    # fills while the model runs, so batches grow by themselves and a lone request never waits.
    config.dynamic_batching.max_queue_delay_microseconds = 0
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_AUTO)
    return config


def render(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config, as_utf8=True)


def read_model_config(model_dir: Path) -> pb.ModelConfig | None:
    """The model's config, or None for a model that has none yet."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except text_format.ParseError as error:
        raise ConfigMismatchError(f"{path} does not parse: {error}") from error


def write_model_config(model_dir: Path, config: pb.ModelConfig) -> Path:
    """Atomically (temp file + rename), so a scanning server never reads half a config."""
    path = model_dir / CONFIG_FILE
    temp = model_dir / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    temp.write_text(render(config), encoding="utf-8")
    os.replace(temp, path)
    return path


def config_differences(existing: pb.ModelConfig, new: pb.ModelConfig) -> list[str]:
    """Human-readable contradictions between the model's config and a new version."""
    differences = []
    for field_name in ("task", "embedding_dimension", "num_labels", "num_layers", "text_pairs"):
        old_value, new_value = getattr(existing, field_name), getattr(new, field_name)
        if old_value != new_value:
            if field_name == "task":
                old_value, new_value = pb.Task.Name(old_value), pb.Task.Name(new_value)
            differences.append(f"{field_name}: config has {old_value}, new version has {new_value}")
    old_layers, new_layers = sorted(existing.pooling_layers), sorted(new.pooling_layers)
    if old_layers != new_layers:
        differences.append(
            f"pooling_layers: config has {old_layers}, new version exports {new_layers}"
        )
    return differences


def check_compatible(model_dir: Path, new: pb.ModelConfig, max_positions: int) -> bool:
    """True when a config must be written (new model); raise ConfigMismatchError when the
    existing one contradicts the new version."""
    existing = read_model_config(model_dir)
    if existing is None:
        return True
    differences = config_differences(existing, new)
    if existing.max_sequence_length > max_positions:
        differences.append(
            f"max_sequence_length: config has {existing.max_sequence_length}, the new version "
            f"has only {max_positions} positions"
        )
    if differences:
        raise ConfigMismatchError(
            f"{model_dir / CONFIG_FILE} contradicts the new version: " + "; ".join(differences)
        )
    return False
