"""Classification metrics recorded with every trained head (scikit-learn's, not hand-written)."""

from __future__ import annotations

from collections.abc import Sequence


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
