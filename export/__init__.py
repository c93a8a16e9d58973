"""bertstream.export: checkpoint -> ONNX (+ head), parity verification, repository writer.

Only this package imports torch; the server and the client never do.
"""

from .graph import (
    INPUT_NAMES,
    LOGITS,
    POOLED_OUTPUTS,
    PROBABILITIES,
    PoolingGraph,
    export_onnx,
    layer_output_names,
    resolve_pooling_layers,
)
from .head import ClassificationHead, HeadError, load_head, random_head, save_head
from .model_config import ConfigFields, ConfigMismatchError, build_model_config, read_model_config
from .pipeline import ExportOptions, export_model, read_export_record, reference_graph
from .publish import (
    PublishError,
    VersionExistsError,
    VersionPlan,
    next_version,
    plan_version,
    publish_version,
    validate_model_name,
)
from .sources import Checkpoint, RandomShape, load_checkpoint, random_checkpoint
from .verify import ExportVerificationError, ParityReport, verify_export
from .vocab import VOCAB_SIZE, build_vocab, write_vocab

__all__ = [
    "INPUT_NAMES",
    "LOGITS",
    "POOLED_OUTPUTS",
    "PROBABILITIES",
    "VOCAB_SIZE",
    "Checkpoint",
    "ClassificationHead",
    "ConfigFields",
    "ConfigMismatchError",
    "ExportOptions",
    "ExportVerificationError",
    "HeadError",
    "ParityReport",
    "PoolingGraph",
    "PublishError",
    "RandomShape",
    "VersionExistsError",
    "VersionPlan",
    "build_model_config",
    "build_vocab",
    "export_model",
    "export_onnx",
    "layer_output_names",
    "load_checkpoint",
    "load_head",
    "next_version",
    "plan_version",
    "publish_version",
    "random_checkpoint",
    "random_head",
    "read_export_record",
    "read_model_config",
    "reference_graph",
    "resolve_pooling_layers",
    "save_head",
    "validate_model_name",
    "verify_export",
    "write_vocab",
]
