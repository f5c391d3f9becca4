"""One post-processing and scoring path, shared by `analyze`, `evaluate` and the benchmarks.

Everything that turns a probability map into a mask and instances, and
everything that compares them with a label, lives here, so the numbers those
commands report agree by construction:

- foreground is `probability >= threshold` (one operator; NaN is background);
- instances: `mask_to_instances` with the minimum size of `InferenceConfig.min_size`;
- ground truth: foreground is label > 0 except `ignore_value`; instances are the
  label's ids when it has several, else its 4-connected components;
- pixels equal to `ignore_value` are left out of every pixel count and the
  instance matching; an image with nothing to find and nothing found scores
  1.0 (`metrics.scores`).
NumPy only (no TensorFlow).
"""
from __future__ import annotations

import numpy as np

from .config import InferenceConfig
from .metrics import scores


def foreground(probability: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: probability >= threshold (NaN -> False)."""
    return np.asarray(probability) >= threshold


def instances(probability: np.ndarray, inference: InferenceConfig, pixel_size_nm: float | None = None) -> np.ndarray:
    """Instance ids (H, W) uint16/uint32 of a probability map under `inference`."""
    from .instances import mask_to_instances

    return mask_to_instances(foreground(probability, inference.threshold), min_size_px=inference.min_size(pixel_size_nm),
                             separate=inference.separate)


THRESHOLD_STEP = 0.2  # how far `alternative_instances` moves the threshold either way
ZOOMS = (0.8, 1.25)  # the scales the "scale" alternatives are predicted at (`Predictor.predict_slice(zoom=...)`)


def alternative_instances(probability: np.ndarray, inference: InferenceConfig, pixel_size_nm: float | None = None,
                          members: np.ndarray | None = None, zoomed: list[np.ndarray] | None = None
                          ) -> dict[str, list[np.ndarray]]:
    """The slice's instances under small changes of the prediction, for the per-object agreement
    features (`confidence.object_features`): an object that holds its shape under them is more
    likely real than one that splits, merges or vanishes.

    "threshold": `instances` of `probability` (H, W) at the threshold -/+ `THRESHOLD_STEP`
    (clipped into [0.05, 0.95]); "tta": of each test-time-augmented member of `members`
    (H, W, M) float32 (`Predictor.predict_slice(members=True)`), at the threshold (absent if None);
    "scale": of each probability map (H, W) of `zoomed`, the slice predicted at the `ZOOMS` scales
    and mapped back to its grid (absent if None).
    Every other setting (minimum size, separation) as `inference`.
    """
    import dataclasses

    t = inference.threshold
    out = {"threshold": [instances(probability, dataclasses.replace(inference, threshold=float(np.clip(v, 0.05, 0.95))),
                                   pixel_size_nm) for v in (t - THRESHOLD_STEP, t + THRESHOLD_STEP)]}
    if members is not None and members.shape[-1] > 1:
        out["tta"] = [instances(members[..., m], inference, pixel_size_nm) for m in range(members.shape[-1])]
    if zoomed:
        out["scale"] = [instances(z, inference, pixel_size_nm) for z in zoomed]
    return out


def truth(label: np.ndarray, ignore_value: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(foreground bool (H, W), valid bool (H, W) or None) of a label image."""
    label = np.asarray(label)
    if ignore_value is None:
        return label > 0, None
    valid = label != ignore_value
    return (label > 0) & valid, valid


def ground_truth_instances(label: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """Instances of a label image: its ids if it has several, else 4-connected components of its foreground."""
    from skimage.measure import label as cc_label

    fg, valid = truth(label, ignore_value)
    ids = np.unique(label[valid] if valid is not None else label)
    if len(ids[ids > 0]) > 1:
        return np.where(fg, label, 0)
    return cc_label(fg, connectivity=1)


def score_slice(probability: np.ndarray, label: np.ndarray, inference: InferenceConfig,
                pixel_size_nm: float | None = None, ignore_value: int | None = None,
                predicted: np.ndarray | None = None) -> dict:
    """Pixel counts and instance matches (IoU >= 0.5) of one slice.

    predicted: the slice's instances if already computed (else `instances`).
    Returns tp/fp/fn/tn (pixels), inst_tp/inst_fp/inst_fn, count, gt_count, count_error.
    """
    from .instances import match_instances
    from .metrics import confusion

    fg, valid = truth(label, ignore_value)
    counts = confusion(foreground(probability, inference.threshold), fg, valid)
    pred = instances(probability, inference, pixel_size_nm) if predicted is None else predicted
    if valid is not None:
        pred = np.where(valid, pred, 0)
    m = match_instances(pred, ground_truth_instances(label, ignore_value), 0.5)
    return {**counts, "inst_tp": int(m["tp"]), "inst_fp": int(m["fp"]), "inst_fn": int(m["fn"]),
            "count": int(m["n_pred"]), "gt_count": int(m["n_true"]), "count_error": int(m["count_error"])}


def matched_objects(predicted: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Per predicted object 1..N (N = predicted.max()): True if some true object overlaps it with
    IoU >= iou_threshold. Above 0.5 a true object can be matched by one prediction only; at exactly
    0.5 the two halves of one true object both count (`instances.match_instances`, which pairs
    them one to one, counts one), a tie too rare on real slices to change a figure."""
    if iou_threshold < 0.5:
        raise ValueError("matched_objects needs iou_threshold >= 0.5 (where matches are unique)")
    return best_iou(predicted, true) >= iou_threshold


def best_iou(instances: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per object 1..N of `instances` (H, W): its highest IoU with any object of `others` (H, W),
    0 where it overlaps none. float64 (N,)."""
    from .instances import pairwise_iou

    a = np.asarray(instances)
    out = np.zeros(int(a.max()) if a.size else 0)
    ids, _, ia, _, iou = pairwise_iou(a, others)
    np.maximum.at(out, ids[ia] - 1, iou)
    return out


def instance_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Instance precision, recall and F1 at IoU 0.5 from matched counts (`metrics.scores`' rule:
    nothing to find and nothing found is 1.0, a zero denominator otherwise 0.0)."""
    s = scores({"tp": tp, "fp": fp, "fn": fn, "tn": 0})
    return {"instance_f1_iou50": s["f1"], "instance_precision_iou50": s["precision"],
            "instance_recall_iou50": s["recall"]}


def pooled_instance_scores(rows: list[dict]) -> dict:
    """Instance F1 at IoU 0.5 pooled over images, and the mean absolute count error per image."""
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("inst_tp", "inst_fp", "inst_fn"))
    return {**instance_scores(tp, fp, fn),
            "mean_abs_count_error": sum(abs(r["count_error"]) for r in rows) / max(len(rows), 1)}
