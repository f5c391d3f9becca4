"""TensorFlow side of the data: in-graph normalisation and the tf.data tile pipelines.

Training stream (nothing written to disk, one slice decoded at a time per
parallel call, so a MitoEM-sized set of 400 slices of 4096 x 4096 never sits in
memory at once):

    group index -> [TileSampler.group: weighted pick of set and slice, decode +
    normalise whole slice, k tiles resampled to the model's pixel size and
    augmented, shuffled within the group] -> unbatch -> batch -> prefetch

The per-group work is NumPy/OpenCV (`xmdl_tf.sampling`, `xmdl_tf.augment`),
run in parallel by tf.data; the PyDataset path for other Keras backends
(`xmdl_tf.pydata`) calls the same functions, so both give the same batches.

Normalisation runs on the *whole slice* before cropping, so every tile of a
slice shares one intensity mapping, exactly as at inference and in the exported
SavedModel, where the whole request image is normalised in the graph
(`normalize`, tested equal to the NumPy `normalize_np`).

Validation is a fixed grid of non-overlapping tiles covering every validation
slice; edges are padded and padded pixels are marked "ignore" (-1 in the
target), so validation loss is comparable across epochs and covers each pixel
exactly once.

Targets are float32 (B, T, T, 1): 1 mitochondrion, 0 background, -1 ignored.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .augment import IGNORE
from .config import NORMALIZATION, NORMALIZATION_METHODS, AugmentConfig, DataConfig
from .io import DataError
from .sampling import (SliceRegion, TileSampler, TrainingSet, as_sets, holdout_split, n_grid_tiles, normalize_np,
                       region_shape, target_from_label, validation_tiles)

__all__ = ["IGNORE", "SliceRegion", "TrainingSet", "holdout_split", "normalize", "normalize_np",
           "target_from_label", "training_dataset", "validation_dataset"]


# ----------------------------------------------------------------------------
# Normalisation: defined once, used by training, inference and export.


def normalize(image: np.ndarray | tf.Tensor, low: float = NORMALIZATION["low"], high: float = NORMALIZATION["high"],
              clip: bool = NORMALIZATION["clip"], method: str = "percentile") -> tf.Tensor:
    """Map raw grey values of ONE image to float32 [0, 1] by its own histogram.

    image: (H, W) or (H, W, 1), any numeric dtype holding integer grey values
        0..65535 (8- or 16-bit EM). Float inputs are rounded.
    method "percentile": (x - p_low) / (p_high - p_low), clipped to [0, 1].
    Percentiles use the inverted-CDF definition
    (numpy.percentile(..., method="inverted_cdf")) computed from a 65536-bin
    histogram, which is exact for integer data and costs one pass, even on a
    4096 x 4096 slice, with no sort.
    method "equalize": each grey value's mid-rank in the same histogram (see
    `sampling.normalize_np`); low, high and clip are unused.
    Returns float32 of the same shape; equal to `normalize_np` (tested).
    """
    if method not in NORMALIZATION_METHODS:
        raise ValueError(f"normalisation method {method!r} is not one of {NORMALIZATION_METHODS}")
    xi = grey_ints(image)
    return normalize_counts(xi, grey_counts(xi), low, high, clip, method)


def grey_ints(image: np.ndarray | tf.Tensor) -> tf.Tensor:
    """int32 grey values 0..65535 of an image (uint8/uint16 as they are; others rounded and clipped):
    the in-graph `sampling.grey_values`."""
    x = tf.convert_to_tensor(image)
    if x.dtype in (tf.uint8, tf.uint16):  # already integer grey values in range: no rounding pass
        return tf.cast(x, tf.int32)
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(x, tf.float32)), 0.0, 65535.0), tf.int32)


def grey_counts(xi: tf.Tensor) -> tf.Tensor:
    """int64 (65536,) counts per grey value of `grey_ints` values."""
    return tf.math.bincount(tf.reshape(xi, [-1]), minlength=65536, maxlength=65536, dtype=tf.int64)


def normalize_counts(xi: tf.Tensor, counts: tf.Tensor, low: float = NORMALIZATION["low"],
                     high: float = NORMALIZATION["high"], clip: bool = NORMALIZATION["clip"],
                     method: str = "percentile") -> tf.Tensor:
    """`normalize` of grey values `xi` (`grey_ints`) by the histogram `counts` (of `xi`, or of its
    tissue alone when its padding is left out): the in-graph `sampling.normalize_counts`."""
    cdf = tf.cumsum(counts)
    n = tf.cast(cdf[-1], tf.float64)
    if method == "equalize":
        below = tf.cast(cdf - counts, tf.float64)
        lut = tf.cast((below + 0.5 * tf.cast(counts, tf.float64)) / tf.maximum(n, 1.0), tf.float32)
        return tf.gather(lut, xi)
    ranks = tf.maximum(tf.math.ceil(tf.constant([low, high], tf.float64) / 100.0 * n), 1.0)
    lo_hi = tf.cast(tf.searchsorted(cdf, tf.cast(ranks, tf.int64), side="left"), tf.float32)
    lo, hi = lo_hi[0], lo_hi[1]
    y = (tf.cast(xi, tf.float32) - lo) / tf.maximum(hi - lo, 1.0)
    if clip:
        y = tf.clip_by_value(y, 0.0, 1.0)
    return y


# ----------------------------------------------------------------------------
# Pipelines


def training_dataset(data: list[TrainingSet] | list[SliceRegion], cfg: DataConfig, batch_size: int, seed: int = 0,
                     augment: AugmentConfig | None = None, start_tile: int = 0,
                     normalization: dict | None = None) -> tf.data.Dataset:
    """Endless stream of augmented training batches (see `TileSampler`).

    augment: augmentation settings (default: the "em" preset); ignored when
    cfg.augment is False. start_tile: skip the first tiles of the stream (a resumed
    run continues exactly where the interrupted one stopped). normalization: the
    model's intensity normalisation (default `config.NORMALIZATION`).
    Yields (x, y): x float32 (B, T, T, 1) in [0, 1]; y float32 (B, T, T, 1) in {1, 0, -1}.
    """
    sampler = TileSampler(as_sets(data), cfg, augment or AugmentConfig(), seed, normalization=normalization)
    tile = cfg.tile_size

    def group(g):
        xy = tf.numpy_function(sampler.group, [g], (tf.float32, tf.float32), stateful=False)
        return tuple(tf.ensure_shape(t, [sampler.tiles_per_group, tile, tile, 1]) for t in xy)

    n = sampler.tiles_per_group
    ds = tf.data.Dataset.counter(start=start_tile // n)
    # deterministic=True: a seed reproduces a run (and the PyDataset path) exactly.
    ds = ds.map(group, num_parallel_calls=2, deterministic=True).unbatch().skip(start_tile % n)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def validation_dataset(data: list[TrainingSet] | list[SliceRegion], cfg: DataConfig, batch_size: int,
                       shapes: list[tuple[int, int]] | None = None,
                       normalization: dict | None = None) -> tf.data.Dataset:
    """Deterministic, finite set of grid tiles covering every validation slice once.

    shapes: (H, W) of each region's slice, if known (for a plain region list);
    the batch count is then declared, so Keras knows the length of a pass.
    normalization: as in `training_dataset`.
    """
    sets = as_sets(data)
    if shapes is not None and len(sets) == 1:
        sets = [TrainingSet(sets[0].name, sets[0].regions, sets[0].factor, shapes=list(shapes))]
    items = [(r, s.factor) for s in sets for r in s.regions]
    if not items:
        raise DataError("no validation slices")
    tile = cfg.tile_size

    def load(i):
        r, f = items[int(i)]
        return validation_tiles(r, tile, f, cfg.ignore_value, normalization)

    def tf_load(i):
        x, y = tf.numpy_function(load, [i], (tf.float32, tf.float32), stateful=False)
        return tf.ensure_shape(x, [None, tile, tile, 1]), tf.ensure_shape(y, [None, tile, tile, 1])

    ds = tf.data.Dataset.range(len(items)).map(tf_load, num_parallel_calls=2, deterministic=True).unbatch()
    ds = ds.batch(batch_size)
    if all(s.shapes for s in sets):
        n = sum(n_grid_tiles(*region_shape(r, hw, s.factor), tile) for s in sets for r, hw in zip(s.regions, s.shapes))
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)
