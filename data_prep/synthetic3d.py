"""Synthetic EM volumes whose every mitochondrion is known.

A 3-D version of ``data_prep.synthetic``: textured cytoplasm crossed by wavy
cell membranes (3-D Voronoi walls), ribosome-like dots and vesicles, noise and
in-plane blur, with mitochondria drawn as darker bodies with a double outer
membrane and cristae-like sheets across their long axis. Objects are built in
nm, rasterised at the (possibly anisotropic) voxel size and kept inside the
bands of ``xmdl_tf.morphometry3d.ShapeRules3D`` (aspect = moment-ellipsoid
major / minor axis):

=============  ==============================================================
globular       near-sphere, diameter 320-480 nm, aspect <= 1.25
elongated      near-prolate ellipsoid, short axes 220-320 nm, aspect 2.0-3.0
tubular        straight or gently bent tube (turn <= 46 deg), diameter
               140-200 nm, length 5.5-8 diameters (caps included)
branched       Y (3 arms) or X (4 arms) of tubes, diameter 140-200 nm, arms
               300-500 nm from a small hub
fragmented     small near-sphere, diameter 110-200 nm (< 0.0042 um^3)
=============  ==============================================================

Objects never overlap and keep two voxels of clearance, except a
``touching_fraction`` of them, pushed against an earlier object until they
share a voxel face (6-connected, different ids). All objects lie at least one
voxel inside the volume, so the measured geometry is the drawn one.

Same seed, same volume: geometry, texture and noise use separate random
streams, so ``appearance`` alters only grey values, never labels.

    python -m data_prep.synthetic3d --out data/synthetic3d --shape 48 256 256 --voxel-size 30 10 10 --seed 0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi

from data_prep.synthetic import Appearance, _arc as _arc2d, _dots, _finish
from xmdl_tf.cli import add_debug, fraction, guarded, pixel_size, positive_int
from xmdl_tf.morphometry3d import SHAPE_CLASSES_3D
from xmdl_tf.runlock import usual_permissions

OBJECTS_PER_UM3 = 3.0  # with the sizes above ~7-10% of the volume, as in neuropil
_PLACE_ORDER = ("branched", "tubular", "elongated", "globular", "fragmented")  # big first packs better
_GAP_VOX = 2  # clearance kept around objects that are not meant to touch
_OUTPUTS = ("image.tif", "instances.tif", "classes.csv")

# A shape is a union of primitives, in nm, in its local frame (long axis along
# local x, bends and branches in the local x-y plane; (z, y, x) order like the
# volume): ("ellipsoid", centre (3,), semi-axes (3,)) or ("capsule", p0 (3,),
# p1 (3,), radius), the points within radius of the segment p0-p1.
Primitive = tuple


# ---------------------------------------------------------------------------
# Shapes


def _design(shape_class: str, rng: np.random.Generator) -> list[Primitive]:
    """The primitives of one object of ``shape_class`` (see the module docstring)."""
    origin = np.zeros(3)
    if shape_class == "globular":
        d = rng.uniform(320, 480)
        return [("ellipsoid", origin, d / 2 * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), 1.0]))]
    if shape_class == "fragmented":
        d = rng.uniform(110, 200)
        return [("ellipsoid", origin, d / 2 * np.array([rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), 1.0]))]
    if shape_class == "elongated":
        b = rng.uniform(120, 160)
        return [("ellipsoid", origin, np.array([b * rng.uniform(0.92, 1.0), b, b * rng.uniform(2.0, 2.8)]))]
    if shape_class == "tubular":
        d = rng.uniform(140, 200)
        points = _arc(d * rng.uniform(5.5, 8.0) - d, rng.uniform(-0.8, 0.8))
        return [("capsule", p0, p1, d / 2) for p0, p1 in zip(points[:-1], points[1:])]
    if shape_class == "branched":
        d = rng.uniform(140, 200)
        n_arms = int(rng.choice([3, 3, 4]))
        angles = np.cumsum(np.r_[0.0, rng.uniform(0.8, 1.2, n_arms - 1) * 2 * math.pi / n_arms])
        arms = rng.uniform(300, 500, n_arms)
        lift = rng.uniform(-0.25, 0.25, n_arms)  # arms leave the plane a little
        tips = np.stack([arms * np.sin(lift), arms * np.cos(lift) * np.sin(angles),
                         arms * np.cos(lift) * np.cos(angles)], axis=1)
        hub = ("ellipsoid", origin, np.full(3, 0.6 * d))  # a small hub where the arms meet
        return [hub] + [("capsule", origin, tip, d / 2) for tip in tips]
    raise ValueError(f"unknown shape class '{shape_class}'; expected one of {SHAPE_CLASSES_3D}")


def _arc(length: float, bend: float, n: int = 12) -> np.ndarray:
    """(n, 3) points (z, y, x) of a circular arc in the local y-x plane, of ``length`` nm
    turning by ``bend`` radians, centred on its midpoint (the 2-D generator's arc)."""
    u, v = _arc2d(length, bend, 0.0, n).T
    return np.stack([np.zeros_like(u), v, u], axis=1)


def _rotation(rng: np.random.Generator, tilt: float) -> np.ndarray:
    """(3, 3) rotation of (z, y, x): a free turn about z, then tilts of up to
    ``tilt`` radians out of the section plane (small tilts fit thin volumes)."""
    yaw, pitch, roll = rng.uniform(0, 2 * math.pi), rng.uniform(-tilt, tilt), rng.uniform(-tilt, tilt)
    c, s = math.cos(yaw), math.sin(yaw)
    about_z = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = math.cos(pitch), math.sin(pitch)
    about_y = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    c, s = math.cos(roll), math.sin(roll)
    about_x = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def _placed(prims: list[Primitive], rot: np.ndarray) -> list[tuple[Primitive, np.ndarray, np.ndarray]]:
    """Primitives rotated into the volume frame, each with its bounding box (lo, hi) in nm."""
    out = []
    for prim in prims:
        if prim[0] == "ellipsoid":
            centre, semi = rot @ prim[1], prim[2]
            half = np.sqrt(((rot * semi) ** 2).sum(axis=1))  # exact extent of a rotated ellipsoid
            form = rot @ np.diag(1 / semi**2) @ rot.T
            out.append((("ellipsoid", centre, form), centre - half, centre + half))
        else:
            p0, p1, r = rot @ prim[1], rot @ prim[2], prim[3]
            out.append((("capsule", p0, p1, r), np.minimum(p0, p1) - r, np.maximum(p0, p1) + r))
    return out


def _inside(prim: Primitive, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Indicator of a placed primitive on broadcastable (z, y, x) nm coordinates."""
    if prim[0] == "ellipsoid":
        d = (z - prim[1][0], y - prim[1][1], x - prim[1][2])
        q = sum(prim[2][i, j] * d[i] * d[j] for i in range(3) for j in range(3))
        return q <= 1.0
    p0, p1, r = prim[1], prim[2], prim[3]
    v = p1 - p0
    t = ((z - p0[0]) * v[0] + (y - p0[1]) * v[1] + (x - p0[2]) * v[2]) / max(float(v @ v), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    return (z - p0[0] - t * v[0]) ** 2 + (y - p0[1] - t * v[1]) ** 2 + (x - p0[2] - t * v[2]) ** 2 <= r * r


def _rasterise(placed: list, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Voxels whose centres lie inside: a tight (z, y, x) bool mask.

    Each primitive is evaluated only on its own bounding box, so a long bent
    tube costs about its own volume, not its (diagonal) bounding box's.
    """
    lo = np.min([p[1] for p in placed], axis=0)
    hi = np.max([p[2] for p in placed], axis=0)
    # A random sub-voxel offset, so objects are not all centred on a voxel.
    start = np.floor(lo / spacing) - 1 + rng.uniform(0, 1, 3)
    n = np.ceil(hi / spacing - start).astype(int) + 2
    mask = np.zeros(n, bool)
    for prim, plo, phi in placed:
        i0 = np.maximum(np.floor(plo / spacing - start).astype(int), 0)
        i1 = np.minimum(np.ceil(phi / spacing - start).astype(int) + 1, n)
        z, y, x = ((start[k] + np.arange(i0[k], i1[k])) * spacing[k] for k in range(3))
        block = tuple(slice(a, b) for a, b in zip(i0, i1))
        mask[block] |= _inside(prim, z[:, None, None], y[None, :, None], x[None, None, :])
    box = ndi.find_objects(mask.astype(np.uint8))
    return mask[box[0]] if box else mask


def make_object(shape_class: str, rng: np.random.Generator, spacing: Sequence[float],
                room: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Draw ``shape_class`` with an orientation that fits ``room`` (Z, Y, X voxels).

    Returns the tight bool mask and the object's long axis (unit (3,) vector
    in physical z, y, x), or None when nothing fits in 30 tries (tilts shrink
    from free to flat as tries fail, so long objects lie in thin volumes).
    """
    spacing = np.asarray(spacing, np.float64)
    for attempt in range(30):
        prims = _design(shape_class, rng)
        rot = _rotation(rng, math.pi / 2 * (1 - attempt / 30))
        placed = _placed(prims, rot)
        extent = (np.max([p[2] for p in placed], 0) - np.min([p[1] for p in placed], 0)) / spacing + 3
        if (extent > np.asarray(room) - 2).any():
            continue
        mask = _rasterise(placed, spacing, rng)
        if mask.any():
            return mask, rot[:, 2]  # the local x axis in the volume frame
    return None


# ---------------------------------------------------------------------------
# Placement


def _fits(shape: tuple[int, ...], mask: np.ndarray, corner: np.ndarray) -> bool:
    return bool((corner >= 1).all() and (corner + mask.shape <= np.asarray(shape) - 1).all())


def _window(instances: np.ndarray, mask: np.ndarray, corner: np.ndarray) -> np.ndarray:
    return instances[tuple(slice(c, c + m) for c, m in zip(corner, mask.shape))]


def _place_free(instances: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                tries: int = 200) -> np.ndarray | None:
    """Corner for ``mask`` with ``_GAP_VOX`` voxels of clearance, or None."""
    high = np.asarray(instances.shape) - mask.shape - 1  # the mask stays 1 voxel inside
    if (high < 1).any():
        return None
    grown = ndi.binary_dilation(np.pad(mask, _GAP_VOX), iterations=_GAP_VOX)
    for _ in range(tries):
        corner = np.array([int(rng.integers(1, h + 1)) for h in high])
        lo = corner - _GAP_VOX
        a, b = np.maximum(lo, 0), np.minimum(lo + grown.shape, instances.shape)
        clearance = grown[tuple(slice(i - o, j - o) for i, j, o in zip(a, b, lo))]
        if not instances[tuple(slice(i, j) for i, j in zip(a, b))][clearance].any():
            return corner
    return None


def _place_touching(instances: np.ndarray, mask: np.ndarray, partner: int,
                    rng: np.random.Generator) -> np.ndarray | None:
    """Start overlapping ``partner`` and slide along one axis in 1-voxel steps
    until free: the last overlap guarantees a shared voxel face."""
    cells = np.argwhere(instances == partner)
    own = np.argwhere(mask)
    for _ in range(10):
        corner = cells[rng.integers(len(cells))] - own[rng.integers(len(own))]
        step = np.zeros(3, int)
        step[int(rng.integers(3))] = 1 if rng.random() < 0.5 else -1
        while _fits(instances.shape, mask, corner):
            if not _window(instances, mask, corner)[mask].any():
                return corner
            corner = corner + step
    return None


def touching_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (a < b) of ids that share a voxel face."""
    pairs: set[tuple[int, int]] = set()
    for axis in range(instances.ndim):
        a = np.moveaxis(instances, axis, 0)[:-1].ravel()
        b = np.moveaxis(instances, axis, 0)[1:].ravel()
        edge = (a != b) & (a > 0) & (b > 0)
        pairs |= {(int(min(p, q)), int(max(p, q))) for p, q in set(zip(a[edge].tolist(), b[edge].tolist()))}
    return pairs


def _layout(shape: tuple[int, int, int], spacing: np.ndarray, classes: Sequence[str], touching_fraction: float,
            rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Draw and place objects: instances uint16 (Z, Y, X) and one record per id."""
    order = [classes[i] for i in rng.permutation(len(classes))]
    order.sort(key=_PLACE_ORDER.index)
    instances = np.zeros(shape, np.uint16)
    target = round(touching_fraction * len(order))
    records: list[dict] = []
    touching: set[int] = set()
    for shape_class in order:
        drawn = make_object(shape_class, rng, spacing, shape)
        if drawn is None:
            continue
        mask, axis = drawn
        corner = None
        if records and len(touching) < target:
            # Prefer a partner that is not touching yet, so each contact adds two.
            fresh = [r for r in records if r["id"] not in touching] or records
            corner = _place_touching(instances, mask, fresh[int(rng.integers(len(fresh)))]["id"], rng)
        if corner is None:
            corner = _place_free(instances, mask, rng)
        if corner is None:
            continue  # no room left: only what was placed is listed
        new_id = len(records) + 1
        _window(instances, mask, corner)[mask] = new_id
        grown = ndi.binary_dilation(np.pad(mask, 1))  # 6-connected ring: face neighbours
        lo = corner - 1
        ring = _window(instances, grown, lo)[grown & ~np.pad(mask, 1)]
        neighbours = set(np.unique(ring).tolist()) - {0, new_id}
        if neighbours:
            touching |= neighbours | {new_id}
        centre = corner + np.argwhere(mask).mean(0)
        records.append({"id": new_id, "shape_class": shape_class, "centre": centre, "axis": axis})
    return instances, records


# ---------------------------------------------------------------------------
# Rendering


def _smooth_noise3d(shape: tuple[int, int, int], spacing: np.ndarray, scale_nm: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std float32 noise with features about ``scale_nm`` wide.

    A coarse random grid, upsampled bicubically in-plane (cv2, as the 2-D
    generator does) and with smoothstep weights across sections: a cubic
    3-D zoom gives the same look at ~20x the cost.
    """
    small = [max(2, int(n * s / scale_nm) + 2) for n, s in zip(shape, spacing)]
    coarse = rng.standard_normal(small).astype(np.float32)
    planes = np.stack([cv2.resize(p, (shape[2], shape[1]), interpolation=cv2.INTER_CUBIC) for p in coarse])
    pos = np.linspace(0, small[0] - 1, shape[0])
    k = np.minimum(pos.astype(int), small[0] - 2)
    w = (pos - k).astype(np.float32)
    w = (w * w * (3 - 2 * w))[:, None, None]
    field = planes[k] * (1 - w) + planes[k + 1] * w
    return (field - field.mean()) / (field.std() + 1e-6)


def _membranes3d(shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wavy cell walls (3-D Voronoi cells ~0.8 um across, warped): float32 in [0, 1]."""
    extent = np.asarray(shape) * spacing
    n_cells = max(3, int(np.prod(extent / 1000) / 0.35))
    seeds = np.zeros(shape, np.int32)
    where = tuple(rng.integers(0, n, n_cells) for n in shape)
    seeds[where] = np.arange(1, n_cells + 1)
    nearest = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_distances=False, return_indices=True)
    cells = seeds[tuple(nearest)]
    del nearest
    # Look the cells up at warped positions, so walls wave instead of being planes.
    warp = [120 / spacing[i] * _smooth_noise3d(shape, spacing, 400, rng) for i in range(3)]
    grid = np.indices(shape[1:])
    wall = np.zeros(shape, np.uint8)
    warped = np.empty(shape, np.int32)
    for z in range(shape[0]):
        idx = [np.clip(np.round(base + w[z]), 0, n - 1).astype(np.intp)
               for base, w, n in zip((z, grid[0], grid[1]), warp, shape)]
        warped[z] = cells[tuple(idx)]
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        wall[tuple(a)] |= (warped[tuple(a)] != warped[tuple(b)]).astype(np.uint8)
    nm = float(spacing[1:].mean())
    thick = max(1, int(round(18 / nm)))
    kernel = np.ones((thick, thick), np.uint8)
    out = np.stack([cv2.GaussianBlur(cv2.dilate(plane, kernel).astype(np.float32), (0, 0), max(0.6, 3 / nm))
                    for plane in wall])
    return out


def _render(instances: np.ndarray, records: list[dict], spacing: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """The noiseless, unblurred volume (float32, grey levels around 150)."""
    shape = instances.shape
    nm = float(spacing[1:].mean())  # in-plane pixel size, for the 2-D helpers
    img = 172 + 8 * _smooth_noise3d(shape, spacing, 600, rng)
    img += 22 * ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), np.maximum(0.7, 5 / spacing))
    img += 10 * _smooth_noise3d(shape, spacing, 40, rng)
    side = max(shape[1:])
    for z in range(shape[0]):  # ribosomes and vesicles are about one section thick
        dots = 70 * _dots(side, nm, rng, 450, (5, 10), ring=False) + 70 * _dots(side, nm, rng, 40, (14, 24), ring=True)
        img[z] -= dots[: shape[1], : shape[2]]

    fg = instances > 0
    outside = ndi.distance_transform_edt(~fg, sampling=spacing).astype(np.float32)
    img -= 130 * _membranes3d(shape, spacing, rng) * np.clip((outside - 40) / 20, 0, 1)

    # Mitochondria: nm from the object's own surface, touching neighbours included.
    inner = fg.copy()
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        same = instances[tuple(a)] == instances[tuple(b)]
        inner[tuple(a)] &= same
        inner[tuple(b)] &= same
    # Boundary voxels get 0; the surface lies about half a voxel outside their centres.
    depth = ndi.distance_transform_edt(inner, sampling=spacing).astype(np.float32)[fg] + nm / 2
    ids = instances[fg].astype(np.int64)
    n = len(records) + 1
    centre, axis = np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32)
    for r in records:
        centre[r["id"]], axis[r["id"]] = r["centre"] * spacing, r["axis"]
    period = np.r_[1.0, rng.uniform(35, 55, n - 1)].astype(np.float32)
    phase = np.r_[0.0, rng.uniform(0, 2 * math.pi, n - 1)].astype(np.float32)
    pos = np.argwhere(fg).astype(np.float32) * spacing.astype(np.float32)
    u = ((pos - centre[ids]) * axis[ids]).sum(1)
    wobble = 2.0 * _smooth_noise3d(shape, spacing, 80, rng)[fg]
    sheets = np.clip((np.cos(2 * math.pi * u / period[ids] + phase[ids] + wobble) - 0.55) / 0.45, 0, 1)
    width = max(3.0, nm / 2)  # membranes stay visible on coarse voxels
    sheets *= np.clip((depth - 20) / 6, 0, 1)  # cristae start inside the inner membrane
    matrix = 138 + 10 * _smooth_noise3d(shape, spacing, 40, rng)[fg]
    outer = np.exp(-(((depth - 4) / width) ** 2))
    inner_membrane = np.exp(-(((depth - 12) / width) ** 2))
    img[fg] = matrix - 100 * outer - 45 * inner_membrane - 60 * sheets
    return img


# ---------------------------------------------------------------------------
# Public API


def generate_volume(
    shape: Sequence[int] = (48, 256, 256),
    seed: int = 0,
    voxel_size_nm: Sequence[float] = (10.0, 10.0, 10.0),
    n_objects: int | None = None,
    touching_fraction: float = 0.2,
    classes: Sequence[str] = SHAPE_CLASSES_3D,
    appearance: Appearance | dict | None = None,
) -> dict:
    """One synthetic EM volume with known mitochondria.

    Args:
        shape: (Z, Y, X) voxels.
        seed: everything is a function of the seed.
        voxel_size_nm: (z, y, x) nm, anisotropic allowed (e.g. (30, 10, 10)).
        n_objects: objects to draw, cycling through ``classes``; default about
            3 per um^3 (at least 5). Objects that find no room are left out.
        touching_fraction: about this fraction of objects share a voxel face
            with another.
        classes: the shape classes to draw (names from ``SHAPE_CLASSES_3D``).
        appearance: ``data_prep.synthetic.Appearance`` or a dict of its fields
            (grey values only; blur is in-plane, in pixels).

    Returns:
        {"image": (Z, Y, X) uint8, "instances": (Z, Y, X) uint16 (0 =
        background, ids 1..N), "classes": {id: class name}, "voxel_size_nm":
        (z, y, x) floats}.
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray([float(v) for v in voxel_size_nm])
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes (Z, Y, X) of at least 8 voxels, got {shape}")
    if spacing.shape != (3,) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"voxel_size_nm must be 3 positive numbers (z, y, x), got {voxel_size_nm!r}")
    if spacing[1:].max() > MAX_IN_PLANE_NM or spacing[0] > MAX_Z_NM:
        # Mitochondria are ~150-500 nm wide: coarser voxels cannot draw them, and placing objects
        # smaller than a voxel only fails, attempt after attempt (the command never ended).
        raise ValueError(f"voxel size {' x '.join(f'{v:g}' for v in spacing)} nm is too coarse to draw mitochondria: "
                         f"at most {MAX_Z_NM:g} nm in z and {MAX_IN_PLANE_NM:g} nm in y and x")
    if not 0 <= touching_fraction <= 1:
        raise ValueError(f"touching_fraction must be in [0, 1], got {touching_fraction}")
    unknown = sorted(set(classes) - set(SHAPE_CLASSES_3D))
    if unknown or not len(classes):
        raise ValueError(f"classes must be names from {SHAPE_CLASSES_3D}, got {list(classes)}")
    appearance = Appearance.coerce(appearance)
    if n_objects is None:
        # About 3 per um^3, but no more than could each get ~2,000 voxels: at coarse voxel sizes the
        # density alone asks for millions of objects smaller than a voxel (and a run that never ends).
        n_objects = max(5, min(round(OBJECTS_PER_UM3 * float(np.prod(np.asarray(shape) * spacing)) / 1e9),
                               int(np.prod(shape)) // 2000))
    elif n_objects < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    wanted = [classes[i % len(classes)] for i in range(n_objects)]

    geometry_ss, texture_ss, noise_ss = np.random.SeedSequence(seed).spawn(3)
    instances, records = _layout(shape, spacing, wanted, touching_fraction, np.random.default_rng(geometry_ss))
    img = _render(instances, records, spacing, np.random.default_rng(texture_ss))
    noise_rng = np.random.default_rng(noise_ss)
    image = np.stack([_finish(img[z], appearance, noise_rng.standard_normal(shape[1:]).astype(np.float32))
                      for z in range(shape[0])])
    return {
        "image": image,
        "instances": instances,
        "classes": {r["id"]: r["shape_class"] for r in records},
        "voxel_size_nm": tuple(float(v) for v in spacing),
    }


MAX_IN_PLANE_NM = 60.0  # coarsest y/x voxel that still draws a mitochondrion several voxels wide
MAX_Z_NM = 150.0


def check_outputs(out: Path) -> None:
    """FileExistsError when ``out`` already holds any of this command's outputs (never overwritten)."""
    existing = [str(out / name) for name in _OUTPUTS if (out / name).exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}")


def write_volume(out_dir: str | Path, volume: dict) -> list[Path]:
    """Write ``image.tif``, ``instances.tif`` (ImageJ hyperstacks carrying the
    voxel size in um) and ``classes.csv`` (id, shape_class, touching) into
    ``out_dir``; refuses to overwrite any of them. Returns the written paths."""
    out = Path(out_dir)
    check_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    z_um, y_um, x_um = (v / 1000 for v in volume["voxel_size_nm"])
    meta = {"resolution": (1 / x_um, 1 / y_um), "metadata": {"spacing": z_um, "unit": "um", "axes": "ZYX"}}
    touching = {i for pair in touching_pairs(volume["instances"]) for i in pair}
    table = pd.DataFrame({"id": list(volume["classes"]), "shape_class": list(volume["classes"].values())})
    table["touching"] = table["id"].isin(touching)
    writers = {
        "image.tif": lambda p: tifffile.imwrite(p, volume["image"], imagej=True, **meta),
        "instances.tif": lambda p: tifffile.imwrite(p, volume["instances"], imagej=True, compression="zlib", **meta),
        "classes.csv": lambda p: table.to_csv(p, index=False),
    }
    paths = []
    for name in _OUTPUTS:
        # A temporary file and os.replace: an interrupted run leaves no partial output.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            writers[name](tmp)
            usual_permissions(tmp)  # mkstemp's 0o600 would hide the file from other users
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(out / name)
    return paths


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic3d", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (image.tif, instances.tif, classes.csv)")
    parser.add_argument("--shape", type=positive_int, nargs=3, default=(48, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--voxel-size", type=pixel_size, nargs=3, default=(10.0, 10.0, 10.0), metavar=("Z", "Y", "X"),
                        help="voxel size in nm (default 10 10 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-objects", type=positive_int, default=None,
                        help="default: about 3 per um^3, at most one per 2,000 voxels")
    parser.add_argument("--touching-fraction", type=fraction, default=0.2)
    add_debug(parser)
    args = parser.parse_args(argv)
    check_outputs(args.out)  # before minutes of generating, not after
    volume = generate_volume(args.shape, args.seed, args.voxel_size, args.n_objects, args.touching_fraction)
    write_volume(args.out, volume)
    print(f"wrote {args.out} ({len(volume['classes'])} objects)")


if __name__ == "__main__":
    sys.exit(main())
