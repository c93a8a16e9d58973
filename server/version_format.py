"""The model-version format: what a version folder holds and what its graph is called.

The one place these names are spelled. `bertstream.export` writes folders by it and the server
reads them by it, so a rename here moves both. Nothing here imports onnxruntime, grpc or torch.

    <repository>/<model>/config.pbtxt     model-level settings (config.py reads it)
    <repository>/<model>/<version>/       a positive integer, no leading zero
        model.onnx (+ model.onnx.data)    encoder + poolings (+ head) in one graph
        tokenizer.json                    the version's own tokenizer
        labels.txt                        classify models: one label per line, index = logit
        export.json                       provenance: source, versions, parity figures

Graph inputs are int64 `input_ids`, `attention_mask`, `token_type_ids` ([batch, tokens]).
For every exported layer n the graph has `{pooling}_layer{n}` for each pooling below
(`tokens_layer{n}` is [batch, tokens, hidden], `mean_max_layer{n}` is 2 x hidden wide, the
others hidden wide); classify models add `logits` and `probabilities` [batch, labels].
"""

from __future__ import annotations

from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task

__all__ = [
    "CONFIG_FILE", "EXPORT_RECORD", "INPUT_NAMES", "IR_FILE", "IR_WEIGHTS_FILE", "LABELS_FILE",
    "LOGITS",
    "MODEL_DATA_FILE",
    "MODEL_FILE", "POOLINGS", "POOLING_NAMES", "PROBABILITIES", "RECORD_FUSED_ATTENTION",
    "RECORD_HEAD", "RECORD_HEAD_ORIGIN", "RECORD_SOURCE", "RECORD_SOURCE_KIND",
    "TOKENIZER_FILE", "TOKEN_OUTPUT_PREFIX", "layer_outputs", "output_name", "output_width",
    "parse_version", "required_files", "text_prefix",
]

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"
IR_FILE = "model.xml"  # an OpenVINO IR pair (model.xml + model.bin); read instead of model.onnx
IR_WEIGHTS_FILE = "model.bin"  # the IR's weights: model.xml is incomplete without them
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.txt"
EXPORT_RECORD = "export.json"

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# The API's pooling enum -> the output name's prefix, in graph order.
POOLING_NAMES: dict[int, str] = {
    Pooling.POOLING_MEAN: "mean",
    Pooling.POOLING_MAX: "max",
    Pooling.POOLING_CLS: "cls",
    Pooling.POOLING_MEAN_MAX: "mean_max",
    Pooling.POOLING_TOKENS: "tokens",
}
POOLINGS = tuple(POOLING_NAMES.values())
TOKEN_OUTPUT_PREFIX = "tokens_"  # outputs with one vector per token
LOGITS, PROBABILITIES = "logits", "probabilities"

# export.json keys other modules read (the record has more: parity figures, versions).
RECORD_SOURCE = "source"
RECORD_SOURCE_KIND = "source_kind"  # "random" for random-init weights
RECORD_HEAD = "head"
RECORD_HEAD_ORIGIN = "origin"  # in the head record; starts with "random" for a random head
RECORD_FUSED_ATTENTION = "fused_attention_layers"


def parse_version(folder: str) -> int | None:
    """A version folder's number: a positive integer written without leading zeros (`1`,
    `12`); None for any other name (`01`, `abc`, hidden staging folders)."""
    if folder.isascii() and folder.isdigit() and not folder.startswith("0"):
        return int(folder)
    return None


def required_files(config: ModelConfig) -> list[str]:
    """Files a version of this model cannot load without."""
    required = [MODEL_FILE, TOKENIZER_FILE]
    if config.task == Task.TASK_CLASSIFY:
        required.append(LABELS_FILE)
    return required


def output_name(pooling: str, layer: int) -> str:
    """The graph output of one pooling ("mean", ...) of one layer (1 = the first)."""
    return f"{pooling}_layer{layer}"


def layer_outputs(layer: int) -> list[str]:
    """The pooled outputs of one exported layer, in graph order."""
    return [output_name(pooling, layer) for pooling in POOLINGS]


def output_width(pooling: str, hidden: int) -> int:
    """The last dimension of a pooled output."""
    return 2 * hidden if pooling == "mean_max" else hidden


def text_prefix(config: ModelConfig, task: int) -> str:
    """What the server puts before each text (e5's "query: "): the model's classify prefix
    for classification, its embed prefix otherwise. Callers send plain text."""
    return config.classify_prefix if task == Task.TASK_CLASSIFY else config.embed_prefix
