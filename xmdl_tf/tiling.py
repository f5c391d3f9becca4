"""Tile grids and tapered, blended stitching for whole-slice inference (NumPy only).

A slice of any size is covered by tiles of size (th, tw) that overlap by
`overlap` pixels. Each tile's prediction is weighted by a window that is zero
in a `margin` along edges shared with a neighbour (where zero padding inside
the network corrupts the output), rises smoothly (Hann ramp) over the rest of
the overlap and is one elsewhere; along the slice border the window stays one,
because there is no neighbour to hand over to. Dividing the accumulated sum by
the accumulated weights gives the stitched map. With `margin` at least half
the network's receptive field the result equals a prediction of the whole
slice at once away from the slice border (checked in the tests).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterator

import numpy as np


def ceil_to(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


# Largest tile area x base filters a model is run on in one call. TensorFlow's oneDNN kernels
# (on by default in xmdl_tf) leave their fast convolution for a slow reference one beyond some
# size: the 16-filter reference model runs a 1792-px tile at 0.42 Mpx/s and a 1888-px one at
# 0.018 (193 s; oneDNN's log puts it in the 128-channel convolution at the third decoder
# level), and 8 filters ran up to 2816 px at full speed (`benchmarks/bench_tile_sizes.py`).
# Keeping tile^2 x filters at or under that of 16 filters x 1792 px (an activation-size bound,
# measured for 8 and 16 filters) caps 16 filters at 1792 px and wider models below.
MAX_TILE_AREA_FILTERS = 16 * 1792 * 1792


def max_tile(base_filters: int, divisor: int = 32) -> int:
    """Largest tile side (px, a multiple of `divisor`) to run a model of `base_filters` on."""
    side = int((MAX_TILE_AREA_FILTERS / max(base_filters, 1)) ** 0.5)
    return max(divisor, side // divisor * divisor)


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with >= `overlap` overlap.

    As few tiles as the overlap allows, spread evenly: any slack (from rounding
    the tile size) becomes extra overlap on every seam instead of one tile
    hanging over the last. Starts are multiples of `align` (the last one too
    when `length` is): a network with k poolings by 2 is shift-equivariant only
    for shifts by multiples of 2**k, so aligned tiles see the same pooling grid
    as a one-pass prediction of the whole slice.
    """
    if tile >= length:
        return [0]
    if overlap < 0:
        raise ValueError(f"overlap {overlap} must be 0 or more pixels")
    if tile - overlap <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile size {tile}")
    n = -(-(length - overlap) // (tile - overlap))
    while True:
        starts = [align * round(i * (length - tile) / (n - 1) / align) for i in range(n - 1)] + [length - tile]
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        n += 1  # snapping widened a step beyond the overlap: one more tile


def seam_overlap(starts: list[int], tile: int) -> int:
    """Smallest overlap between neighbouring tiles (0 for a single tile)."""
    if len(starts) < 2:
        return 0
    return tile - max(b - a for a, b in zip(starts, starts[1:]))


def _ramp(n: int) -> np.ndarray:
    # Hann half-window: ramp(i) + ramp(n-1-i) == 1, so neighbours' weights sum to one.
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)).astype(np.float32)


def window_1d(tile: int, overlap: int, margin: int, left: bool, right: bool) -> np.ndarray:
    """Weights along one axis; `left`/`right` say whether that side has a neighbour."""
    w = np.ones(tile, np.float32)
    ramp_len = max(overlap - 2 * margin, 1)
    if left:
        w[:margin] = 0.0
        w[margin: margin + ramp_len] = _ramp(ramp_len)
    if right:
        w[tile - margin:] = 0.0
        w[tile - margin - ramp_len: tile - margin] = _ramp(ramp_len)[::-1]
    return w


def fit_tile(length: int, tile: int, overlap: int, divisor: int) -> int:
    """Smallest tile (multiple of `divisor`, <= `tile`) covering `length` with as few tiles as `tile` needs.

    A fixed tile size wastes compute when the last tile hangs mostly over
    already covered pixels (4096 px with 1024-px tiles and 64-px overlap needs
    5 tiles of which the last adds little); spreading the same number of tiles
    evenly shrinks each one (to 896 px there).
    """
    if tile >= length:
        return ceil_to(length, divisor)
    n = -(-(length - overlap) // (tile - overlap))
    return min(tile, ceil_to(-(-(length + (n - 1) * overlap) // n), divisor))


def plan_tiles(shape: tuple[int, int], tile: int, overlap: int, divisor: int) -> tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]:
    """Tile size (th, tw), padded slice shape and the tile origins for a slice of `shape`.

    The tile shrinks to the slice (rounded up to `divisor`) for small slices
    and is evened out over large ones (`fit_tile`); the slice is padded only
    when it is smaller than one tile.
    """
    if tile % divisor:
        raise ValueError(f"tile size {tile} is not divisible by the model's size divisor {divisor}")
    overlap = min(overlap, tile // 2)  # more would make every pixel covered three times
    h, w = shape
    th, tw = fit_tile(h, tile, overlap, divisor), fit_tile(w, tile, overlap, divisor)
    ph, pw = max(h, th), max(w, tw)
    ov_h, ov_w = min(overlap, th // 2), min(overlap, tw // 2)
    origins = [(y, x) for y in tile_starts(ph, th, ov_h, divisor) for x in tile_starts(pw, tw, ov_w, divisor)]
    return (th, tw), (ph, pw), origins


def iter_batches(items: list, batch_size: int) -> Iterator[list]:
    for i in range(0, len(items), batch_size):
        yield items[i: i + batch_size]


# Pixels per batch when the batch size is left to us: four 512 x 512 tiles.
# Large tiles go one at a time, which bounds memory on CPUs and small GPUs.
AUTO_BATCH_PIXELS = 4 * 512 * 512


def auto_batch_size(tile_shape: tuple[int, int], pixels: int = AUTO_BATCH_PIXELS) -> int:
    """Tiles per batch for tiles of `tile_shape` (at least one)."""
    return max(1, pixels // (tile_shape[0] * tile_shape[1]))


def default_margin(overlap: int) -> int:
    """Zero-weight band along shared tile edges: 3/8 of the overlap, the rest (1/4) is the Hann ramp.

    Measured on the reference model (`benchmarks/bench_inference.py`, context
    section): a tile's mask differs from the one-pass whole-slice mask on ~2%
    of pixels within 16 px of a cut edge, ~0.4% at 16-64 px and <0.05% beyond
    96 px. Discarding most of the overlap and ramping over a short band keeps
    only well-contexted pixels.
    """
    return (3 * overlap) // 8


def predict_tiled(predict_batch: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile: int = 512,
                  overlap: int = 64, divisor: int = 32, batch_size: int | None = None, margin: int | None = None,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Stitch a per-tile prediction over a whole slice.

    predict_batch: maps float32 (n, th, tw, K) to float32 (n, th, tw, C);
        return only the channels you need, blending cost is linear in C.
    image: float32 (H, W) or (H, W, K), already normalised (extra input
        channels, e.g. a Grad-CAM target region, are tiled with the image).
    batch_size: tiles per call (default: `auto_batch_size` of the tile shape).
    margin: zero-weight band in px along shared edges (default `default_margin`).
    Returns float32 (H, W, C).
    Memory is O(H * W * C), independent of the number of tiles.
    """
    if image.ndim == 2:
        image = image[..., None]
    h, w = image.shape[:2]
    (th, tw), (ph, pw), origins = plan_tiles((h, w), tile, overlap, divisor)
    if (ph, pw) != (h, w):
        image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric")
    batch_size = batch_size or auto_batch_size((th, tw))
    # Windows follow the overlap the plan delivers (>= the one asked for), capped
    # so that the bands of a tile's two sides never meet.
    ov_h = min(seam_overlap(sorted({y for y, _ in origins}), th), th // 2)
    ov_w = min(seam_overlap(sorted({x for _, x in origins}), tw), tw // 2)
    m_h = default_margin(ov_h) if margin is None else min(margin, ov_h // 2)
    m_w = default_margin(ov_w) if margin is None else min(margin, ov_w // 2)

    @lru_cache(maxsize=None)  # one window per combination of neighbours, at most 9 distinct
    def windows(top: bool, bottom: bool, left: bool, right: bool) -> np.ndarray:
        return window_1d(th, ov_h, m_h, top, bottom)[:, None] * window_1d(tw, ov_w, m_w, left, right)[None, :]

    acc: np.ndarray | None = None
    wsum = np.zeros((ph, pw), np.float32)
    for batch in iter_batches(origins, batch_size):
        x = np.stack([image[y: y + th, x0: x0 + tw] for y, x0 in batch]).astype(np.float32, copy=False)
        out = np.asarray(predict_batch(x), np.float32)  # may be a read-only view of a tensor
        if acc is None:
            acc = np.zeros((ph, pw, out.shape[-1]), np.float32)
        for (y, x0), o in zip(batch, out):
            wgt = windows(y > 0, y + th < ph, x0 > 0, x0 + tw < pw)
            acc[y: y + th, x0: x0 + tw] += o * wgt[..., None]
            wsum[y: y + th, x0: x0 + tw] += wgt
        if progress is not None:
            progress(len(batch))
    assert acc is not None
    np.maximum(wsum, 1e-12, out=wsum)
    acc /= wsum[..., None]
    return acc[:h, :w]


def check_width(shape: tuple[int, ...], factor: float, divisor: int, what: str = "image") -> None:
    """DataError when (H, W) `shape`, resampled by `factor` to the model's grid, is narrower than the
    model's size divisor (2**(depth-1) px): padded up to one tile it would "work", but every object
    in so thin a strip is cut by its edge."""
    if min(shape) * factor < divisor:
        from .io import DataError

        grid = f" (x{factor:.3g} on the model's grid)" if factor != 1 else ""
        raise DataError(f"{what} of {shape[0]} x {shape[1]} px{grid}: narrower than {divisor} px, "
                        "the least the model can segment")
