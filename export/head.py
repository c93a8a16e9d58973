"""The classification head: a linear layer over the CLS vector or the mean of the last layer,
or (pooling `pooler`) BERT's own pooler, tanh(dense(CLS)), then the linear layer: what a
Hugging Face `BertForSequenceClassification` checkpoint carries.

A head is a plain safetensors file with `weight` [num_labels, hidden] and `bias` [num_labels]
(and `pooler.weight` [hidden, hidden], `pooler.bias` [hidden] for a pooler head), so whatever
trains it (the project's own probe trainer, or a user's script) plugs in by writing that file.
`save_head` also stores the labels and the pooling in the file's metadata, so a trained head
carries its own label order; `--labels` overrides or supplies them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HEAD_POOLINGS = ("cls", "mean", "pooler")
_POOLER_TENSORS = ("pooler.weight", "pooler.bias")
_INIT_STD = 0.02  # BERT's initializer_range


class HeadError(ValueError):
    """The head file, its labels, or its shape do not fit the model."""


@dataclass(frozen=True, eq=False)
class ClassificationHead:
    labels: tuple[str, ...]
    weight: torch.Tensor  # [num_labels, hidden], float32
    bias: torch.Tensor  # [num_labels], float32
    pooling: str = "cls"
    origin: str = "random"  # "random(seed=N)" or the file it came from
    training: dict[str, object] | None = None  # how it was trained and what it scored
    # BERT's pooler (weight [H, H], bias [H]) for pooling "pooler", None otherwise
    pooler: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        _check_labels(self.labels)
        if self.pooling not in HEAD_POOLINGS:
            raise HeadError(f"head pooling must be one of {HEAD_POOLINGS}, not {self.pooling!r}")
        if (self.pooling == "pooler") != (self.pooler is not None):
            raise HeadError("pooling 'pooler' needs the pooler's weight and bias, and only it "
                            "takes them")
        if self.pooler is not None:
            hidden = self.weight.shape[1]
            if self.pooler[0].shape != (hidden, hidden) or self.pooler[1].shape != (hidden,):
                raise HeadError(f"pooler weight must be [{hidden}, {hidden}] and bias [{hidden}]")
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise HeadError(
                f"head weight must be [C, H] and bias [C]; got {tuple(self.weight.shape)} and "
                f"{tuple(self.bias.shape)}"
            )
        if self.weight.shape[0] != len(self.labels):
            raise HeadError(
                f"head has {self.weight.shape[0]} classes but {len(self.labels)} labels were given"
            )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def linear(self) -> torch.nn.Linear:
        """A fresh `nn.Linear` holding this head's parameters (for the export graph)."""
        layer = torch.nn.Linear(self.hidden_size, self.num_labels)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer.eval()

    def module(self) -> torch.nn.Module:
        """Pooled vector -> logits: the linear layer, after tanh(dense) for a pooler head."""
        if self.pooler is None:
            return self.linear()
        dense = torch.nn.Linear(self.hidden_size, self.hidden_size)
        with torch.no_grad():
            dense.weight.copy_(self.pooler[0])
            dense.bias.copy_(self.pooler[1])
        return torch.nn.Sequential(dense, torch.nn.Tanh(), self.linear()).eval()

    @property
    def text_pairs(self) -> bool:
        """Trained on text pairs, as its trainer recorded (a checkpoint's head cannot say)."""
        return bool((self.training or {}).get("text_pairs", False))

    def describe(self) -> dict[str, object]:
        """Provenance for export.json."""
        return {
            "origin": self.origin,
            "pooling": self.pooling,
            "num_labels": self.num_labels,
            "labels": list(self.labels),
            "training": self.training,
        }

    @property
    def prefix(self) -> str | None:
        """The text prefix the head was trained with, when a trainer recorded it."""
        prefix = (self.training or {}).get("prefix")
        return prefix if isinstance(prefix, str) else None


def _check_labels(labels: Sequence[str]) -> None:
    if not labels:
        raise HeadError("a classification head needs at least one label")
    for label in labels:
        if not label or label != label.strip() or "\n" in label or "\r" in label:
            raise HeadError(f"label {label!r} is empty, padded with spaces, or spans lines")
    if len(set(labels)) != len(labels):
        raise HeadError(f"labels must be unique: {list(labels)}")


def random_head(
    labels: Sequence[str], hidden_size: int, seed: int = 0, pooling: str = "cls"
) -> ClassificationHead:
    """An untrained head (BERT's initialisation, seeded) so classify models can be built and
    served before a head has been trained."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(labels), hidden_size, generator=generator) * _INIT_STD
    pooler = None
    if pooling == "pooler":
        dense = torch.randn(hidden_size, hidden_size, generator=generator) * _INIT_STD
        pooler = (dense, torch.zeros(hidden_size))
    return ClassificationHead(
        labels=tuple(labels),
        weight=weight,
        bias=torch.zeros(len(labels)),
        pooling=pooling,
        origin=f"random(seed={seed})",
        pooler=pooler,
    )


def load_head(
    path: Path,
    labels: Sequence[str] | None = None,
    pooling: str | None = None,
) -> ClassificationHead:
    """Read a head file; `labels` and `pooling` override what its metadata says."""
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        if not {"weight", "bias"} <= names:
            raise HeadError(f"{path}: needs tensors 'weight' and 'bias', found {sorted(names)}")
        weight = handle.get_tensor("weight").to(torch.float32)
        bias = handle.get_tensor("bias").to(torch.float32)
        pooler = None
        if set(_POOLER_TENSORS) <= names:
            dense, dense_bias = (handle.get_tensor(n).to(torch.float32) for n in _POOLER_TENSORS)
            pooler = (dense, dense_bias)
        metadata = handle.metadata() or {}
    if labels is None:
        if "labels" not in metadata:
            raise HeadError(f"{path}: no labels in the file's metadata; pass labels")
        labels = json.loads(metadata["labels"])
    training = json.loads(metadata["training"]) if "training" in metadata else None
    return ClassificationHead(
        labels=tuple(labels),
        weight=weight,
        bias=bias,
        pooling=pooling or metadata.get("pooling", "pooler" if pooler else "cls"),
        origin=str(Path(path).resolve()),
        training=training,
        pooler=pooler,
    )


def save_head(head: ClassificationHead, path: Path) -> Path:
    """Write a head file that `load_head` (and `bertstream-export --head`) reads back."""
    labels = json.dumps(list(head.labels), ensure_ascii=False)
    metadata = {"labels": labels, "pooling": head.pooling}
    if head.training is not None:
        metadata["training"] = json.dumps(head.training, ensure_ascii=False)
    tensors = {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}
    if head.pooler is not None:
        tensors.update(zip(_POOLER_TENSORS, (t.contiguous() for t in head.pooler), strict=True))
    save_file(tensors, str(path), metadata=metadata)
    return path
