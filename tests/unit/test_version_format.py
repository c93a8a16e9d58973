"""The model-version format: one spelling of folder and output names for export and server."""

from __future__ import annotations

from bertstream.server import version_format as fmt
from bertstream.v1.model_config_pb2 import ModelConfig, Pooling, Task


def test_outputs_widths_and_required_files() -> None:
    assert fmt.layer_outputs(3) == ["mean_layer3", "max_layer3", "cls_layer3",
                                    "mean_max_layer3", "tokens_layer3"]
    assert fmt.output_width("mean_max", 384) == 768 and fmt.output_width("cls", 384) == 384
    assert fmt.output_name("tokens", 1).startswith(fmt.TOKEN_OUTPUT_PREFIX)
    assert fmt.required_files(ModelConfig(task=Task.TASK_EMBED)) == ["model.onnx",
                                                                     "tokenizer.json"]
    assert fmt.required_files(ModelConfig(task=Task.TASK_CLASSIFY))[-1] == "labels.txt"
    assert set(fmt.POOLING_NAMES) == set(Pooling.values()) - {Pooling.POOLING_UNSPECIFIED}


def test_prefix_follows_the_task() -> None:
    config = ModelConfig(embed_prefix="query: ", classify_prefix="passage: ")
    assert fmt.text_prefix(config, Task.TASK_EMBED) == "query: "
    assert fmt.text_prefix(config, Task.TASK_CLASSIFY) == "passage: "


def test_export_writes_by_the_same_names() -> None:
    """export re-exports the format's names rather than spelling its own."""
    from bertstream.export import graph, pipeline

    assert graph.INPUT_NAMES is fmt.INPUT_NAMES and graph.POOLED_OUTPUTS is fmt.POOLINGS
    assert pipeline.ONNX_FILE == fmt.MODEL_FILE and pipeline.EXPORT_FILE == fmt.EXPORT_RECORD
