"""Normalisation and the tf.data tile pipelines for training and validation.

Training stream (nothing written to disk, one slice decoded at a time per
parallel call, so a MitoEM-sized set of 400 slices of 4096 x 4096 never sits in
memory at once):

    slice list -> shuffle -> decode + normalise whole slice -> k random crops
    (optionally foreground-aware) -> shuffle tiles -> augment -> batch -> prefetch

Normalisation runs on the *whole slice* before cropping, so every tile of a
slice shares one intensity mapping, exactly as at inference and in the exported
SavedModel, where the whole request image is normalised in the graph.

Validation is a fixed grid of non-overlapping tiles covering every validation
slice; edges are padded and padded pixels are marked "ignore" (-1 in the
target), so validation loss is comparable across epochs and covers each pixel
exactly once.

Targets are float32 (B, T, T, 1): 1 mitochondrion, 0 background, -1 ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from .config import NORMALIZATION, DataConfig
from .io import DataError, SlicePair, read_pair

IGNORE = -1.0


# ----------------------------------------------------------------------------
# Normalisation: defined once, used by training, inference and export.


def normalize(image, low: float = NORMALIZATION["low"], high: float = NORMALIZATION["high"],
              clip: bool = NORMALIZATION["clip"]) -> tf.Tensor:
    """Map raw grey values of ONE image to float32 [0, 1] by its own percentiles.

    image: (H, W) or (H, W, 1), any numeric dtype holding integer grey values
        0..65535 (8- or 16-bit EM). Float inputs are rounded.
    Returns float32 of the same shape: (x - p_low) / (p_high - p_low), clipped
    to [0, 1]. Percentiles use the inverted-CDF definition
    (numpy.percentile(..., method="inverted_cdf")) computed from a 65536-bin
    histogram, which is exact for integer data and costs one pass, even on a
    4096 x 4096 slice, with no sort.
    """
    x = tf.convert_to_tensor(image)
    if x.dtype in (tf.uint8, tf.uint16):  # already integer grey values in range: no rounding pass
        xi = tf.cast(x, tf.int32)
    else:
        xi = tf.cast(tf.clip_by_value(tf.round(tf.cast(x, tf.float32)), 0.0, 65535.0), tf.int32)
    counts = tf.math.bincount(tf.reshape(xi, [-1]), minlength=65536, maxlength=65536, dtype=tf.int64)
    cdf = tf.cumsum(counts)
    n = tf.cast(cdf[-1], tf.float64)
    ranks = tf.maximum(tf.math.ceil(tf.constant([low, high], tf.float64) / 100.0 * n), 1.0)
    lo_hi = tf.cast(tf.searchsorted(cdf, tf.cast(ranks, tf.int64), side="left"), tf.float32)
    lo, hi = lo_hi[0], lo_hi[1]
    y = (tf.cast(xi, tf.float32) - lo) / tf.maximum(hi - lo, 1.0)
    if clip:
        y = tf.clip_by_value(y, 0.0, 1.0)
    return y


def normalize_np(image: np.ndarray, **kw) -> np.ndarray:
    """`normalize` for NumPy callers: (H, W) -> float32 (H, W) in [0, 1]."""
    return normalize(image, **kw).numpy()


def target_from_label(label: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """Label (H, W) ints -> float32 target: 1 foreground (> 0), 0 background, -1 ignored."""
    target = (label > 0).astype(np.float32)
    if ignore_value is not None:
        target[label == ignore_value] = IGNORE
    return target


# ----------------------------------------------------------------------------
# Slice table


@dataclass(frozen=True)
class SliceRegion:
    """A slice pair and the band of rows [row_from, row_to) (fractions of height) to use.

    Bands let validation be carved from the training slices themselves as
    held-back rows when a data set has no validation split (e.g. one slice).
    """

    pair: SlicePair
    row_from: float = 0.0
    row_to: float = 1.0


def holdout_split(pairs: list[SlicePair], val_fraction: float = 0.2) -> tuple[list[SliceRegion], list[SliceRegion]]:
    """Carve validation from training slices: the bottom `val_fraction` of rows of every slice."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = 1.0 - val_fraction
    return [SliceRegion(p, 0.0, cut) for p in pairs], [SliceRegion(p, cut, 1.0) for p in pairs]


def _load_region(region: SliceRegion, ignore_value: int | None, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = read_pair(region.pair)
    if label is None:
        raise DataError(f"{region.pair.image}: no label for a training/validation slice")
    h = image.shape[0]
    r0, r1 = int(round(region.row_from * h)), int(round(region.row_to * h))
    # Normalise the whole slice, then cut the band: same statistics as inference.
    x = normalize_np(image)[r0:r1]
    y = target_from_label(label, ignore_value)[r0:r1]
    pad_h, pad_w = max(0, min_size - x.shape[0]), max(0, min_size - x.shape[1])
    if pad_h or pad_w:  # slices smaller than a tile: mirror the image, ignore the padding
        x = np.pad(x, ((0, pad_h), (0, pad_w)), mode="symmetric")
        y = np.pad(y, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    return x, y


def _loader(regions: list[SliceRegion], ignore_value: int | None, min_size: int):
    def load(i):
        x, y = _load_region(regions[int(i)], ignore_value, min_size)
        return np.stack([x, y], axis=-1)  # (H, W, 2) float32: image, target

    def tf_load(i):
        xy = tf.numpy_function(load, [i], tf.float32, stateful=False)
        xy.set_shape([None, None, 2])
        return xy

    return tf_load


# ----------------------------------------------------------------------------
# Training stream


def _random_crops(xy: tf.Tensor, seed: tf.Tensor, k: int, tile: int, fg_fraction: float) -> tf.Tensor:
    """k crops (k, tile, tile, 2) from one slice (H, W, 2); some centred on foreground."""
    shape = tf.shape(xy)
    h, w = shape[0], shape[1]
    u = tf.random.stateless_uniform([k, 3], seed=seed)
    y0 = tf.cast(u[:, 0] * tf.cast(h - tile + 1, tf.float32), tf.int32)
    x0 = tf.cast(u[:, 1] * tf.cast(w - tile + 1, tf.float32), tf.int32)
    if fg_fraction > 0:
        fg = tf.where(xy[..., 1] > 0.5)  # (N, 2) int64 coordinates of mitochondria pixels
        n_fg = tf.shape(fg)[0]
        pick = tf.random.stateless_uniform([k], seed=seed + 1, maxval=tf.maximum(n_fg, 1), dtype=tf.int32)
        centre = tf.cast(tf.gather(fg, tf.minimum(pick, tf.maximum(n_fg - 1, 0))), tf.int32)
        # Jitter so the chosen pixel is not always in the tile centre.
        jitter = tf.random.stateless_uniform([k, 2], seed=seed + 2, minval=-tile // 4, maxval=tile // 4 + 1, dtype=tf.int32)
        fy = tf.clip_by_value(centre[:, 0] - tile // 2 + jitter[:, 0], 0, h - tile)
        fx = tf.clip_by_value(centre[:, 1] - tile // 2 + jitter[:, 1], 0, w - tile)
        use_fg = tf.logical_and(u[:, 2] < fg_fraction, n_fg > 0)
        y0 = tf.where(use_fg, fy, y0)
        x0 = tf.where(use_fg, fx, x0)
    return tf.map_fn(
        lambda o: xy[o[0]: o[0] + tile, o[1]: o[1] + tile, :],
        tf.stack([y0, x0], axis=1),
        fn_output_signature=tf.TensorSpec([tile, tile, 2], tf.float32),
    )


def _gaussian_blur(x: tf.Tensor, sigma: tf.Tensor, radius: int = 3) -> tf.Tensor:
    """Separable Gaussian blur of (T, T, 1) with a traced sigma (pixels; ~0 leaves x unchanged)."""
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * (t / tf.maximum(sigma, 1e-3)) ** 2)
    k = k / tf.reduce_sum(k)
    x4 = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    x4 = tf.nn.conv2d(x4, tf.reshape(k, [-1, 1, 1, 1]), 1, "VALID")
    x4 = tf.nn.conv2d(x4, tf.reshape(k, [1, -1, 1, 1]), 1, "VALID")
    return x4[0]


def augment(xy: tf.Tensor, seed: tf.Tensor, strength: float = 1.0) -> tf.Tensor:
    """Random flips, 90-degree rotations, blur and brightness/contrast/gamma/noise jitter.

    Blur (Gaussian, sigma up to 1.2 px x strength, on half the tiles) stands in
    for microscopes that are less sharp, or slices resampled from another pixel
    size, than the training data.

    xy: (T, T, 2) float32, channel 0 the normalised image in [0, 1], channel 1
    the target. Geometric transforms act on both channels; intensity jitter on
    the image only. `strength` scales the intensity ranges (1 = default,
    2 = heavy, as for fine-tuning).
    """
    xy = tf.image.stateless_random_flip_left_right(xy, seed)
    xy = tf.image.stateless_random_flip_up_down(xy, seed + 1)
    k = tf.random.stateless_uniform([], seed=seed + 2, maxval=4, dtype=tf.int32)
    xy = tf.image.rot90(xy, k)
    if strength <= 0:
        return xy
    x, y = xy[..., :1], xy[..., 1:]
    r = tf.random.stateless_uniform([5], seed=seed + 3, minval=-1.0, maxval=1.0)
    sigma = tf.where(r[4] > 0, 1.2 * strength * r[4], 0.0)  # on half the tiles, sigma in (0, 1.2 * strength] px
    x = tf.cond(sigma > 0.05, lambda: _gaussian_blur(x, sigma), lambda: x)
    contrast = tf.exp(0.2 * strength * r[0])
    brightness = 0.08 * strength * r[1]
    gamma = tf.exp(0.3 * strength * r[2])
    mean = tf.reduce_mean(x)
    x = (x - mean) * contrast + mean + brightness
    x = tf.clip_by_value(x, 0.0, 1.0) ** gamma
    sigma = 0.02 * strength * (r[3] + 1.0) / 2.0
    x = x + sigma * tf.random.stateless_normal(tf.shape(x), seed=seed + 4)
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.concat([x, y], axis=-1)


def _split_xy(xy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return xy[..., :1], xy[..., 1:]


def training_dataset(regions: list[SliceRegion], cfg: DataConfig, batch_size: int, seed: int = 0,
                     augment_strength: float = 1.0) -> tf.data.Dataset:
    """Endless stream of augmented training batches.

    Yields (x, y): x float32 (B, T, T, 1) in [0, 1]; y float32 (B, T, T, 1) in {1, 0, -1}.
    """
    if not regions:
        raise DataError("no training slices")
    tile, k = cfg.tile_size, cfg.tiles_per_slice
    n = len(regions)
    ds = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    # Deterministic order: a seed reproduces a run (decode times vary, so this costs a little speed).
    ds = ds.map(_loader(regions, cfg.ignore_value, tile), num_parallel_calls=min(4, n), deterministic=True)
    # One stateless seed per decoded slice and per tile keeps randomness explicit.
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.counter())
    ds = ds.map(
        lambda xy, i: _random_crops(xy, tf.stack([tf.cast(seed, tf.int64), i]), k, tile, cfg.foreground_fraction),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).unbatch()
    ds = ds.shuffle(max(cfg.shuffle_buffer, k), seed=seed + 1)
    if cfg.augment:
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.counter(start=10**9))
        ds = ds.map(lambda xy, i: augment(xy, tf.stack([tf.cast(seed, tf.int64), i]), augment_strength),
                    num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(_split_xy, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def grid_tiles(xy: tf.Tensor, tile: int) -> tf.Tensor:
    """Cut (H, W, 2) into non-overlapping (n, tile, tile, 2) tiles, padding the edges.

    Image padding mirrors the slice; target padding is IGNORE so it never counts.
    """
    shape = tf.shape(xy)
    h, w = shape[0], shape[1]
    ph = (tile - h % tile) % tile
    pw = (tile - w % tile) % tile
    x = tf.pad(xy[..., :1], [[0, ph], [0, pw], [0, 0]], mode="SYMMETRIC")
    y = tf.pad(xy[..., 1:], [[0, ph], [0, pw], [0, 0]], constant_values=IGNORE)
    xy = tf.concat([x, y], axis=-1)
    nh, nw = (h + ph) // tile, (w + pw) // tile
    t = tf.reshape(xy, [nh, tile, nw, tile, 2])
    t = tf.transpose(t, [0, 2, 1, 3, 4])
    return tf.reshape(t, [nh * nw, tile, tile, 2])


def validation_dataset(regions: list[SliceRegion], cfg: DataConfig, batch_size: int,
                       shapes: list[tuple[int, int]] | None = None) -> tf.data.Dataset:
    """Deterministic, finite set of grid tiles covering every validation slice once.

    shapes: (H, W) of each region's slice, if known; the batch count is then
    declared, so Keras knows the length of a validation pass.
    """
    if not regions:
        raise DataError("no validation slices")
    tile = cfg.tile_size
    ds = tf.data.Dataset.range(len(regions))
    ds = ds.map(_loader(regions, cfg.ignore_value, tile), num_parallel_calls=min(4, len(regions)), deterministic=True)
    ds = ds.map(lambda xy: grid_tiles(xy, tile)).unbatch()
    ds = ds.map(_split_xy).batch(batch_size)
    if shapes is not None:
        n = 0
        for r, (h, w) in zip(regions, shapes):
            band = round(r.row_to * h) - round(r.row_from * h)
            n += math.ceil(max(band, tile) / tile) * math.ceil(max(w, tile) / tile)
        ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


def default_steps_per_epoch(regions: list[SliceRegion], shapes: list[tuple[int, int]], tile: int, batch_size: int) -> int:
    """Steps that draw, on average, as many tiles as cover the training area once."""
    area = sum((r.row_to - r.row_from) * h * w for r, (h, w) in zip(regions, shapes))
    return max(1, math.ceil(area / tile**2 / batch_size))
