"""Per-pixel uncertainty and per-object confidence in NumPy (no TensorFlow).

uncertainty: the binary entropy (bits, [0, 1]) of the calibrated foreground
probability: 0 where the model is sure, 1 at p = 0.5.

Per-object confidence: a handful of features of each predicted object
(`object_features`) fed to a logistic model (`ObjectConfidence`) fitted on
validation objects labelled true (matched to a true mitochondrion at
IoU >= 0.5) or false. A logistic fit is calibrated on the data it was fitted
on, so a confidence of 0.8 means about 80% of such objects were real there.
`select_features` keeps only the features that hold in every val set, so
that the ranking carries over to a microscope the model never saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FEATURES = ("mean_probability", "low_probability", "mean_uncertainty", "edge_contrast", "log_area",
            "mean_gradcam")
# Every feature `object_features` computes; a fitted model names the ones it uses (`ObjectConfidence.features`).
ALL_FEATURES = FEATURES + ("solidity", "elongation", "gradcam_contrast", "touches_border", "tta_spread",
                           "threshold_agreement", "tta_agreement", "scale_agreement", "image_contrast",
                           "image_texture")
# Features that need the slice's instances under changed predictions (`postprocess.alternative_instances`).
AGREEMENT_FEATURES = ("threshold_agreement", "tta_agreement", "scale_agreement")
# Features read from the raw image's grey values (`object_features(image=...)`).
IMAGE_FEATURES = ("image_contrast", "image_texture")
# Features that exist only with test-time augmentation (0 without it, which would read as sure).
TTA_FEATURES = ("tta_spread", "tta_agreement")
# What `calibrate` may choose from: features that mean the same on any microscope. Not log_area
# (pixels: depends on the pixel size, unknown for some data) nor touches_border (where the
# image was cut, not what the object is).
# Not the agreement or image features either: in the leave-one-set-out study (model card) adding
# them ranked unseen sets' objects no better (mean zero-shot AUROC +0.003 for the agreement ones,
# which would cost `analyze` 10 more instance maps a slice; the image ones help one left-out set
# and hurt another: grey values follow the microscope's contrast). They stay computable for studies.
POOL = ("mean_probability", "low_probability", "mean_uncertainty", "edge_contrast", "mean_gradcam", "solidity",
        "elongation", "gradcam_contrast", "tta_spread")
# How `calibrate` combines the chosen features: "equal" (each standardised feature, signed as it
# separates the val objects, averaged with equal weights; one logistic fit on that score) ranked the
# left-out sets' objects better than a full logistic fit ("logistic"), whose weights lean on
# relations peculiar to the val sets (leave-one-set-out study, model card).
COMBINE = "equal"
MIN_SET_AUROC = 0.6  # a feature is kept only if it separates true from false this well in every set
REVIEW_BELOW = 0.5  # objects with confidence under this are flagged `needs_review`


def entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of foreground probabilities, float32 in [0, 1] (NaN -> 1)."""
    from .calibration import blockwise

    def bits(q: np.ndarray) -> np.ndarray:
        q = np.clip(np.nan_to_num(q, nan=0.5), 1e-7, 1 - 1e-7)
        return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))

    return blockwise(bits, p)


def _means(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean of `values` over each label 1..n (NaN for labels with no pixel)."""
    s = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)[1:n + 1]
    c = np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return s / c


def object_features(instances: np.ndarray, probability: np.ndarray, heatmap: np.ndarray | None = None,
                    ring_px: int = 3, spread: np.ndarray | None = None,
                    alternatives: dict[str, list[np.ndarray]] | None = None,
                    image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Features of each object 1..N of `instances` (H, W) from its calibrated `probability` (H, W).

    mean_probability / low_probability: mean and 10th percentile inside.
    mean_uncertainty: mean `entropy` inside.
    edge_contrast: mean probability inside minus that of the background ring
        up to `ring_px` px around it (each ring pixel belongs to its nearest object).
    log_area: log10 of the area in pixels. mean_gradcam: mean heat inside (0 if none).
    Scale-free shape: solidity (area / convex hull area), elongation (1 - minor / major
    axis of the second moments). gradcam_contrast: mean heat inside minus that of the
    ring. touches_border: 1.0 if the object reaches the image edge (cut off), else 0.0.
    tta_spread: mean inside of `spread` (H, W), the standard deviation of the
    test-time-augmented predictions (`Predictor.predict_slice(spread=True)`; 0 if none).
    threshold_agreement / tta_agreement / scale_agreement: mean over the instance maps of
    `alternatives["threshold"]` / `["tta"]` / `["scale"]` (`postprocess.alternative_instances`:
    the slice at a lower and a higher threshold / each test-time-augmented member / predicted
    20% smaller and 25% larger) of the
    object's best IoU with any object there (`postprocess.best_iou`): 1 for an object that keeps its
    shape, lower for one that splits, merges, shrinks or vanishes (0 if not given).
    image_contrast / image_texture: from the raw `image` (H, W), in units of the whole
    slice's grey-value standard deviation (so any linear contrast gives the same values):
    mean grey value inside minus that of the ring, and the standard deviation inside
    (0 if no image).
    Returns {"label": ids, feature: values (N,)} for every name in `ALL_FEATURES`.
    """
    from .postprocess import best_iou

    inst = np.asarray(instances)
    n = int(inst.max()) if inst.size else 0
    ids = np.arange(1, n + 1)
    if n == 0:
        return {"label": ids, **{f: np.zeros(0) for f in ALL_FEATURES}}
    # Everything below reads only the objects' pixels and their rings (flat indices `fg`, `rg`),
    # never a whole-slice float64 copy: a 4096^2 slice holds ~10% objects, and full-size
    # temporaries here once made this step the peak of `analyze`'s memory.
    flat = inst.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    rg, ring_lab = _rings(inst, n, ring_px)

    def at(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.asarray(values).ravel()[idx].astype(np.float64)

    p_in = np.nan_to_num(at(probability, fg), nan=0.5)
    inner = _means(p_in, lab, n)
    ring_mean = _means(np.nan_to_num(at(probability, rg), nan=0.5), ring_lab, n)
    area = np.bincount(lab, minlength=n + 1)[1:]
    order = np.argsort(lab, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area)])
    p_sorted = p_in[order]
    low = np.array([np.percentile(p_sorted[starts[i - 1]:starts[i]], 10) for i in ids])
    heat_in = _means(at(heatmap, fg), lab, n) if heatmap is not None else None
    edge = np.zeros(n + 1, bool)
    edge[np.unique(np.concatenate([inst[0], inst[-1], inst[:, 0], inst[:, -1]]))] = True
    return {
        "label": ids,
        "mean_probability": inner,
        "low_probability": low,
        "mean_uncertainty": _means(entropy(p_in), lab, n),
        "edge_contrast": inner - np.nan_to_num(ring_mean, nan=0.0),
        "log_area": np.log10(np.maximum(area, 1)),
        "mean_gradcam": heat_in if heatmap is not None else np.zeros(n),
        "solidity": _solidity(inst, n),
        "elongation": _elongation(fg, lab, inst.shape[1], n),
        "gradcam_contrast": (heat_in - np.nan_to_num(_means(at(heatmap, rg), ring_lab, n), nan=0.0))
        if heatmap is not None else np.zeros(n),
        "touches_border": edge[1:].astype(np.float64),
        "tta_spread": _means(at(spread, fg), lab, n) if spread is not None else np.zeros(n),
        **_image_features(image, fg, lab, rg, ring_lab, n),
        **{f"{k}_agreement": np.mean([best_iou(inst, other) for other in alternatives[k]], axis=0)
           if alternatives and alternatives.get(k) else np.zeros(n) for k in ("threshold", "tta", "scale")},
    }


def _rings(inst: np.ndarray, n: int, ring_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (sorted) of the background pixels within `ring_px` px of an object of `inst`
    (H, W), and the label 1..n of the object nearest to each.

    One distance transform per object, on its bounding box widened by 2 * ring_px: every object
    nearer than it to one of its ring pixels lies inside that box, so the result is that of one
    transform of the whole slice, without its slice-sized float64 and index arrays (and faster
    when objects cover a small share of the slice)."""
    from scipy import ndimage

    h, w = inst.shape
    m = 2 * ring_px
    idx, labs = [np.zeros(0, np.int64)], [np.zeros(0, inst.dtype)]
    for i, sl in enumerate(ndimage.find_objects(inst, max_label=n), 1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - m, 0), min(sl[0].stop + m, h)
        x0, x1 = max(sl[1].start - m, 0), min(sl[1].stop + m, w)
        crop = inst[y0:y1, x0:x1]
        dist, (iy, ix) = ndimage.distance_transform_edt(crop == 0, return_indices=True)
        yy, xx = np.nonzero((dist <= ring_px) & (crop == 0) & (crop[iy, ix] == i))
        idx.append((yy + y0).astype(np.int64) * w + (xx + x0))
        labs.append(np.full(len(yy), i, inst.dtype))
    idx, labs = np.concatenate(idx), np.concatenate(labs)
    order = np.argsort(idx, kind="stable")
    return idx[order], labs[order]


def _image_features(image: np.ndarray | None, fg: np.ndarray, lab: np.ndarray, rg: np.ndarray,
                    ring_lab: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Grey-value contrast and texture of each object, from the object pixels at flat indices `fg`
    (labels `lab`) and the ring pixels `rg` (labels `ring_lab`) of `image` (H, W)."""
    if image is None:
        return {"image_contrast": np.zeros(n), "image_texture": np.zeros(n)}
    image = np.asarray(image)
    mean = float(image.mean(dtype=np.float64))
    sd = float(image.std(dtype=np.float64)) or 1.0
    flat = image.ravel()
    g_in, g_ring = (flat[fg].astype(np.float64) - mean) / sd, (flat[rg].astype(np.float64) - mean) / sd
    inner = _means(g_in, lab, n)
    spread = np.sqrt(np.maximum(_means(g_in * g_in, lab, n) - inner ** 2, 0))
    return {"image_contrast": inner - np.nan_to_num(_means(g_ring, ring_lab, n), nan=0.0), "image_texture": spread}


def _solidity(inst: np.ndarray, n: int) -> np.ndarray:
    """Area / convex hull area of each object 1..n (1 for convex ones; 1 for single pixels)."""
    import cv2
    from scipy import ndimage

    out = np.ones(n)
    for i, sl in enumerate(ndimage.find_objects(inst, max_label=n)):
        if sl is None:
            continue
        m = (inst[sl] == i + 1).astype(np.uint8)
        pts = cv2.findNonZero(m)
        if pts is None or len(pts) < 3:
            continue
        # Hull of pixel squares, not centres: offsets by half a pixel on each side (else a
        # 1-px-wide line has zero hull area).
        corners = (pts.reshape(-1, 1, 2).astype(np.float32) + np.array([[[0, 0]], [[1, 0]], [[0, 1]], [[1, 1]]],
                                                                           np.float32).reshape(1, 4, 2)).reshape(-1, 1, 2)
        hull = cv2.contourArea(cv2.convexHull(corners))
        out[i] = min(1.0, float(m.sum()) / hull) if hull > 0 else 1.0
    return out


def _elongation(fg: np.ndarray, lab: np.ndarray, width: int, n: int) -> np.ndarray:
    """1 - minor / major axis length (second moments) of each object 1..n, from its pixels' flat
    indices `fg` (labels `lab`) in a slice `width` px wide: 0 for a disc, -> 1 for a line."""
    yy, xx = np.divmod(fg, width)
    yy, xx = yy.astype(np.float64), xx.astype(np.float64)
    c = np.maximum(np.bincount(lab, minlength=n + 1)[1:], 1)
    m = {k: np.bincount(lab, weights=v, minlength=n + 1)[1:] / c
         for k, v in (("y", yy), ("x", xx), ("yy", yy * yy), ("xx", xx * xx), ("xy", yy * xx))}
    vy, vx, cxy = m["yy"] - m["y"] ** 2 + 1 / 12, m["xx"] - m["x"] ** 2 + 1 / 12, m["xy"] - m["y"] * m["x"]
    half, root = (vy + vx) / 2, np.sqrt(np.maximum(((vy - vx) / 2) ** 2 + cxy ** 2, 0))
    major, minor = half + root, np.maximum(half - root, 0)
    return 1 - np.sqrt(minor / np.maximum(major, 1e-12))


def select_features(x: np.ndarray, y: np.ndarray, groups: np.ndarray, names: tuple[str, ...] = POOL,
                    min_auroc: float = MIN_SET_AUROC) -> tuple[str, ...]:
    """The features (columns of x (N, F), named `names`) that tell true from false objects (y (N,)
    bool) in the same direction and with AUROC >= min_auroc within every group (data set) that has
    both kinds: the ones likely to hold on a set the model has not seen. At least the single best
    feature is kept (by its worst group).

    Groups with fewer than 5 true or 5 false objects are not judged (too few to tell).
    """
    x, y, groups = np.asarray(x, np.float64), np.asarray(y, bool), np.asarray(groups)
    judged = [g for g in np.unique(groups) if min((y[groups == g]).sum(), (~y[groups == g]).sum()) >= 5]
    if not judged:
        return tuple(names)
    worst = []
    for i in range(len(names)):
        sign = 1.0 if auroc(x[:, i], y) >= 0.5 else -1.0
        per = [auroc(sign * x[groups == g, i], y[groups == g]) for g in judged]
        worst.append(min(np.nan_to_num(per, nan=0.0)))
    keep = tuple(n for n, w in zip(names, worst) if w >= min_auroc)
    return keep or (names[int(np.argmax(worst))],)


def feature_matrix(features: dict[str, np.ndarray], names: tuple[str, ...] = FEATURES) -> np.ndarray:
    return np.stack([np.asarray(features[f], np.float64) for f in names], axis=1) if len(features["label"]) \
        else np.zeros((0, len(names)))


@dataclass
class ObjectConfidence:
    """Logistic model of P(object is a real mitochondrion | features), standardised inputs, L2-penalised.

    Stored in config.json as `to_dict()`.
    """

    features: tuple[str, ...] = FEATURES
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    coef: list[float] = field(default_factory=list)
    intercept: float = 0.0

    def fit(self, x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50,
            combine: str = "logistic") -> "ObjectConfidence":
        """Newton-Raphson (IRLS) on standardised features; x (N, F), y (N,) bool.

        l2: ridge on the summed log-loss (as scikit-learn's C = 1/l2): enough to keep
        separable data finite, too little to shrink the probabilities of a real fit.
        combine: "logistic" fits one weight per feature; "equal" averages the standardised
        features, each signed as it separates y (its AUROC above or below 0.5), and fits the
        logistic on that one score (a weight and an intercept), so that only the ranking's
        direction, not the val sets' particular weights, carries over; a feature constant on x
        separates nothing and gets weight 0. Either way the result is a logistic model of the
        standardised features (`predict` is the same). ValueError if x holds NaN or inf.
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"object confidence on {len(self.features)} features {self.features} got x of shape {x.shape}")
        if not np.isfinite(x).all():
            bad = [self.features[i] for i in np.flatnonzero(~np.isfinite(x).all(0))]
            raise ValueError(f"object confidence: features {bad} hold NaN or inf values")
        if len(x) < 4 or y.min() == y.max():
            raise ValueError("fitting object confidence needs true and false detections (at least 4 objects)")
        if combine not in ("logistic", "equal"):
            raise ValueError(f"combine {combine!r}: 'logistic' or 'equal'")
        mu, sd = x.mean(0), x.std(0)
        constant = sd == 0
        sd[constant] = 1.0
        zx = (x - mu) / sd
        if combine == "equal":
            sign = np.array([1.0 if auroc(zx[:, i], y > 0.5) >= 0.5 else -1.0 for i in range(zx.shape[1])])
            sign[constant] = 0.0  # its z is 0 here, but would not be on new data
            intercept, (slope,) = _logistic(zx @ sign[:, None] / len(sign), y, l2, iterations)
            coef = slope * sign / len(sign)
        else:
            intercept, coef = _logistic(zx, y, l2, iterations)
        self.mean, self.scale = mu.tolist(), sd.tolist()
        self.intercept, self.coef = float(intercept), np.asarray(coef, np.float64).tolist()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Confidence in [0, 1] for feature rows x (N, F)."""
        if not self.coef:
            raise ValueError("object confidence is not fitted")
        x = np.asarray(x, np.float64)
        z = (np.nan_to_num(x) - np.array(self.mean)) / np.array(self.scale)
        return 1.0 / (1.0 + np.exp(-(self.intercept + z @ np.array(self.coef))))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean, "scale": self.scale, "coef": self.coef,
                "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict, source: str = "object confidence") -> "ObjectConfidence":
        """The model `to_dict` stored; one ValueError naming `source` (say, the config.json and its
        key) when a value is missing or damaged."""
        try:
            features = tuple(str(n) for n in d["features"])
            arrays = [np.asarray(d[k], np.float64) for k in ("mean", "scale", "coef")]
            intercept = float(d["intercept"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: missing or damaged value ({type(err).__name__}: {err})") from None
        mean, scale, coef = arrays
        if any(a.shape != (len(features),) for a in arrays):
            raise ValueError(f"{source}: mean, scale and coef need one number per feature ({len(features)}), got "
                             f"{[a.shape for a in arrays]}")
        if not (all(np.isfinite(a).all() for a in arrays) and np.isfinite(intercept) and (scale > 0).all()):
            raise ValueError(f"{source}: NaN, inf or non-positive scale among the stored values")
        return cls(features, mean.tolist(), scale.tolist(), coef.tolist(), intercept)


def _logistic(z: np.ndarray, y: np.ndarray, l2: float, iterations: int) -> tuple[float, np.ndarray]:
    """(intercept, weights (F,)) of an L2-penalised logistic regression of y on z (N, F), by IRLS."""
    z = np.hstack([np.ones((len(z), 1)), z])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], float(l2))
    reg[0] = 0.0  # no penalty on the intercept
    for _ in range(iterations):
        q = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (q - y) + reg * w
        hess = (z * (q * (1 - q))[:, None]).T @ z + np.diag(reg)
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), w[1:]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties half.

    NaN (not 0.5) when there are no positives or no negatives, or when a score is NaN."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_interval(scores: np.ndarray, positive: np.ndarray, groups: np.ndarray, level: float = 0.95,
                   n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of `auroc` that resamples whole groups (e.g. the
    slices the objects lie in, `groups` (N,)) with replacement, not single objects: objects of one
    slice share its contrast and its errors, so resampling them alone would claim too narrow an
    interval. NaN bounds when fewer than two groups, or no resample holds both kinds."""
    s, pos, g = np.asarray(scores, np.float64), np.asarray(positive, bool), np.asarray(groups)
    if not len(s) == len(pos) == len(g):
        raise ValueError(f"scores, positive and groups differ in length: {len(s)}, {len(pos)}, {len(g)}")
    if not 0 < level < 1:
        raise ValueError(f"level {level!r} is not in (0, 1)")
    ids, inverse = np.unique(g, return_inverse=True)
    if len(ids) < 2:
        return float("nan"), float("nan")
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        values.append(auroc(s[idx], pos[idx]))
    values = np.asarray(values)
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
