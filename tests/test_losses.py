import numpy as np
import pytest

from xmdl_tf.losses import PooledMetric, SegmentationLoss, pooled_metrics
from xmdl_tf.metrics import confusion, scores


def probs(fg: np.ndarray) -> np.ndarray:
    fg = fg.astype(np.float32)
    return np.stack([1 - fg, fg], -1)


def target(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.float32)[..., None]


def test_dice_identical_and_disjoint():
    a = np.zeros((2, 16, 16), bool)
    a[:, 2:10, 2:10] = True
    b = np.zeros_like(a)
    b[:, 10:15, 10:15] = True
    loss = SegmentationLoss("dice")
    assert float(loss(target(a), probs(a))) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(target(a), probs(b))) > 0.99


def test_dice_value_and_ignore():
    t = np.zeros((1, 4, 4), bool)
    t[0, :2, :2] = True  # 4 pixels
    p = np.zeros((1, 4, 4), bool)
    p[0, :2, :] = True  # 8 pixels, 4 overlap
    loss = SegmentationLoss("dice", smooth=0.0)
    assert float(loss(target(t), probs(p))) == pytest.approx(1 - 8 / 12, abs=1e-6)
    # Ignored pixels (-1) contribute nothing: mark the 4 false positives as ignored -> perfect.
    y = target(t)
    y[0, :2, 2:] = -1
    assert float(loss(y, probs(p))) == pytest.approx(0.0, abs=1e-6)
    ce = SegmentationLoss("dice_ce")
    assert float(ce(target(t), probs(p) * 0.98 + 0.01)) > float(loss(target(t), probs(p) * 0.98 + 0.01))
    with pytest.raises(ValueError):
        SegmentationLoss("focal")


def test_hand_made_iou_cases():
    # segmentation_models-style known IoUs: 1, 1/2, 1/3
    t = np.zeros((1, 2, 6), bool)
    t[0, 0, :4] = True
    for p_cols, iou in (((0, 4), 1.0), ((0, 2), 0.5), ((2, 6), 1 / 3)):
        p = np.zeros_like(t)
        p[0, 0, p_cols[0]:p_cols[1]] = True
        m = PooledMetric("iou")
        m.update_state(target(t), probs(p))
        assert float(m.result()) == pytest.approx(iou, abs=1e-6)


def test_pooled_metrics_match_numpy_reference():
    rng = np.random.default_rng(0)
    metrics = pooled_metrics()
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for _ in range(3):  # pooled over batches, not averaged per batch
        t = rng.random((2, 16, 16)) < 0.2
        p = rng.random((2, 16, 16))
        for m in metrics:
            m.update_state(target(t), probs(p))
        c = confusion(p >= 0.5, t)
        total = {k: total[k] + c[k] for k in total}
    ref = scores(total)
    for m in metrics:
        assert float(m.result()) == pytest.approx(ref[m.kind], abs=1e-6), m.kind
    metrics[0].reset_state()
    assert float(metrics[0].result()) == 1.0  # nothing seen, nothing predicted


def test_numpy_scores_edge_cases():
    assert scores(confusion(np.zeros(4), np.zeros(4)))["f1"] == 1.0
    assert scores(confusion(np.ones(4), np.zeros(4)))["precision"] == 0.0
    c = confusion(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]), valid=np.array([1, 1, 1, 0]))
    assert c == {"tp": 1, "fp": 1, "fn": 1, "tn": 0}
    assert scores(c)["iou"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        confusion(np.zeros(3), np.zeros(4))


def test_instance_scores_pooled():
    from xmdl_tf.config import InferenceConfig
    from xmdl_tf.postprocess import pooled_instance_scores, score_slice

    true = np.zeros((20, 20), np.uint8)
    true[2:6, 2:6] = 1
    true[10:15, 10:15] = 1  # two objects (binary label -> connected components)
    pred = np.zeros((20, 20), np.uint16)
    pred[2:6, 2:6] = 1  # one exact match
    pred[17:19, 0:3] = 2  # one false positive
    r = score_slice((pred > 0).astype(np.float32), true, InferenceConfig(), predicted=pred)
    assert (r["inst_tp"], r["inst_fp"], r["inst_fn"], r["count_error"]) == (1, 1, 1, 0)
    s = pooled_instance_scores([r, {**r, "count_error": -2}])
    assert s["instance_f1_iou50"] == pytest.approx(0.5) and s["mean_abs_count_error"] == 1.0
