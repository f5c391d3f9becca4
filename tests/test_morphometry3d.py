"""3-D morphometry against analytic shapes, shape classes, summaries and meshes.

Shapes are drawn in nm (voxel centres inside the analytic body) at isotropic
(10, 10, 10) and anisotropic (30, 10, 10) nm voxels, each with a sub-voxel
offset so no shape sits symmetrically on the grid. Tolerances are stated per
check; they are what the smoothed-mesh and skeleton methods reach here.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from xmdl_tf.morphometry3d import (
    SHAPE_CLASSES_3D,
    ShapeRules3D,
    classify3d,
    measure3d,
    object_mesh,
    skeleton_stats3d,
    summarize3d,
    write_meshes,
)

ISO = (10.0, 10.0, 10.0)
ANISO = (30.0, 10.0, 10.0)
SPACINGS = pytest.mark.parametrize("spacing", [ISO, ANISO], ids=["iso", "aniso"])
# Voxel counts of bodies only ~5 sections thick (r = 70-100 nm at 30 nm) are
# off the analytic volume by up to ~3.5% from digitisation alone.
VOLUME_TOL = {ISO: 0.02, ANISO: 0.04}
AREA_TOL = {ISO: 0.03, ANISO: 0.04}


# Analytic shapes, in nm


def _grid(extent_nm, spacing):
    """Voxel-centre coordinates (z, y, x) in nm of a volume covering ``extent_nm``
    plus a 3-voxel margin, centred on 0 with an off-grid offset, and its shape."""
    shape = tuple(int(math.ceil(e / s)) + 6 for e, s in zip(extent_nm, spacing))
    axes = [(np.arange(n) - n / 2 + 0.31) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True), shape


def _ellipsoid(semi, spacing, rotate_zx_deg=0.0):
    (z, y, x), _ = _grid([2 * max(semi)] * 3, spacing)
    a = math.radians(rotate_zx_deg)
    u, w = z * math.cos(a) + x * math.sin(a), -z * math.sin(a) + x * math.cos(a)
    return (u / semi[0]) ** 2 + (y / semi[1]) ** 2 + (w / semi[2]) ** 2 <= 1


def _cylinder(radius, length, spacing):
    """Flat-ended cylinder along x."""
    (z, y, x), _ = _grid((2 * radius, 2 * radius, length), spacing)
    return (z**2 + y**2 <= radius**2) & (np.abs(x) <= length / 2)


def _torus(big, small, spacing):
    """Ring in the y-x plane."""
    (z, y, x), _ = _grid((2 * small, 2 * (big + small), 2 * (big + small)), spacing)
    return (np.sqrt(y**2 + x**2) - big) ** 2 + z**2 <= small**2


def _tubes(radius, tips, spacing):
    """Union of round-capped tubes from the origin to each tip (z, y, x) nm."""
    reach = np.abs(np.asarray(tips, float)).max(axis=0) + radius
    (z, y, x), _ = _grid(2 * reach, spacing)
    out = False
    for tip in np.asarray(tips, float):
        t = np.clip((z * tip[0] + y * tip[1] + x * tip[2]) / (tip @ tip), 0, 1)
        out = out | ((z - t * tip[0]) ** 2 + (y - t * tip[1]) ** 2 + (x - t * tip[2]) ** 2 <= radius**2)
    return out


def _measure_one(mask, spacing):
    table = measure3d(mask.astype(np.uint16), spacing)
    assert len(table) == 1
    return table.iloc[0]


def _rel(value, reference):
    return abs(value - reference) / reference


# Geometry against analytic values


@SPACINGS
def test_sphere(spacing):
    r = 150.0
    row = _measure_one(_ellipsoid((r, r, r), spacing), spacing)
    assert _rel(row["volume_nm3"], 4 / 3 * math.pi * r**3) < 0.02
    assert _rel(row["surface_area_nm2"], 4 * math.pi * r**2) < 0.03
    assert 0.97 < row["sphericity"] <= 1.0
    assert _rel(row["equivalent_diameter_nm"], 2 * r) < 0.01
    for axis in ("major", "intermediate", "minor"):
        assert _rel(row[f"axis_{axis}_nm"], 2 * r) < 0.03
    assert row["elongation"] < 1.03 and row["flatness"] < 1.03
    assert row["solidity"] > 0.98
    # A sphere thins to a point or a short segment: length about its diameter.
    assert row["n_branches"] <= 1 and row["n_junctions"] == 0
    assert row["skeleton_length_nm"] < 1.1 * 2 * r


@SPACINGS
@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_ellipsoid_axes(spacing, angle):
    semi = (100.0, 150.0, 240.0)
    row = _measure_one(_ellipsoid(semi, spacing, rotate_zx_deg=angle), spacing)
    assert _rel(row["volume_nm3"], 4 / 3 * math.pi * np.prod(semi)) < 0.02
    assert _rel(row["axis_major_nm"], 480) < 0.03
    assert _rel(row["axis_intermediate_nm"], 300) < 0.03
    assert _rel(row["axis_minor_nm"], 200) < 0.03
    assert _rel(row["elongation"], 240 / 150) < 0.03
    assert _rel(row["flatness"], 150 / 100) < 0.03
    # Knud Thomsen's formula, within 1.1% of the exact area for any ellipsoid.
    p = 1.6075
    a, b, c = semi
    area = 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
    assert _rel(row["surface_area_nm2"], area) < 0.04
    assert row["solidity"] > 0.96


@SPACINGS
def test_cylinder(spacing):
    r, length = 100.0, 600.0
    row = _measure_one(_cylinder(r, length, spacing), spacing)
    assert _rel(row["volume_nm3"], math.pi * r**2 * length) < VOLUME_TOL[spacing]
    # Caps included; smoothing rounds the rims (< 1% here).
    assert _rel(row["surface_area_nm2"], 2 * math.pi * r * length + 2 * math.pi * r**2) < AREA_TOL[spacing]
    # Moments of a solid cylinder: variance L^2/12 along, r^2/4 across.
    assert _rel(row["axis_major_nm"], 2 * math.sqrt(5 * length**2 / 12)) < 0.03
    assert _rel(row["axis_minor_nm"], 2 * math.sqrt(5 * r**2 / 4)) < 0.03
    assert _rel(row["skeleton_length_nm"], length) < 0.05
    assert (row["n_branches"], row["n_junctions"]) == (1, 0)
    assert row["solidity"] > 0.97
    assert row["z_extent_slices"] == pytest.approx(2 * r / spacing[0], abs=1)
    assert row["z_extent_nm"] == row["z_extent_slices"] * spacing[0]


@SPACINGS
def test_torus(spacing):
    big, small = 200.0, 70.0
    row = _measure_one(_torus(big, small, spacing), spacing)
    assert _rel(row["volume_nm3"], 2 * math.pi**2 * big * small**2) < VOLUME_TOL[spacing]
    assert _rel(row["surface_area_nm2"], 4 * math.pi**2 * big * small) < AREA_TOL[spacing]
    assert _rel(row["skeleton_length_nm"], 2 * math.pi * big) < 0.05
    # A loop is one branch and no junction.
    assert (row["n_branches"], row["n_junctions"]) == (1, 0)
    # Convex hull of a torus: the solid of revolution of the hull of its two
    # cross-section discs, pi (2 r R^2 + pi R r^2 + 4 r^3 / 3).
    hull = math.pi * (2 * small * big**2 + math.pi * big * small**2 + 4 * small**3 / 3)
    assert row["solidity"] == pytest.approx(2 * math.pi**2 * big * small**2 / hull, abs=0.05)
    assert row["solidity"] < 0.8


@SPACINGS
@pytest.mark.parametrize(
    ("name", "tips", "branches", "junctions"),
    [
        ("bent", [(0, 250, -200), (0, 250, 200)], 1, 0),
        ("Y", [(0, 250, 0), (0, -130, 220), (0, -130, -220)], 3, 1),
        ("X", [(0, 280, 0), (0, -280, 0), (0, 0, 280), (0, 0, -280)], 4, 1),
        ("Y tilted", [(120, 220, 0), (-60, -130, 220), (-60, -130, -220)], 3, 1),
    ],
)
def test_skeleton_topology(spacing, name, tips, branches, junctions):
    row = _measure_one(_tubes(70.0, tips, spacing), spacing)
    assert (row["n_branches"], row["n_junctions"]) == (branches, junctions)
    if junctions:
        assert row["solidity"] < 0.8
    # Arms end in round caps: the skeleton spans about the summed arm lengths
    # plus one radius per free end.
    arms = sum(np.linalg.norm(t) for t in np.asarray(tips, float))
    assert 0.75 * (arms + 70 * len(tips)) < row["skeleton_length_nm"] < 1.05 * (arms + 70 * len(tips))


@SPACINGS
def test_bumps_are_pruned_not_branches(spacing):
    """Knobs on a tube grow skeleton spurs; pruning removes them, a real arm stays."""
    r, half = 80.0, 270.0  # round-capped tube along x, 700 nm long
    (z, y, x), _ = _grid((2 * r + 120, 6 * r + 60, 2 * (half + r)), spacing)
    tube = z**2 + y**2 + (np.abs(x) - half).clip(0) ** 2 <= r**2
    bumpy = tube.copy()
    for bz, by, bx, br in ((0, 80, -150, 60), (0, -80, 100, 60), (80, 0, 0, 55)):
        bumpy |= (z - bz) ** 2 + (y - by) ** 2 + (x - bx) ** 2 <= br**2
    length, branches, junctions = skeleton_stats3d(bumpy, spacing)
    assert (branches, junctions) == (1, 0)
    assert _rel(length, 2 * (half + r)) < 0.15
    if spacing == ISO:  # on these voxels the knobs do grow spurs
        assert skeleton_stats3d(bumpy, spacing, spur_factor=0.0)[1] > 1
    arm = tube | ((z**2 + x**2 <= (0.8 * r) ** 2) & (y >= 0) & (y <= 3 * r))  # protrudes 2r
    assert skeleton_stats3d(arm, spacing)[1:] == (3, 1)


def test_a_skeleton_of_isolated_voxels_is_measured_as_points_not_an_error():
    """Smoothing can leave an object as blobs that each thin to one voxel; skan cannot build paths
    from isolated voxels ("index pointer size 0 should be 1", seen on a chunked run), so they count
    as points: no branch, as long as the widest blob is wide."""
    from xmdl_tf.morphometry3d import _skeleton

    solid = np.zeros((10, 10, 20), np.float32)
    solid[4, 4, 4] = solid[4, 4, 12] = 1.0
    length, branches, junctions = _skeleton(solid, 0.5, (1.0, 1.0, 1.0), 1.0)
    assert (branches, junctions) == (0, 0) and length == pytest.approx(1.0)


def test_physical_units_scale_voxel_units():
    mask = _cylinder(10.0, 40.0, (1.0, 1.0, 1.0))
    vox = measure3d(mask.astype(np.uint8)).iloc[0]
    nm = measure3d(mask.astype(np.uint8), (7.0, 7.0, 7.0)).iloc[0]
    assert np.isnan(vox["voxel_size_z_nm"]) and nm["voxel_size_x_nm"] == 7.0
    assert "volume_nm3" not in vox and "centroid_z_nm" not in vox and "z_extent_nm" not in vox
    assert nm["volume_nm3"] == vox["volume_vox"] * 7.0**3
    assert nm["surface_area_nm2"] == pytest.approx(vox["surface_area_vox2"] * 49, rel=1e-5)
    for col in ("equivalent_diameter", "axis_major", "axis_minor", "skeleton_length"):
        assert nm[f"{col}_nm"] == pytest.approx(vox[f"{col}_vox"] * 7.0, rel=1e-5)
    assert nm["centroid_y_nm"] == pytest.approx(vox["centroid_y_vox"] * 7.0)
    for col in ("sphericity", "solidity", "elongation", "flatness", "n_branches"):
        assert nm[col] == pytest.approx(vox[col], rel=1e-5)


# Several objects: ids, boxes, border, intensities


def test_ids_boxes_border_and_means():
    labels = np.zeros((12, 30, 40), np.uint32)
    labels[2:6, 5:15, 5:25] = 7  # inside
    labels[0:4, 20:30, 30:36] = 2  # touches the z = 0 and y = end faces
    labels[6:10, 5:15, 5:25] = 9  # shares a face with 7, different id
    image = np.zeros(labels.shape, np.uint16)
    image[labels == 7], image[labels == 2], image[labels == 9] = 100, 40, 250
    image[labels == 0] = 7  # background must not leak into the means
    heatmap = np.where(labels == 9, 0.9, 0.1).astype(np.float32)
    table = measure3d(labels, (40.0, 5.0, 5.0), image=image, heatmap=heatmap)

    assert list(table["id"]) == [2, 7, 9]
    row = table.set_index("id").loc[7]
    assert [row[f"bbox_{a}0"] for a in "zyx"] == [2, 5, 5]
    assert [row[f"bbox_{a}1"] for a in "zyx"] == [6, 15, 25]
    assert (row["centroid_z_vox"], row["centroid_y_vox"], row["centroid_x_vox"]) == (3.5, 9.5, 14.5)
    assert row["centroid_z_nm"] == 3.5 * 40
    assert row["volume_vox"] == 4 * 10 * 20 and row["volume_nm3"] == 800 * 40 * 25
    assert row["z_extent_slices"] == 4 and row["z_extent_nm"] == 160
    # A box: axes from the box variances s^2 / 12, so L sqrt(5/3) per side.
    for side, col in zip(sorted([160.0, 50.0, 100.0], reverse=True), ("major", "intermediate", "minor")):
        assert row[f"axis_{col}_nm"] == pytest.approx(side * math.sqrt(5 / 3))
    assert table.set_index("id")["touches_border"].to_dict() == {2: True, 7: False, 9: False}
    assert table.set_index("id")["mean_intensity"].to_dict() == {2: 40.0, 7: 100.0, 9: 250.0}
    assert table.set_index("id")["gradcam_mean"].to_dict() == pytest.approx({2: 0.1, 7: 0.1, 9: 0.9})


@pytest.mark.parametrize("spacing", [None, ISO])
def test_empty_volume_gives_empty_table_with_all_columns(spacing):
    empty = np.zeros((8, 8, 8), np.uint16)
    table = measure3d(empty, spacing, image=empty, heatmap=empty)
    unit = "vox" if spacing is None else "nm"
    assert len(table) == 0
    for col in ("id", "volume_vox", f"surface_area_{unit}2", f"skeleton_length_{unit}", "n_junctions",
                "mean_intensity", "gradcam_mean", "voxel_size_z_nm", "touches_border"):
        assert col in table
    full = measure3d(_ellipsoid((30.0,) * 3, ISO).astype(np.uint16), spacing, image=np.zeros((12,) * 3),
                     heatmap=np.zeros((12,) * 3))
    assert list(table.columns) == list(full.columns)
    summary = summarize3d(table, empty.shape, spacing)
    assert summary["count"] == 0 and summary["volume_fraction"] == 0
    assert math.isnan(summary["median_volume_vox"]) and math.isnan(summary["median_gradcam"])
    assert summary["density_per_um3"] == 0 if spacing else math.isnan(summary["density_per_um3"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"instances": np.zeros((4, 4), np.uint16)}, "3-D"),
        ({"instances": np.zeros((4, 4, 4), np.float32)}, "integer"),
        ({"instances": -np.ones((4, 4, 4), np.int32)}, "non-negative"),
        ({"image": np.zeros((4, 4, 5))}, "image shape"),
        ({"heatmap": np.zeros((4, 4))}, "heatmap shape"),
        ({"voxel_size_nm": (10.0, 10.0)}, "voxel_size_nm"),
        ({"voxel_size_nm": (10.0, 0.0, 10.0)}, "voxel_size_nm"),
        ({"voxel_size_nm": (10.0, -1.0, 10.0)}, "voxel_size_nm"),
        ({"voxel_size_nm": (10.0, float("nan"), 10.0)}, "voxel_size_nm"),
        ({"voxel_size_nm": (10.0, float("inf"), 10.0)}, "voxel_size_nm"),
        ({"voxel_size_nm": "10"}, "voxel_size_nm"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    args = {"instances": np.ones((4, 4, 4), np.uint16), **kwargs}
    with pytest.raises(ValueError, match=match):
        measure3d(**args)


# Meshes


def test_meshes_round_trip_ply_and_obj(tmp_path):
    spacing = ANISO
    sphere = _ellipsoid((80.0,) * 3, spacing)
    verts, faces = object_mesh(sphere, spacing, offset_vox=(10, 20, 30))
    assert verts.dtype == np.float32 and verts.shape[1] == 3 and faces.shape[1] == 3
    # Vertices lie on the sphere, centred on the crop centre moved by the offset.
    centre = (np.asarray(sphere.shape) / 2 - 0.31 + np.array([10, 20, 30])) * spacing
    radius = np.linalg.norm(verts - centre, axis=1)
    assert np.abs(radius - 80).max() < spacing[0]
    small = object_mesh(sphere, spacing, step=2)
    assert len(small[0]) < len(verts) / 2
    meshes = {3: (verts, faces), 11: small}

    ply = tmp_path / "m.ply"
    write_meshes(ply, meshes)
    data = ply.read_bytes()
    head, body = data.split(b"end_header\n", 1)
    header = head.decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    n_v, n_f = len(verts) + len(small[0]), len(faces) + len(small[1])
    assert f"element vertex {n_v}" in header and f"element face {n_f}" in header
    vdt = np.dtype([("xyz", "<f4", 3), ("id", "<u4")])
    fdt = np.dtype([("n", "u1"), ("idx", "<i4", 3), ("id", "<u4")])
    assert len(body) == n_v * vdt.itemsize + n_f * fdt.itemsize
    v = np.frombuffer(body, vdt, n_v)
    f = np.frombuffer(body, fdt, n_f, offset=n_v * vdt.itemsize)
    np.testing.assert_array_equal(v["xyz"][: len(verts)], verts[:, ::-1])  # written x, y, z
    assert set(v["id"]) == {3, 11} and set(f["id"]) == {3, 11} and (f["n"] == 3).all()
    assert f["idx"].max() == n_v - 1 and f["idx"][f["id"] == 11].min() >= len(verts)

    obj = tmp_path / "m.obj"
    write_meshes(obj, meshes, fmt="obj")
    lines = obj.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("o ")] == ["o object_3", "o object_11"]
    assert sum(ln.startswith("v ") for ln in lines) == n_v
    idx = np.array([ln.split()[1:] for ln in lines if ln.startswith("f ")], int)
    assert len(idx) == n_f and idx.min() == 1 and idx.max() == n_v
    first_v = np.array(next(ln for ln in lines if ln.startswith("v ")).split()[1:], float)
    np.testing.assert_allclose(first_v, verts[0, ::-1], rtol=1e-5)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.obj", "m.ply"]  # no temporary files left
    with pytest.raises(ValueError, match="format"):
        write_meshes(tmp_path / "m.stl", meshes)
    with pytest.raises(ValueError, match="non-empty"):
        object_mesh(np.zeros((4, 4, 4), bool))


# Shape classes


def _table(**columns):
    n = len(next(iter(columns.values())))
    base = {"volume_vox": [1e6] * n, "volume_nm3": [1e8] * n, "n_junctions": [0] * n, "n_branches": [1] * n,
            "axis_major_nm": [300.0] * n, "axis_minor_nm": [300.0] * n}
    base.update(columns)
    return pd.DataFrame(base)


def test_rules_order_and_boundaries():
    rules = ShapeRules3D()
    minor = 200.0
    table = _table(
        volume_nm3=[rules.fragmented_max_volume_nm3 - 1, rules.fragmented_max_volume_nm3, 1e8, 1e8, 1e8, 1e8, 1e8],
        n_junctions=[1, 0, 1, 0, 0, 0, 0],
        n_branches=[3, 1, 1, 3, 1, 1, 1],
        axis_major_nm=[minor * 9, minor, minor, minor, minor * rules.globular_max_aspect,
                       minor * rules.elongated_max_aspect - 1e-6, minor * rules.elongated_max_aspect],
        axis_minor_nm=[minor] * 7,
    )
    assert list(classify3d(table, rules)) == [
        "fragmented", "globular", "branched", "branched", "elongated", "elongated", "tubular"
    ]  # fmt: skip


def test_fragmented_falls_back_to_voxels_row_by_row():
    rules = ShapeRules3D()
    table = _table(volume_nm3=[np.nan, np.nan, 1e8], volume_vox=[100.0, 1e6, 100.0],
                   axis_major_nm=[np.nan, np.nan, 300.0], axis_minor_nm=[np.nan, np.nan, 300.0])
    table["axis_major_vox"] = [30.0, 90.0, 1.0]
    table["axis_minor_vox"] = [30.0, 30.0, 1.0]
    assert list(classify3d(table, rules)) == ["fragmented", "elongated", "globular"]
    no_nm = table.drop(columns=["volume_nm3", "axis_major_nm", "axis_minor_nm"])
    assert list(classify3d(no_nm)) == ["fragmented", "elongated", "fragmented"]


def test_rules_json_round_trip_and_validation(tmp_path):
    rules = ShapeRules3D().override({"globular_max_aspect": 1.8, "branched_min_branches": 4.0})
    assert rules.branched_min_branches == 4 and isinstance(rules.branched_min_branches, int)
    path = tmp_path / "rules.json"
    rules.to_json(path)
    assert ShapeRules3D.from_json(path) == rules
    assert json.loads(path.read_text())["globular_max_aspect"] == 1.8
    (tmp_path / "part.json").write_text('{"elongated_max_aspect": 5}')
    assert ShapeRules3D.from_json(tmp_path / "part.json") == ShapeRules3D(elongated_max_aspect=5.0)
    (tmp_path / "list.json").write_text("[1, 2]")
    for bad in (
        lambda: ShapeRules3D.from_dict({"round_max_aspect": 2}),
        lambda: ShapeRules3D.from_json(tmp_path / "list.json"),
        lambda: ShapeRules3D(fragmented_max_volume_nm3=-1),
        lambda: ShapeRules3D(fragmented_max_volume_nm3=float("nan")),
        lambda: ShapeRules3D(branched_min_junctions=True),
        lambda: ShapeRules3D(branched_min_junctions=1.5),
        lambda: ShapeRules3D(globular_max_aspect=4.0, elongated_max_aspect=3.0),
        lambda: ShapeRules3D(globular_max_aspect=0.5),
    ):
        with pytest.raises(ValueError):
            bad()


def test_analytic_shapes_get_their_classes():
    spacing = ISO
    shapes = {
        "globular": _ellipsoid((170.0, 180.0, 190.0), spacing),
        "elongated": _ellipsoid((120.0, 130.0, 300.0), spacing),
        "tubular": _cylinder(80.0, 900.0, spacing),
        "branched": _tubes(70.0, [(0, 300, 0), (0, -150, 260), (0, -150, -260)], spacing),
        "fragmented": _ellipsoid((60.0, 70.0, 70.0), spacing),
    }
    # Side by side along x, each in its own slab.
    depth, height = (max(m.shape[i] for m in shapes.values()) for i in (0, 1))
    labels = np.zeros((depth, height, sum(m.shape[2] for m in shapes.values())), np.uint16)
    x0 = 0
    for i, mask in enumerate(shapes.values(), start=1):
        labels[: mask.shape[0], : mask.shape[1], x0 : x0 + mask.shape[2]][mask] = i
        x0 += mask.shape[2]
    table = measure3d(labels, spacing)
    assert list(classify3d(table)) == list(shapes)
    assert set(classify3d(table)) == set(SHAPE_CLASSES_3D)


def test_summarize_counts_density_fraction_medians():
    table = _table(volume_nm3=[1e6, 2e8, 3e8], volume_vox=[1.0, 200.0, 300.0],
                   axis_major_nm=[300.0, 300.0, 1200.0])
    table["touches_border"] = [True, False, False]
    table["sphericity"] = [0.9, 0.8, 0.5]
    table["gradcam_mean"] = [0.1, 0.2, 0.6]
    summary = summarize3d(table, (100, 100, 100), (10.0, 10.0, 10.0))
    assert summary["count"] == 3
    assert (summary["count_fragmented"], summary["count_globular"], summary["count_tubular"]) == (1, 1, 1)
    assert summary["count_branched"] == summary["count_elongated"] == 0
    assert summary["density_per_um3"] == pytest.approx(3.0)  # 1000^3 nm^3 = 1 um^3
    assert summary["volume_fraction"] == pytest.approx(501 / 1e6)
    assert summary["n_touching_border"] == 1
    assert summary["median_volume_nm3"] == 2e8 and summary["median_sphericity"] == 0.8
    assert summary["median_gradcam"] == pytest.approx(0.2)
    # A given shape_class column wins over re-classifying; no voxel size: NaN density.
    labelled = table.assign(shape_class=["tubular"] * 3)
    summary = summarize3d(labelled, (100, 100, 100))
    assert summary["count_tubular"] == 3 and math.isnan(summary["density_per_um3"])


def test_coarse_mesh_of_a_thin_object_does_not_fail():
    # A coarse marching-cubes step can miss a thin object; the mesh falls back to step 1.
    from xmdl_tf.morphometry3d import object_mesh

    plate = np.zeros((3, 40, 40), bool)
    plate[1, 5:35, 5:35] = True
    verts, faces = object_mesh(plate, (30.0, 5.0, 5.0), step=6)
    assert verts.ndim == 2 and verts.shape[1] == 3 and faces.shape[1] == 3


@pytest.mark.parametrize("dtype, big", [(np.uint32, 2**32 - 1), (np.int64, 2**40), (np.uint64, 2**63 + 5)])
def test_huge_ids_are_measured_and_kept(dtype, big):
    # Ids far above the voxel count made ndi.find_objects allocate one entry per id.
    labels = np.zeros((6, 12, 12), dtype)
    labels[1:4, 2:5, 2:6] = 2
    labels[2:5, 6:11, 6:10] = big
    table = measure3d(labels, ISO)
    assert [int(i) for i in table["id"]] == [2, big]
    assert table["volume_vox"].tolist() == [36, 60]
    assert table["volume_nm3"].tolist() == [36_000.0, 60_000.0]


def test_shape_of_an_object_in_one_or_two_sections_is_not_measured():
    """A 270 x 200 nm profile in 1-2 sections of 45 nm: its z extent is the sections', so sphericity and
    solidity are NaN (smoothing would make the one-section slab a lens of sphericity 0.89); from 3 on,
    measured; volume and area always."""
    y, x = np.ogrid[:60, :60]
    disk = ((y - 30) / 27.0) ** 2 + ((x - 30) / 20.0) ** 2 <= 1
    for nz in (1, 2, 3):
        lab = np.zeros((nz + 2, 60, 60), np.uint16)
        lab[1:1 + nz] = disk
        row = measure3d(lab, (45.0, 5.0, 5.0)).iloc[0]
        assert row["volume_nm3"] == pytest.approx(disk.sum() * nz * 45 * 25)
        assert row["surface_area_nm2"] > 2 * disk.sum() * 25 * 0.8
        assert np.isnan(row["sphericity"]) == (nz < 3) and np.isnan(row["solidity"]) == (nz < 3)
