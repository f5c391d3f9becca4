"""Synthetic EM slices whose every mitochondrion is known.

Each slice is a textured cytoplasm crossed by cell membranes, with vesicles,
noise and blur, and mitochondria drawn as darker bodies with a double outer
membrane and cristae-like stripes. Objects come in the five shape classes the
toolkit reports, built in physical units (nm) at ``pixel_size_nm`` and kept
well inside each class's band (area in um^2, moment-ellipse aspect ratio
major/minor, solidity = area / convex-hull area):

=============  ==============================================================
fragmented     small round/oval bodies, area 0.008-0.022 um^2
round          ellipse, aspect ratio 1.0-1.2, area 0.10-0.30 um^2
elongated      convex ellipse, aspect ratio 1.9-2.4, area 0.10-0.35, solidity > 0.92
tubular        straight or gently bent tube, aspect ratio >= 4.5, area >= 0.10,
               solidity > 0.85 (measured as skimage does)
irregular      branched Y/T/star (3-5 arms) or a strongly bent cup,
               solidity < 0.65, area >= 0.10
=============  ==============================================================

Objects never overlap; a ``touching_fraction`` of them is pushed against an
earlier one until they share an edge (4-connected, different ids). Objects
lie wholly inside the slice so their measured geometry is the drawn one.

Same seed, same slice: geometry, texture and noise use separate random
streams, so changing ``appearance`` alters only grey values, never labels.

    python -m data_prep.synthetic --out data/synthetic --n 20 --size 1024 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from data_prep import _common as c
from xmdl_tf.cli import add_debug, fraction, guarded, pixel_size, positive_int

SHAPE_CLASSES = ("round", "elongated", "tubular", "fragmented", "irregular")
OBJECTS_PER_UM2 = 0.9  # about the density of the real ssTEM slices
_PLACE_ORDER = ("irregular", "tubular", "elongated", "round", "fragmented")  # big first packs better
_GAP_PX = 3  # clearance kept around objects that are not meant to touch


@dataclasses.dataclass(frozen=True)
class Appearance:
    """Grey-value look of a slice; changes no geometry.

    invert: swap dark and bright (as in some SBEM data).
    contrast: multiplies deviations from the mean grey (1 = default look).
    brightness: added to every pixel, in grey levels.
    noise: standard deviation of the Gaussian noise, in grey levels.
    blur: sigma of the Gaussian blur, in pixels (0 = none).
    """

    invert: bool = False
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 10.0
    blur: float = 1.0

    @classmethod
    def coerce(cls, value: "Appearance | dict | None") -> "Appearance":
        """Accept None (defaults), a dict of fields, or an Appearance; unknown keys are an error."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown appearance keys {sorted(unknown)}; allowed: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**value)


# ---------------------------------------------------------------------------
# Shapes: boolean masks in a local patch, built in nm and measured in px


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x right, y up) of a (2h+1)^2 patch centred on 0."""
    r = np.arange(-half, half + 1, dtype=np.float32)
    return r[None, :], -r[:, None]


def _rotate(x: np.ndarray, y: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a direction ``theta`` (radians, ccw from x)."""
    ct, st = math.cos(theta), math.sin(theta)
    return x * ct + y * st, -x * st + y * ct


def _superellipse(a: float, b: float, p: float, theta: float) -> np.ndarray:
    x, y = _grid(int(math.ceil(max(a, b))) + 2)
    u, v = _rotate(x, y, theta)
    return (np.abs(u / a) ** p + np.abs(v / b) ** p) <= 1.0


def _segment_distance(x: np.ndarray, y: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.hypot(x - (p0[0] + t * d[0]), y - (p0[1] + t * d[1]))


def _polyline_mask(points: np.ndarray, radius: float, half: int) -> np.ndarray:
    """Pixels within ``radius`` of a polyline (N, 2) of (x, y) points: a tube with round caps."""
    x, y = _grid(half)
    dist = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf, dtype=np.float32)
    for p0, p1 in zip(points[:-1], points[1:]):
        dist = np.minimum(dist, _segment_distance(x, y, p0, p1))
    return dist <= radius


def _arc(length: float, bend: float, theta: float, n: int = 24) -> np.ndarray:
    """(n, 2) points of a circular arc of ``length`` turning by ``bend`` radians,
    centred on its midpoint, chord along ``theta``."""
    s = np.linspace(-length / 2, length / 2, n)
    if abs(bend) < 1e-6:
        u, v = s, np.zeros_like(s)
    else:
        radius = length / bend
        u, v = radius * np.sin(s / radius), radius * (1 - np.cos(s / radius))
    v = v - v.mean()
    ct, st = math.cos(theta), math.sin(theta)
    return np.stack([u * ct - v * st, u * st + v * ct], axis=1)


def _measure(mask: np.ndarray) -> tuple[int, float, float]:
    """(area px, moment-ellipse aspect ratio, solidity) of a patch mask, as skimage measures them."""
    rows, cols = np.nonzero(mask)
    area = rows.size
    if area < 5:
        return area, 1.0, 1.0
    evals = np.linalg.eigvalsh(np.cov(np.stack([rows, cols]).astype(np.float64), bias=True))
    ratio = math.sqrt(max(evals[1], 1e-12) / max(evals[0], 1e-12))
    hull = cv2.convexHull(np.stack([cols, rows], axis=1).astype(np.int32))
    hull_img = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull_img, hull, 1)
    return area, ratio, area / max(int(hull_img.sum()), area)


def _design(shape_class: str, rng: np.random.Generator, nm: float) -> dict:
    """One candidate object of ``shape_class``: mask and the parameters used.

    ``nm`` is the pixel size; lengths below are drawn in nm and divided by it.
    """
    theta = rng.uniform(-math.pi / 2, math.pi / 2)
    if shape_class in ("round", "fragmented", "elongated"):
        if shape_class == "round":
            area, ratio, p = rng.uniform(0.11, 0.28), rng.uniform(1.0, 1.15), 2.0
        elif shape_class == "fragmented":
            area, ratio, p = rng.uniform(0.009, 0.02), rng.uniform(1.0, 1.5), 2.0
        else:
            area, ratio, p = rng.uniform(0.11, 0.32), rng.uniform(2.0, 2.3), rng.uniform(2.0, 2.4)
        b = math.sqrt(area * 1e6 / (math.pi * ratio)) / nm  # semi-minor axis, px
        a = b * ratio
        return dict(mask=_superellipse(a, b, p, theta), variant="ellipse", length=2 * a, width=2 * b,
                    theta=theta, n_branches=1)
    if shape_class == "tubular":
        width = rng.uniform(130, 180) / nm
        length = width * rng.uniform(5.5, 8.0)
        bend = rng.uniform(-0.45, 0.45)
        points = _arc(length - width, bend, theta)
        half = int(math.ceil(np.abs(points).max() + width)) + 2
        return dict(mask=_polyline_mask(points, width / 2, half), variant="tube", length=length, width=width,
                    theta=theta, n_branches=1)
    if shape_class == "irregular":
        width = rng.uniform(100, 140) / nm
        if rng.random() < 0.25:
            # A cup: a thick arc bent by 200-260 degrees, strongly concave.
            radius = rng.uniform(170, 240) / nm
            sweep = math.radians(rng.uniform(200, 260))
            points = _arc(radius * sweep, sweep, theta, n=40)
            half = int(math.ceil(np.abs(points).max() + width)) + 2
            return dict(mask=_polyline_mask(points, width / 2, half), variant="cup", length=radius * sweep + width,
                        width=width, theta=theta, n_branches=1)
        n_arms = int(rng.choice([3, 3, 4, 5]))
        angles = theta + np.cumsum(np.r_[0.0, rng.uniform(0.75, 1.25, n_arms - 1) * 2 * math.pi / n_arms])
        lengths = rng.uniform(320, 520, n_arms) / nm
        half = int(math.ceil(lengths.max() + width)) + 2
        x, y = _grid(half)
        mask = np.hypot(x, y) <= width * 0.75  # a small hub where the arms meet
        for angle, arm in zip(angles, lengths):
            tip = np.array([arm * math.cos(angle), arm * math.sin(angle)], dtype=np.float32)
            mask |= _polyline_mask(np.stack([np.zeros(2, np.float32), tip]), width / 2, half)
        return dict(mask=mask, variant="star", length=2 * lengths.max() + width, width=width,
                    theta=float(angles[0]), n_branches=n_arms)
    raise ValueError(f"unknown shape class '{shape_class}'; expected one of {SHAPE_CLASSES}")


def _in_band(shape_class: str, area_um2: float, ratio: float, solidity: float) -> bool:
    """The generator's own acceptance bands (inside the classifier's rules)."""
    if shape_class == "fragmented":
        return area_um2 < 0.025 and ratio < 1.6
    if shape_class == "round":
        return 0.09 <= area_um2 <= 0.35 and ratio <= 1.2
    if shape_class == "elongated":
        return area_um2 >= 0.09 and 1.9 <= ratio <= 2.45 and solidity > 0.92
    if shape_class == "tubular":
        return area_um2 >= 0.09 and ratio >= 4.5 and solidity > 0.88
    return area_um2 >= 0.09 and solidity < 0.65  # irregular


def make_object(shape_class: str, rng: np.random.Generator, pixel_size_nm: float) -> dict:
    """Draw an object of ``shape_class`` until it lies inside the class band.

    Returns the patch mask (bool, odd square) and its designed and measured
    geometry (px, degrees, um^2).
    """
    for _ in range(50):
        obj = _design(shape_class, rng, pixel_size_nm)
        area, ratio, solidity = _measure(obj["mask"])
        area_um2 = area * pixel_size_nm**2 / 1e6
        if _in_band(shape_class, area_um2, ratio, solidity):
            return {**obj, "area_px": area, "area_um2": area_um2, "aspect_ratio": ratio, "solidity": solidity}
    raise RuntimeError(f"could not draw a '{shape_class}' object at {pixel_size_nm} nm/px "
                       "(pixel size too coarse for the class geometry?)")


# ---------------------------------------------------------------------------
# Placement


def _fits(instances: np.ndarray, mask: np.ndarray, r0: int, c0: int) -> bool:
    h, w = mask.shape
    return r0 >= 1 and c0 >= 1 and r0 + h <= instances.shape[0] - 1 and c0 + w <= instances.shape[1] - 1


def _free(instances: np.ndarray, mask: np.ndarray, r0: int, c0: int) -> bool:
    h, w = mask.shape
    return not instances[r0:r0 + h, c0:c0 + w][mask].any()


def _place_free(instances: np.ndarray, grown: np.ndarray, rng: np.random.Generator,
                tries: int = 300) -> tuple[int, int] | None:
    """Top-left corner for ``grown`` (the mask padded and dilated by the clearance), or None."""
    h, w = grown.shape
    if h >= instances.shape[0] - 1 or w >= instances.shape[1] - 1:
        return None
    for _ in range(tries):
        r0 = int(rng.integers(1, instances.shape[0] - h))
        c0 = int(rng.integers(1, instances.shape[1] - w))
        if _free(instances, grown, r0, c0):
            return r0, c0
    return None


def _place_touching(instances: np.ndarray, mask: np.ndarray, target_rc: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int] | None:
    """Start on top of an existing object and slide along one axis in 1 px
    steps until free: the last overlap guarantees a shared (4-connected) edge."""
    h, w = mask.shape
    step = [(0, 1), (0, -1), (1, 0), (-1, 0)][int(rng.integers(4))]
    r0, c0 = int(target_rc[0]) - h // 2, int(target_rc[1]) - w // 2
    while _fits(instances, mask, r0, c0):
        if _free(instances, mask, r0, c0):
            return r0, c0
        r0, c0 = r0 + step[0], c0 + step[1]
    return None


def _layout(size: int, n_objects: int, touching_fraction: float, pixel_size_nm: float,
            rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Draw and place objects: (instances uint32 (size, size), per-object records)."""
    classes = [SHAPE_CLASSES[i % len(SHAPE_CLASSES)] for i in range(n_objects)]
    classes = [classes[i] for i in rng.permutation(n_objects)]
    classes.sort(key=_PLACE_ORDER.index)
    instances = np.zeros((size, size), np.uint32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * _GAP_PX + 1,) * 2)
    target = round(touching_fraction * n_objects)
    records: list[dict] = []
    touching: set[int] = set()
    for shape_class in classes:
        obj = make_object(shape_class, rng, pixel_size_nm)
        mask = obj["mask"]
        if mask.shape[0] >= size - 2:
            continue
        corner = None
        if records and len(touching) < target:
            # Prefer a partner that is not touching yet, so each contact adds two.
            fresh = [r for r in records if r["id"] not in touching] or records
            partner = fresh[int(rng.integers(len(fresh)))]
            corner = _place_touching(instances, mask, (partner["cy"], partner["cx"]), rng)
        if corner is None:
            grown = cv2.dilate(np.pad(mask, _GAP_PX).astype(np.uint8), kernel).astype(bool)
            corner = _place_free(instances, grown, rng)
            if corner is not None:
                corner = (corner[0] + _GAP_PX, corner[1] + _GAP_PX)
        if corner is None:
            continue  # no room left: the table lists only what was drawn
        r0, c0 = corner
        new_id = len(records) + 1
        window = instances[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
        window[mask] = new_id
        neighbours = _neighbour_ids(instances, mask, r0, c0, new_id)
        if neighbours:
            touching |= neighbours | {new_id}
        rows, cols = np.nonzero(mask)
        records.append({**obj, "id": new_id, "shape_class": shape_class,
                        "cy": r0 + rows.mean(), "cx": c0 + cols.mean()})
    return instances, records


def _neighbour_ids(instances: np.ndarray, mask: np.ndarray, r0: int, c0: int, own: int) -> set[int]:
    """Ids 4-adjacent to the object just written at (r0, c0)."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    padded = np.pad(mask, 1).astype(np.uint8)
    ring = cv2.dilate(padded, cross).astype(bool) & ~padded.astype(bool)
    h, w = padded.shape
    window = instances[r0 - 1:r0 - 1 + h, c0 - 1:c0 - 1 + w]
    ids = set(np.unique(window[ring]).tolist()) - {0, own}
    return ids


def touching_ids(instances: np.ndarray) -> set[int]:
    """Ids that share a 4-connected edge with a different non-zero id."""
    out: set[int] = set()
    for a, b in ((instances[:, :-1], instances[:, 1:]), (instances[:-1, :], instances[1:, :])):
        edge = (a != b) & (a > 0) & (b > 0)
        out |= set(np.unique(a[edge]).tolist()) | set(np.unique(b[edge]).tolist())
    return out


# ---------------------------------------------------------------------------
# Rendering


def _smooth_noise(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale_px`` wide (float32)."""
    small = (max(2, int(shape[0] / scale_px) + 2), max(2, int(shape[1] / scale_px) + 2))
    field = cv2.resize(rng.standard_normal(small).astype(np.float32), (shape[1], shape[0]),
                       interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _membranes(size: int, nm: float, rng: np.random.Generator) -> np.ndarray:
    """Wavy cell boundaries (Voronoi cells about 0.8 um across, warped): float32 in [0, 1]."""
    n_cells = max(2, int((size * nm / 1000) ** 2 / 0.7))
    seeds = np.full((size, size), 255, np.uint8)
    seeds[rng.integers(0, size, n_cells), rng.integers(0, size, n_cells)] = 0
    _, cells = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    amp = 120 / nm
    grid = np.indices((size, size), dtype=np.float32)
    map_y = grid[0] + amp * _smooth_noise((size, size), 400 / nm, rng)
    map_x = grid[1] + amp * _smooth_noise((size, size), 400 / nm, rng)
    cells = cv2.remap(cells.astype(np.float32), map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
    edge = np.zeros((size, size), np.uint8)
    edge[:, 1:] |= (cells[:, 1:] != cells[:, :-1]).astype(np.uint8)
    edge[1:, :] |= (cells[1:, :] != cells[:-1, :]).astype(np.uint8)
    thick = max(1, int(round(18 / nm)))
    edge = cv2.dilate(edge, np.ones((thick, thick), np.uint8))
    return cv2.GaussianBlur(edge.astype(np.float32), (0, 0), max(0.6, 3 / nm))


def _dots(size: int, nm: float, rng: np.random.Generator, per_um2: float, radius_nm: tuple[float, float],
          ring: bool) -> np.ndarray:
    """Small dark dots (ribosome-like) or rings (vesicles): float32 in [0, 1]."""
    layer = np.zeros((size, size), np.float32)
    n = int(per_um2 * (size * nm / 1000) ** 2)
    ys, xs = rng.integers(0, size, n), rng.integers(0, size, n)
    radii = np.maximum(1, np.round(rng.uniform(*radius_nm, n) / nm)).astype(int)
    for y, x, r in zip(ys.tolist(), xs.tolist(), radii.tolist()):
        cv2.circle(layer, (x, y), r, 1.0, 1 if ring else -1, lineType=cv2.LINE_AA)
    return layer


def _render(instances: np.ndarray, records: list[dict], nm: float, rng: np.random.Generator) -> np.ndarray:
    """The noiseless, unblurred slice (float32, grey levels around 150)."""
    size = instances.shape[0]
    img = 172 + 8 * _smooth_noise((size, size), 600 / nm, rng)
    img += 22 * cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), max(0.7, 5 / nm))
    img += 10 * _smooth_noise((size, size), 40 / nm, rng)
    img -= 70 * _dots(size, nm, rng, 450, (5, 10), ring=False)
    img -= 70 * _dots(size, nm, rng, 40, (14, 24), ring=True)

    fg = instances > 0
    fg_u8 = fg.astype(np.uint8)
    # Membranes stop short of mitochondria; some are wrapped by their own
    # neurite membrane, as axonal mitochondria are in the real ssTEM slices.
    outside = cv2.distanceTransform(1 - fg_u8, cv2.DIST_L2, 5)
    wrap = 30 / nm + 25 / nm * (1 + _smooth_noise((size, size), 300 / nm, rng))
    membranes = _membranes(size, nm, rng) * np.clip((outside - wrap - 4) / 4, 0, 1)
    ring = np.clip(1.5 - np.abs(outside - wrap) / max(1.0, 6 / nm), 0, 1)
    wrapped = np.zeros(len(records) + 1, np.float32)
    wrapped[1:] = rng.random(len(records)) < 0.6
    _, nearest = cv2.distanceTransformWithLabels(1 - fg_u8, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    # DIST_LABEL_CCOMP labels the nearest connected object; map it to one id per component.
    comp_to_id = np.zeros(int(nearest.max()) + 1, np.uint32)
    comp_to_id[nearest[fg]] = instances[fg]
    ring *= wrapped[comp_to_id[nearest]]
    img -= 130 * np.maximum(membranes, ring)

    # Mitochondria: distance to the object's own edge, touching neighbours included.
    inner = fg.copy()
    inner[:, 1:] &= instances[:, 1:] == instances[:, :-1]
    inner[:, :-1] &= instances[:, :-1] == instances[:, 1:]
    inner[1:, :] &= instances[1:, :] == instances[:-1, :]
    inner[:-1, :] &= instances[:-1, :] == instances[1:, :]
    depth = cv2.distanceTransform(inner.astype(np.uint8), cv2.DIST_L2, 5)
    ids = instances[fg]
    d = depth[fg] * nm  # nm from the object's edge
    n = len(records) + 1
    theta = np.zeros(n, np.float32)
    period = np.ones(n, np.float32)
    phase = np.zeros(n, np.float32)
    cy, cx = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for r in records:
        theta[r["id"]], cy[r["id"]], cx[r["id"]] = r["theta"], r["cy"], r["cx"]
    period[1:] = rng.uniform(35, 55, n - 1) / nm
    phase[1:] = rng.uniform(0, 2 * math.pi, n - 1)
    rows, cols = np.nonzero(fg)
    u = (cols - cx[ids]) * np.cos(theta[ids]) - (rows - cy[ids]) * np.sin(theta[ids])
    wobble = 2.0 * _smooth_noise((size, size), 80 / nm, rng)[fg]
    stripes = np.clip((np.cos(2 * math.pi * u / period[ids] + phase[ids] + wobble) - 0.55) / 0.45, 0, 1)
    stripes *= np.clip((d - 14) / 6, 0, 1)  # cristae start inside the inner membrane
    matrix = 138 + 10 * _smooth_noise((size, size), 40 / nm, rng)[fg]
    outer = np.exp(-((d - 3.5) / 3.0) ** 2)
    inner_membrane = np.exp(-((d - 11) / 3.0) ** 2)
    img[fg] = matrix - 100 * outer - 45 * inner_membrane - 60 * stripes
    return img


def _finish(img: np.ndarray, appearance: Appearance, noise: np.ndarray) -> np.ndarray:
    if appearance.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), appearance.blur)
    img = img + appearance.noise * noise
    if appearance.invert:
        img = 255 - img
    mean = float(img.mean())
    img = (img - mean) * appearance.contrast + mean + appearance.brightness
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Public API


def generate_slice(size: int = 512, seed: int = 0, pixel_size_nm: float = 5.0, n_objects: int | None = None,
                   touching_fraction: float = 0.2, appearance: Appearance | dict | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """One synthetic EM slice with known mitochondria.

    size: slice height and width in px; pixel_size_nm: nm per px.
    n_objects: objects to draw (classes balanced, in turn); default about
    0.9 per um^2 (at least 5). Objects that find no room are left out.
    touching_fraction: about this fraction of objects share an edge with another.
    appearance: :class:`Appearance` or dict of its fields (grey values only).

    Returns image uint8 (size, size); instances uint32 (size, size), 0 =
    background, ids 1..N; objects DataFrame, one row per id: id, shape_class,
    variant, centroid_y, centroid_x (px), area_px, area_um2, length_px,
    width_px (designed extent and thickness: ellipse axes; tube length with
    caps and diameter; branched: twice the longest arm and the arm width),
    orientation_deg (major axis, ccw from the x axis as displayed, -90..90),
    aspect_ratio and solidity (measured), n_branches (arms; 1 if unbranched),
    touching (shares an edge with another id).
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 px, got {size}")
    if not 0 <= touching_fraction <= 1:
        raise ValueError(f"touching_fraction must be in [0, 1], got {touching_fraction}")
    appearance = Appearance.coerce(appearance)
    geometry_ss, texture_ss, noise_ss = np.random.SeedSequence(seed).spawn(3)
    if n_objects is None:
        n_objects = max(5, round(OBJECTS_PER_UM2 * (size * pixel_size_nm / 1000) ** 2))
    instances, records = _layout(size, n_objects, touching_fraction, pixel_size_nm,
                                 np.random.default_rng(geometry_ss))
    img = _render(instances, records, pixel_size_nm, np.random.default_rng(texture_ss))
    noise = np.random.default_rng(noise_ss).standard_normal(img.shape).astype(np.float32)
    image = _finish(img, appearance, noise)

    touching = touching_ids(instances)
    objects = pd.DataFrame({
        "id": [r["id"] for r in records],
        "shape_class": [r["shape_class"] for r in records],
        "variant": [r["variant"] for r in records],
        "centroid_y": [float(r["cy"]) for r in records],
        "centroid_x": [float(r["cx"]) for r in records],
        "area_px": [int(r["area_px"]) for r in records],
        "area_um2": [float(r["area_um2"]) for r in records],
        "length_px": [float(r["length"]) for r in records],
        "width_px": [float(r["width"]) for r in records],
        "orientation_deg": [float((math.degrees(r["theta"]) + 90) % 180 - 90) for r in records],
        "aspect_ratio": [float(r["aspect_ratio"]) for r in records],
        "solidity": [float(r["solidity"]) for r in records],
        "n_branches": [int(r["n_branches"]) for r in records],
        "touching": [r["id"] in touching for r in records],
    })
    return image, instances, objects


def generate_dataset(out_dir: str | Path, n: int = 20, size: int = 1024, seed: int = 0, pixel_size_nm: float = 5.0,
                     splits: Sequence[float] = (0.7, 0.15, 0.15), *, overwrite: bool = False,
                     touching_fraction: float = 0.2, appearance: Appearance | dict | None = None) -> Path:
    """Write ``n`` synthetic slices as ``out_dir/{train,val,test}/{x,y}``.

    Slice i uses seed ``slice_seed(seed, i)`` (recorded in dataset.json), so
    any slice can be regenerated alone with :func:`generate_slice`. Also
    writes ``{split}/objects/objNNNN.csv`` per slice and ``objects.csv`` for
    all slices (with ``split`` and ``slice`` columns). Labels are instance
    ids (uint16 zlib TIFF). Returns dataset.json's path.
    """
    appearance = Appearance.coerce(appearance)
    assignment = c.assign_splits(n, splits)
    split_of = {i: s for s, idx in assignment.items() for i in idx}
    records = {s: {"count": 0, "slices": [], "seeds": [], "labelled": True} for s in c.SPLITS}
    tables = []
    with c.output_folder(out_dir, overwrite) as stage:
        for i in range(n):
            split, s_seed = split_of[i], slice_seed(seed, i)
            image, instances, objects = generate_slice(size, s_seed, pixel_size_nm, None, touching_fraction,
                                                       appearance)
            c.write_image(stage / split / "x" / f"im{i:04d}", image)
            c.write_label(stage / split / "y" / f"seg{i:04d}.tif",
                          c.encode_label(instances, "instance", c.instance_dtype(len(objects))))
            (stage / split / "objects").mkdir(exist_ok=True)
            objects.to_csv(stage / split / "objects" / f"obj{i:04d}.csv", index=False)
            tables.append(objects.assign(split=split, slice=i))
            rec = records[split]
            rec["count"] += 1
            rec["slices"].append(i)
            rec["seeds"].append(s_seed)
        all_objects = pd.concat(tables, ignore_index=True)
        all_objects.to_csv(stage / "objects.csv", index=False)
        c.write_dataset_json(
            stage, name=Path(out_dir).name, converter="data_prep.synthetic", source_files=[], splits=records,
            kind="instance", pixel_size_in=pixel_size_nm,
            generator={"seed": seed, "n": n, "size": size, "touching_fraction": touching_fraction,
                       "appearance": dataclasses.asdict(appearance), "split_fractions": list(splits)},
            objects={"table": "objects.csv", "per_slice": "{split}/objects/objNNNN.csv",
                     "per_class": all_objects["shape_class"].value_counts().reindex(SHAPE_CLASSES, fill_value=0)
                     .astype(int).to_dict(),
                     "total": int(len(all_objects))},
        )
    return Path(out_dir) / "dataset.json"


def slice_seed(seed: int, index: int) -> int:
    """The seed of slice ``index`` in a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--n", type=positive_int, default=20, help="number of slices (default 20)")
    parser.add_argument("--size", type=positive_int, default=1024, help="slice width and height in px (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel-size", type=pixel_size, default=5.0, metavar="NM", help="nm per px (default 5)")
    parser.add_argument("--splits", type=c.fractions_arg, default=(0.7, 0.15, 0.15),
                        help="train,val,test fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--touching-fraction", type=fraction, default=0.2,
                        help="share of objects placed touching a neighbour (default 0.2)")
    parser.add_argument("--appearance", type=json.loads, default=None,
                        help='JSON dict of Appearance fields, e.g. \'{"contrast": 0.6, "noise": 12}\'')
    parser.add_argument("--overwrite", action="store_true")
    add_debug(parser)
    args = parser.parse_args(argv)
    path = generate_dataset(args.out, n=args.n, size=args.size, seed=args.seed, pixel_size_nm=args.pixel_size,
                            splits=args.splits, overwrite=args.overwrite, touching_fraction=args.touching_fraction,
                            appearance=args.appearance)
    print(f"wrote {path.parent} ({path})")


if __name__ == "__main__":
    sys.exit(main())
