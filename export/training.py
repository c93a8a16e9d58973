"""Train a classification head for any exported encoder: a frozen linear probe by default.

The probe reads its features from an exported version folder through the server's own
loader (tokenizer, padding, and the engine the server would pick: OpenVINO on a CPU where it is
installed, bf16 where the processor has it and the load check passes, else onnxruntime), so
the head is fitted on exactly the vectors the server will feed it, and needs no PyTorch. The
fit is scikit-learn's multinomial logistic regression on standardised features, with the
regularisation picked on the dev split; the standardisation is folded back into the weights,
so the head is one plain `nn.Linear` over the pooled vector and the exported graph stays
encoder + linear layer.

Full fine-tuning (encoder and head together) lives in finetune.py; both write the same head
file with the same metrics, which `bertstream-export --head` copies into export.json.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.loader import open_version
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import output_name

from .datasets import LabelledData
from .head import ClassificationHead, save_head
from .metrics import scores

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
ENGINES = ("auto", "onnxruntime", "openvino")  # bertstream-server's --cpu-engine
_FEATURE_BATCH = 32


@dataclass(frozen=True)
class ProbeOptions:
    encoder: Path  # a published version folder: model.onnx, tokenizer.json; config.pbtxt above
    output: Path  # the head file to write (.safetensors)
    pooling: str = "mean"  # the head's input: mean or cls of the last layer
    prefix: str | None = None  # None: the model's classify_prefix, else its embed_prefix
    c_grid: tuple[float, ...] = C_GRID
    class_weight: str | None = None  # None or "balanced"
    threads: int = 0
    engine: str = "auto"  # as bertstream-server --cpu-engine: auto | onnxruntime | openvino


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="text", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


class EncoderFeatures:
    """Pooled last-layer vectors of an exported version, computed the way the server does."""

    def __init__(self, version_dir: Path, prefix: str | None = None, threads: int = 0,
                 engine: str = "auto") -> None:
        self.config = model_config.load(version_dir.parent)
        self.layer = self.config.num_layers
        if self.layer not in self.config.pooling_layers:
            raise ValueError(
                f"{version_dir} does not export layer {self.layer} (the last); its poolings are "
                f"{list(self.config.pooling_layers)}"
            )
        self.prefix = (
            prefix if prefix is not None
            else self.config.classify_prefix or self.config.embed_prefix
        )
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        # The server's own load (a config's backend wins over `engine`, as in the server).
        options = RuntimeOptions(intra_op_threads=threads, cpu_engine=engine)
        self.runtime, self.tokenizer = open_version(version_dir, self.config, options)
        self.engine = self.runtime.provider  # e.g. "OpenVINO CPU bf16", "CPUExecutionProvider"
        self.hidden_size = self.config.embedding_dimension
        self.truncated = 0

    def __call__(self, texts: Sequence[str], pooling: str, description: str = "") -> np.ndarray:
        """[len(texts), hidden] float32; texts over the model's limit keep their start."""
        output = output_name(pooling, self.layer)
        encoded = self.tokenizer.encode([self.prefix + t for t in texts], truncate=True)
        self.truncated += sum(1 for n in encoded.truncated_tokens if n)
        order = sorted(range(len(encoded)), key=encoded.lengths.__getitem__)  # less padding
        features = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        with _progress(len(texts), description) as bar:
            for start in range(0, len(order), _FEATURE_BATCH):
                rows = order[start : start + _FEATURE_BATCH]
                batch = Batch.of(encoded, rows)
                features[rows] = self.runtime.run(batch, [output])[output]
                bar.update(len(rows))
        return features


def _fold_standardisation(model, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, ...]:
    """LR on (x - mean) / std == LR on x with weight / std and bias - weight . mean / std."""
    weight = model.coef_ / std
    bias = model.intercept_ - weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32)


def fit_probe(
    features: Mapping[str, np.ndarray],
    labels: Mapping[str, Sequence[int]],
    c_grid: Sequence[float] = C_GRID,
    class_weight: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Fit on train for each C, keep the best dev accuracy; return weight, bias and report.
    `features` and `labels` by split name (train and dev are used)."""
    from sklearn.linear_model import LogisticRegression

    train = features["train"]
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    y_train = np.asarray(labels["train"])
    y_dev = np.asarray(labels["dev"])
    search = []
    best = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=3000, class_weight=class_weight)
        model.fit((train - mean) / std, y_train)
        dev_accuracy = float((model.predict((features["dev"] - mean) / std) == y_dev).mean())
        search.append({"C": c, "dev_accuracy": round(dev_accuracy, 4)})
        if best is None or dev_accuracy > best[0]:
            best = (dev_accuracy, c, model)
    assert best is not None
    weight, bias = _fold_standardisation(best[2], mean, std)
    return weight, bias, {"C": best[1], "search": search, "class_weight": class_weight}


def evaluate(
    weight: np.ndarray, bias: np.ndarray, features: dict[str, np.ndarray], data: LabelledData
) -> dict[str, dict]:
    """The head's metrics on every split, computed with the folded (exported) weights."""
    metrics = {}
    for name, split in data.splits.items():
        predicted = (features[name] @ weight.T + bias).argmax(axis=1)
        metrics[name] = scores(split.labels, predicted.tolist(), data.labels)
    return metrics


def train_probe(
    options: ProbeOptions, data: LabelledData, log: Callable[[str], None] = print
) -> tuple[ClassificationHead, dict[str, object]]:
    """Features for every split -> logistic regression -> head file with its metrics."""
    started = time.monotonic()
    encoder = EncoderFeatures(options.encoder, options.prefix, options.threads, options.engine)
    log(f"features on {encoder.engine}")
    features = {}
    for name, split in data.splits.items():
        t0 = time.monotonic()
        features[name] = encoder(split.texts, options.pooling, f"features {name}")
        rate = len(split) / max(time.monotonic() - t0, 1e-9)
        log(f"{name}: {len(split)} texts encoded ({rate:.1f} texts/s)")
    labels = {name: split.labels for name, split in data.splits.items()}
    weight, bias, fit = fit_probe(features, labels, options.c_grid, options.class_weight)
    metrics = evaluate(weight, bias, features, data)
    training = {
        "mode": "frozen linear probe (logistic regression on standardised features)",
        "encoder": str(options.encoder.resolve()),
        "prefix": encoder.prefix,
        "engine": encoder.engine,
        "pooling": f"{options.pooling} of layer {encoder.layer}",
        "data": data.describe(),
        "truncated_texts": encoder.truncated,
        "fit": fit,
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 1),
    }
    head = ClassificationHead(
        labels=data.labels,
        weight=torch.from_numpy(weight),
        bias=torch.from_numpy(bias),
        pooling=options.pooling,
        origin=f"trained: {data.source}",
        training=training,
    )
    save_head(head, options.output)
    return head, training


def summary(training: dict[str, object]) -> str:
    """Lines for the command's stdout."""
    lines = [f"mode: {training['mode']}"]
    metrics = training["metrics"]
    assert isinstance(metrics, dict)
    for name, split in metrics.items():
        f1 = ", ".join(f"{k} {v:.3f}" for k, v in split["f1"].items())
        lines.append(
            f"{name:<5} n={split['n']:<5} accuracy {split['accuracy']:.4f}  macro-F1 "
            f"{split['macro_f1']:.4f}  ({f1})"
        )
    return "\n".join(lines)
