"""Instance separation and instance-level scores on hand-drawn masks."""

import importlib
import math

import cv2
import numpy as np
import pytest
from skimage.draw import disk, ellipse

from xmdl_tf.instances import mask_to_instances, match_instances, min_size_px_from_area


def _discs(shape, centres, radius):
    mask = np.zeros(shape, bool)
    for c in centres:
        rr, cc = disk(c, radius, shape=shape)
        mask[rr, cc] = True
    return mask


def _thick_polyline(shape, points, width):
    mask = np.zeros(shape, np.uint8)
    cv2.polylines(mask, [np.asarray(points, np.int32)], False, 1, width)
    return mask.astype(bool)


def test_separated_objects_counted_exactly():
    centres = [(16 + 32 * i, 16 + 32 * j) for i in range(3) for j in range(3)]
    mask = _discs((96, 96), centres, 10)
    labels = mask_to_instances(mask)
    assert labels.dtype == np.uint16
    assert labels.max() == 9
    assert sorted(np.unique(labels)) == list(range(10))  # consecutive ids
    assert np.array_equal(labels > 0, mask)


def test_two_touching_discs_are_split_evenly():
    mask = _discs((64, 96), [(32, 30), (32, 58)], 15)  # neck half-width ~5 px
    assert mask_to_instances(mask, separate=False).max() == 1
    labels = mask_to_instances(mask)
    assert labels.max() == 2
    areas = np.bincount(labels.ravel())[1:]
    assert abs(areas[0] - areas[1]) <= 0.05 * areas.mean()
    left, right = labels[32, 30], labels[32, 58]
    assert left != right and left > 0 and right > 0


def test_small_touching_discs_are_split():
    mask = _discs((40, 60), [(20, 20), (20, 33)], 7)
    assert mask_to_instances(mask).max() == 2


def test_wide_overlap_is_one_object():
    # Neck almost as wide as the bodies: one (peanut-shaped) object, not two.
    mask = _discs((64, 96), [(32, 38), (32, 56)], 15)
    assert mask_to_instances(mask).max() == 1


@pytest.mark.parametrize(
    "mask",
    [
        _thick_polyline((64, 256), [(20, 32), (236, 32)], 16),  # straight tube
        _thick_polyline((128, 256), [(20, 100), (80, 30), (160, 90), (236, 20)], 12),  # bent tube
    ],
    ids=["straight_tube", "bent_tube"],
)
def test_tubes_are_not_split(mask):
    assert mask_to_instances(mask).max() == 1


def test_long_ellipse_is_not_split():
    mask = np.zeros((100, 260), bool)
    rr, cc = ellipse(50, 130, 12, 115, rotation=0.3, shape=mask.shape)
    mask[rr, cc] = True
    assert mask_to_instances(mask).max() == 1


def test_noisy_tube_and_branched_object_are_not_split():
    rng = np.random.default_rng(0)
    mask = np.zeros((96, 256), bool)
    for x in np.linspace(20, 236, 300):
        rr, cc = disk((48 + 20 * math.sin(x / 30), x), 7 + rng.normal(0, 0.8), shape=mask.shape)
        mask[rr, cc] = True
    assert mask_to_instances(mask).max() == 1
    y = np.zeros((160, 160), np.uint8)
    for angle in (90, 210, 330):
        a = math.radians(angle)
        cv2.line(y, (80, 80), (int(80 + 60 * math.cos(a)), int(80 - 60 * math.sin(a))), 1, 10)
    assert mask_to_instances(y).max() == 1


def test_input_kinds_and_threshold():
    mask = _discs((48, 48), [(24, 24)], 10)
    prob = np.where(mask, 0.8, 0.3).astype(np.float32)
    for arr in (mask, mask.astype(np.uint8), mask.astype(np.uint8) * 255, prob):
        assert mask_to_instances(arr).max() == 1
    assert mask_to_instances(prob, threshold=0.9).max() == 0
    prob[0, 0] = np.nan  # NaN is background, not an error
    assert mask_to_instances(prob)[0, 0] == 0
    with pytest.raises(ValueError, match="2-D"):
        mask_to_instances(np.zeros((2, 8, 8)))


def test_fill_holes_and_min_size():
    mask = _discs((64, 64), [(32, 32)], 20)
    mask[28:36, 28:36] = False  # enclosed hole
    mask[2:4, 2:4] = True  # 4-pixel speck
    filled = mask_to_instances(mask)
    assert filled.max() == 2 and filled[32, 32] > 0
    assert mask_to_instances(mask, fill_holes=False)[32, 32] == 0
    kept = mask_to_instances(mask, min_size_px=5)
    assert kept.max() == 1 and kept[3, 3] == 0
    assert mask_to_instances(mask, min_size_px=4).max() == 2  # the limit is inclusive


def test_background_enclosed_by_touching_objects_stays_background():
    # Six discs in a closed ring: the enclosed gap is not a hole in one object.
    centres = [(48 + 22 * math.sin(a), 48 + 22 * math.cos(a)) for a in np.arange(6) * math.pi / 3]
    mask = _discs((96, 96), centres, 12)
    labels = mask_to_instances(mask)
    assert labels.max() == 6 and labels[48, 48] == 0
    assert np.array_equal(labels > 0, mask)


def test_object_with_small_holes_is_filled_not_split():
    mask = _discs((80, 80), [(40, 40)], 30)
    for c in ((30, 30), (30, 50), (50, 40), (40, 40)):
        mask[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2] = False
    labels = mask_to_instances(mask)
    assert labels.max() == 1 and np.array_equal(labels > 0, _discs((80, 80), [(40, 40)], 30))


def test_uint32_when_ids_exceed_uint16():
    mask = np.zeros((512, 512), bool)
    mask[::2, ::2] = True  # 65,536 isolated pixels
    labels = mask_to_instances(mask, separate=False)
    assert labels.dtype == np.uint32 and labels.max() == 65_536


def test_min_size_from_area():
    assert min_size_px_from_area(50_000, 5.0) == 2000
    assert min_size_px_from_area(1000, 3.0) == 112  # ceil(111.1)
    assert min_size_px_from_area(100, 0.1) == 10_000  # no float round-up
    with pytest.raises(ValueError):
        min_size_px_from_area(100, 0)
    with pytest.raises(ValueError):
        min_size_px_from_area(-1, 5)


def _labels_from_boxes(shape, boxes):
    labels = np.zeros(shape, np.uint16)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


def test_match_identical():
    true = _labels_from_boxes((40, 40), [(0, 10, 0, 10), (20, 30, 0, 10), (0, 10, 20, 30)])
    r = match_instances(true, true)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 0, 0)
    assert r["precision"] == r["recall"] == r["f1"] == r["mean_matched_iou"] == 1.0
    assert r["count_error"] == 0


def test_match_one_missed_and_ids_arbitrary():
    true = _labels_from_boxes((40, 40), [(0, 10, 0, 10), (20, 30, 0, 10), (0, 10, 20, 30)])
    pred = np.where(true == 3, 0, true * 7).astype(np.uint32)  # ids 7 and 14, object 3 missed
    r = match_instances(pred, true)
    assert (r["tp"], r["fp"], r["fn"], r["n_pred"], r["n_true"]) == (2, 0, 1, 2, 3)
    assert r["precision"] == 1.0
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(0.8)
    assert r["count_error"] == -1


def test_match_shift_below_threshold_is_unmatched():
    true = _labels_from_boxes((20, 40), [(0, 10, 0, 10)])
    pred = _labels_from_boxes((20, 40), [(0, 10, 4, 14)])  # IoU = 60 / 140 = 0.43
    r = match_instances(pred, true)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)
    assert r["f1"] == 0.0 and math.isnan(r["mean_matched_iou"])
    r = match_instances(pred, true, iou_threshold=0.4)
    assert r["tp"] == 1 and r["mean_matched_iou"] == pytest.approx(60 / 140)


def test_match_maximises_number_of_matches():
    # In one row: true X = [0, 10), Y = [10, 20); pred B = [0, 2), A = [2, 14).
    # IoU: A-X 8/14, A-Y 4/18, B-X 2/10. Greedy A-X leaves B unmatched;
    # the best matching at threshold 0.2 is A-Y + B-X.
    true = _labels_from_boxes((1, 20), [(0, 1, 0, 10), (0, 1, 10, 20)])
    pred = _labels_from_boxes((1, 20), [(0, 1, 0, 2), (0, 1, 2, 14)])
    r = match_instances(pred, true, iou_threshold=0.2)
    assert r["tp"] == 2
    assert r["mean_matched_iou"] == pytest.approx((2 / 10 + 4 / 18) / 2)


def test_match_empty_and_errors():
    empty = np.zeros((8, 8), np.uint16)
    r = match_instances(empty, empty)
    assert r["tp"] == 0 and r["f1"] == 1.0
    one = empty.copy()
    one[2:4, 2:4] = 1
    assert match_instances(empty, one)["f1"] == 0.0
    assert match_instances(one, empty)["fp"] == 1
    with pytest.raises(ValueError, match="shape"):
        match_instances(empty, np.zeros((8, 9), np.uint16))


def test_match_many_objects_against_separation():
    # 400 separated discs: labels from the mask match the drawn truth exactly.
    centres = [(10 + 20 * i, 10 + 20 * j) for i in range(20) for j in range(20)]
    true = np.zeros((400, 400), np.uint16)
    for k, c in enumerate(centres, start=1):
        rr, cc = disk(c, 6)
        true[rr, cc] = k
    r = match_instances(mask_to_instances(true > 0), true)
    assert r["tp"] == 400 and r["f1"] == 1.0


def test_synthetic_touching_objects_are_separated():
    try:
        synthetic = importlib.import_module("data_prep.synthetic")
    except ImportError as exc:
        pytest.skip(f"data_prep.synthetic not available: {exc}")
    _, true, objects = synthetic.generate_slice(size=768, seed=3, pixel_size_nm=5.0, touching_fraction=0.6)
    assert objects["touching"].sum() >= 4
    r = match_instances(mask_to_instances(true > 0), true)
    assert r["f1"] == 1.0 and r["count_error"] == 0


def test_pairwise_iou_sparse_table():
    from xmdl_tf.instances import pairwise_iou

    a = np.zeros((10, 10), np.int32)
    b = np.zeros((10, 10), np.int32)
    a[0:4, 0:4] = 7      # 16 px
    a[6:10, 6:10] = 3    # 16 px, overlaps nothing
    b[0:4, 2:6] = 900    # 16 px, 8 shared with a's 7
    b[0:2, 0:2] = 5      # 4 px inside a's 7 (b's 900 keeps the rest)
    ids_a, ids_b, ia, ib, iou = pairwise_iou(a, b)
    assert ids_a.tolist() == [3, 7] and ids_b.tolist() == [5, 900]
    pairs = {(int(ids_a[i]), int(ids_b[j])): v for i, j, v in zip(ia, ib, iou)}
    assert pairs == pytest.approx({(7, 5): 4 / 16, (7, 900): 8 / (16 + 16 - 8)})


# Independent brute-force references for the scores


def _brute_ious(pred, true):
    p_ids = [int(i) for i in np.unique(pred) if i]
    t_ids = [int(j) for j in np.unique(true) if j]
    iou = np.zeros((len(p_ids), len(t_ids)))
    for a, i in enumerate(p_ids):
        for b, j in enumerate(t_ids):
            iou[a, b] = np.sum((pred == i) & (true == j)) / np.sum((pred == i) | (true == j))
    return p_ids, t_ids, iou


def _brute_max_matching(iou, threshold):
    """Largest number of one-to-one pairs with IoU >= threshold, by enumeration."""
    def best(a, used):
        if a == iou.shape[0]:
            return 0
        options = [best(a + 1, used)]
        options += [1 + best(a + 1, used | {b}) for b in range(iou.shape[1]) if b not in used and iou[a, b] >= threshold]
        return max(options)
    return best(0, frozenset())


def _coco_ap(pred, true, threshold, scores=None):
    """COCO / MitoEM AP: greedy matching in score order (a true object claimed once), 101-point precision."""
    p_ids, t_ids, iou = _brute_ious(pred, true)
    if not t_ids:
        return float("nan")
    rank = [np.sum(pred == i) if scores is None else scores.get(i, 0.0) for i in p_ids]
    claimed, hits = set(), []
    for a in np.argsort(-np.asarray(rank, float), kind="stable"):
        free = [b for b in range(len(t_ids)) if b not in claimed and iou[a, b] >= threshold]
        if free:
            claimed.add(max(free, key=lambda b: iou[a, b]))
        hits.append(bool(free))
    hits = np.asarray(hits, bool)
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    recall, precision = tp / len(t_ids), list(tp / np.maximum(tp + fp, 1))
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    q = [precision[k] if k < len(precision) else 0.0 for k in np.searchsorted(recall, np.linspace(0, 1, 101), "left")]
    return float(np.mean(q))


def test_match_and_ap_agree_with_brute_force():
    from xmdl_tf.instances import average_precision

    rng = np.random.default_rng(0)
    for trial in range(300):
        # Tiny random label images: many exact IoU ties (0.5 included), non-contiguous ids.
        pred, true = rng.integers(0, 4, (3, 4)) * 3, rng.integers(0, 4, (3, 4)) * 5
        scores = {int(i): float(rng.random()) for i in range(3, 10, 3)} if trial % 2 else None
        p_ids, t_ids, iou = _brute_ious(pred, true)
        for t in (0.5, 0.75):
            m = match_instances(pred, true, t)
            tp = _brute_max_matching(iou, t)
            assert (m["tp"], m["n_pred"], m["n_true"]) == (tp, len(p_ids), len(t_ids))
            ap = average_precision(pred, true, (t,), scores)[f"ap{round(100 * t)}"]
            ref = _coco_ap(pred, true, t, scores)
            assert (math.isnan(ap) and math.isnan(ref)) or ap == pytest.approx(ref), (trial, t)


def test_ap_counts_a_true_object_once_when_two_halves_reach_iou_half():
    from xmdl_tf.instances import average_precision

    # True: two 2 x 4 objects; predicted: the first cut into two 1 x 4 halves (IoU exactly 0.5
    # each), the second missed. One true positive, recall 0.5: AP50 = 51 / 101, not 1.0.
    true = np.zeros((6, 4), np.uint16)
    true[0:2], true[4:6] = 1, 2
    pred = np.zeros((6, 4), np.uint16)
    pred[0], pred[1] = 1, 2
    assert average_precision(pred, true)["ap50"] == pytest.approx(51 / 101)
    assert match_instances(pred, true, 0.5)["tp"] == 1


def test_match_and_ap_with_uint64_ids_beyond_int64():
    from xmdl_tf.instances import average_precision

    true = np.zeros((4, 8), np.uint64)
    true[:, 0:2], true[:, 4:6], true[:, 6:8] = 1, 2**63 + 7, 2**64 - 1
    assert match_instances(true, true)["tp"] == 3
    assert average_precision(true, true) == {"ap50": 1.0, "ap75": 1.0}


def test_pooled_pixel_scores_agree_with_brute_force():
    from xmdl_tf.metrics import add_counts, confusion, scores

    rng = np.random.default_rng(1)
    total = {}
    preds, trues = [], []
    for _ in range(5):
        pred, true, valid = rng.random((9, 7)) < 0.4, rng.random((9, 7)) < 0.3, rng.random((9, 7)) < 0.8
        total = add_counts(total, confusion(pred, true, valid))
        preds.append(pred[valid]), trues.append(true[valid])
    p, t = np.concatenate(preds), np.concatenate(trues)
    tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
    s = scores(total)
    assert s["precision"] == pytest.approx(tp / (tp + fp)) and s["recall"] == pytest.approx(tp / (tp + fn))
    assert s["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) and s["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert s["accuracy"] == pytest.approx(np.mean(p == t))
    # Documented conventions: nothing to find and nothing found scores 1; otherwise a 0/0 ratio is 0.
    empty = np.zeros((4, 4), bool)
    assert scores(confusion(empty, empty)) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0, "accuracy": 1.0}
    some = empty.copy()
    some[1, 1] = True
    assert scores(confusion(empty, some))["precision"] == 0.0 and scores(confusion(some, empty))["recall"] == 0.0


def test_separation_neither_loses_nor_duplicates_foreground():
    from scipy import ndimage as ndi

    from xmdl_tf.instances3d import volume_instances

    rng = np.random.default_rng(2)
    for _ in range(10):
        mask = np.zeros((64, 64), bool)
        for _ in range(6):
            rr, cc = disk(rng.integers(0, 64, 2), rng.integers(3, 12), shape=mask.shape)
            mask[rr, cc] = True
        labels = mask_to_instances(mask)
        assert not (mask & (labels == 0)).any() and not ((labels > 0) & ~ndi.binary_fill_holes(mask)).any()
        assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    zz, yy, xx = np.mgrid[:12, :32, :32]
    vol = np.zeros((12, 32, 32), bool)
    for _ in range(5):
        c, r = rng.integers(0, (12, 32, 32)), rng.integers(3, 8)
        vol |= (3 * (zz - c[0])) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
    labels = volume_instances(vol, (30.0, 10.0, 10.0))
    assert not (vol & (labels == 0)).any()
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_separation_cuts_off_no_piece_under_the_minimum_size():
    # A disc with a 7 x 7 knob on a 1-px neck: a split makes a 50-px piece. With a minimum size
    # above that, the knob stays with the disc; two touching discs of the size are still split.
    y, x = np.mgrid[:80, :80]
    mask = (y - 45) ** 2 + (x - 45) ** 2 <= 400
    mask[17:24, 43:50] = True
    mask[24, 45] = True
    assert sorted(np.bincount(mask_to_instances(mask).ravel())[1:]) == [50, 1257]
    kept = mask_to_instances(mask, min_size_px=200)
    assert kept.max() == 1 and np.count_nonzero(kept) == 1307
    discs = _discs((64, 128), [(32, 44), (32, 78)], 20)
    halves = np.bincount(mask_to_instances(discs, min_size_px=1000).ravel())[1:]
    assert len(halves) == 2 and halves.min() >= 1000
    assert mask_to_instances(discs, min_size_px=halves.min() + 1).max() == 1  # the smaller half is too small

    from xmdl_tf.instances3d import volume_instances

    z, y, x = np.mgrid[:24, :48, :48]
    vol = (z - 12) ** 2 + (y - 30) ** 2 + (x - 24) ** 2 <= 81
    vol[8:17, 4:13, 20:29] = True  # a 9 x 9 x 9 knob
    vol[12, 13:22, 24] = True  # on a 1-voxel neck
    assert sorted(np.bincount(volume_instances(vol).ravel())[1:]) == [734, 3074]
    assert volume_instances(vol, min_size_vox=1000).max() == 1
