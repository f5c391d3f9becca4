"""Per-mitochondrion measurements, physical units, shape classes and summaries.

NumPy / scikit-image / OpenCV / pandas only; no TensorFlow.

Conventions
-----------
- Pixels are unit squares; ``pixel_size_nm`` is the side of one pixel in nm.
  Columns ending ``_px`` / ``_px2`` are pixels / pixels^2; ``_nm`` / ``_nm2``
  are the same quantities in nm / nm^2 and exist only when the pixel size is
  known. Every table has a ``pixel_size_nm`` column (NaN when unknown).
- Coordinates: ``centroid_y`` is the row and ``centroid_x`` the column, from
  the top-left pixel centre (0, 0).
- Perimeter is the Crofton estimate (``skimage.measure.perimeter_crofton``,
  4 directions): within ~2% for digitised discs and ellipses, where the
  boundary-chain estimate overshoots curved outlines and makes circularity of
  small round objects exceed 1.
- Axis lengths are those of the ellipse with the object's second moments,
  counting each pixel as a unit square (variance 1/12 added along each axis),
  so a digitised ellipse gets its drawn axes and a one-pixel-wide line a
  finite minor axis (4/sqrt(12) ~ 1.15 px) instead of 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.morphology import skeletonize, thin

__all__ = ["SHAPE_CLASSES", "Rules", "ShapeRules", "classify", "measure", "skeleton_stats", "summarize"]

SHAPE_CLASSES: tuple[str, ...] = ("round", "elongated", "tubular", "fragmented", "irregular")

# Column -> physical counterpart and the power of the pixel size it scales with.
_PHYSICAL = {
    "centroid_y_px": ("centroid_y_nm", 1),
    "centroid_x_px": ("centroid_x_nm", 1),
    "area_px2": ("area_nm2", 2),
    "perimeter_px": ("perimeter_nm", 1),
    "major_axis_length_px": ("major_axis_length_nm", 1),
    "minor_axis_length_px": ("minor_axis_length_nm", 1),
    "equivalent_diameter_px": ("equivalent_diameter_nm", 1),
    "skeleton_length_px": ("skeleton_length_nm", 1),
}

# 8-neighbour offsets.
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


# Skeletons


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a[y + dy, x + dx] with zeros outside; a must have a 1-pixel zero margin."""
    return np.roll(a, (-dy, -dx), axis=(0, 1))


def _neighbours(skel: np.ndarray) -> np.ndarray:
    """Number of 8-neighbours of each skeleton pixel (0 off the skeleton)."""
    count = sum(_shifted(skel, dy, dx).astype(np.uint8) for dy, dx in _RING)
    return np.where(skel, count, 0)


def _path_length(skel: np.ndarray) -> float:
    """Length of a skeleton in pixels: the sum over its branches of the polyline through the pixel centres.

    Links: orthogonal neighbours, and diagonal ones not already bridged by an
    orthogonal corner pixel (so staircase corners are not counted twice). The
    links are cut into branches (end or junction to end or junction, or a
    closed loop), and each branch is smoothed by two passes of a [1, 2, 1] / 4
    filter with its ends fixed before its length is taken, as in 3-D
    (``morphometry3d._path_length``): the raw 8-connected staircase of steps
    1 and sqrt(2) overstates an oblique or curved line by up to ~8% (a bar at
    22.5-30 degrees, a ring), the smoothed one stays within ~1.5% at every
    angle; straight horizontal, vertical and diagonal runs are unchanged.
    """
    width = skel.shape[1]
    right, down = _shifted(skel, 0, 1), _shifted(skel, 1, 0)
    starts = (
        (1, skel & right),
        (width, skel & down),
        (width + 1, skel & _shifted(skel, 1, 1) & ~right & ~down),
        (width - 1, skel & _shifted(skel, 1, -1) & ~_shifted(skel, 0, -1) & ~down),
    )
    src = np.concatenate([np.flatnonzero(start) for _, start in starts])
    dst = np.concatenate([np.flatnonzero(start) + step for step, start in starts])
    adjacent: dict[int, list[tuple[int, int]]] = {}
    for e, (a, b) in enumerate(zip(src.tolist(), dst.tolist())):
        adjacent.setdefault(a, []).append((b, e))
        adjacent.setdefault(b, []).append((a, e))
    used = np.zeros(len(src), bool)

    def branch(start: int, nxt: int, e: int) -> float:
        path = [start]
        while True:
            used[e] = True
            path.append(nxt)
            if len(adjacent[nxt]) != 2:
                break
            ahead = [(q, f) for q, f in adjacent[nxt] if not used[f]]
            if not ahead:  # back at the start of a closed loop
                break
            nxt, e = ahead[0]
        return _smoothed_length(np.column_stack(np.divmod(np.asarray(path), width)))

    total = 0.0
    # Branches from every end or junction first, then what is left: closed loops.
    for nodes_first in (True, False):
        for a, links in adjacent.items():
            if nodes_first and len(links) == 2:
                continue
            for b, e in links:
                if not used[e]:
                    total += branch(a, b, e)
    return total


def _smoothed_length(coords: np.ndarray, passes: int = 2) -> float:
    """Length of an ordered path (n, 2) after ``passes`` [1, 2, 1] / 4 smoothings, ends fixed."""
    c = np.asarray(coords, np.float64)
    for _ in range(passes if len(c) > 2 else 0):
        c[1:-1] = 0.25 * c[:-2] + 0.5 * c[1:-1] + 0.25 * c[2:]
    return float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum())


def _trace_spur(skel: np.ndarray, nb: np.ndarray, end: tuple[int, int]) -> tuple[list, tuple[int, int]] | None:
    """Walk from an end pixel to the first junction pixel (>= 3 neighbours).

    Returns:
        the path (end first, junction excluded) and the junction, or None if
        the walk reaches another end (the skeleton is a simple curve).
    """
    path, prev, cur = [], None, end
    while True:
        path.append(cur)
        nxt = [
            (cur[0] + dy, cur[1] + dx)
            for dy, dx in _RING
            if skel[cur[0] + dy, cur[1] + dx] and (cur[0] + dy, cur[1] + dx) != prev
        ]
        if not nxt:
            return None
        prev, cur = cur, nxt[0]
        if nb[cur] >= 3:
            return path, cur
        if nb[cur] == 1:
            return None


def _graph(skel: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Cut a skeleton into junction zones and branch pieces.

    Junction pixels (>= 3 neighbours) with their 3x3 neighbourhood form the
    zones (clusters, e.g. the short middle of an X, are one zone); the rest
    are pieces. Cutting the neighbourhood too separates pieces that touch
    diagonally around a junction.

    Returns:
        zone labels, piece labels (both 8-connected, int32), the number of
        pieces, and each zone's degree (pieces touching it; index 0 unused).
    """
    eight = np.ones((3, 3), bool)
    zone = ndi.binary_dilation(_neighbours(skel) >= 3, eight) & skel
    pieces, n_pieces = ndi.label(skel & ~zone, eight)
    zones, n_zones = ndi.label(zone, eight)
    keys = []
    for dy, dx in _RING:  # every (zone, piece) pair that touches, even diagonally
        near = _shifted(zones, dy, dx)
        touch = (near > 0) & (pieces > 0)
        keys.append(near[touch].astype(np.int64) * (n_pieces + 1) + pieces[touch])
    pairs = np.unique(np.concatenate(keys))
    degree = np.bincount(pairs // (n_pieces + 1), minlength=n_zones + 1)
    return zones, pieces, n_pieces, degree


def _prune(skel: np.ndarray, dist: np.ndarray, spur_factor: float, max_rounds: int = 10) -> np.ndarray:
    """Remove terminal branches that do not protrude beyond the junction's disc.

    A terminal branch from junction J to end E protrudes by
    |JE| + r(E) - r(J) beyond the largest disc centred at J (r = distance to
    the background); it is noise if that is < ``spur_factor`` * r(J). Zones
    touched by a single piece are tiny forks or loops at a branch end and are
    cut first. Rounds repeat because removing spurs can expose new ones.
    """
    skel = skel.copy()
    for _ in range(max_rounds):
        nb = _neighbours(skel)
        if not (nb >= 3).any():
            break
        zones, _, n_pieces, degree = _graph(skel)
        tips = np.flatnonzero(degree <= 1)
        tips = tips[tips > 0]
        if n_pieces and len(tips):
            skel &= ~np.isin(zones, tips)
            continue
        drop = []
        for end in zip(*np.nonzero(nb == 1)):
            traced = _trace_spur(skel, nb, end)
            if traced is None:
                continue
            path, junction = traced
            reach = math.hypot(end[0] - junction[0], end[1] - junction[1]) + dist[end] - dist[junction]
            if reach < spur_factor * dist[junction]:
                drop.extend(path)
        if not drop:
            break
        skel[tuple(np.array(drop).T)] = False
    return skel


def _count_branches(skel: np.ndarray) -> int:
    """Branches of a pruned skeleton: 1 for a curve or loop, 3 for a Y, 4 for an X.

    A zone touched by exactly two pieces is a kink, not a junction: its two
    pieces are one branch.
    """
    if not skel.any():
        return 0
    _, _, n_pieces, degree = _graph(skel)
    return max(1, n_pieces - int(np.count_nonzero(degree[1:] == 2)))


def skeleton_stats(obj: np.ndarray, spur_factor: float = 1.0) -> tuple[float, int, np.ndarray]:
    """Pruned medial skeleton of one object, its length and number of branches.

    Every blunt end or boundary bump of a thick object grows a short skeleton
    spur; a terminal branch counts only if it protrudes beyond the largest
    disc inscribed at its junction by at least ``spur_factor`` times that
    disc's radius (see ``_prune``).

    Args:
        obj: (h, w) bool mask of one object.
        spur_factor: minimum protrusion of a terminal branch, in units of the
            local half-width at its junction.

    Returns:
        skeleton length in pixels (centre to centre along the smoothed
        branches, see ``_path_length``; for a straight bar of length L and
        width W about L - W, since the medial axis stops short of the ends),
        number of branches (1 for a simple curve or loop, 3 for a
        Y, 4 for an X, 0 for an empty mask) and the (h, w) bool skeleton.
    """
    obj = np.pad(np.asarray(obj, bool), 2)
    # thin() removes the small loops and plus-shaped clusters skeletonize()
    # leaves at blunt ends, so every free end is a pixel with one neighbour.
    skel = thin(skeletonize(obj))
    if (_neighbours(skel) >= 3).any():
        dist = cv2.distanceTransform(obj.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        skel = _prune(skel, dist, spur_factor)
    return _path_length(skel), _count_branches(skel), skel[2:-2, 2:-2]


# Measurements


def measure(
    instances: np.ndarray,
    image: np.ndarray | None = None,
    pixel_size_nm: float | None = None,
    heatmap: np.ndarray | None = None,
) -> pd.DataFrame:
    """Measure every labelled object.

    Args:
        instances: (H, W) integer labels, 0 background (e.g. from
            ``xmdl_tf.instances.mask_to_instances``).
        image: optional (H, W) intensities (any numeric dtype) for
            ``mean_intensity``, in the image's own units.
        pixel_size_nm: pixel side in nm; adds the ``_nm`` / ``_nm2`` columns.
        heatmap: optional (H, W) Grad-CAM heatmap for ``gradcam_mean``.

    Returns:
        DataFrame, one row per object id in increasing order; columns as in the
        README table (``id``, ``centroid_y_px`` ... ``touches_border``, then
        ``mean_intensity`` / ``gradcam_mean`` when given, ``pixel_size_nm`` and
        the physical columns).
    """
    labels = np.asarray(instances)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"instances must be a 2-D integer label image, got {labels.dtype} {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"instances is an empty label image (shape {labels.shape})")
    for name, arr in (("image", image), ("heatmap", heatmap)):
        if arr is not None and np.shape(arr) != labels.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} differs from instances shape {labels.shape}")
    if pixel_size_nm is not None and not (isinstance(pixel_size_nm, numbers.Real) and not isinstance(pixel_size_nm, bool)
                                         and pixel_size_nm > 0 and math.isfinite(pixel_size_nm)):
        raise ValueError(f"pixel_size_nm must be a positive number or None, got {pixel_size_nm!r}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("instance ids must be non-negative")
    labels, original_ids = compact_ids(labels)
    height, width = labels.shape

    props = regionprops_table(
        labels,
        properties=(
            "label", "centroid", "area", "perimeter_crofton", "inertia_tensor_eigvals",
            "orientation", "solidity", "extent", "bbox", "image",
        ),
    )  # fmt: skip
    ids = props["label"].astype(np.int64)
    area = props["area"].astype(np.float64)
    perimeter = props["perimeter_crofton"].astype(np.float64)
    # Unit-square pixels: add each pixel's own variance 1/12 (see module docstring).
    var_major = props["inertia_tensor_eigvals-0"] + 1 / 12
    var_minor = props["inertia_tensor_eigvals-1"] + 1 / 12
    major, minor = 4 * np.sqrt(var_major), 4 * np.sqrt(var_minor)
    # skimage: angle from the row axis; here: from the +x axis, counter-clockwise
    # as displayed (y up), in (-90, 90]; 0 = horizontal, 90 = vertical.
    orientation = (np.degrees(props["orientation"]) + 90) % 180
    orientation = np.where(orientation > 90, orientation - 180, orientation)

    skeletons = [skeleton_stats(obj) for obj in props["image"]]
    table = pd.DataFrame(
        {
            "id": ids,
            "centroid_y_px": props["centroid-0"],
            "centroid_x_px": props["centroid-1"],
            "area_px2": area,
            "perimeter_px": perimeter,
            "major_axis_length_px": major,
            "minor_axis_length_px": minor,
            "eccentricity": np.sqrt(np.clip(1 - var_minor / var_major, 0, 1)),
            "solidity": props["solidity"],
            "aspect_ratio": major / minor,
            "circularity": np.minimum(4 * np.pi * area / np.maximum(perimeter, 1e-12) ** 2, 1.0),
            "extent": props["extent"],
            "equivalent_diameter_px": np.sqrt(4 * area / np.pi),
            "orientation_deg": orientation,
            "skeleton_length_px": np.array([s[0] for s in skeletons], np.float64),
            "n_branches": np.array([s[1] for s in skeletons], np.int64),
            "touches_border": (
                (props["bbox-0"] == 0) | (props["bbox-1"] == 0)
                | (props["bbox-2"] == height) | (props["bbox-3"] == width)
            ),
        }
    )  # fmt: skip
    if image is not None:
        table["mean_intensity"] = _means(np.asarray(image, np.float64), labels, ids, area)
    if heatmap is not None:
        table["gradcam_mean"] = _means(np.asarray(heatmap, np.float64), labels, ids, area)
    table["pixel_size_nm"] = float(pixel_size_nm) if pixel_size_nm is not None else np.nan
    if pixel_size_nm is not None:
        for col, (phys, power) in _PHYSICAL.items():
            table[phys] = table[col] * float(pixel_size_nm) ** power
    if original_ids is not None:
        table["id"] = original_ids[ids]
    return table


def compact_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels whose ids are small enough for per-id arrays (``ndi.find_objects``, ``bincount``).

    Ids above the number of pixels (e.g. 2**32 - 1 or uint64 hashes) would make
    those arrays as long as the largest id; such labels are renumbered 1..n in
    id order. Returns (labels to measure, the original id of each new id with
    index 0 for the background, int64 or uint64), or (labels, None) when the
    ids are kept.
    """
    top = int(labels.max()) if labels.size else 0
    if top <= max(labels.size, 1):
        return (labels.astype(np.int64) if labels.dtype == np.uint64 else labels), None
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids, inverse = np.r_[ids.dtype.type(0), ids], inverse + 1
    if ids.dtype.kind == "i" or ids[-1] <= np.iinfo(np.int64).max:
        ids = ids.astype(np.int64)
    return inverse.reshape(labels.shape).astype(np.int64), ids


def _means(values: np.ndarray, labels: np.ndarray, ids: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Mean of (H, W) ``values`` over each object id, (n,) float64."""
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=int(ids.max(initial=0)) + 1)
    return sums[ids] / area


# Shape classes


class Rules:
    """Base of the frozen threshold dataclasses (`ShapeRules`, `morphometry3d.ShapeRules3D`):
    every field a finite number >= 0 (ints stay ints), JSON in and out, overrides by name.
    Subclasses add their own cross-field checks in `_check`."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}.{f.name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name}.{f.name} must be >= 0, got {value!r}")
            # Normalise JSON numbers (3.0 for an int field, 2 for a float one).
            if f.type in (int, "int"):
                if not float(value).is_integer():
                    raise ValueError(f"{name}.{f.name} must be an integer, got {value!r}")
                object.__setattr__(self, f.name, int(value))
            else:
                object.__setattr__(self, f.name, float(value))
        self._check()

    def _check(self) -> None:
        """Cross-field checks of a subclass (raise ValueError)."""

    def to_dict(self) -> dict[str, float | int]:
        """All thresholds by name (JSON-ready)."""
        return dataclasses.asdict(self)

    def override(self, values: Mapping[str, Any]):
        """A copy with some thresholds replaced; unknown names raise ValueError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} rule(s) {unknown}; valid names: {sorted(known)}")
        return dataclasses.replace(self, **values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Defaults overridden by ``values``; unknown names raise ValueError."""
        return cls().override(values)

    @classmethod
    def from_json(cls, path: str | Path):
        """Read a JSON object of thresholds (a subset is fine; the rest default).

        Every problem (no such file, not JSON, a bad or unknown threshold) is a
        one-line ValueError naming the file."""
        try:
            with open(path, encoding="utf-8") as fh:
                values = json.load(fh)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such {cls.__name__} file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON object of {cls.__name__} thresholds ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of {cls.__name__} thresholds, got {type(values).__name__}")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def to_json(self, path: str | Path) -> None:
        """Write all thresholds as a JSON object."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ShapeRules(Rules):
    """Every threshold of the shape classes, in one place.

    Rules, first match wins (``*_max_*`` bounds are exclusive, ``*_min_*``
    bounds inclusive):

    1. fragmented: area < ``fragmented_max_area_nm2`` (or, when the pixel size
       is unknown, area < ``fragmented_max_area_px``);
    2. irregular: solidity < ``irregular_max_solidity`` or
       n_branches >= ``irregular_min_branches``;
    3. round: aspect_ratio < ``round_max_aspect``;
    4. elongated: aspect_ratio < ``elongated_max_aspect``;
    5. tubular: otherwise.

    ``fragmented_max_area_nm2`` = 50,000 nm^2 = 0.05 um^2, a disc ~250 nm
    across. ``fragmented_max_area_px`` = 2000 px is the same area at 5 nm per
    pixel, the sampling of the EPFL (Lucchi) hippocampus EM benchmark; it is
    only a fallback for images without a pixel size and should be set for
    other sampling.
    """

    fragmented_max_area_nm2: float = 50_000.0
    fragmented_max_area_px: float = 2_000.0
    irregular_max_solidity: float = 0.75
    irregular_min_branches: int = 3
    round_max_aspect: float = 1.5
    elongated_max_aspect: float = 3.0

    def _check(self) -> None:
        if self.irregular_max_solidity > 1:
            raise ValueError(f"ShapeRules.irregular_max_solidity must be <= 1, got {self.irregular_max_solidity}")
        if not 1 <= self.round_max_aspect <= self.elongated_max_aspect:
            raise ValueError(
                "ShapeRules needs 1 <= round_max_aspect <= elongated_max_aspect, got "
                f"{self.round_max_aspect} and {self.elongated_max_aspect}"
            )


def classify(
    table: pd.DataFrame,
    rules: ShapeRules | None = None,
    pixel_size_nm: float | None = None,
) -> pd.Series:
    """Shape class of every row of a ``measure`` table.

    Args:
        table: needs ``area_px2``, ``solidity``, ``n_branches`` and ``aspect_ratio``.
        rules: thresholds; defaults to ``ShapeRules()``.
        pixel_size_nm: pixel side in nm. When None, the table's own
            ``pixel_size_nm`` column is used row by row (objects.csv can mix
            images); rows without one use ``fragmented_max_area_px``.

    Returns:
        Series of names from ``SHAPE_CLASSES``, same index as ``table``.
    """
    rules = rules or ShapeRules()
    area_px = table["area_px2"].to_numpy(np.float64)
    if pixel_size_nm is not None:
        size = np.full(len(table), float(pixel_size_nm))
    elif "pixel_size_nm" in table:
        size = table["pixel_size_nm"].to_numpy(np.float64)
    else:
        size = np.full(len(table), np.nan)
    known = np.isfinite(size) & (size > 0)
    fragmented = np.where(
        known,
        area_px * np.where(known, size, 0) ** 2 < rules.fragmented_max_area_nm2,
        area_px < rules.fragmented_max_area_px,
    )
    irregular = (table["solidity"].to_numpy() < rules.irregular_max_solidity) | (
        table["n_branches"].to_numpy() >= rules.irregular_min_branches
    )
    aspect = table["aspect_ratio"].to_numpy(np.float64)
    names = np.select(
        [fragmented, irregular, aspect < rules.round_max_aspect, aspect < rules.elongated_max_aspect],
        ["fragmented", "irregular", "round", "elongated"],
        default="tubular",
    )
    return pd.Series(names, index=table.index, name="shape_class", dtype=object)


# Summary


def summarize(table: pd.DataFrame) -> dict[str, float | int]:
    """One image's summary row from its (classified) measurement table.

    Returns:
        ``count``; ``count_<class>`` for each of ``SHAPE_CLASSES`` when the table
        has a ``shape_class`` column; ``n_touching_border``; the medians
        ``median_area_px2``, ``median_aspect_ratio``, ``median_solidity``,
        ``median_circularity``, ``median_equivalent_diameter_px``,
        ``median_skeleton_length_px`` (and their ``_nm`` / ``_nm2`` twins when
        the table has them), ``median_gradcam`` when ``gradcam_mean`` exists;
        ``total_area_px2`` (and ``total_area_nm2``). Medians are NaN for an
        empty table.
    """
    out: dict[str, float | int] = {"count": len(table)}
    if "shape_class" in table:
        counts = table["shape_class"].value_counts()
        out.update({f"count_{name}": int(counts.get(name, 0)) for name in SHAPE_CLASSES})
    out["n_touching_border"] = int(table["touches_border"].sum()) if "touches_border" in table else 0
    for col in (
        "area_px2", "area_nm2", "aspect_ratio", "solidity", "circularity",
        "equivalent_diameter_px", "equivalent_diameter_nm", "skeleton_length_px", "skeleton_length_nm",
    ):  # fmt: skip
        if col in table:
            out[f"median_{col}"] = float(table[col].median()) if len(table) else float("nan")
    if "gradcam_mean" in table:
        out["median_gradcam"] = float(table["gradcam_mean"].median()) if len(table) else float("nan")
    for col in ("area_px2", "area_nm2"):
        if col in table:
            out[f"total_{col}"] = float(table[col].sum())
    return out
