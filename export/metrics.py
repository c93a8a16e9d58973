"""Metrics recorded with every trained head: classification (scikit-learn's, not hand-written)
and, for pair models, reranking."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def scores(labels: Sequence[int], predicted: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix (rows: true labels)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    classes = list(range(len(names)))
    per_class = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
    return {
        "n": len(labels),
        "accuracy": round(float(accuracy_score(labels, predicted)), 4),
        "macro_f1": round(float(f1_score(labels, predicted, labels=classes, average="macro",
                                         zero_division=0)), 4),
        "f1": {name: round(float(f), 4) for name, f in zip(names, per_class, strict=True)},
        "confusion": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


def mrr_at_k(scores: np.ndarray, k: int) -> float:
    """Mean reciprocal rank of column 0 (the right answer) among each row's candidates, 0 past
    rank `k`. A tie counts against the right answer (rank = 1 + candidates scoring at least
    as high), so a constant scorer earns nothing. k = 1 gives top-1 accuracy."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [queries, candidates], not {scores.shape}")
    ranks = 1 + (scores[:, 1:] >= scores[:, :1]).sum(axis=1)
    return float(np.where(ranks <= k, 1.0 / ranks, 0.0).mean()) if len(ranks) else 0.0


def rerank_lines(training: dict) -> list[str]:
    """A pair head's accuracy and rerank figures beside cosine's, for stdout."""
    rerank = training.get("rerank")
    if not isinstance(rerank, dict):
        return []
    cross, cosine = rerank["cross_encoder"], rerank["cosine"]
    return [
        f"rerank: {rerank['queries']} test titles, each against {rerank['candidates']} leads "
        "(its own first)",
        f"  {'':<28} {'accuracy':>8} {'MRR@10':>8} {'top-1':>8}",
        f"  {'cross-encoder (this head)':<28} {cross['test']['accuracy']:>8.4f} "
        f"{cross['mrr@10']:>8.4f} {cross['top1']:>8.4f}",
        f"  {'cosine of embeddings':<28} {cosine['test']['accuracy']:>8.4f} "
        f"{cosine['mrr@10']:>8.4f} {cosine['top1']:>8.4f}",
    ]
