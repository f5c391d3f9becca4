"""Per-mitochondrion 3-D measurements, shape classes, summaries and meshes.

NumPy / SciPy / scikit-image / skan / pandas only; no TensorFlow.

Conventions
-----------
- Arrays are (Z, Y, X); ``voxel_size_nm`` is (z, y, x) in nm and may be
  anisotropic (e.g. (45, 4.6, 4.6) for serial sections). Voxel i along an
  axis has its centre at i * spacing.
- Units are in the column names, one suffix per call: with a voxel size,
  lengths end ``_nm``, areas ``_nm2`` and volumes ``_nm3``; without one,
  geometry is computed with unit spacing and the same columns end ``_vox``,
  ``_vox2`` (``volume_vox`` is always the voxel count). ``centroid_*_vox`` and
  ``bbox_*`` are always voxel indices (bbox half-open), ``centroid_*_nm`` and
  ``z_extent_nm`` exist only with a voxel size. Every table has
  ``voxel_size_{z,y,x}_nm`` (NaN when unknown). Volumes are voxel counts
  times the voxel volume; ``equivalent_diameter`` = (6 V / pi)^(1/3).
- Surfaces: marching cubes of the object's mask smoothed by a Gaussian of
  ``max(1, 0.5 * s_max / s_i)`` voxels along axis i (so serial sections are
  smoothed over about half a section thickness in-plane too, which removes the
  terraces between sections), cut at the level that keeps the voxel volume.
  A fixed level of 0.5 shrinks curved surfaces by about sigma^2 / radius; the
  volume-preserving level does not. Digitised spheres of radius >= 60 nm get
  their area within 3% at (10, 10, 10), (20, 10, 10), (30, 10, 10) and
  (45, 4.6, 4.6) nm, where the raw binary mask overestimates it by 8-16%.
  Objects only a few smoothing widths across (< ~60 nm) come out rounder
  and smaller in area than drawn.
- ``sphericity`` and ``solidity`` are NaN for an object in fewer than 3
  sections (``MIN_SECTIONS_FOR_SHAPE``): its z extent is then the sampling's,
  not its own, and no surface says what its 3-D shape is.
- ``sphericity`` = pi^(1/3) (6 V)^(2/3) / A with V and A the volume and area
  of the same mesh, so it is <= 1 by the isoperimetric inequality (1 only for
  a sphere); ``solidity`` = mesh volume / volume of the convex hull of the mesh
  vertices. Both use one surface, so a digitised sphere or ellipsoid scores
  ~1, where voxel count over the hull of voxel corners (or centres) would be
  biased by half a voxel per side.
- Axes are the full lengths 2 sqrt(5 lambda) of the ellipsoid with the
  object's second moments in physical coordinates, counting each voxel as a
  box (variance s_i^2 / 12 added along axis i), so a digitised ellipsoid gets
  its drawn axes and a one-voxel-thin object finite ones.
  ``elongation`` = major / intermediate and ``flatness`` = intermediate /
  minor, both >= 1 (a cigar is elongated, a pancake flat, a sphere neither).
- Skeletons: skimage's 3-D thinning of the smoothed mask, resampled to near
  isotropic voxels when the data are not, analysed with skan, spurs pruned
  (see ``skeleton_stats3d``). ``skeleton_length`` includes the free ends'
  distances to the surface, so a tube of length L measures about L (unlike
  the 2-D ``skeleton_length_px``, which stops at the medial axis, ~L - W).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import marching_cubes, mesh_surface_area
from skimage.morphology import skeletonize
from .morphometry import Rules, compact_ids
from .runlock import usual_permissions

__all__ = [
    "SHAPE_CLASSES_3D", "ShapeRules3D", "classify3d", "measure3d", "object_mesh",
    "skeleton_stats3d", "summarize3d", "write_meshes",
]  # fmt: skip

SHAPE_CLASSES_3D: tuple[str, ...] = ("globular", "elongated", "tubular", "branched", "fragmented")

VoxelSize = tuple[float, float, float]

# Skeletons are computed on voxels no more than this many times finer than the
# coarsest axis: (30, 10, 10) nm runs at 10 nm, (45, 4.6, 4.6) at 15 nm, which
# keeps a 200 nm tube >= 10 voxels across without a 10x larger crop.
_SKELETON_MAX_REFINE = 3.0
_ANISOTROPY_TOLERANCE = 1.2  # spacings within 20% are treated as isotropic
_MAX_PRUNE_ROUNDS = 10
_SPUR_FACTOR = 1.0  # terminal branches must protrude >= 1 local radius (see skeleton_stats3d)


# Inputs


def _voxel_size(voxel_size_nm: Sequence[float] | None) -> VoxelSize | None:
    """(z, y, x) nm as floats, or None; ValueError unless 3 positive finite numbers."""
    from .instances3d import as_voxel_size

    return as_voxel_size(voxel_size_nm)


def _check_labels(instances: np.ndarray) -> np.ndarray:
    labels = np.asarray(instances)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"instances must be a 3-D (Z, Y, X) integer label volume, got {labels.dtype} {labels.shape}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("instance ids must be non-negative")
    return labels


# Surfaces


def _sigma_vox(spacing: VoxelSize) -> np.ndarray:
    """Gaussian sigma per axis in voxels: >= 1 voxel and >= half the coarsest spacing."""
    s = np.asarray(spacing, np.float64)
    return np.maximum(1.0, 0.5 * s.max() / s)


def _smoothed(mask: np.ndarray, spacing: VoxelSize) -> tuple[np.ndarray, float, np.ndarray]:
    """Gaussian-smoothed mask and the level that keeps its voxel count.

    Args:
        mask: (z, y, x) bool crop of one object.
        spacing: voxel size (z, y, x), any unit.

    Returns:
        the float32 field (the crop padded by ``pad`` zeros per side, so the
        level surface is closed), the level, and ``pad`` (3,) int voxels.
    """
    sigma = _sigma_vox(spacing)
    pad = np.ceil(2 * sigma).astype(int) + 1
    field = np.pad(mask, [(p, p) for p in pad]).astype(np.float32)
    field = ndi.gaussian_filter(field, sigma, mode="constant")
    n = int(np.count_nonzero(mask))
    flat = field.ravel()
    k = flat.size - n  # the n largest values lie above the level
    part = np.partition(flat, (k - 1, k))
    return field, float(0.5 * (part[k - 1] + part[k])), pad


def _mesh(field: np.ndarray, level: float, spacing: VoxelSize, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of ``field`` at ``level``: verts (n, 3) float32 in the crop's
    physical frame (z, y, x), faces (m, 3) int.

    A coarse step can jump over a thin object entirely; it then falls back to
    step 1, and to an empty mesh if even that finds no surface.
    """
    for s in dict.fromkeys((step, 1)):
        try:
            verts, faces, _, _ = marching_cubes(field, level, spacing=spacing, step_size=s, allow_degenerate=False)
            return verts.astype(np.float32), faces
        except (RuntimeError, ValueError):  # "No surface found at the given iso value"
            continue
    return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)


def _mesh_volume(verts: np.ndarray, faces: np.ndarray) -> float:
    """Enclosed volume of a closed triangle mesh (divergence theorem)."""
    v = verts.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return abs(float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)


def object_mesh(
    mask_crop: np.ndarray,
    voxel_size_nm: Sequence[float] | None = None,
    offset_vox: Sequence[int] = (0, 0, 0),
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed surface mesh of one object (the one ``measure3d`` measures).

    Args:
        mask_crop: (z, y, x) bool mask of one object, e.g. a bounding-box crop.
        voxel_size_nm: (z, y, x) nm; None gives vertices in voxels.
        offset_vox: (z, y, x) voxel index of ``mask_crop[0, 0, 0]`` in the
            volume, so meshes of several crops share one frame.
        step: marching-cubes step in voxels (> 1 gives coarser, smaller meshes).

    Returns:
        verts (n, 3) float32, (z, y, x) in nm (or voxels) in the volume frame;
        faces (m, 3) int, indices into verts.
    """
    mask = np.asarray(mask_crop, bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError(f"mask_crop must be a non-empty 3-D mask, got shape {mask.shape}")
    spacing = _voxel_size(voxel_size_nm) or (1.0, 1.0, 1.0)
    field, level, pad = _smoothed(mask, spacing)
    verts, faces = _mesh(field, level, spacing, step)
    shift = (np.asarray(offset_vox, np.float64) - pad) * np.asarray(spacing)
    return (verts + shift).astype(np.float32), faces


# Skeletons


def _isotropic(field: np.ndarray, spacing: VoxelSize) -> tuple[np.ndarray, VoxelSize]:
    """``field`` resampled (linearly) to near-isotropic voxels, and their spacing."""
    s = np.asarray(spacing, np.float64)
    if s.max() <= _ANISOTROPY_TOLERANCE * s.min():
        return field, spacing
    target = max(s.min(), s.max() / _SKELETON_MAX_REFINE)
    shape_in = np.asarray(field.shape)
    shape_out = np.maximum(2, np.round(shape_in * s / target)).astype(int)
    out = ndi.zoom(field, shape_out / shape_in, order=1, grid_mode=False)
    # zoom maps first and last samples onto each other: the exact new spacing.
    new = s * (shape_in - 1) / (np.asarray(out.shape) - 1)
    return out, (float(new[0]), float(new[1]), float(new[2]))


class _Clusters:
    """Union-find over skan node ids."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = self.parent.setdefault(a, a)
        while root != self.parent[root]:
            root = self.parent[root]
        while a != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _graph(table: pd.DataFrame, radius: np.ndarray) -> tuple[_Clusters, np.ndarray, dict[int, int]]:
    """Contract junction-to-junction branches shorter than the larger end radius.

    Adjacent junction pixels (and the short middle of an X, whose two arms
    cross a little apart) would otherwise count as several junctions.

    Returns:
        the node clusters, a bool mask of the contracted (internal) branches,
        and each cluster's degree (branch ends on it; a loop counts twice).
    """
    clusters = _Clusters()
    src = table["node_id_src"].to_numpy()
    dst = table["node_id_dst"].to_numpy()
    internal = (
        (table["branch_type"].to_numpy() == 2)
        & (table["branch_distance"].to_numpy() < np.maximum(radius[src], radius[dst]))
    )  # fmt: skip
    for a, b in zip(src[internal], dst[internal]):
        clusters.union(int(a), int(b))
    degree: dict[int, int] = {}
    for a, b in zip(src[~internal], dst[~internal]):
        for node in (clusters.find(int(a)), clusters.find(int(b))):
            degree[node] = degree.get(node, 0) + 1
    return clusters, internal, degree


def _count(table: pd.DataFrame, radius: np.ndarray) -> tuple[int, int]:
    """(branches, junctions) of a pruned skeleton graph.

    Junctions are clusters of degree >= 3; branches are the edges left after
    merging the two edges through every degree-2 node (a kink), so a loop with
    no junction is one branch.
    """
    clusters, internal, degree = _graph(table, radius)
    src = table["node_id_src"].to_numpy()[~internal]
    dst = table["node_id_dst"].to_numpy()[~internal]
    n_junctions = sum(1 for d in degree.values() if d >= 3)
    # Connected components of the contracted graph: a component whose every
    # node has degree 2 is a closed loop.
    comp = _Clusters()
    for a, b in zip(src, dst):
        comp.union(clusters.find(int(a)), clusters.find(int(b)))
    edges: dict[int, int] = {}
    kinks: dict[int, int] = {}
    others: dict[int, int] = {}
    for a in src:
        root = comp.find(clusters.find(int(a)))
        edges[root] = edges.get(root, 0) + 1
    for node, d in degree.items():
        root = comp.find(node)
        (kinks if d == 2 else others)[root] = (kinks if d == 2 else others).get(root, 0) + 1
    n_branches = sum(1 if others.get(root, 0) == 0 else n - kinks.get(root, 0) for root, n in edges.items())
    return n_branches, n_junctions


def _shaved(solid: np.ndarray, axis: int | None) -> np.ndarray:
    """``solid`` one voxel thinner along ``axis``: its first layer on that side removed."""
    if axis is None:
        return solid
    lower = [slice(None)] * 3
    lower[axis] = slice(None, -1)
    out = np.zeros_like(solid)
    upper = [slice(None)] * 3
    upper[axis] = slice(1, None)
    out[tuple(upper)] = solid[tuple(upper)] & solid[tuple(lower)]
    return out


def _thin(solid: np.ndarray) -> np.ndarray:
    """``skeletonize`` (Lee's 3-D thinning), robust to its vanishing skeletons.

    scikit-image's 3-D thinning re-checks its deletion candidates for
    simplicity but not for having become end points, so a curve can be eaten
    from one end within one pass and an object vanish (scikit-image issues
    3757, 6513): smooth ellipsoids, and symmetric bars of even thickness in
    every scan order. A vanished object is thinned again one voxel thinner
    along one axis (which breaks the even thickness) and with the axes
    flipped and permuted (other scan orders); in our tests every vanished
    case came back within four tries. If all vanish, the deepest voxel stands
    for the skeleton (a point).
    """
    for perm in itertools.permutations(range(3)):
        back = np.argsort(perm)
        for flips in itertools.product((1, -1), repeat=3):
            view = tuple(slice(None, None, f) for f in flips)
            for axis in (None, 0, 1, 2):
                moved = np.ascontiguousarray(_shaved(solid, axis).transpose(perm)[view])
                skel = skeletonize(moved)[view].transpose(back)
                if skel.any():
                    return skel
    skel = np.zeros_like(solid)
    skel[np.unravel_index(np.argmax(ndi.distance_transform_edt(solid)), solid.shape)] = True
    return skel


def _path_length(coords: np.ndarray, passes: int = 2) -> float:
    """Length of a skeleton path (n, 3) in physical units, after smoothing.

    Voxel steps of 1, sqrt(2) and sqrt(3) trace a staircase that overstates a
    curve's length by up to ~10% (a digitised ring: +9%); two passes of a
    [1, 2, 1] / 4 filter with the ends fixed bring rings within ~1%.
    """
    c = coords.astype(np.float64)
    for _ in range(passes if len(c) > 2 else 0):
        c[1:-1] = 0.25 * c[:-2] + 0.5 * c[1:-1] + 0.25 * c[2:]
    return float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum())


def _summary(skel: np.ndarray, spacing: VoxelSize) -> tuple[Any, pd.DataFrame | None]:
    """skan's Skeleton and branch table of a skeleton image; (None, None) when it has no branch: one
    voxel, or only isolated voxels (smoothing can split an object into blobs that each thin to a point)."""
    import skan  # numba compiles on first use; import only when skeletons are measured

    n = np.count_nonzero(skel)
    if n < 2 or ndi.label(skel, structure=np.ones((3,) * skel.ndim, bool))[1] == n:
        return None, None  # (skan fails on a skeleton of isolated voxels: no path to build)
    sk = skan.Skeleton(skel, spacing=spacing)
    with warnings.catch_warnings():
        # skan 0.13 renames columns with pandas' deprecated inplace=True.
        warnings.filterwarnings("ignore", message=".*inplace keyword.*")
        return sk, skan.summarize(sk, separator="_")


def skeleton_stats3d(
    mask: np.ndarray, voxel_size_nm: Sequence[float] | None = None, spur_factor: float = _SPUR_FACTOR
) -> tuple[float, int, int]:
    """Pruned 3-D curve skeleton of one object: length, branches, junctions.

    The mask is smoothed as for the surface (see the module docstring),
    resampled to near-isotropic voxels when anisotropic, thinned
    (``skimage.morphology.skeletonize``) and analysed with skan. Blunt ends and
    surface bumps grow short terminal branches; a terminal branch from junction
    J to end E is a spur, and removed, when it protrudes beyond the largest
    ball inscribed at J by less than ``spur_factor`` times that ball's radius:
    |JE| + r(E) - r(J) < spur_factor * r(J) (r = distance to the background).
    The plain branch length would keep the spurs that run from a flat end's
    fork to its corners (about r sqrt(2) long). Pruning repeats until nothing
    changes, since removing spurs can expose new ones. Junctions closer
    together than their radius (the two forks of an X) count as one.

    Args:
        mask: (z, y, x) bool mask of one object (a crop is enough).
        voxel_size_nm: (z, y, x) nm; None for voxel units.
        spur_factor: minimum protrusion of a terminal branch, in local radii.

    Returns:
        skeleton length (nm or voxels): the smoothed path length of all
        branches plus, at each free end, the end's distance to the surface, so
        a tube of length L (caps included) measures about L, a ring of radius R
        about 2 pi R and a Y the sum of its arms; number of branches (1 for a
        simple curve and for a loop, 3 for a Y, 4 for an X; a sphere thins to a
        point, 0 branches and length ~ its diameter, or a short segment, 1
        branch); number of junctions.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0, 0, 0
    spacing = _voxel_size(voxel_size_nm) or (1.0, 1.0, 1.0)
    field, level, _ = _smoothed(mask, spacing)
    return _skeleton(field, level, spacing, spur_factor)


def _skeleton(field: np.ndarray, level: float, spacing: VoxelSize, spur_factor: float) -> tuple[float, int, int]:
    """``skeleton_stats3d`` of the object {field > level} (a ``_smoothed`` field)."""
    field, spacing = _isotropic(field, spacing)
    solid = field > level
    if not solid.any():  # an object thinner than the resampled voxels
        solid = field >= field.max()
    skel = _thin(solid)
    radius_img = ndi.distance_transform_edt(solid, sampling=spacing)
    for rounds_left in range(_MAX_PRUNE_ROUNDS, -1, -1):
        sk, table = _summary(skel, spacing)
        if table is None:
            radius = radius_img[skel]
            break
        radius = radius_img[tuple(np.round(sk.coordinates).astype(int).T)]
        drop = _spurs(sk, table, radius, spur_factor)
        if not drop or not rounds_left:
            break
        for i in drop:
            path = sk.path(i)
            path = path[sk.degrees[path] <= 2]  # keep the junction pixels
            skel[tuple(np.round(sk.coordinates[path]).astype(int).T)] = False
        # Re-thin: wiping a spur can leave a small clump at its junction.
        skel = _thin(skel)
    # Free ends stop about one radius short of the surface: extend each by its
    # distance to the surface (edt minus half a voxel), so a tube's skeleton
    # measures the tube's length.
    reach = np.clip(radius - 0.5 * min(spacing), 0, None)
    if table is None:  # a point (or isolated points): a sphere-like object, as long as it is wide
        return 2 * float(reach.max()), 0, 0
    s = np.asarray(spacing)
    length = sum(_path_length(sk.path_coordinates(i) * s) for i in range(sk.n_paths))
    length += float(reach[sk.degrees == 1].sum())
    n_branches, n_junctions = _count(table, radius)
    return float(length), n_branches, n_junctions


def _spurs(sk: Any, table: pd.DataFrame, radius: np.ndarray, spur_factor: float) -> list[int]:
    """Rows of ``table`` that are spurs (see ``skeleton_stats3d``); radius is per skan node."""
    clusters, internal, degree = _graph(table, radius)
    drop = []
    for i in np.flatnonzero((table["branch_type"].to_numpy() == 1) & ~internal):
        a, b = int(table["node_id_src"].iat[i]), int(table["node_id_dst"].iat[i])
        end, junction = (a, b) if sk.degrees[a] == 1 else (b, a)
        if degree.get(clusters.find(junction), 0) < 3:
            continue  # the junction was a kink or a contracted cluster's far side
        reach = float(table["euclidean_distance"].iat[i]) + radius[end] - radius[junction]
        if reach < spur_factor * radius[junction]:
            drop.append(int(i))
    return drop


# Measurements


def _moments(mask: np.ndarray, spacing: VoxelSize) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (3,) in crop voxels and physical covariance (3, 3) of a mask.

    Uses the three 2-D projections instead of every voxel's coordinates, so a
    large object costs no (n, 3) coordinate array.
    """
    pzy, pzx, pyx = (mask.sum(axis=a, dtype=np.float64) for a in (2, 1, 0))
    z, y, x = (np.arange(n, dtype=np.float64) for n in mask.shape)
    n = pzy.sum()
    cz, cy = pzy.sum(1) @ z / n, pzy.sum(0) @ y / n
    cx = pzx.sum(0) @ x / n
    dz, dy, dx = z - cz, y - cy, x - cx
    cov = np.empty((3, 3))
    cov[0, 0] = pzy.sum(1) @ dz**2 / n
    cov[1, 1] = pzy.sum(0) @ dy**2 / n
    cov[2, 2] = pzx.sum(0) @ dx**2 / n
    cov[0, 1] = cov[1, 0] = dz @ pzy @ dy / n
    cov[0, 2] = cov[2, 0] = dz @ pzx @ dx / n
    cov[1, 2] = cov[2, 1] = dy @ pyx @ dx / n
    s = np.asarray(spacing)
    # Each voxel is a box, not a point: its own variance s^2/12 per axis.
    return np.array([cz, cy, cx]), cov * np.outer(s, s) + np.diag(s**2 / 12)


def _columns(unit: str, known: bool, image: bool, heatmap: bool) -> list[str]:
    """Column names of a ``measure3d`` table, in order."""
    cols = ["id", "centroid_z_vox", "centroid_y_vox", "centroid_x_vox"]
    if known:
        cols += ["centroid_z_nm", "centroid_y_nm", "centroid_x_nm"]
    cols += ["bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1", "volume_vox"]
    if known:
        cols.append("volume_nm3")
    cols += [
        f"surface_area_{unit}2", "sphericity", f"equivalent_diameter_{unit}",
        f"axis_major_{unit}", f"axis_intermediate_{unit}", f"axis_minor_{unit}", "elongation", "flatness",
        "solidity", "z_extent_slices",
    ]  # fmt: skip
    if known:
        cols.append("z_extent_nm")
    cols += [f"skeleton_length_{unit}", "n_branches", "n_junctions", "touches_border"]
    if image:
        cols.append("mean_intensity")
    if heatmap:
        cols.append("gradcam_mean")
    return cols + ["voxel_size_z_nm", "voxel_size_y_nm", "voxel_size_x_nm"]


# Sections an object must span for sphericity and solidity: fewer, and its thickness is the sampling's.
MIN_SECTIONS_FOR_SHAPE = 3


def _measure_one(mask: np.ndarray, spacing: VoxelSize, unit: str) -> dict[str, Any]:
    """Geometry of one object's bool crop, in the units of ``spacing``."""
    field, level, _ = _smoothed(mask, spacing)
    verts, faces = _mesh(field, level, spacing)
    area = float(mesh_surface_area(verts, faces))
    mesh_volume = _mesh_volume(verts, faces)
    try:
        solidity = mesh_volume / ConvexHull(verts.astype(np.float64)).volume
    except (QhullError, ValueError):  # too few or coplanar vertices
        solidity = float("nan")
    centroid, cov = _moments(mask, spacing)
    lam = np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]
    major, inter, minor = 2 * np.sqrt(5 * lam)
    volume = float(np.count_nonzero(mask)) * float(np.prod(spacing))
    length, n_branches, n_junctions = _skeleton(field, level, spacing, _SPUR_FACTOR)
    if np.count_nonzero(mask.any(axis=(1, 2))) < MIN_SECTIONS_FOR_SHAPE:
        # Seen in one or two sections, the object's extent along z is the section thickness, not its
        # own: the smoothed surface rounds that slab into a lens (sphericity 0.89 for a 270 x 200 nm
        # profile in one 45-nm section, where the slab itself has 0.63). Its 3-D shape is not measured.
        sphericity = solidity = float("nan")
    else:
        sphericity = math.pi ** (1 / 3) * (6 * mesh_volume) ** (2 / 3) / area if area > 0 else float("nan")
    return {
        "centroid": centroid,
        f"surface_area_{unit}2": area,
        "sphericity": sphericity,
        f"equivalent_diameter_{unit}": (6 * volume / math.pi) ** (1 / 3),
        f"axis_major_{unit}": major,
        f"axis_intermediate_{unit}": inter,
        f"axis_minor_{unit}": minor,
        "elongation": major / inter,
        "flatness": inter / minor,
        "solidity": solidity,
        f"skeleton_length_{unit}": length,
        "n_branches": n_branches,
        "n_junctions": n_junctions,
    }


def measure3d(
    instances: np.ndarray,
    voxel_size_nm: Sequence[float] | None = None,
    image: np.ndarray | None = None,
    heatmap: np.ndarray | None = None,
) -> pd.DataFrame:
    """Measure every labelled object of a volume.

    Objects are measured one at a time on their bounding-box crops, so memory
    follows the largest object, not the volume.

    Args:
        instances: (Z, Y, X) integer ids (any integer dtype), 0 background.
        voxel_size_nm: (z, y, x) voxel size in nm (anisotropic allowed); None
            computes geometry with unit spacing and names columns ``_vox``.
        image: optional (Z, Y, X) intensities for ``mean_intensity``.
        heatmap: optional (Z, Y, X) Grad-CAM heatmap for ``gradcam_mean``.

    Returns:
        DataFrame, one row per id in increasing order, columns (``<u>`` is
        ``nm`` with a voxel size, ``vox`` without): id; centroid_{z,y,x}_vox
        [centroid_{z,y,x}_nm]; bbox_{z,y,x}0, bbox_{z,y,x}1; volume_vox
        [volume_nm3]; surface_area_<u>2; sphericity; equivalent_diameter_<u>;
        axis_{major,intermediate,minor}_<u>; elongation; flatness; solidity;
        z_extent_slices [z_extent_nm]; skeleton_length_<u>; n_branches;
        n_junctions; touches_border (the bbox reaches a volume face);
        [mean_intensity]; [gradcam_mean]; voxel_size_{z,y,x}_nm. An empty
        volume gives an empty table with the same columns.
    """
    labels = _check_labels(instances)
    for name, arr in (("image", image), ("heatmap", heatmap)):
        if arr is not None and np.shape(arr) != labels.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} differs from instances shape {labels.shape}")
    size = _voxel_size(voxel_size_nm)
    labels, original_ids = compact_ids(labels)  # ids up to 2**64 - 1 without id-long arrays
    rows = []
    for index, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        obj_id = index + 1
        rows.append(object_row(obj_id if original_ids is None else original_ids[obj_id], labels[box] == obj_id,
                               tuple(s.start for s in box), labels.shape, size,
                               None if image is None else image[box], None if heatmap is None else heatmap[box]))
    return table_from_rows(rows, voxel_size_nm, image is not None, heatmap is not None)


def object_row(obj_id: int, mask: np.ndarray, origin: Sequence[int], volume_shape: Sequence[int],
               voxel_size_nm: Sequence[float] | None = None, image: np.ndarray | None = None,
               heatmap: np.ndarray | None = None) -> dict[str, Any]:
    """One object's `measure3d` row from its tight bounding-box mask.

    mask: (z, y, x) bool, the object in its bounding box; origin: the box's
    first voxel in the volume; volume_shape: (Z, Y, X) of the whole volume (for
    `touches_border`); image / heatmap: the same box of those volumes. Used by
    `measure3d` and by the chunked path, which sees each object on its own.
    """
    size = _voxel_size(voxel_size_nm)
    known = size is not None
    spacing = size or (1.0, 1.0, 1.0)
    unit = "nm" if known else "vox"
    lo = np.asarray(origin, np.int64)
    hi = lo + np.asarray(mask.shape)
    geo = _measure_one(mask, spacing, unit)
    centroid = lo + geo.pop("centroid")
    row: dict[str, Any] = {"id": int(obj_id)}
    row.update(zip(("centroid_z_vox", "centroid_y_vox", "centroid_x_vox"), centroid))
    if known:
        row.update(zip(("centroid_z_nm", "centroid_y_nm", "centroid_x_nm"), centroid * np.asarray(spacing)))
    row.update(zip(("bbox_z0", "bbox_y0", "bbox_x0"), lo.tolist()))
    row.update(zip(("bbox_z1", "bbox_y1", "bbox_x1"), hi.tolist()))
    row["volume_vox"] = int(np.count_nonzero(mask))
    if known:
        row["volume_nm3"] = row["volume_vox"] * float(np.prod(spacing))
    row.update(geo)
    row["z_extent_slices"] = int(hi[0] - lo[0])
    if known:
        row["z_extent_nm"] = row["z_extent_slices"] * spacing[0]
    row["touches_border"] = bool((lo == 0).any() or (hi == np.asarray(volume_shape)).any())
    if image is not None:
        row["mean_intensity"] = float(np.asarray(image)[mask].mean(dtype=np.float64))
    if heatmap is not None:
        row["gradcam_mean"] = float(np.asarray(heatmap)[mask].mean(dtype=np.float64))
    return row


def table_from_rows(rows: list[dict], voxel_size_nm: Sequence[float] | None = None, image: bool = False,
                    heatmap: bool = False) -> pd.DataFrame:
    """`object_row` rows as a `measure3d` table (columns, dtypes, voxel-size columns)."""
    size = _voxel_size(voxel_size_nm)
    known = size is not None
    spacing = size or (1.0, 1.0, 1.0)
    columns = _columns("nm" if known else "vox", known, image, heatmap)
    table = pd.DataFrame(rows, columns=columns)
    for axis, value in zip("zyx", spacing):
        table[f"voxel_size_{axis}_nm"] = value if known else np.nan
    big = len(table) and int(table["id"].max()) > np.iinfo(np.int64).max  # uint64 ids beyond int64
    dtypes = {"id": np.uint64 if big else np.int64, "volume_vox": np.int64, "z_extent_slices": np.int64, "n_branches": np.int64,
              "n_junctions": np.int64, "touches_border": bool}
    dtypes.update({c: np.int64 for c in columns if c.startswith("bbox_")})
    return table.astype(dtypes).astype({c: np.float64 for c in columns if c not in dtypes})


# Meshes


def write_meshes(
    path: str | Path,
    meshes: Mapping[int, tuple[np.ndarray, np.ndarray]],
    fmt: str | None = None,
    unit: str = "nm",
) -> None:
    """Write object meshes to one PLY or OBJ file, atomically.

    Vertices are given (z, y, x), as ``object_mesh`` returns them, and written
    x, y, z, the order mesh viewers (MeshLab, Blender, napari) expect, so the
    volume's X axis is the viewer's x.

    - PLY: binary little-endian; vertex x, y, z float32 and ``object_id``
      uint32; face ``vertex_indices`` (uchar count, int32 indices) and
      ``object_id`` uint32. The unit is stated in a header comment.
    - OBJ: one ``o object_<id>`` group per object, 1-based global indices.

    Args:
        path: output file; written via a temporary file in the same folder
            and ``os.replace``, so readers never see a partial file.
        meshes: {object id: (verts (n, 3) z, y, x; faces (m, 3) int)}.
        fmt: "ply" or "obj"; None takes it from the file suffix.
        unit: unit of the vertex coordinates, recorded in the file.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in ("ply", "obj"):
        raise ValueError(f"mesh format must be 'ply' or 'obj', got {fmt!r}")
    ids = sorted(meshes)
    verts = [np.asarray(meshes[i][0], np.float32)[:, ::-1] for i in ids]  # z, y, x -> x, y, z
    faces = [np.asarray(meshes[i][1], np.int64) for i in ids]
    for i, v, f in zip(ids, verts, faces):
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"mesh {i}: expected verts (n, 3) and faces (m, 3), got {v.shape} and {f.shape}")
    offsets = np.cumsum([0] + [len(v) for v in verts])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if fmt == "ply":
                _write_ply(fh, ids, verts, faces, offsets, unit)
            else:
                _write_obj(fh, ids, verts, faces, offsets, unit)
        usual_permissions(tmp)  # mkstemp's 0o600 would hide the mesh from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_ply(fh, ids, verts, faces, offsets, unit: str) -> None:
    n_v, n_f = int(offsets[-1]), sum(len(f) for f in faces)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment xmdl_tf morphometry3d meshes, vertex coordinates x y z in {unit}\n"
        f"element vertex {n_v}\nproperty float x\nproperty float y\nproperty float z\nproperty uint object_id\n"
        f"element face {n_f}\nproperty list uchar int vertex_indices\nproperty uint object_id\nend_header\n"
    )
    fh.write(header.encode("ascii"))
    vdt = np.dtype([("xyz", "<f4", 3), ("id", "<u4")])
    fdt = np.dtype([("n", "u1"), ("idx", "<i4", 3), ("id", "<u4")])
    for i, v in zip(ids, verts):
        rec = np.empty(len(v), vdt)
        rec["xyz"], rec["id"] = v, i
        fh.write(rec.tobytes())
    for i, f, off in zip(ids, faces, offsets):
        rec = np.empty(len(f), fdt)
        rec["n"], rec["idx"], rec["id"] = 3, f + off, i
        fh.write(rec.tobytes())


def _write_obj(fh, ids, verts, faces, offsets, unit: str) -> None:
    fh.write(f"# xmdl_tf morphometry3d meshes, vertex coordinates x y z in {unit}\n".encode("ascii"))
    for i, v, f, off in zip(ids, verts, faces, offsets):
        lines = [f"o object_{i}"]
        lines += [f"v {x:.6g} {y:.6g} {z:.6g}" for x, y, z in v.tolist()]
        lines += [f"f {a} {b} {c}" for a, b, c in (f + off + 1).tolist()]
        fh.write(("\n".join(lines) + "\n").encode("ascii"))


# Shape classes


@dataclass(frozen=True)
class ShapeRules3D(Rules):
    """Every threshold of the 3-D shape classes, in one place.

    Rules, first match wins (``*_max_*`` bounds exclusive, ``*_min_*``
    inclusive); aspect = axis_major / axis_minor of the moment ellipsoid:

    1. fragmented: volume < ``fragmented_max_volume_nm3`` (or, when the voxel
       size is unknown, volume_vox < ``fragmented_max_volume_vox``);
    2. branched: n_junctions >= ``branched_min_junctions`` or
       n_branches >= ``branched_min_branches`` (after spur pruning);
    3. globular: aspect < ``globular_max_aspect``;
    4. elongated: aspect < ``elongated_max_aspect``;
    5. tubular: otherwise (long and thin).

    Mitochondria are about 200-500 nm across; ``fragmented_max_volume_nm3`` =
    8e6 nm^3 = 0.008 um^3 is a sphere ~250 nm across, the smallest intact
    globular ones are ~300 nm (0.014 um^3). ``fragmented_max_volume_vox`` =
    64,000 voxels is the same volume at 5 nm isotropic voxels (FIB-SEM, e.g.
    the EPFL hippocampus volume); it is only a fallback for volumes without a
    voxel size and should be set for other sampling. A prolate ellipsoid's
    aspect is its axis ratio; a straight tube's is about 1.15 x length /
    diameter, so tubes with length >= 3 diameters are tubular.
    """

    fragmented_max_volume_nm3: float = 8.0e6
    fragmented_max_volume_vox: float = 64_000.0
    branched_min_junctions: int = 1
    branched_min_branches: int = 3
    globular_max_aspect: float = 1.6
    elongated_max_aspect: float = 3.5

    def _check(self) -> None:
        if not 1 <= self.globular_max_aspect <= self.elongated_max_aspect:
            raise ValueError(
                "ShapeRules3D needs 1 <= globular_max_aspect <= elongated_max_aspect, got "
                f"{self.globular_max_aspect} and {self.elongated_max_aspect}"
            )


def _physical_or_voxel(table: pd.DataFrame, name: str) -> np.ndarray:
    """Column ``<name>_nm`` row by row where known, else ``<name>_vox`` (float64)."""
    if f"{name}_vox" not in table and f"{name}_nm" not in table:
        raise ValueError(f"table has neither {name}_nm nor {name}_vox (expected a measure3d table)")
    out = np.full(len(table), np.nan)
    if f"{name}_vox" in table:
        out = table[f"{name}_vox"].to_numpy(np.float64)
    if f"{name}_nm" in table:
        nm = table[f"{name}_nm"].to_numpy(np.float64)
        out = np.where(np.isfinite(nm), nm, out)
    return out


def classify3d(table: pd.DataFrame, rules: ShapeRules3D | None = None) -> pd.Series:
    """Shape class of every row of a ``measure3d`` table (rules: ``ShapeRules3D``).

    Rows with a finite ``volume_nm3`` use the nm^3 threshold, the others
    ``volume_vox`` and the voxel fallback, so tables of several volumes can be
    classified together.

    Returns:
        Series of names from ``SHAPE_CLASSES_3D``, same index as ``table``.
    """
    rules = rules or ShapeRules3D()
    volume_vox = table["volume_vox"].to_numpy(np.float64)
    volume_nm3 = table["volume_nm3"].to_numpy(np.float64) if "volume_nm3" in table else np.full(len(table), np.nan)
    known = np.isfinite(volume_nm3)
    fragmented = np.where(
        known,
        np.where(known, volume_nm3, 0) < rules.fragmented_max_volume_nm3,
        volume_vox < rules.fragmented_max_volume_vox,
    )
    branched = (table["n_junctions"].to_numpy() >= rules.branched_min_junctions) | (
        table["n_branches"].to_numpy() >= rules.branched_min_branches
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = _physical_or_voxel(table, "axis_major") / _physical_or_voxel(table, "axis_minor")
    names = np.select(
        [fragmented, branched, aspect < rules.globular_max_aspect, aspect < rules.elongated_max_aspect],
        ["fragmented", "branched", "globular", "elongated"],
        default="tubular",
    )
    return pd.Series(names, index=table.index, name="shape_class", dtype=object)


# Summary


def summarize3d(
    table: pd.DataFrame,
    volume_shape_zyx: Sequence[int],
    voxel_size_nm: Sequence[float] | None = None,
) -> dict[str, float | int]:
    """One volume's summary from its ``measure3d`` table.

    Args:
        table: the volume's table; a ``shape_class`` column is used when
            present, otherwise the rows are classified with default rules.
        volume_shape_zyx: (Z, Y, X) of the measured volume, voxels.
        voxel_size_nm: (z, y, x) nm; None takes it from the table's
            ``voxel_size_*_nm`` columns when they are finite.

    Returns:
        ``count``; ``count_<class>`` for each of ``SHAPE_CLASSES_3D``;
        ``density_per_um3`` (objects per um^3, NaN without a voxel size);
        ``volume_fraction`` (object voxels / all voxels); ``n_touching_border``;
        medians of volume, surface area, sphericity, equivalent diameter,
        elongation and skeleton length (each present column of either unit,
        e.g. ``median_volume_vox`` and ``median_volume_nm3``), and
        ``median_gradcam`` when ``gradcam_mean`` exists. Medians are NaN for an
        empty table.
    """
    shape = tuple(int(n) for n in volume_shape_zyx)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"volume_shape_zyx must be 3 positive sizes, got {volume_shape_zyx!r}")
    size = _voxel_size(voxel_size_nm)
    if size is None and len(table) and all(f"voxel_size_{a}_nm" in table for a in "zyx"):
        first = tuple(float(table[f"voxel_size_{a}_nm"].iloc[0]) for a in "zyx")
        if all(math.isfinite(v) and v > 0 for v in first):
            size = first  # type: ignore[assignment]
    n_voxels = float(np.prod(shape))
    classes = table["shape_class"] if "shape_class" in table else classify3d(table)
    counts = classes.value_counts()
    out: dict[str, float | int] = {"count": len(table)}
    out.update({f"count_{name}": int(counts.get(name, 0)) for name in SHAPE_CLASSES_3D})
    out["density_per_um3"] = len(table) / (n_voxels * float(np.prod(size)) / 1e9) if size else float("nan")
    out["volume_fraction"] = float(table["volume_vox"].sum()) / n_voxels if len(table) else 0.0
    out["n_touching_border"] = int(table["touches_border"].sum()) if len(table) else 0
    for col in (
        "volume_vox", "volume_nm3", "surface_area_vox2", "surface_area_nm2", "sphericity",
        "equivalent_diameter_vox", "equivalent_diameter_nm", "elongation", "skeleton_length_vox",
        "skeleton_length_nm",
    ):  # fmt: skip
        if col in table:
            out[f"median_{col}"] = float(table[col].median()) if len(table) else float("nan")
    if "gradcam_mean" in table:
        out["median_gradcam"] = float(table["gradcam_mean"].median()) if len(table) else float("nan")
    return out
