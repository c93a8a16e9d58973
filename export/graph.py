"""The exported graph: encoder + poolings for chosen layers (+ classification head).

The output names are the contract with the server, which asks onnxruntime only for the outputs
a batch needs. For every exported layer n (1..num_layers, n = hidden_states[n]):

    mean_layer{n}      [B, H]   mean over tokens with attention_mask == 1 ([CLS], [SEP] included)
    max_layer{n}       [B, H]   element-wise max over tokens with attention_mask == 1
    cls_layer{n}       [B, H]   the [CLS] vector
    mean_max_layer{n}  [B, 2H]  mean then max, concatenated
    tokens_layer{n}    [B, S, H] raw token vectors (padding positions included)

and for classify models `logits` [B, C] and `probabilities` [B, C] (softmax) from a linear head
over the last layer's CLS vector or mean (or BERT's pooler over CLS, for a checkpoint's own
head). Nothing is normalised in the graph: the server does it
per request. Inputs are int64 `input_ids`, `attention_mask`, `token_type_ids`, all [B, S].
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from bertstream.server.version_format import (
    INPUT_NAMES,
    LOGITS,
    POOLINGS,
    PROBABILITIES,
    layer_outputs,
)
from transformers import BertModel

from .head import ClassificationHead

# The names are the model-version format's (bertstream.server.version_format), re-exported.
POOLED_OUTPUTS = POOLINGS
layer_output_names = layer_outputs


def resolve_pooling_layers(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Absolute layer numbers, ascending. Negative numbers count from the end (-1 = last), as
    bert-as-service's `-pooling_layer`; None means the last and the second to last."""
    if layers is None:
        layers = (-1, -2) if num_layers >= 2 else (-1,)
    if not layers:
        raise ValueError("at least one pooling layer is needed")
    resolved = set()
    for layer in layers:
        absolute = num_layers + 1 + layer if layer < 0 else layer
        if not 1 <= absolute <= num_layers:
            raise ValueError(
                f"pooling layer {layer} is outside 1..{num_layers} (or -{num_layers}..-1)"
            )
        resolved.add(absolute)
    return tuple(sorted(resolved))


MASK_VALUE = -10000.0


def additive_mask(attention_mask: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [B, 1, 1, S] mask BERT adds to attention scores: 0 for tokens, -10000 for padding.

    transformers 5 passes a ready 4-D mask through unchanged. Built here rather than by
    transformers (whose vmap-built boolean mask exports as Where/And/GatherND), it exports as
    Unsqueeze, Cast, Sub, Mul: the pattern onnxruntime's attention fusion matches. -10000 rather
    than the float minimum, as the original BERT: exp(-10000) is 0 in fp32 all the same, and
    the value stays finite in an fp16 graph.
    """
    expanded = attention_mask.unsqueeze(1).unsqueeze(2).to(dtype)
    return (1.0 - expanded) * MASK_VALUE


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _masked_max(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Padding gets the lowest finite value, not -inf, so an fp16 conversion stays finite.
    lowest = torch.finfo(states.dtype).min
    return states.masked_fill(mask == 0, lowest).amax(dim=1)


class PoolingGraph(torch.nn.Module):
    """What gets exported; also the PyTorch reference the parity check runs."""

    def __init__(
        self,
        encoder: BertModel,
        layers: Sequence[int],
        head: ClassificationHead | None = None,
    ) -> None:
        super().__init__()
        num_layers = int(encoder.config.num_hidden_layers)
        if not layers or any(not 1 <= n <= num_layers for n in layers):
            raise ValueError(f"layers must be absolute numbers in 1..{num_layers}: {layers}")
        if head is not None and head.hidden_size != encoder.config.hidden_size:
            raise ValueError(
                f"head expects hidden size {head.hidden_size}, the encoder has "
                f"{encoder.config.hidden_size}"
            )
        # Eager attention with the classic additive mask (see `additive_mask`): the form
        # onnxruntime's BERT optimizer knows how to fuse into its Attention operator. This sets
        # the encoder object itself to eager attention (same results as sdpa, within 5e-7).
        encoder.set_attn_implementation("eager")
        self.encoder = encoder.eval()
        self.layers = tuple(sorted(set(layers)))
        self.head = head.module() if head is not None else None
        self.head_pooling = head.pooling if head is not None else "cls"

    def output_names(self) -> list[str]:
        names = [name for layer in self.layers for name in layer_output_names(layer)]
        if self.head is not None:
            names += [LOGITS, PROBABILITIES]
        return names

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # By keyword: transformers 5 changed BertModel.forward's positional order.
        encoded = self.encoder(
            input_ids=input_ids,
            attention_mask=additive_mask(attention_mask, self.encoder.dtype),
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        )
        hidden_states = encoded.hidden_states
        mask = attention_mask.unsqueeze(-1).to(hidden_states[-1].dtype)
        outputs: list[torch.Tensor] = []
        for layer in self.layers:
            states = hidden_states[layer]
            mean = masked_mean(states, mask)
            maximum = _masked_max(states, mask)
            outputs += [mean, maximum, states[:, 0], torch.cat([mean, maximum], dim=-1), states]
        if self.head is not None:
            last = hidden_states[-1]
            # "pooler": the head's own tanh(dense) runs on the CLS vector
            pooled = masked_mean(last, mask) if self.head_pooling == "mean" else last[:, 0]
            logits = self.head(pooled)
            outputs += [logits, torch.softmax(logits, dim=-1)]
        return tuple(outputs)


def export_onnx(graph: PoolingGraph, path: Path) -> Path:
    """Export with the dynamo exporter (the legacy one gives wrong outputs with torch 2.13 and
    transformers 5), dynamic batch and sequence axes, weights in `<path>.data` beside it."""
    max_positions = int(graph.encoder.config.max_position_embeddings)
    # Sample sizes above 1: torch.export specialises dimensions of size 0 and 1.
    sample = torch.ones(2, 8, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=65_536)
    sequence = torch.export.Dim("sequence", min=1, max=max_positions)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed": noise here
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Pytree deprecations and "axis names merged" (the three inputs share both axes by
            # design) are noise too.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                graph,
                (sample, sample.clone(), torch.zeros_like(sample)),
                str(path),
                input_names=list(INPUT_NAMES),
                output_names=graph.output_names(),
                dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
                dynamo=True,
                external_data=True,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    return path
