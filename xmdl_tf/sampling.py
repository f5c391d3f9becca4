"""Training and validation tiles in NumPy: normalisation, balanced multi-set sampling, resampling.

Everything here is backend-neutral (NumPy + OpenCV), so the `tf.data` pipeline
(`xmdl_tf.data`) and the `keras.utils.PyDataset` path for JAX/PyTorch
(`xmdl_tf.pydata`) are thin wrappers over the same functions and give the same
tiles for the same seed.

The training stream is a sequence of *groups*, each a pure function of
(seed, group index):

    for each of G slots: pick a data set by its weight, a slice of it uniformly,
    decode + normalise the whole slice, resample k tiles from it at the model's
    pixel size (random zoom, rotation, mirror, elastic; see `augment`),
    augment their intensities
    -> shuffle the G*k tiles together -> emit

G = shuffle_buffer // tiles_per_slice. Only one slice is in memory per worker at
a time, and an interrupted run can restart the stream at any group.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import cv2
import numpy as np

from .augment import IGNORE, augment_intensity, draw_geometry, elastic_field, warp_tile
from .config import NORMALIZATION, NORMALIZATION_METHODS, AugmentConfig, DataConfig
from .io import DataError, SlicePair, read_pair

# ----------------------------------------------------------------------------
# Normalisation (NumPy twin of `xmdl_tf.data.normalize`; tested equal)


def normalize_np(image: np.ndarray, low: float = NORMALIZATION["low"], high: float = NORMALIZATION["high"],
                 clip: bool = NORMALIZATION["clip"], method: str = "percentile") -> np.ndarray:
    """Map raw grey values of ONE image to float32 [0, 1] by its own histogram.

    image: (H, W) or (H, W, 1) integer grey values 0..65535 (float inputs are rounded).
    method "percentile": (x - p_low) / (p_high - p_low), clipped when `clip`;
    percentiles are the inverted-CDF ones of a 65536-bin histogram, exactly as
    the TensorFlow `normalize` used in the exported SavedModel computes them.
    method "equalize": each grey value's mid-rank in the image's histogram (the
    fraction of pixels darker than it plus half of those equal to it), so any
    monotone change of contrast, gamma or brightness maps to the same output;
    low, high and clip are unused.
    """
    x = grey_values(image)
    return normalize_counts(x, grey_counts(x), low, high, clip, method)


def grey_values(image: np.ndarray) -> np.ndarray:
    """The image as integer grey values 0..65535 (uint8/uint16 as they are; others rounded and clipped)."""
    x = np.asarray(image)
    if x.dtype not in (np.uint8, np.uint16):
        x = np.clip(np.round(x.astype(np.float32)), 0, 65535).astype(np.int32)
    return x


# Constant padding smaller than this share of a slice is left alone (a few clipped pixels at an edge).
PADDING_MIN_FRACTION = 0.005
# A slice's padding is found on a grid of s x s blocks, at most this many a side: the same grid whether
# the slice is held whole, cut into xmdl-volume's chunks or served by the SavedModel graph.
PADDING_THUMB = 256


def padding_stride(shape_yx) -> int:
    """s: the side, in px, of the blocks a slice of (H, W) px is searched for padding on (1 up to
    PADDING_THUMB px a side: then every pixel is a block)."""
    return max(1, -(-max(int(n) for n in shape_yx) // PADDING_THUMB))


def block_extremes(values: np.ndarray, s: int, origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) grey value of each s x s block (blocks start at multiples of s in the slice) that
    `values`, the piece (h, w) of a slice at `origin` (y0, x0), overlaps; a block the piece holds only
    part of gets that part's (the chunked path combines the parts with np.minimum / np.maximum)."""
    v = np.asarray(values)
    if s == 1:
        return v, v
    oy, ox = origin[0] % s, origin[1] % s
    h, w = v.shape
    x = np.pad(v, ((oy, -(oy + h) % s), (ox, -(ox + w) % s)), mode="edge")  # repeats: extremes unchanged
    b = x.reshape(x.shape[0] // s, s, x.shape[1] // s, s)
    return b.min(axis=(1, 3)), b.max(axis=(1, 3))


def _edge_regions(full: np.ndarray) -> np.ndarray:
    """bool: the 4-connected regions of `full` that touch its border and each cover at least
    PADDING_MIN_FRACTION of it."""
    least = PADDING_MIN_FRACTION * full.size
    if full.sum() < least:
        return np.zeros(full.shape, bool)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(full.astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    edge = edge[(edge > 0) & (stats[edge, cv2.CC_STAT_AREA] >= least)]
    return np.isin(lab, edge)


def padding_blocks(bmin: np.ndarray, bmax: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """uint8 (bh, bw) codes of a slice's constant padding on its block grid (`block_extremes`): 1 for
    blocks wholly of the slice's lowest grey value in a region of such blocks that touches the edge and
    covers at least PADDING_MIN_FRACTION of the grid, 2 the same for its highest value; None when there
    is none, or when it would leave no tissue (an image of two grey values). counts: the slice's
    grey-value histogram. Whole blocks, not sampled pixels: clipped noise in tissue never fills one."""
    candidates = _padding_values(counts)
    if not candidates:
        return None
    codes = np.zeros(np.shape(bmin), np.uint8)
    for code, v in candidates:
        codes[_edge_regions(np.asarray(bmax == v if code == 1 else bmin == v))] = code
    found = [v for code, v in candidates if (codes == code).any()]
    if not found or np.asarray(counts)[found].sum() == np.asarray(counts).sum():
        return None
    return codes


def _padding_values(counts: np.ndarray) -> list[tuple[int, int]]:
    """(code, grey value) of the slice's lowest (1) and highest (2) grey values that are common enough
    to be padding (half PADDING_MIN_FRACTION of its pixels, a margin for partial blocks): most slices
    have none, and are done with after their histogram."""
    c = np.asarray(counts)
    levels = np.flatnonzero(c)
    if len(levels) < 2:
        return []
    least = 0.5 * PADDING_MIN_FRACTION * c.sum()
    return [(code, int(v)) for code, v in ((1, levels[0]), (2, levels[-1])) if c[v] >= least]


def padding_pixels(values: np.ndarray, codes: np.ndarray, counts: np.ndarray, rows: np.ndarray,
                   cols: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(bool padding mask of `values` or None, the slice's tissue histogram).

    values: (h, w) grey values, a slice or a piece of one; codes: the slice's `padding_blocks`; counts:
    the whole slice's histogram; rows, cols: the block row (column) of each of the piece's rows
    (columns). Padding is every pixel of the padding's grey value 4-connected to its whole blocks
    within one block of them; its grey values leave the histogram (of the whole slice, so every
    piece of it is normalised alike). On a grid of single pixels (s = 1), exactly the 4-connected
    edge regions of the lowest / highest value.
    """
    levels = np.flatnonzero(counts)
    pad, dropped = np.zeros(np.shape(values), bool), []
    for code, v in ((1, int(levels[0])), (2, int(levels[-1]))):
        core = codes == code
        if not core.any():
            continue
        dropped.append(v)
        near = cv2.dilate(core.astype(np.uint8), np.ones((3, 3), np.uint8))[np.ix_(rows, cols)].astype(bool)
        same = near & (values == v)
        inner = same & core[np.ix_(rows, cols)]
        if inner.any():
            _, lab = cv2.connectedComponents(same.astype(np.uint8), connectivity=4)
            keep = np.unique(lab[inner])
            pad |= np.isin(lab, keep[keep > 0])
    return (pad if pad.any() else None), without_values(counts, dropped)


def find_padding(values: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(bool (H, W) constant padding of a whole slice of grey values or None, its tissue histogram).

    Padding: a registered or rotated section set into a canvas, i.e. regions of exactly the slice's
    lowest or highest grey value that touch its edge and cover at least PADDING_MIN_FRACTION of it
    (`padding_blocks`, `padding_pixels`; isolated saturated pixels on the edge are none). EM noise
    makes real tissue never exactly constant over thousands of pixels, so such regions hold no
    tissue; left in, they drag the normalisation's percentiles and show the network a block with a
    hard edge, which cost a padded slice half its mitochondria next to that edge.
    """
    counts = grey_counts(values)
    if not _padding_values(counts):
        return None, counts
    s = padding_stride(np.shape(values))
    bmin, bmax = block_extremes(values, s)
    codes = padding_blocks(bmin, bmax, counts)
    if codes is None:
        return None, counts
    rows, cols = (np.minimum(np.arange(n) // s, m - 1) for n, m in zip(np.shape(values), codes.shape))
    return padding_pixels(values, codes, counts, rows, cols)


def padding_mask(image: np.ndarray) -> np.ndarray | None:
    """bool (H, W) constant padding of a slice (`find_padding`), or None."""
    return find_padding(grey_values(image))[0]


def grey_counts(image: np.ndarray) -> np.ndarray:
    """int64 counts per grey value 0.. of an image of integer grey values (`grey_values`).

    The histogram of a slice is the sum of the histograms of its pieces, so a
    slice cut into chunks is normalised exactly as a whole one (`normalize_as`).
    """
    x = np.asarray(image)
    return np.bincount(x.ravel(), minlength=256 if x.dtype == np.uint8 else 65536).astype(np.int64)


def without_values(counts: np.ndarray, values) -> np.ndarray:
    """A copy of the grey-value histogram `counts` with the bins of `values` emptied: the histogram of a
    slice's tissue when `values` are the grey values of its padding (`padding_mask`)."""
    c = np.array(counts, np.int64)
    c[np.asarray(list(values), np.int64)] = 0
    return c


def median_grey(counts: np.ndarray) -> int:
    """The (lower) median grey value of a histogram: what a slice's padding is shown as."""
    return int(percentile_bounds(counts, 50.0, 50.0)[0])


def normalize_counts(x: np.ndarray, counts: np.ndarray, low: float, high: float, clip: bool,
                     method: str = "percentile") -> np.ndarray:
    """`normalize_np` of grey values `x` by the histogram `counts` (of `x` or of the slice it is cut from)."""
    if method == "percentile":
        return apply_bounds(x, *percentile_bounds(counts, low, high), clip)
    if method == "equalize":
        lut = equalize_lut(counts)
        return lut[np.minimum(x, len(lut) - 1)]  # grey values above the histogram's range: the top rank
    raise ValueError(f"normalisation method {method!r} is not one of {NORMALIZATION_METHODS}")


def equalize_lut(counts: np.ndarray) -> np.ndarray:
    """float32 mid-rank of every grey value 0..len(counts)-1: (pixels below + half the pixels equal) / all."""
    c = np.asarray(counts, np.float64)
    below = np.cumsum(c) - c
    return ((below + 0.5 * c) / max(float(c.sum()), 1.0)).astype(np.float32)


def percentile_bounds(counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """(lo, hi) grey values at percentiles `low`, `high` of a histogram (counts per grey value 0..)."""
    cdf = np.cumsum(counts)
    n = float(cdf[-1])
    ranks = np.maximum(np.ceil(np.array([low, high], np.float64) / 100.0 * n), 1.0)
    lo, hi = np.searchsorted(cdf, ranks.astype(np.int64), side="left").astype(np.float32)
    return float(lo), float(hi)


def apply_bounds(image: np.ndarray, lo: float, hi: float, clip: bool = True) -> np.ndarray:
    """float32 (image - lo) / (hi - lo), clipped to [0, 1] when `clip`."""
    y = (np.asarray(image).astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1.0))
    if clip:
        np.clip(y, 0.0, 1.0, out=y)
    return y


def normalize_as(image: np.ndarray, normalization: dict, counts: np.ndarray | None = None) -> np.ndarray:
    """`normalize_np` with a model's stored settings (config.json "normalization").

    counts: the grey-value histogram (`grey_counts`) of the whole slice when
    `image` is a piece of it, so the piece is normalised as its slice; default:
    the image's own.
    """
    norm = {**NORMALIZATION, **normalization}  # a stored setting may leave the defaults out
    x = grey_values(image)
    return normalize_counts(x, grey_counts(x) if counts is None else counts, float(norm["low"]), float(norm["high"]),
                            bool(norm["clip"]), norm["method"])


def target_from_label(label: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """Label (H, W) ints -> float32 target: 1 foreground (> 0), 0 background, -1 ignored."""
    target = (label > 0).astype(np.float32)
    if ignore_value is not None:
        target[label == ignore_value] = IGNORE
    return target


# ----------------------------------------------------------------------------
# Slice tables


@dataclass(frozen=True)
class SliceRegion:
    """A slice pair and the band of rows [row_from, row_to) (fractions of height) to use.

    Bands let validation be carved from the training slices themselves as
    held-back rows when a data set has no validation split (e.g. one slice).
    """

    pair: SlicePair
    row_from: float = 0.0
    row_to: float = 1.0


@dataclass(frozen=True)
class TrainingSet:
    """The slices of one data set and how they enter training.

    factor: resampling factor to the model's pixel size (data pixel size /
        model pixel size; 1 = keep the grid, e.g. when the pixel size is unknown).
    weight: relative share of the training tiles drawn from this set.
    """

    name: str
    regions: list[SliceRegion]
    factor: float = 1.0
    weight: float = 1.0
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) per region, if known


def as_sets(data: list[TrainingSet] | list[SliceRegion]) -> list[TrainingSet]:
    """Accept a plain region list (one set, native grid) wherever sets are expected."""
    if data and all(isinstance(r, SliceRegion) for r in data):
        return [TrainingSet("data", list(data))]
    return list(data)


def holdout_split(pairs: list[SlicePair], val_fraction: float = 0.2) -> tuple[list[SliceRegion], list[SliceRegion]]:
    """Carve validation from training slices: the bottom `val_fraction` of rows of every slice."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = 1.0 - val_fraction
    return [SliceRegion(p, 0.0, cut) for p in pairs], [SliceRegion(p, cut, 1.0) for p in pairs]


def load_region(region: SliceRegion, ignore_value: int | None = None,
                normalization: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 [0, 1], target float32) of a region, both (h, W).

    The whole slice is normalised before the band is cut: the same intensity
    mapping as at inference, where whole slices are normalised.
    normalization: the model's settings (config.json "normalization"; default
    `config.NORMALIZATION`).
    """
    image, label = read_pair(region.pair)
    if label is None:
        raise DataError(f"{region.pair.image}: no label for a training/validation slice")
    h = image.shape[0]
    r0, r1 = int(round(region.row_from * h)), int(round(region.row_to * h))
    x = normalize_as(image, NORMALIZATION if normalization is None else normalization)
    return x[r0:r1], target_from_label(label, ignore_value)[r0:r1]


# A pixel size within 2% of the model's is used as is: resampling would only blur.
SAME_PIXEL_SIZE = 0.02


def resample_factor(data_px: float | None, model_px: float | None) -> float:
    """Data pixel size / model pixel size; 1 when either is unknown or they agree within 2%."""
    if not data_px or not model_px:
        return 1.0
    f = float(data_px) / float(model_px)
    return 1.0 if abs(f - 1.0) < SAME_PIXEL_SIZE else f


def resample_image(x: np.ndarray, factor: float) -> np.ndarray:
    """Resize an (H, W) image by `factor`: area averaging when shrinking (no aliasing),
    linear when enlarging; factor 1 returns it. Shape (max(1, round(H * factor)), ...)."""
    if factor == 1.0:
        return x
    size = (max(1, round(x.shape[1] * factor)), max(1, round(x.shape[0] * factor)))
    return cv2.resize(x, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def resample_pair(x: np.ndarray, y: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (`resample_image`, as at inference) and target (nearest neighbour)
    by `factor`; factor 1 returns the inputs."""
    if factor == 1.0:
        return x, y
    x = resample_image(x, factor)
    # INTER_NEAREST_EXACT samples pixel centres as INTER_AREA/LINEAR do; plain
    # INTER_NEAREST would shift labels by (1/factor - 1)/2 pixels against the image.
    return x, cv2.resize(y, x.shape[1::-1], interpolation=cv2.INTER_NEAREST_EXACT)


# ----------------------------------------------------------------------------
# Training tiles


def sample_tiles(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, k: int, tile: int, factor: float = 1.0,
                 fg_fraction: float = 0.0, aug: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k tiles (k, tile, tile) float32 image and target from one slice at the model's pixel size.

    x, y: normalised slice and target (H, W). factor: slice pixel size / model
    pixel size. fg_fraction: expected share of tiles centred near a
    mitochondrion pixel (then jittered by up to a quarter tile). aug: augmentation,
    or None for plain crops (flips/rotations included only with aug).
    """
    h, w = x.shape
    xs = np.empty((k, tile, tile), np.float32)
    ys = np.empty((k, tile, tile), np.float32)
    fg = None
    for i in range(k):
        zoom, angle, mirror = draw_geometry(rng, aug)
        step = 1.0 / (factor * zoom)
        disp = elastic_field(rng, tile, aug.elastic) if aug is not None and aug.elastic > 0 else None
        # Centres keep the (rotated) tile inside the slice when it fits.
        half = step * tile / 2 * (abs(math.cos(angle)) + abs(math.sin(angle)))
        lo_r, hi_r = half - 0.5, h - half - 0.5
        lo_c, hi_c = half - 0.5, w - half - 0.5
        if fg_fraction > 0 and rng.uniform() < fg_fraction:
            if fg is None:
                fg = np.argwhere(y > 0.5)
            if len(fg):
                cy, cx = fg[rng.integers(len(fg))] + rng.uniform(-1, 1, 2) * step * tile / 4
            else:
                cy, cx = rng.uniform(lo_r, max(lo_r, hi_r)), rng.uniform(lo_c, max(lo_c, hi_c))
        else:
            cy, cx = rng.uniform(lo_r, max(lo_r, hi_r)), rng.uniform(lo_c, max(lo_c, hi_c))
        cy = np.clip(cy, lo_r, hi_r) if hi_r >= lo_r else (h - 1) / 2
        cx = np.clip(cx, lo_c, hi_c) if hi_c >= lo_c else (w - 1) / 2
        # Snap to the pixel grid so unzoomed, unrotated tiles are exact crops.
        off = (tile - 1) / 2
        cy, cx = math.floor(cy - off + 0.5) + off, math.floor(cx - off + 0.5) + off
        xs[i], ys[i] = warp_tile(x, y, (cy, cx), tile, step, angle, mirror, disp)
        if aug is not None:
            xs[i] = augment_intensity(xs[i], rng, aug)
    return xs, ys


_WORKER: "TileSampler | None" = None  # the sampler of a worker process (`TileSampler(processes=...)`)


def _init_worker(kwargs: dict) -> None:
    global _WORKER
    _WORKER = TileSampler(**kwargs)


def _worker_slot(args: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER.slot(*args)


class TileSampler:
    """Deterministic, endless stream of training tiles from several data sets.

    `group(g)` returns the g-th group of tiles: image and target float32
    (n, tile, tile, 1), n = tiles_per_group. It depends only on (seed, g), so any
    pipeline that emits groups 0, 1, 2, ... in order reproduces the stream.

    processes: build each group's slots (one slice each) in this many worker
    processes (0: in the calling thread). NumPy and OpenCV release the GIL only
    in part: 16 loader threads on a 16-core GPU machine built about 3x what one
    core does, where processes are not bound by it; but the tiles cross a pipe,
    and on 2 cores threads measured faster (README). Same tiles either way
    (tested). Call `close()` to stop them.
    normalization: the model's intensity normalisation (default `config.NORMALIZATION`).
    """

    def __init__(self, sets: list[TrainingSet], cfg: DataConfig, aug: AugmentConfig | None, seed: int = 0,
                 cache_mb: float = 1024, processes: int = 0, normalization: dict | None = None):
        sets = [s for s in sets if s.regions]
        if not sets:
            raise DataError("no training slices")
        weights = np.array([s.weight for s in sets], np.float64)
        if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError(f"set weights must be >= 0 with a positive sum, got {weights.tolist()}")
        self.sets, self.cfg, self.aug, self.seed = sets, cfg, aug if cfg.augment else None, int(seed)
        self.normalization = dict(NORMALIZATION if normalization is None else normalization)
        self.p = weights / weights.sum()
        self.slices_per_group = max(1, cfg.shuffle_buffer // cfg.tiles_per_slice)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._building: dict[int, threading.Event] = {}
        self.cache_groups = 4
        self._lock = threading.Lock()
        # Decoded, normalised slices, least recently used dropped first: decoding a
        # PNG costs more than cutting and augmenting its tiles. Bounded, so a
        # MitoEM-sized set streams as before.
        self._slices: OrderedDict = OrderedDict()
        self._slice_bytes, self._slice_budget = 0, int(cache_mb * 2**20)
        self.processes, self._pool, self._cache_mb = max(0, int(processes)), None, cache_mb

    def close(self) -> None:
        """Stop the worker processes (if any); the sampler still works, in the calling thread."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _workers(self):
        if self._pool is None and self.processes:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with self._lock:
                if self._pool is None:
                    # spawn, not fork: the parent runs TensorFlow's or JAX's threads, which a fork
                    # would copy in whatever state they are. Each worker keeps its own slice cache.
                    kwargs = {"sets": self.sets, "cfg": self.cfg, "aug": self.aug, "seed": self.seed,
                              "cache_mb": self._cache_mb / self.processes * 2, "normalization": self.normalization}
                    self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_init_worker, initargs=(kwargs,))
        return self._pool

    def _load(self, region: SliceRegion) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            hit = self._slices.get(region)
            if hit is not None:
                self._slices.move_to_end(region)
                return hit
        # Copies of the band: a view would keep the whole slice alive, uncounted.
        x, y = (np.ascontiguousarray(a) for a in load_region(region, self.cfg.ignore_value, self.normalization))
        x.flags.writeable = y.flags.writeable = False  # shared between groups: never modified in place
        size = x.nbytes + y.nbytes
        with self._lock:
            if size <= self._slice_budget and region not in self._slices:
                self._slices[region] = (x, y)
                self._slice_bytes += size
                while self._slice_bytes > self._slice_budget:
                    _, (ox, oy) = self._slices.popitem(last=False)
                    self._slice_bytes -= ox.nbytes + oy.nbytes
        return x, y

    @property
    def tiles_per_group(self) -> int:
        return self.slices_per_group * self.cfg.tiles_per_slice

    def group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(g)])
        slots = []
        for slot in range(self.slices_per_group):
            si = int(rng.choice(len(self.sets), p=self.p))
            slots.append((si, int(rng.integers(len(self.sets[si].regions))), int(g), slot))
        pool = self._workers()
        built = list(pool.map(_worker_slot, slots)) if pool is not None else [self.slot(*a) for a in slots]
        order = rng.permutation(self.tiles_per_group)
        return (np.concatenate([x for x, _ in built])[order, ..., None],
                np.concatenate([y for _, y in built])[order, ..., None])

    def slot(self, set_index: int, region_index: int, g: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The tiles of one slot of group g: (tiles_per_slice, tile, tile) image and target."""
        cfg, s = self.cfg, self.sets[set_index]
        x, y = self._load(s.regions[region_index])
        return sample_tiles(x, y, np.random.default_rng([self.seed, int(g), slot]), cfg.tiles_per_slice,
                            cfg.tile_size, s.factor, cfg.foreground_fraction, self.aug)

    def batch(self, i: int, batch_size: int, start_tile: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Batch i of the tile stream that starts at tile `start_tile` (batches may span groups).

        Recent groups are cached (thread-safe), so consecutive batches cost one
        group build per tiles_per_group / batch_size batches.
        """
        n = self.tiles_per_group
        first, last = start_tile + i * batch_size, start_tile + (i + 1) * batch_size
        parts_x, parts_y = [], []
        for g in range(first // n, (last - 1) // n + 1):
            gx, gy = self._cached_group(g)
            a, b = max(first - g * n, 0), min(last - g * n, n)
            parts_x.append(gx[a:b])
            parts_y.append(gy[a:b])
        return np.concatenate(parts_x), np.concatenate(parts_y)

    def _cached_group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        # One thread builds a group; others asking for it meanwhile wait for that build
        # instead of repeating it (many loader threads on a GPU machine ask for the same
        # group at once). The cache holds more groups than there are loader threads, so
        # a group is not dropped while batches of it are still queued.
        with self._lock:
            hit = self._cache.get(g)
            if hit is None:
                hit = self._building.get(g)
                if hit is None:
                    self._building[g] = done = threading.Event()
        if isinstance(hit, threading.Event):
            hit.wait()
            with self._lock:
                hit = self._cache.get(g)
            return hit if hit is not None else self._cached_group(g)
        if hit is not None:
            return hit
        try:
            built = self.group(g)  # outside the lock: other threads keep working
            with self._lock:
                self._cache[g] = built
                while len(self._cache) > self.cache_groups:
                    self._cache.pop(next(iter(self._cache)))
        finally:
            with self._lock:
                self._building.pop(g, None)
            done.set()
        return built


# ----------------------------------------------------------------------------
# Validation tiles


def grid_tiles_np(x: np.ndarray, y: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut (H, W) image and target into non-overlapping (n, tile, tile, 1) tiles, row-major.

    Edges are padded: the image mirrored, the target IGNORE so padding never counts.
    """
    h, w = x.shape
    ph, pw = (-h) % tile, (-w) % tile
    if ph or pw:
        # Mirror padding larger than the slice (tiny slices) needs several reflections.
        x = np.pad(x, ((0, ph), (0, pw)), mode="symmetric")
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
    nh, nw = x.shape[0] // tile, x.shape[1] // tile

    def cut(a):
        return a.reshape(nh, tile, nw, tile).transpose(0, 2, 1, 3).reshape(nh * nw, tile, tile, 1)

    return cut(x), cut(y)


def validation_tiles(region: SliceRegion, tile: int, factor: float = 1.0, ignore_value: int | None = None,
                     normalization: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grid tiles (n, tile, tile, 1) covering one validation region once, at the model's pixel size."""
    x, y = resample_pair(*load_region(region, ignore_value, normalization), factor)
    return grid_tiles_np(x, y, tile)


# What the trainer validates on gives the model at least this much context (px), whatever the training
# tile: a model trained on 64-px tiles and validated on them scored val F1 0.71 where whole slices gave
# 0.35 (at 256 px the two agreed, 0.89 / 0.93), so small-tile runs chose their epochs on a figure that
# analyze never reproduces.
MIN_VALIDATION_CONTEXT = 256


def validation_tile(tile: int, shape: tuple[int, int]) -> int:
    """The tile the trainer validates a (h, w) region with: the smallest multiple of the training `tile`
    (so of the size divisor too) reaching MIN_VALIDATION_CONTEXT px, or covering the region if smaller
    (no padding beyond what the training tile's grid pads)."""
    need = min(MIN_VALIDATION_CONTEXT, max(shape))
    return tile * max(1, -(-need // tile))


def selection_tiles(region: SliceRegion, tile: int, factor: float = 1.0, ignore_value: int | None = None,
                    normalization: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grid tiles (n, t, t, 1) of one validation region for the trainer's per-epoch validation, t =
    `validation_tile(tile, region shape)` (`validation_tiles` keeps the training tile)."""
    x, y = resample_pair(*load_region(region, ignore_value, normalization), factor)
    return grid_tiles_np(x, y, validation_tile(tile, x.shape))


def n_grid_tiles(h: int, w: int, tile: int) -> int:
    return math.ceil(h / tile) * math.ceil(w / tile)


def region_shape(region: SliceRegion, shape: tuple[int, int], factor: float = 1.0) -> tuple[int, int]:
    """(h, w) of a region's band after resampling by `factor`."""
    h, w = shape
    band = round(region.row_to * h) - round(region.row_from * h)
    if factor == 1.0:
        return band, w
    return max(1, round(band * factor)), max(1, round(w * factor))


def default_steps_per_epoch(sets: list[TrainingSet], tile: int, batch_size: int) -> int:
    """Steps that draw, on average, as many tiles as cover the training area once
    (at the model's pixel size)."""
    area = sum(math.prod(region_shape(r, hw, s.factor)) for s in sets for r, hw in zip(s.regions, s.shapes))
    return max(1, math.ceil(area / tile**2 / batch_size))
