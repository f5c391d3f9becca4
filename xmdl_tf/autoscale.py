"""The scale of a slice whose pixel size nobody knows, estimated from the mitochondria the model sees.

A model learns mitochondria at the sizes its training sets show them at its
pixel size; shown objects half or twice as wide, it misses many (the
leave-one-set-out zoom sweeps in models/README.md: a grid off by x2 costs up
to 0.5 F1). A slice that states no pixel size, and gets none, is predicted on
its own grid as if it were the model's. With `InferenceConfig.auto_zoom`
(on by default; `--no-auto-zoom`) `analyze` and `evaluate` do instead what
cellpose does for cell diameters: one quick pass (no test-time augmentation)
on the slice's own grid, the median width of the objects found (twice the
largest inscribed radius), and, if that lies outside the widths the model
finds on its own validation sets (`InferenceConfig.object_width_px`, measured
by `python -m xmdl_tf.tune`) by more than `TOLERANCE`, the zoom that brings
it to the nearest end of that range; a second pass at that zoom checks that
the objects followed it (`followed`: else back to zoom 1) and refines it
once. The zoom only resamples the slice for prediction: objects are still
measured in the slice's own pixels, since a scale read off the objects cannot
say how large they are.

Why the check (`benchmarks/auto_zoom.py`, models/README.md "Auto zoom"): on
data like its own the model's objects have the right widths and the zoom
comes out right; on a microscope it never saw, its objects are often
fragments of the size it prefers, whatever the true size, and without the
check the zoom went the wrong way (zero-shot F1 0.491 -> 0.398 over slices
shown at x0.5-2; with it 0.503).

Zoom search (`InferenceConfig.zoom_search`: "off", "always", or "ood" for the
slices the model's out-of-distribution score warns about; `search_zoom`): a
second way, which needs no widths and applies to slices of known pixel size too.
A crop of the slice is predicted at x0.5, 0.71, 1, 1.41 and 2 the grid its pixel
size asks for, and the zoom at which the model is surest of what it marks (the
mean probability of its foreground pixels, on the grid it predicted on) is kept.
On leave-one-set-out models that zoom beat zoom 1 on every left-out set
(`benchmarks/zoom_search.py`, models/README.md "Zoom search"): a model that
never saw a microscope reads it best where its objects' rims are sharpest.

NumPy only; `estimate_zoom` and `search_zoom` take the prediction as a callable.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

# Widths within [lo / TOLERANCE, hi * TOLERANCE] of the model's range are left alone: the model
# trained with random zooms of x0.5-2, so a small mismatch costs nothing, and a dead band keeps
# slices of one stack from being zoomed by a few percent each for nothing.
TOLERANCE = 1.25
MAX_ZOOM = 4.0  # beyond x4 either way the objects found are too few or too wrong to trust a size
MIN_OBJECTS = 5  # fewer objects than this say nothing about the slice's scale
PASSES = 2  # the first estimate and one refinement, as cellpose refines its diameter once
# At the second pass the objects' width must have moved by at least half the zoom (log terms):
# fragments of the size a model prefers, found where it does not recognise the objects, do not.
FOLLOW = 0.5
SEARCH_ZOOMS = (0.5, 0.71, 1.0, 1.41, 2.0)  # the zooms of benchmarks/zoom_search.py
SEARCH_SIDE = 1024  # px of the model's grid at zoom 1: the crop the search predicts (x0.25-4 of its area)


def object_widths(mask: np.ndarray, min_px: int = 30) -> np.ndarray:
    """Widths (px, float64 (N,)) of the connected components of `mask` (H, W) with at least
    `min_px` pixels: twice the largest inscribed radius (Euclidean distance to the background).

    For an elongated mitochondrion this is its width, not its length, and it does not depend on
    how much of the object the slice cuts off along its length.
    """
    import cv2

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if m.ndim != 2:
        raise ValueError(f"object_widths: mask must be 2-D, got shape {m.shape}")
    n, comp, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(0)
    # Pad with background: OpenCV counts outside the image as foreground, so an object cut by the
    # border would otherwise be measured as if it went on beyond it.
    dist = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    inscribed = np.zeros(n, np.float64)
    np.maximum.at(inscribed, comp.ravel(), dist.ravel())
    keep = stats[1:, cv2.CC_STAT_AREA] >= max(int(min_px), 1)
    # (The distance runs from a pixel's centre to the nearest background pixel's centre, so a
    # straight band W px wide measures W + 1: the same for the reference and the estimate.)
    return 2.0 * inscribed[1:][keep]


def median_width(widths: Iterable[np.ndarray]) -> float:
    """Median of the concatenated widths (px); NaN when there are none."""
    w = np.concatenate([np.asarray(x, np.float64).ravel() for x in widths] or [np.zeros(0)])
    return float(np.median(w)) if w.size else float("nan")


def predicted_width(predictions: Iterable[tuple[np.ndarray, float]], threshold: float, min_px: int = 30) -> float:
    """Median width, in model px, of the objects of one set's predictions: (probability (H, W) on
    the slice's own grid, the slice's resample factor to the model's pixel size) pairs, objects at
    probability >= threshold with at least `min_px` model px."""
    return median_width(object_widths(p >= threshold, max(1, round(min_px / f ** 2))) * f for p, f in predictions)


def width_range(per_set: dict[str, float]) -> tuple[float, float] | None:
    """(smallest, largest) of the sets' median widths (model px), rounded to 0.1 px; None if none is known."""
    v = [float(w) for w in per_set.values() if w is not None and np.isfinite(w) and w > 0]
    return (round(min(v), 1), round(max(v), 1)) if v else None


def zoom_towards(width: float, reference: tuple[float, float], tolerance: float = TOLERANCE) -> float:
    """Zoom that brings objects of median `width` (model px) into `reference` (lo, hi): 1 while
    `width` lies within [lo / tolerance, hi * tolerance], else lo / width or hi / width."""
    lo, hi = reference
    if not 0 < lo <= hi:
        raise ValueError(f"reference widths {reference}: need 0 < lo <= hi")
    if not np.isfinite(width) or width <= 0:
        return 1.0
    if width < lo / tolerance:
        return lo / width
    if width > hi * tolerance:
        return hi / width
    return 1.0


@dataclass(frozen=True)
class ZoomEstimate:
    """The zoom chosen for one slice (1 = its own grid) and what it was read from.

    widths: the median object width (model px) found at each pass; objects: how many the last
    pass measured; reason: why the estimate stopped ("in range", "too few objects", "refined",
    "capped at x4", or, back at zoom 1, "objects did not follow the zoom" / "objects lost at the
    zoom"; from `search_zoom`: "surest at ..." or "nothing found at any zoom").
    scores: `search_zoom`'s score (`mean_foreground_probability`) at each of its zooms, in their
    order (its widths are empty and objects 0: it measures no widths); () from `estimate_zoom`.
    probability: the pass's foreground probability (H, W) float32 without test-time augmentation
    at the chosen zoom, when one was made there (`prediction_grid`), for a caller that predicts
    the slice the same way to reuse; None otherwise.
    """

    zoom: float
    widths: tuple[float, ...]
    objects: int
    reason: str
    scores: tuple[float, ...] = ()
    probability: np.ndarray | None = field(default=None, repr=False, compare=False)


def estimate_zoom(predict: Callable[[float], np.ndarray], threshold: float, reference: tuple[float, float],
                  min_px: int = 30, passes: int = PASSES, tolerance: float = TOLERANCE,
                  max_zoom: float = MAX_ZOOM) -> ZoomEstimate:
    """Estimate the zoom at which a slice's mitochondria look as wide as the model's own.

    predict(zoom): the slice's foreground probability (H, W), float, on the slice's own grid,
    predicted with the slice resampled by `zoom` (1 = as it is).
    threshold: foreground is probability >= threshold.
    reference: (lo, hi) median object widths, model px, of the model's validation sets.
    min_px: smallest object counted, in model px (at zoom z, min_px / z^2 slice px).
    """
    zoom, widths, n, reason = 1.0, [], 0, "too few objects"
    previous = 1.0
    for k in range(max(passes, 1)):
        prob = np.asarray(predict(zoom))
        w = object_widths(prob >= threshold, max(1, round(min_px / zoom ** 2))) * zoom  # in model px
        if len(w) < MIN_OBJECTS:
            if k > 0:  # real objects brought towards the model's sizes do not vanish
                zoom, reason = 1.0, "objects lost at the zoom"
            break
        n = len(w)
        widths.append(round(float(np.median(w)), 2))
        if k > 0 and not followed(widths[-2], widths[-1], zoom / previous):
            zoom, reason = 1.0, "objects did not follow the zoom"
            break
        step = zoom_towards(widths[-1], reference, tolerance)
        if step == 1.0:
            reason = "in range" if k == 0 else "refined"
            break
        # Rounded as reported, so that a pass made at the chosen zoom is the prediction at that zoom.
        previous, zoom = zoom, round(float(np.clip(zoom * step, 1.0 / max_zoom, max_zoom)), 4)
        reason = f"capped at x{max_zoom:g}" if zoom in (1.0 / max_zoom, max_zoom) else "refined"
    return ZoomEstimate(zoom, tuple(widths), n, reason)


def mean_foreground_probability(prob: np.ndarray, threshold: float, min_px: int = 30) -> float:
    """Mean probability of the pixels at or above `threshold` in objects (8-connected) of at least
    `min_px` pixels of `prob` (H, W); 0 when there are none."""
    import cv2

    fg = np.ascontiguousarray(prob >= threshold, np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= max(int(min_px), 1)
    inside = keep[comp]
    return float(prob[inside].mean()) if inside.any() else 0.0


def search_zoom(predict: Callable[[float], np.ndarray], threshold: float, zooms: Iterable[float] = SEARCH_ZOOMS,
                min_px: int = 30) -> ZoomEstimate:
    """The zoom, among `zooms`, at which the model is surest of what it marks.

    predict(zoom): foreground probability (h, w) float *on the grid the model predicted on*
    (the slice, or a crop of it, resampled by `zoom`): mapped back to the slice's grid, a zoomed
    prediction is smoothed by the interpolation, which would favour zoom 1 for nothing.
    The score is `mean_foreground_probability` (objects of at least `min_px` model px); ties
    and slices where nothing is found keep zoom 1. The estimate's `widths` holds the scores,
    in the order of `zooms`.
    """
    zooms = [float(z) for z in zooms]
    if not zooms or min(zooms) <= 0:
        raise ValueError(f"search zooms {zooms}: need positive zooms")
    scores = [mean_foreground_probability(np.asarray(predict(z)), threshold, min_px) for z in zooms]
    rounded = tuple(round(v, 5) for v in scores)
    if max(scores) == 0.0:
        return ZoomEstimate(1.0, (), 0, "nothing found at any zoom", rounded)
    best = max(range(len(zooms)), key=lambda i: (scores[i], zooms[i] == 1.0))
    at1 = scores[zooms.index(1.0)] if 1.0 in zooms else float("nan")
    return ZoomEstimate(zooms[best], (), 0,
                        f"surest at x{zooms[best]:g} (mean foreground probability {scores[best]:.4f}, "
                        f"{at1:.4f} at x1)", rounded)


def followed(before: float, after: float, zoom: float, share: float = FOLLOW) -> bool:
    """Did objects of median width `before` (model px) follow a zoom by `zoom` to `after`?

    Real objects grow by the zoom (in model px); what a model finds where it does not recognise
    the objects (fragments and other structures of the size it prefers) stays about as wide. True
    when the width changed by at least `share` of the zoom, in log terms, and the same way.
    """
    if zoom == 1.0:
        return True
    return float(np.log(after / before) / np.log(zoom)) >= share


def enabled(predictor, inference) -> bool:
    """Whether slices of unknown pixel size get a zoom estimate with `predictor` and `inference`:
    auto_zoom and rescale on, object_width_px measured, and a model that states its pixel size."""
    return bool(inference.auto_zoom and inference.rescale and inference.object_width_px
                and getattr(predictor, "pixel_size_nm", None))


def prediction_grid(predictor, image: np.ndarray, inference, pixel_size_nm: float | None,
                    keep_probability: bool = False, unlike: bool | None = None
                    ) -> tuple[float | None, ZoomEstimate | None]:
    """The pixel size to predict a slice at, and the zoom estimate behind it (None if none was made).

    A known `pixel_size_nm` is returned as it is. For an unknown one, with `inference.auto_zoom`
    and a model that states its pixel size and `inference.object_width_px`, the slice's zoom is
    estimated (`estimate_zoom`, passes of `predictor.predict_slice` without test-time
    augmentation) and returned as the pixel size that makes `predict_slice` resample by it
    (model pixel size x zoom; None at zoom 1). Measurements stay in the slice's pixels: pass the
    grid to prediction only, and the objects' minimum size through `for_objects`. Off with
    `inference.rescale` False (predict on the slice's own grid). keep_probability: return the
    pass made at the chosen zoom in the estimate (`ZoomEstimate.probability`), for a caller
    that would predict the slice that way again. unlike: whether the model's OOD score warns about the
    slice, when the caller has it (else `unlike_training` reads it, for `zoom_search` "ood").
    """
    ic = inference
    if ic.zoom_search != "off" and ic.rescale and getattr(predictor, "pixel_size_nm", None):
        if unlike is None and ic.zoom_search == "ood":
            unlike = unlike_training(predictor, image, pixel_size_nm, ic.rescale)
        if ic.zoom_search == "always" or unlike:
            return _searched_grid(predictor, image, ic, pixel_size_nm)
    # Otherwise (data like the model's own under "ood"): auto zoom, for an unknown pixel size.
    if pixel_size_nm or not enabled(predictor, ic):
        return pixel_size_nm, None
    model_px = predictor.pixel_size_nm

    passes: dict[float, np.ndarray] = {}

    def predict(zoom: float) -> np.ndarray:
        prob = predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=False,
                                       pixel_size_nm=grid_of(model_px, zoom), rescale=True)
        if keep_probability:  # else no pass outlives the estimate
            passes[zoom] = prob
        return prob

    est = estimate_zoom(predict, ic.threshold, tuple(ic.object_width_px), ic.min_size_px)
    log.info("auto zoom x%.3g (median widths %s model px, %d objects, %s)", est.zoom, est.widths, est.objects,
             est.reason)
    return grid_of(model_px, est.zoom), dataclasses.replace(est, probability=passes.get(est.zoom))


def unlike_training(predictor, image: np.ndarray, pixel_size_nm: float | None, rescale: bool = True) -> bool:
    """Whether the model's out-of-distribution score (`ood.npz` beside it) warns about the slice at
    the grid its pixel size asks for; False for a model without one (nothing says it is unlike)."""
    from .ood import model_distribution

    dist = model_distribution(predictor)
    if dist is None:
        return False
    return bool(dist.image_score(predictor, image, pixel_size_nm, rescale) > dist.threshold)


def _searched_grid(predictor, image: np.ndarray, ic, pixel_size_nm: float | None
                   ) -> tuple[float | None, ZoomEstimate]:
    """`prediction_grid` with `InferenceConfig.zoom_search`: the grid of `search_zoom` on a centred
    crop of at most SEARCH_SIDE model px (at zoom 1) of the slice, predicted without TTA."""
    from .sampling import grey_counts, resample_image

    factor = predictor.scale_factor(pixel_size_nm, ic.rescale)  # the slice's own resample to the model
    side = max(1, int(round(SEARCH_SIDE / factor)))
    h, w = image.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    crop = image[y0:y0 + side, x0:x0 + side]
    # The crop normalised as the whole slice is (its grey-value histogram), whatever it holds.
    counts = grey_counts(image) if np.issubdtype(image.dtype, np.integer) else None

    def predict(zoom: float) -> np.ndarray:
        f = factor * zoom
        shown = crop if f == 1.0 else resample_image(crop, f)
        return predictor.predict_slice(shown, ic.tile, ic.overlap, ic.batch_size, tta=False, pixel_size_nm=None,
                                       rescale=False, counts=counts)

    est = search_zoom(predict, ic.threshold, SEARCH_ZOOMS, ic.min_size_px)
    log.info("zoom search x%.3g (%s)", est.zoom, est.reason)
    base = pixel_size_nm if pixel_size_nm else predictor.pixel_size_nm
    return (pixel_size_nm if est.zoom == 1.0 else float(base) * est.zoom), est


def grid_of(model_px: float, zoom: float) -> float | None:
    """The pixel size (nm) at which `Predictor.scale_factor` resamples a slice by `zoom`; None at 1."""
    return None if zoom == 1.0 else float(model_px) * float(zoom)


def for_objects(inference, estimate: ZoomEstimate | None):
    """`inference` with its minimum object sizes for data of unknown pixel size (model px and voxels)
    expressed in the data's own pixels when `estimate` zoomed it in-plane: min_size_px / zoom^2 and
    min_volume_vox / zoom^2 (a volume is zoomed in XY only)."""
    if estimate is None or estimate.zoom == 1.0:
        return inference
    a = estimate.zoom ** 2
    return dataclasses.replace(inference, min_size_px=max(1, int(round(inference.min_size_px / a))),
                               min_volume_vox=max(1, int(round(inference.min_volume_vox / a))))
