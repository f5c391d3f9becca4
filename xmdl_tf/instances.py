"""Foreground mask -> separated, labelled mitochondria, and instance-level scores.

NumPy / SciPy / scikit-image / OpenCV only; no TensorFlow.

Separation of touching mitochondria
-----------------------------------
Touching objects are split by a marker-controlled watershed on the Euclidean
distance transform (EDT), which is a map of local half-width. Candidate markers
are all local maxima of the lightly smoothed EDT, so at first every object is
over-segmented. Neighbouring regions are then merged again, highest pass first
(the "dynamics" of the maxima), unless the pass between them is a real neck:

    keep apart  iff  saddle <= neck_ratio * peak_low
                and  peak_low - saddle >= min_depth_px

where ``peak_low`` is the EDT maximum (the half-width) of the thinner of the two
bodies and ``saddle`` the highest EDT value on their common boundary (the
half-width of the neck). A tube or long ellipse has a ridge of almost constant
EDT, so its spurious maxima have ``saddle ~ peak`` and are merged back; two
round bodies joined by a neck narrower than ``neck_ratio`` of their radius are
split. A ratio (rather than a fixed depth as with h-maxima) makes the rule
independent of object size and of the pixel size.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import watershed

__all__ = ["average_precision", "mask_to_instances", "match_instances", "min_size_px_from_area", "split_component"]

# An enclosed hole at least this wide (inscribed radius, relative to the
# thinnest object around it) is background between objects, not a gap to fill.
_GAP_RATIO = 0.5


def min_size_px_from_area(area_nm2: float, pixel_size_nm: float) -> int:
    """Minimum object size in pixels for a minimum area in nm^2.

    Args:
        area_nm2: smallest area to keep, nm^2 (>= 0).
        pixel_size_nm: side of one (square) pixel, nm (> 0).

    Returns:
        ceil(area_nm2 / pixel_size_nm^2), the pixel count to pass as
        ``mask_to_instances(min_size_px=...)``.
    """
    if not pixel_size_nm > 0 or not math.isfinite(pixel_size_nm):
        raise ValueError(f"pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    if not area_nm2 >= 0 or not math.isfinite(area_nm2):
        raise ValueError(f"area_nm2 must be a non-negative number, got {area_nm2!r}")
    # Round the quotient first so that float noise (e.g. 100 / 0.1**2) does
    # not push an exact pixel count up by one.
    return int(math.ceil(round(area_nm2 / pixel_size_nm**2, 9)))


def _foreground(mask_or_prob: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool foreground: floats are thresholded, bool/ints taken as nonzero."""
    arr = np.asarray(mask_or_prob)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask or probability map, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"empty mask or probability map (shape {arr.shape})")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= threshold  # as postprocess.foreground; NaN compares False -> background
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise TypeError(f"unsupported dtype {arr.dtype} (expected bool, integer or float)")


def _as_label_dtype(labels: np.ndarray, n: int) -> np.ndarray:
    return labels.astype(np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32, copy=False)


def split_component(
    dist: np.ndarray,
    comp: np.ndarray,
    *,
    min_distance_px: int | tuple[int, ...],
    neck_ratio: float,
    min_depth_px: float,
    min_size: int = 0,
) -> np.ndarray:
    """Split one connected component at its necks (2-D or 3-D; see the module docstring).

    Args:
        dist: (h, w) or (d, h, w) float smoothed EDT of the crop (in any
            length unit: pixels in 2-D, nm for anisotropic volumes).
        comp: bool mask of the component in the crop, same shape.
        min_distance_px: radius of the local-maximum search, in array cells;
            one int, or one per axis (anisotropic voxels).
        min_depth_px: least body-minus-neck half-width, in the unit of ``dist``.
        min_size: least cells (pixels, voxels) of a piece: a smaller one is not cut off
            but stays with the neighbour it shares its widest pass with (the minimum
            object size holds for what the split makes, not only for whole components).

    Returns:
        int32 labels 0..k (0 outside ``comp``), k >= 1, same shape.
    """
    radius = np.broadcast_to(np.asarray(min_distance_px, int), (dist.ndim,))
    peaks = comp & (dist == ndi.maximum_filter(dist, size=tuple(2 * radius + 1), mode="constant"))
    markers, n = ndi.label(peaks, structure=np.ones((3,) * dist.ndim, bool))
    if n <= 1:
        return comp.astype(np.int32)
    ws = watershed(-dist, markers, mask=comp)
    missed = comp & (ws == 0)
    if missed.any():
        # The watershed floods face neighbours only; a piece of an 8- (26-) connected
        # component joined by a corner or an edge takes its nearest region's label.
        near = ndi.distance_transform_edt(ws == 0, return_distances=False, return_indices=True)
        ws = np.where(missed, ws[tuple(near)], ws)

    # Highest boundary value (the pass) between every pair of face-adjacent regions.
    keys, vals = [], []
    for axis in range(dist.ndim):
        lo_side = tuple(slice(None, -1) if i == axis else slice(None) for i in range(dist.ndim))
        hi_side = tuple(slice(1, None) if i == axis else slice(None) for i in range(dist.ndim))
        a, b, da, db = ws[lo_side], ws[hi_side], dist[lo_side], dist[hi_side]
        sel = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])
        keys.append(lo.astype(np.int64) * (n + 1) + hi)
        vals.append(np.minimum(da[sel], db[sel]))
    key, val = np.concatenate(keys), np.concatenate(vals)
    if key.size == 0:  # regions meet only diagonally: no pass to judge, keep the component whole
        return comp.astype(np.int32)
    order = np.lexsort((-val, key))
    key, val = key[order], val[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, saddle = key[first], val[first]
    pair_a, pair_b = key // (n + 1), key % (n + 1)

    peak = np.zeros(n + 1, np.float64)
    np.maximum.at(peak, ws.ravel(), dist.ravel())

    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.argsort(-saddle, kind="stable"):
        ra, rb = find(int(pair_a[i])), find(int(pair_b[i]))
        if ra == rb:
            continue
        low, s = min(peak[ra], peak[rb]), float(saddle[i])
        if s <= neck_ratio * low and low - s >= min_depth_px:
            continue
        parent[rb] = ra
        peak[ra] = max(peak[ra], peak[rb])
    if min_size > 1:
        # Widest pass first, so a small piece joins the body it is most broadly attached to;
        # sizes only grow, so one pass leaves no piece under min_size that has a neighbour.
        size = np.bincount(ws[comp], minlength=n + 1).astype(np.int64)
        for r in range(n + 1):
            if find(r) != r:
                size[find(r)] += size[r]
        for i in np.argsort(-saddle, kind="stable"):
            ra, rb = find(int(pair_a[i])), find(int(pair_b[i]))
            if ra != rb and min(size[ra], size[rb]) < min_size:
                parent[rb] = ra
                size[ra] += size[rb]

    roots = np.array([find(i) for i in range(n + 1)])
    _, compact = np.unique(roots[1:], return_inverse=True)
    lut = np.r_[0, compact + 1].astype(np.int32)
    return lut[ws]


def mask_to_instances(
    mask_or_prob: np.ndarray,
    threshold: float = 0.5,
    min_size_px: int = 0,
    fill_holes: bool = True,
    separate: bool = True,
    min_distance_px: int = 3,
    neck_ratio: float = 0.7,
    min_depth_px: float = 2.0,
    smooth_sigma_px: float = 1.0,
) -> np.ndarray:
    """Label the mitochondria in a foreground mask or probability map.

    Steps: threshold -> fill holes -> drop objects under ``min_size_px`` ->
    split touching objects at necks, into pieces of at least ``min_size_px``
    (see module docstring) -> relabel 1..N.

    Args:
        mask_or_prob: (H, W) foreground. Float arrays are probabilities and
            ``>= threshold`` is foreground; bool and integer arrays are masks
            (any nonzero value is foreground, so 0/1 and 0/255 both work).
        threshold: probability cut-off for float input.
        min_size_px: objects with fewer pixels (8-connected, holes filled) are
            dropped before separation, and separation cuts off no piece smaller
            than this. See ``min_size_px_from_area`` for nm^2.
        fill_holes: fill enclosed background holes (not those open to the
            image border), except background enclosed by several touching
            objects: holes that separate objects and are either cracks <= 2 px
            wide or at least half as wide as the objects stay background.
        separate: split touching mitochondria; False keeps connected components.
        min_distance_px: radius of the local-maximum search for candidate
            markers; maxima closer than this are one candidate.
        neck_ratio: a neck is split only if its half-width is at most this
            fraction of the half-width of the thinner body it joins. 0.7 splits
            two equal discs whose centres are more than ~1.43 radii apart.
        min_depth_px: ...and only if the body is at least this many pixels
            wider (in half-width) than the neck; stops splits on boundary noise.
        smooth_sigma_px: Gaussian sigma applied to the EDT before finding
            markers, pixels; 0 disables smoothing.

    Returns:
        (H, W) labels, uint16 if N <= 65535 else uint32; 0 background,
        objects 1..N in raster order of their first pixel's component.
    """
    fg = _foreground(mask_or_prob, threshold)
    filled = ndi.binary_fill_holes(fg) if fill_holes else fg
    n, cc, stats, _ = cv2.connectedComponentsWithStats(filled.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    if min_size_px > 0:
        keep = stats[:, cv2.CC_STAT_AREA] >= min_size_px
        keep[0] = False
        lut = np.zeros(n, np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1)
        cc = lut[cc]
        n = int(keep.sum()) + 1
    if not separate or n <= 1:
        return _as_label_dtype(cc, n - 1)

    split = dict(min_distance_px=min_distance_px, neck_ratio=neck_ratio, min_depth_px=min_depth_px,
                 min_size=min_size_px)
    pad = 1 + math.ceil(3 * smooth_sigma_px)
    out = np.zeros(cc.shape, np.int64)
    next_id = 1
    for i, sl in enumerate(ndi.find_objects(cc), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(sl, cc.shape))
        comp = cc[sl] == i
        holes = comp & ~fg[sl]
        if holes.any():
            # A hole enclosed by several touching mitochondria is background
            # between them, not a gap inside one: filled, it would bridge them.
            dist = _edt(comp & ~holes, smooth_sigma_px)
            comp &= ~_gaps(holes, split_component(dist, comp & ~holes, **split), dist)
        sub = split_component(_edt(comp, smooth_sigma_px), comp, **split)
        out[sl][comp] = sub[comp] + (next_id - 1)
        next_id += int(sub.max())
    return _as_label_dtype(out, next_id - 1)


def _edt(mask: np.ndarray, sigma: float) -> np.ndarray:
    """(h, w) float32 Euclidean distance to the background, Gaussian-smoothed.

    OpenCV counts pixels beyond the array as foreground, which is right at
    the image border; crops carry a background margin on their other sides.
    """
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if sigma > 0:
        dist = cv2.GaussianBlur(dist, (0, 0), sigma)
        dist[~mask] = 0
    return dist


def _gaps(holes: np.ndarray, labels: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """(h, w) bool: holes that are gaps between objects rather than inside one.

    A hole is a gap if, with the holes left open, its rim touches two or more
    separated objects and it is either at least ``_GAP_RATIO`` times as wide
    (in inscribed radius) as the thinnest of them, or a crack at most two
    pixels wide (the broken line of background left along a contact). Other holes are
    gaps inside one mitochondrion, filled even if leaving them open would
    make necks between them.

    Args:
        holes: (h, w) bool enclosed holes of one component.
        labels: (h, w) int separation of the component with holes open.
        dist: (h, w) float32 EDT used for that separation.
    """
    hole_ids, n = ndi.label(holes)
    width = ndi.maximum(cv2.distanceTransform(holes.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE), hole_ids, np.arange(1, n + 1))
    k = int(labels.max()) + 1
    peak = np.zeros(k)
    np.maximum.at(peak, labels.ravel(), dist.ravel())
    pairs = []
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        # Holes are enclosed, never on the crop edge, so roll never wraps onto them.
        rim = np.roll(labels, (-dy, -dx), axis=(0, 1))
        sel = (hole_ids > 0) & (rim > 0)
        pairs.append(hole_ids[sel].astype(np.int64) * k + rim[sel])
    pairs = np.unique(np.concatenate(pairs))
    hole, obj = pairs // k, pairs % k
    n_objects = np.bincount(hole, minlength=n + 1)
    thinnest = np.full(n + 1, np.inf)
    np.minimum.at(thinnest, hole, peak[obj])
    width = np.asarray(width)
    gap = (n_objects[1:] >= 2) & ((width >= _GAP_RATIO * thinnest[1:]) | (width <= 1))
    return np.isin(hole_ids, np.flatnonzero(gap) + 1)


def _ids_and_areas(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero ids (sorted; int64, or uint64 for uint64 labels) and their pixel counts."""
    flat = labels.ravel()
    if flat.size and int(flat.max()) <= 4 * flat.size:
        counts = np.bincount(flat.astype(np.int64))
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        return ids.astype(_id_dtype(labels)), counts[ids]
    ids, counts = np.unique(flat, return_counts=True)
    return ids[ids > 0].astype(_id_dtype(labels)), counts[ids > 0]


def _id_dtype(labels: np.ndarray) -> type:
    """uint64 ids stay uint64 (ids >= 2**63 would wrap in int64 and break the sorted order)."""
    return np.uint64 if labels.dtype == np.uint64 else np.int64


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse IoU table of two (H, W) integer label images (0 background).

    Returns (ids_a, ids_b, ia, ib, iou): the sorted nonzero ids of each, and
    for every pair of objects that overlap, their indices into ids_a / ids_b
    and their IoU (float64). Only overlapping pixels are visited, so thousands
    of objects stay fast.
    """
    a, b = np.asarray(a), np.asarray(b)
    ids_a, area_a = _ids_and_areas(a)
    ids_b, area_b = _ids_and_areas(b)
    both = (a != 0) & (b != 0)
    ia = np.searchsorted(ids_a, a[both].astype(ids_a.dtype))
    ib = np.searchsorted(ids_b, b[both].astype(ids_b.dtype))
    nb = max(len(ids_b), 1)
    key, inter = np.unique(ia.astype(np.int64) * nb + ib, return_counts=True)
    ia, ib = key // nb, key % nb
    return ids_a, ids_b, ia, ib, inter / (area_a[ia] + area_b[ib] - inter)


def match_instances(pred: np.ndarray, true: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Score predicted instances against ground truth by one-to-one IoU matching.

    Among pairs with IoU >= ``iou_threshold``, the matching maximises the
    number of matches, then their summed IoU (Hungarian algorithm, run
    separately on each connected group of candidate pairs so thousands of
    objects stay fast). Above a threshold of 0.5 every object has at most one
    candidate, so this only matters for lower thresholds.

    Args:
        pred, true: (H, W) integer instance labels of the same shape, 0 background.
        iou_threshold: minimum IoU of a true positive, in (0, 1].

    Returns:
        dict with ``tp``, ``fp``, ``fn``, ``n_pred``, ``n_true`` (ints),
        ``precision`` = tp / n_pred, ``recall`` = tp / n_true,
        ``f1`` = 2 tp / (n_pred + n_true) (each 1.0 when both are empty, 0.0
        when only one is), ``mean_matched_iou`` (NaN without matches) and
        ``count_error`` = n_pred - n_true (signed).
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    p_ids, t_ids, pi, ti, iou = pairwise_iou(pred, true)
    n_pred, n_true = len(p_ids), len(t_ids)
    cand = iou >= iou_threshold
    pi, ti, iou = pi[cand], ti[cand], iou[cand]

    matched = []
    if len(iou):
        graph = coo_matrix((np.ones(len(iou)), (pi, ti + n_pred)), shape=(n_pred + n_true,) * 2)
        _, comp = connected_components(graph, directed=False)
        group = comp[pi]
        sizes = np.bincount(group)
        single = sizes[group] == 1
        matched.append(iou[single])  # one candidate in its group: always matched
        for g in np.unique(group[~single]):
            sel = group == g
            rows, r = np.unique(pi[sel], return_inverse=True)
            cols, c = np.unique(ti[sel], return_inverse=True)
            # Weight 1 per match plus IoU / (2 k): summed IoU only breaks ties
            # between matchings of equal size, since k matches add < 1/2.
            k = min(len(rows), len(cols))
            m = np.zeros((len(rows), len(cols)))
            m[r, c] = iou[sel]
            ri, ci = linear_sum_assignment(np.where(m > 0, 1 + m / (2 * k), 0), maximize=True)
            matched.append(m[ri, ci][m[ri, ci] > 0])
    matched_iou = np.concatenate(matched) if matched else np.zeros(0)

    tp = len(matched_iou)
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (n_pred + n_true)
    return {
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_true - tp,
        "n_pred": n_pred,
        "n_true": n_true,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_matched_iou": float(matched_iou.mean()) if tp else float("nan"),
        "count_error": n_pred - n_true,
    }


# The MitoEM challenge's recall grid (COCO): 101 points 0, 0.01, ..., 1.
_RECALL_GRID = np.linspace(0.0, 1.0, 101)


def average_precision(
    pred: np.ndarray,
    true: np.ndarray,
    iou_thresholds: tuple[float, ...] = (0.5, 0.75),
    scores: dict[int, float] | None = None,
) -> dict[str, float]:
    """Instance average precision as the MitoEM challenge computes it (2-D or 3-D).

    As in the challenge's evaluation code (mAP_3Dvolume, COCO-style): the
    predictions are ranked by score, highest first; each one is a true
    positive at threshold t when its best IoU with any true object is >= t
    and no higher-ranked prediction has claimed that object (above 0.5 none
    can, since predictions are disjoint; at exactly 0.5 the two halves of one
    true object both reach it, and only the first counts); precision is made monotone from the right and read at the 101
    recall points 0, 0.01, ..., 1 (0 beyond the highest recall reached); AP is
    their mean. Without ``scores`` objects are ranked by size (voxel count),
    the challenge's default when no score file is given.

    Args:
        pred, true: integer instance labels of the same shape, 0 background.
        iou_thresholds: each in [0.5, 1].
        scores: optional {predicted id: confidence}.

    Returns:
        {"ap50": ..., "ap75": ...} (key ``ap`` + round(100 t) per threshold);
        NaN when ``true`` has no object (the challenge reports -1); 1.0 when
        every true object is matched before the first false positive.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    if any(not 0.5 <= t <= 1 for t in iou_thresholds):
        raise ValueError(f"iou_thresholds must lie in [0.5, 1], got {iou_thresholds}")
    p_ids, p_area = _ids_and_areas(pred)
    t_ids, t_area = _ids_and_areas(true)
    best = np.zeros(len(p_ids))
    best_true = np.full(len(p_ids), -1)  # index into t_ids of each prediction's best true object
    both = (pred != 0) & (true != 0)
    if both.any():
        pi = np.searchsorted(p_ids, pred[both].astype(p_ids.dtype))
        ti = np.searchsorted(t_ids, true[both].astype(t_ids.dtype))
        key, inter = np.unique(pi.astype(np.int64) * len(t_ids) + ti, return_counts=True)
        pi, ti = key // len(t_ids), key % len(t_ids)
        iou = inter / (p_area[pi] + t_area[ti] - inter)
        order = np.lexsort((-iou, pi))  # per prediction, highest IoU first
        first = order[np.r_[True, pi[order][1:] != pi[order][:-1]]]
        best[pi[first]], best_true[pi[first]] = iou[first], ti[first]
    rank = p_area.astype(np.float64) if scores is None else np.array([scores.get(int(i), 0.0) for i in p_ids], float)
    order = np.argsort(-rank, kind="stable")
    best, best_true = best[order], best_true[order]
    out = {}
    for t in iou_thresholds:
        key = f"ap{round(100 * t)}"
        if len(t_ids) == 0:
            out[key] = float("nan")
            continue
        hit = best >= t
        # A true object is claimed once, by the highest-ranked prediction reaching t (as in the
        # challenge's COCO matching): at t = 0.5 exactly, two halves of one object both reach it.
        reach = np.flatnonzero(hit)
        hit[reach] = False
        hit[reach[np.unique(best_true[reach], return_index=True)[1]]] = True
        tp, fp = np.cumsum(hit), np.cumsum(~hit)
        recall = tp / len(t_ids)
        precision = tp / np.maximum(tp + fp, 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        idx = np.searchsorted(recall, _RECALL_GRID, side="left")
        q = np.zeros(len(_RECALL_GRID))
        q[idx < len(precision)] = precision[idx[idx < len(precision)]]
        out[key] = float(q.mean())
    return out
