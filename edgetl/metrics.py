"""Classification metrics from scores and labels, in numpy (no scikit-learn dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    topk = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1))) if len(labels) else 0.0


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def classification_metrics(scores: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """top-1, top-5, per-class accuracy (recall), macro-F1 and the confusion matrix (rows: true)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n_cls = len(classes)
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(pred, labels, n_cls)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    recall = np.divide(tp, support, out=np.zeros(n_cls), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n_cls), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n_cls), where=(precision + recall) > 0)
    present = support > 0  # classes absent from this split would drag macro-F1 down for no reason
    return {
        "n": len(labels),
        "top1": float(np.mean(pred == labels)) if len(labels) else 0.0,
        # top-5 of 5 classes or fewer is 100% by construction: reported only where it says something.
        "top5": topk_accuracy(scores, labels, 5) if n_cls > 5 else None,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {c: (float(recall[i]) if support[i] else None) for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "labels": list(classes),
    }


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())
