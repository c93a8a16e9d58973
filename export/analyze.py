"""`bertstream-analyze`: which pooling of which layer gives useful vectors, as pictures.

    bertstream-analyze --version model_repository/news-zh/1 --data inews --output docs/img

For every pooled output a version exports (`{pooling}_layer{n}`: mean, max, cls, mean_max of
each of config.pbtxt's `pooling_layers`) a linear probe is fitted on the labelled train split
and scored on the test split: the probe of `bertstream-train-head` (training.fit_probe:
logistic regression on standardised features, C picked on dev), so one cell of the heat map is
exactly the head that command would train on that output. The features come from one pass of
the server's own load (loader.open_version: tokenizer, prefix, engine), all outputs at once.

Writes `<model>-probe.png` (accuracy and macro-F1 per pooling x layer, numbers in the cells),
`<model>-map.png` (the test set's vectors of the default output in 2-D, PCA and t-SNE,
coloured by label) and `<model>-probe.json` (every number the pictures show, and how they were
made). A classify model whose labels are the data's also has its shipped head scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from bertstream.server.engine.backends.base import RuntimeOptions
from bertstream.server.engine.batch import Batch
from bertstream.server.engine.loader import open_version
from bertstream.server.repository import config as model_config
from bertstream.server.version_format import (
    CONFIG_FILE,
    LABELS_FILE,
    LOGITS,
    POOLING_NAMES,
    POOLINGS,
    output_name,
    parse_version,
)
from bertstream.v1.model_config_pb2 import Pooling

from .datasets import INEWS_SOURCE, DatasetError, LabelledData, load_files, load_inews
from .metrics import scores
from .training import C_GRID, ENGINES, fit_probe

# Every pooling that makes one vector per text (not `tokens`).
PROBED_POOLINGS = tuple(p for p in POOLINGS if p != POOLING_NAMES[Pooling.POOLING_TOKENS])
_BATCH = 32
_DPI = 100


@dataclass(frozen=True)
class AnalyzeOptions:
    version: Path  # a version folder (config.pbtxt in its parent)
    output: Path  # folder for the PNGs and the JSON
    c_grid: tuple[float, ...] = C_GRID
    engine: str = "auto"  # as bertstream-server --cpu-engine
    threads: int = 0


def resolve_version(path: Path) -> Path:
    """A version folder as given, or a model folder's highest version."""
    if (path / CONFIG_FILE).is_file():
        versions = [v for v in (parse_version(p.name) for p in path.iterdir()) if v]
        if not versions:
            raise ValueError(f"{path} has no version folder")
        return path / str(max(versions))
    return path


class VersionOutputs:
    """Every pooled output of a version (and its logits) in one pass, as the server computes
    them; `truncated` counts texts over the model's limit (kept from their start)."""

    def __init__(self, version: Path, engine: str, threads: int) -> None:
        self.config = model_config.load(version.parent)
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        options = RuntimeOptions(intra_op_threads=threads, cpu_engine=engine)
        self.runtime, self.tokenizer = open_version(version, self.config, options)
        self.engine = self.runtime.provider
        self.prefix = self.config.classify_prefix or self.config.embed_prefix
        self.layers = sorted(self.config.pooling_layers)
        self.outputs = [output_name(p, n) for p in PROBED_POOLINGS for n in self.layers]
        labels_file = version / LABELS_FILE
        lines = labels_file.read_text("utf-8").splitlines() if labels_file.is_file() else []
        self.labels = tuple(line.strip() for line in lines if line.strip())
        self.truncated = 0

    def __call__(self, texts: Sequence[str], with_logits: bool) -> dict[str, np.ndarray]:
        names = [*self.outputs, LOGITS] if with_logits else self.outputs
        encoded = self.tokenizer.encode([self.prefix + t for t in texts], truncate=True)
        self.truncated += sum(1 for n in encoded.truncated_tokens if n)
        order = sorted(range(len(encoded)), key=encoded.lengths.__getitem__)  # less padding
        result: dict[str, np.ndarray] = {}
        for start in range(0, len(order), _BATCH):
            rows = order[start : start + _BATCH]
            for name, values in self.runtime.run(Batch.of(encoded, rows), names).items():
                if name not in result:
                    result[name] = np.zeros((len(texts), values.shape[1]), dtype=np.float32)
                result[name][rows] = values
        return result


def probe_grid(
    features: dict[str, dict[str, np.ndarray]], data: LabelledData, outputs: Sequence[str],
    c_grid: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """For each output: fit on train (C by dev accuracy), score on test."""
    cells: dict[str, dict[str, Any]] = {}
    labels = {split: data.splits[split].labels for split in features}
    for name in outputs:
        split_features = {split: values[name] for split, values in features.items()}
        weight, bias, fit = fit_probe(split_features, labels, c_grid)
        predicted = (split_features["test"] @ weight.T + bias).argmax(axis=1)
        test = scores(data.splits["test"].labels, predicted.tolist(), data.labels)
        search: list[dict[str, float]] = fit["search"]  # type: ignore[assignment]
        best_dev = max(row["dev_accuracy"] for row in search)
        cells[name] = {"C": fit["C"], "dev_accuracy": best_dev, "test": test}
    return cells


def project(vectors: np.ndarray, seed: int = 0) -> dict[str, np.ndarray | list[float]]:
    """PCA and t-SNE of L2-normalised vectors (e5-like models compare by cosine)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    pca = PCA(n_components=2, random_state=seed).fit(unit)
    perplexity = float(max(2.0, min(30.0, (len(unit) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine",
                random_state=seed).fit_transform(unit)
    return {"pca": pca.transform(unit), "tsne": tsne,
            "pca_explained": [round(float(v), 4) for v in pca.explained_variance_ratio_]}


def _head_scores(head_labels: Sequence[str], test: dict[str, np.ndarray],
                 data: LabelledData) -> dict[str, Any]:
    """The shipped head's test metrics; its logit order may differ from the data's."""
    to_data = np.array([data.labels.index(label) for label in head_labels])
    predicted = to_data[test[LOGITS].argmax(axis=1)]
    return scores(data.splits["test"].labels, predicted.tolist(), data.labels)


def _matrix(cells: dict, layers: Sequence[int], metric: str) -> list[list[float]]:
    return [[cells[output_name(p, n)]["test"][metric] for n in layers] for p in PROBED_POOLINGS]


def draw_probe(record: dict, path: Path) -> None:
    """Two heat maps, pooling x layer: test accuracy and test macro-F1, numbers in the cells."""
    import matplotlib.pyplot as plt

    layers = record["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(layers), 4.2), constrained_layout=True)
    for ax, metric, title in zip(axes, ("accuracy", "macro_f1"), ("test accuracy",
                                                                  "test macro-F1"), strict=True):
        values = np.array(record[metric])
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers)), [f"layer {n}" for n in layers])
        ax.set_yticks(range(len(PROBED_POOLINGS)), list(PROBED_POOLINGS))
        ax.set_title(title)
        middle = (values.min() + values.max()) / 2
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=10,
                    color="black" if value > middle else "white")
        fig.colorbar(image, ax=ax, shrink=0.8)
    head = (f"; shipped head {record['head']['accuracy']:.3f} accuracy" if record["head"]
            else "")
    fig.suptitle(f"{record['model']}: a linear probe on each pooled output, scored on test\n"
                 f"majority class {record['majority_baseline']:.3f} accuracy{head}\n"
                 f"{_caption(record)}", fontsize=9)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def draw_map(record: dict, points: dict, labels: Sequence[int], path: Path) -> None:
    """The test set's vectors in 2-D (PCA | t-SNE), one colour per label."""
    import matplotlib.pyplot as plt

    names = record["data"]["labels"]
    truth = np.asarray(labels)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), constrained_layout=True)
    explained = record["map"]["pca_explained"]
    titles = (f"PCA ({explained[0]:.0%} + {explained[1]:.0%} of variance)", "t-SNE (cosine)")
    colours = plt.get_cmap("Dark2" if len(names) <= 8 else "tab20")  # no red/green meaning
    largest_first = sorted(range(len(names)), key=lambda i: -int(np.sum(truth == i)))
    for ax, key, title in zip(axes, ("pca", "tsne"), titles, strict=True):
        for index in largest_first:  # small classes drawn last, on top
            chosen = points[key][truth == index]
            ax.scatter(chosen[:, 0], chosen[:, 1], s=7, alpha=0.6, color=colours(index),
                       label=f"{names[index]} ({len(chosen)})")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(markerscale=2, fontsize=8)
    fig.suptitle(f"{record['model']}: {record['map']['output']} (the default output, "
                 f"L2-normalised) of {len(truth)} test texts\n"
                 f"{_caption(record)}", fontsize=9)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _caption(record: dict) -> str:
    sizes, source = record["data"]["sizes"], Path(record["data"]["source"]).name
    return (f"{source} (train {sizes['train']}, test {sizes['test']}); "
            f"{record['engine']}; {record['created'][:10]}")


def analyze(options: AnalyzeOptions, data: LabelledData,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Features -> probe per output -> PNGs and JSON in options.output; returns the record."""
    started = time.monotonic()
    version = resolve_version(options.version)
    model = VersionOutputs(version, options.engine, options.threads)
    log(f"{version}: {len(model.outputs)} outputs on {model.engine}")
    with_logits = bool(model.labels) and sorted(model.labels) == sorted(data.labels)
    features = {}
    for name, split in data.splits.items():
        t0 = time.monotonic()
        features[name] = model(split.texts, with_logits and name == "test")
        log(f"{name}: {len(split)} texts ({len(split) / max(time.monotonic() - t0, 1e-9):.1f}/s)")
    cells = probe_grid(features, data, model.outputs, options.c_grid)
    shown = _map_output(model)
    points = project(features["test"][shown])
    test_labels = data.splits["test"].labels
    best = max(cells, key=lambda name: cells[name]["test"]["accuracy"])
    majority = np.bincount(data.splits["train"].labels, minlength=len(data.labels)).argmax()
    name = version.parent.name
    record: dict[str, Any] = {
        "model": name, "version": str(version), "engine": model.engine,
        "prefix": model.prefix, "created": datetime.now(timezone.utc).isoformat(),
        "data": data.describe(), "truncated_texts": model.truncated,
        "probe": "logistic regression on standardised features, C by dev accuracy "
                 "(bertstream-train-head's frozen probe)",
        "poolings": list(PROBED_POOLINGS), "layers": model.layers,
        "accuracy": _matrix(cells, model.layers, "accuracy"),
        "macro_f1": _matrix(cells, model.layers, "macro_f1"),
        "cells": cells, "best": {"output": best, **cells[best]["test"]},
        "majority_baseline": round(float(np.mean(np.asarray(test_labels) == majority)), 4),
        "head": _head_scores(model.labels, features["test"], data) if with_logits else None,
        "map": {"output": shown, "normalised": "L2", "pca_explained": points["pca_explained"]},
        "figures": {"probe": f"{name}-probe.png", "map": f"{name}-map.png"},
        "seconds": round(time.monotonic() - started, 1),
    }
    _write(record, points, test_labels, options.output)
    return record


def _map_output(model: VersionOutputs) -> str:
    """The output the map shows: the model's default (what Embed returns unasked)."""
    config = model.config
    shown = output_name(POOLING_NAMES[config.default_pooling],
                        config.default_pooling_layer or config.num_layers)
    # A `tokens` default has no vector per text: the mean of the top exported layer instead.
    return shown if shown in model.outputs else output_name("mean", model.layers[-1])


def _write(record: dict[str, Any], points: dict, labels: Sequence[int], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    output.mkdir(parents=True, exist_ok=True)
    draw_probe(record, output / record["figures"]["probe"])
    draw_map(record, points, labels, output / record["figures"]["map"])
    (output / f"{record['model']}-probe.json").write_text(
        json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def summary(record: dict[str, Any]) -> str:
    """The accuracy grid and the best output, for stdout."""
    lines = [f"{pooling:<9}" + "".join(f"  layer {n}: {a:.4f}"
                                       for n, a in zip(record["layers"], row, strict=True))
             for pooling, row in zip(record["poolings"], record["accuracy"], strict=True)]
    best = record["best"]
    lines.append(f"best {best['output']}: accuracy {best['accuracy']:.4f}, macro-F1 "
                 f"{best['macro_f1']:.4f}; majority baseline {record['majority_baseline']:.4f}"
                 + (f"; shipped head {record['head']['accuracy']:.4f}" if record["head"] else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertstream-analyze",
        description="Probe accuracy per pooling x layer of an exported version, and a 2-D map "
                    "of its test vectors (PNGs + JSON).")
    parser.add_argument("--version", type=Path, required=True,
                        help="a version folder (or a model folder: its highest version)")
    parser.add_argument("--data", default=INEWS_SOURCE,
                        help="'inews' (default), or a train file (.jsonl / .tsv) as "
                             "bertstream-train-head reads it")
    parser.add_argument("--dev", type=Path, help="dev file (default: 10%% of train per label)")
    parser.add_argument("--test", type=Path, help="test file (default: 10%% of train per label)")
    parser.add_argument("--output", type=Path, default=Path("docs/img"),
                        help="folder for <model>-probe.png, <model>-map.png, <model>-probe.json")
    parser.add_argument("--limit", type=int, help="at most N texts per split (seeded sample)")
    parser.add_argument("--c-grid", default=",".join(str(c) for c in C_GRID),
                        help="inverse regularisation strengths tried; dev accuracy picks one")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="CPU engine, as bertstream-server --cpu-engine")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: all)")
    return parser


def _log(message: str) -> None:
    print(f"bertstream-analyze: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        data = (load_inews() if args.data == INEWS_SOURCE
                else load_files(Path(args.data), args.dev, args.test)).sampled(args.limit)
        options = AnalyzeOptions(
            version=args.version, output=args.output, engine=args.engine, threads=args.threads,
            c_grid=tuple(float(c) for c in args.c_grid.split(",") if c.strip()))
        record = analyze(options, data, _log)
    except (OSError, ValueError, DatasetError) as error:
        print(f"bertstream-analyze: error: {error}", file=sys.stderr)
        return 1
    print(summary(record))
    print("wrote " + ", ".join(str(args.output / f) for f in record["figures"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
