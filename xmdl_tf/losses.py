"""Dice loss and pooled foreground metrics, in `keras.ops` (graph mode and XLA safe).

Conventions: y_true float32 (B, H, W, 1) with 1 = mitochondrion, 0 =
background, -1 = ignored (padding, unlabelled); y_pred (B, H, W, C) softmax
probabilities with channel 1 the mitochondria class. Ignored pixels add
nothing to the loss or the metrics.

Metrics accumulate true/false positives/negatives over *all pixels* of all
batches (pooled), never averaged per tile: a tile without mitochondria would
otherwise count as a perfect or an undefined score.
"""
from __future__ import annotations

import keras
from keras import ops


def _fg(y_true, y_pred):
    y_true = ops.cast(y_true, "float32")
    valid = ops.cast(y_true >= 0, "float32")[..., 0]
    target = ops.maximum(y_true, 0.0)[..., 0]
    prob = ops.cast(y_pred, "float32")[..., 1]
    return target, prob, valid


@keras.saving.register_keras_serializable(package="xmdl_tf")
class SegmentationLoss(keras.losses.Loss):
    """Soft Dice loss on the mitochondria channel, pooled over the batch.

    loss = 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), sums over valid pixels.
    Identical masks give 0, disjoint masks give ~1. kind="dice_ce" adds the
    mean binary cross-entropy of the same channel (often steadier early on).
    y_true float32 (B, H, W, 1): 1 mitochondrion, 0 background, -1 ignored; y_pred
    float32 (B, H, W, C) softmax, channel 1 the mitochondria. One value for the batch.
    """

    def __init__(self, kind: str = "dice", smooth: float = 1.0, name: str | None = None, **kwargs):
        if kind not in ("dice", "dice_ce"):
            raise ValueError(f"loss kind must be 'dice' or 'dice_ce', got {kind!r}")
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.smooth = kind, smooth

    def call(self, y_true, y_pred):
        t, p, v = _fg(y_true, y_pred)
        inter = ops.sum(p * t * v)
        denom = ops.sum(p * v) + ops.sum(t * v)
        loss = 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)
        if self.kind == "dice_ce":
            eps = 1e-7
            pc = ops.clip(p, eps, 1.0 - eps)
            ce = -(t * ops.log(pc) + (1.0 - t) * ops.log(1.0 - pc))
            loss = loss + ops.sum(ce * v) / ops.maximum(ops.sum(v), 1.0)
        # One value for the batch; Keras' reduction then leaves it unchanged.
        return ops.reshape(loss, (1,))

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="xmdl_tf")
class PooledMetric(keras.metrics.Metric):
    """Foreground accuracy/precision/recall/f1/iou from pixel counts pooled over batches.

    Thresholds the mitochondria probability at `threshold`. Undefined ratios
    (no positives at all) are reported as 1 when nothing was expected and
    nothing was predicted, else 0. Inputs as `SegmentationLoss` (-1 pixels left
    out); `result()` is a float32 scalar in [0, 1].
    """

    KINDS = ("accuracy", "precision", "recall", "f1", "iou")

    def __init__(self, kind: str = "f1", threshold: float = 0.5, name: str | None = None, **kwargs):
        if kind not in self.KINDS:
            raise ValueError(f"metric kind must be one of {self.KINDS}, got {kind!r}")
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.threshold = kind, threshold
        self.counts = self.add_variable(shape=(4,), initializer="zeros", name="counts", dtype="float64")

    def update_state(self, y_true, y_pred, sample_weight=None):
        t, p, v = _fg(y_true, y_pred)
        pred = ops.cast(p >= self.threshold, "float32")
        tp = ops.sum(pred * t * v)
        fp = ops.sum(pred * (1.0 - t) * v)
        fn = ops.sum((1.0 - pred) * t * v)
        tn = ops.sum((1.0 - pred) * (1.0 - t) * v)
        self.counts.assign_add(ops.cast(ops.stack([tp, fp, fn, tn]), "float64"))

    def result(self):
        tp, fp, fn, tn = (self.counts[i] for i in range(4))
        num, den = {
            "accuracy": (tp + tn, tp + fp + fn + tn),
            "precision": (tp, tp + fp),
            "recall": (tp, tp + fn),
            "f1": (2 * tp, 2 * tp + fp + fn),
            "iou": (tp, tp + fp + fn),
        }[self.kind]
        empty = ops.cast(tp + fp + fn == 0, "float64")
        return ops.cast(ops.where(den > 0, num / ops.maximum(den, 1e-12), empty), "float32")

    def reset_state(self):
        self.counts.assign(ops.zeros((4,), dtype="float64"))

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "threshold": self.threshold}


def pooled_metrics(threshold: float = 0.5) -> list[PooledMetric]:
    return [PooledMetric(k, threshold) for k in PooledMetric.KINDS]
