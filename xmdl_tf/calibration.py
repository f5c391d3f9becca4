"""Probability calibration in NumPy: temperature scaling, reliability and expected calibration error.

A segmentation network's softmax probabilities are usually over-confident.
Temperature scaling divides the foreground logit, log(p / (1 - p)), by one
number T fitted on validation pixels (T > 1 softens, T < 1 sharpens); it
never changes which side of 0.5 a pixel falls, so masks at threshold 0.5
are unchanged. Everything here works on flat arrays of foreground
probabilities `p` (float, [0, 1]) and truths `y` (bool or 0/1), optionally
with a `valid` mask to leave ignored pixels out (`sample_pixels`). NaN
probabilities (no prediction) are left out of every fit and measure.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) as float64, with p clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


BLOCK = 1 << 18  # elements per block of `blockwise` (2 MB of float64)


def blockwise(fn, x: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """`fn` (elementwise, float64 in any shape -> same shape) applied to `x` a block of elements
    at a time, into one float32 array of x's shape: the float64 temporaries of a whole 4096^2
    slice would otherwise cost several times its size."""
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    src, dst = x.reshape(-1), out.reshape(-1)
    for i in range(0, src.size, block):
        dst[i:i + block] = fn(src[i:i + block].astype(np.float64))
    return out


def check_temperature(temperature: float) -> float:
    """`temperature` if it is a positive finite number; else ValueError (0 would make every pixel
    0 or 1, a negative T would swap foreground and background)."""
    try:
        ok = bool(np.isfinite(temperature) and temperature > 0)
    except (TypeError, ValueError):  # not one number
        ok = False
    if not ok:
        raise ValueError(f"temperature {temperature!r}: expected a positive finite number")
    return temperature


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities sigmoid(logit(p) / T), float32, same shape as p (NaN stays NaN).

    ValueError unless T is a positive finite number (`check_temperature`)."""
    check_temperature(temperature)
    if temperature == 1.0:
        return np.asarray(p, np.float32)

    def calibrate(q: np.ndarray) -> np.ndarray:
        out = 0.5 * (1.0 + np.tanh(0.5 * logit(q) / temperature))  # a sigmoid that never overflows
        return np.where(np.isnan(q), np.nan, out)

    return blockwise(calibrate, p)


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary negative log-likelihood (nats) of truths y under probabilities p (NaN p left out)."""
    p, y = _known(p, y)
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def fit_temperature(p: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0),
                    iterations: int = 60) -> float:
    """The T minimising the NLL of sigmoid(logit(p) / T) against y (golden-section search on log T).

    The NLL is convex in 1/T, so the search finds the global minimum within `bounds` (a bound
    itself when the NLL keeps falling towards it: e.g. the lower one when every pixel is on its
    right side of 0.5). NaN probabilities are left out.
    """
    p, y = _known(p, y)
    z = logit(p)
    if z.size == 0:
        raise ValueError("no pixels to fit a temperature on")
    if y.all() or not y.any():
        raise ValueError("fitting a temperature needs both foreground and background pixels")
    sign = np.where(y, 1.0, -1.0)

    def loss(log_t: float) -> float:
        # -log sigmoid(s * z / T), computed stably
        return float(np.mean(np.logaddexp(0.0, -sign * z / np.exp(log_t))))

    a, b = np.log(bounds[0]), np.log(bounds[1])
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """Reliability diagram data: per equal-width probability bin, the mean predicted foreground
    probability, the observed foreground frequency and the pixel count (empty bins: NaN, 0).
    Bin i holds edges[i] <= p < edges[i + 1]; the last one also p = 1. NaN probabilities are left out."""
    p, y = _known(p, y)
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": np.linspace(0.0, 1.0, bins + 1), "mean_probability": sum_p / count,
                "frequency": sum_y / count, "count": count}


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the pixel-weighted mean |mean probability - observed frequency| over the bins."""
    r = reliability(p, y, bins)
    used = r["count"] > 0
    n = r["count"][used].sum()
    if n == 0:
        raise ValueError("no pixels to measure calibration on")
    gap = np.abs(r["mean_probability"][used] - r["frequency"][used])
    return float(np.sum(r["count"][used] * gap) / n)


def _known(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 probabilities and bool truths of the pixels whose probability is not NaN."""
    p = np.ravel(np.asarray(p, np.float64))
    y = np.ravel(np.asarray(y, bool))
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities against {y.size} truths")
    keep = ~np.isnan(p)
    return (p, y) if keep.all() else (p[keep], y[keep])


def sample_pixels(p: np.ndarray, y: np.ndarray, valid: np.ndarray | None, k: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Up to k random (probability, truth) pixels of one slice, leaving invalid ones out."""
    p, y = np.ravel(p), np.ravel(np.asarray(y, bool))
    keep = np.flatnonzero(np.ravel(valid)) if valid is not None else np.arange(p.size)
    keep = keep[~np.isnan(p[keep])]
    if keep.size > k:
        keep = rng.choice(keep, k, replace=False)
    return p[keep].astype(np.float32), y[keep]
