"""Foreground segmentation scores in NumPy, pooled over pixels (no TensorFlow)."""
from __future__ import annotations

import numpy as np

COUNT_KEYS = ("tp", "fp", "fn", "tn")


def confusion(pred: np.ndarray, true: np.ndarray, valid: np.ndarray | None = None) -> dict[str, int]:
    """Pixel counts of a binary prediction against a binary truth (same shape, bool-like)."""
    pred = np.asarray(pred, bool)
    true = np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
    if valid is not None:
        valid = np.asarray(valid, bool)
        pred, true = pred[valid], true[valid]
    tp = int(np.count_nonzero(pred & true))
    fp = int(np.count_nonzero(pred & ~true))
    fn = int(np.count_nonzero(~pred & true))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size - tp - fp - fn)}


def scores(c: dict[str, int]) -> dict[str, float]:
    """Foreground precision, recall, F1 (= Dice), IoU and accuracy from counts.

    A ratio with a zero denominator is 1.0 if there was nothing to find and
    nothing was predicted, else 0.0 (same rule as `losses.PooledMetric`).
    """
    tp, fp, fn, tn = (c[k] for k in COUNT_KEYS)
    empty = 1.0 if tp + fp + fn == 0 else 0.0

    def ratio(num: float, den: float) -> float:
        return float(num / den) if den > 0 else empty

    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "accuracy": float((tp + tn) / max(tp + fp + fn + tn, 1)),
    }


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b[k] for k in COUNT_KEYS}
