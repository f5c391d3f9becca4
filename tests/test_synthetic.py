"""The synthetic EM generator: determinism, labels vs. object table, class geometry."""

import json

import cv2

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.morphology import skeletonize

from data_prep import synthetic
from data_prep._common import read_image_file
from data_prep.synthetic import SHAPE_CLASSES, generate_dataset, generate_slice, slice_seed

NM = 5.0
UM2_PER_PX = NM**2 / 1e6


@pytest.fixture(scope="module")
def slices():
    """Four 512 px slices, 12 objects each (every class at least twice per slice)."""
    return [generate_slice(512, seed=s, pixel_size_nm=NM, n_objects=12) for s in range(4)]


def test_types_shapes_and_determinism():
    image, instances, objects = generate_slice(256, seed=7, pixel_size_nm=NM, n_objects=5)
    assert image.dtype == np.uint8 and image.shape == (256, 256)
    assert instances.dtype == np.uint32 and instances.shape == (256, 256)
    again = generate_slice(256, seed=7, pixel_size_nm=NM, n_objects=5)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(instances, again[1])
    pd.testing.assert_frame_equal(objects, again[2])
    other = generate_slice(256, seed=8, pixel_size_nm=NM, n_objects=5)
    assert not np.array_equal(instances, other[1])


def test_appearance_changes_grey_values_only():
    image, instances, objects = generate_slice(256, seed=3, n_objects=5)
    shifted = {"invert": False, "contrast": 0.6, "brightness": 30, "noise": 12, "blur": 1.5}
    image2, instances2, objects2 = generate_slice(256, seed=3, n_objects=5, appearance=shifted)
    np.testing.assert_array_equal(instances, instances2)
    pd.testing.assert_frame_equal(objects, objects2)
    assert image2.std() < image.std() and image2.mean() > image.mean() + 15
    inverted, _, _ = generate_slice(256, seed=3, n_objects=5, appearance=synthetic.Appearance(invert=True))
    fg = instances > 0
    assert image[fg].mean() < image[~fg].mean() and inverted[fg].mean() > inverted[~fg].mean()
    with pytest.raises(ValueError, match="gamma"):
        generate_slice(128, appearance={"gamma": 2})


def test_instances_match_object_table(slices):
    for image, instances, objects in slices:
        ids = np.unique(instances[instances > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(objects) + 1))
        np.testing.assert_array_equal(objects["id"], ids)
        assert set(objects["shape_class"]) == set(SHAPE_CLASSES)
        props = {p.label: p for p in regionprops(instances)}
        for row in objects.itertuples():
            p = props[row.id]
            assert p.area == row.area_px
            assert row.area_um2 == pytest.approx(p.area * UM2_PER_PX)
            assert (row.centroid_y, row.centroid_x) == pytest.approx(p.centroid, abs=1e-6)
            # Objects lie wholly inside the slice, so their geometry is the drawn one.
            r0, c0, r1, c1 = p.bbox
            assert r0 > 0 and c0 > 0 and r1 < 512 and c1 < 512
            assert ndi.label(p.image)[1] == 1  # one connected body per id
        # The touching column is exactly 4-connected contact between different ids.
        touch = set()
        for a, b in ((instances[:, :-1], instances[:, 1:]), (instances[:-1], instances[1:])):
            edge = (a != b) & (a > 0) & (b > 0)
            touch |= set(a[edge].tolist()) | set(b[edge].tolist())
        assert set(objects.loc[objects["touching"], "id"]) == touch


def test_touching_fraction_controls_contacts():
    _, _, none = generate_slice(512, seed=1, n_objects=10, touching_fraction=0.0)
    _, instances, some = generate_slice(512, seed=1, n_objects=10, touching_fraction=0.4)
    assert not none["touching"].any()
    assert some["touching"].sum() >= 3
    # Touching objects must merge under connected components: that is the point of them.
    n_components = ndi.label(instances > 0)[1]
    assert n_components < len(some)


def _skeleton_junctions(mask: np.ndarray) -> int:
    skeleton = skeletonize(mask)
    neighbours = ndi.convolve(skeleton.astype(int), np.ones((3, 3), int), mode="constant") - 1
    return int((skeleton & (neighbours >= 3)).sum())


def _classify(area_um2: float, ratio: float, solidity: float, junctions: int) -> str:
    """The toolkit's default shape rules."""
    if area_um2 < 0.05:
        return "fragmented"
    if solidity < 0.75 or junctions >= 1:
        return "irregular"
    return "round" if ratio < 1.5 else "elongated" if ratio < 3 else "tubular"


def test_each_class_has_its_geometry(slices):
    hits = total = 0
    for _, instances, objects in slices:
        props = {p.label: p for p in regionprops(instances)}
        for row in objects.itertuples():
            p = props[row.id]
            area = p.area * UM2_PER_PX
            ratio = p.axis_major_length / max(p.axis_minor_length, 1e-9)
            cls = row.shape_class
            if cls == "fragmented":
                assert area < 0.03
                assert ratio < 1.8
            elif cls == "round":
                assert 0.08 <= area <= 0.4 and 1.0 <= ratio <= 1.3
            elif cls == "elongated":
                assert area >= 0.08 and 1.8 <= ratio <= 2.6 and p.solidity > 0.9
            elif cls == "tubular":
                assert area >= 0.08 and ratio >= 4 and p.solidity > 0.8
            else:
                assert area >= 0.08 and p.solidity < 0.7
                if row.variant == "star":
                    assert row.n_branches >= 3 and _skeleton_junctions(p.image) >= 1
            if cls in ("elongated", "tubular"):
                # orientation_deg is ccw from x as displayed; skimage's is from the row axis.
                diff = (row.orientation_deg - (np.degrees(p.orientation) + 90)) % 180
                assert min(diff, 180 - diff) < 6
            hits += _classify(area, ratio, p.solidity, _skeleton_junctions(p.image)) == cls
            total += 1
    assert hits / total >= 0.9


def test_geometry_is_physical_at_another_pixel_size():
    """At 10 nm/px the classes keep their areas in um^2, not in px."""
    _, _, objects = generate_slice(256, seed=2, pixel_size_nm=10.0, n_objects=5)
    assert len(objects) == 5
    for row in objects.itertuples():
        assert row.area_um2 == pytest.approx(row.area_px * 1e-4)
        if row.shape_class == "fragmented":
            assert row.area_um2 < 0.03
        else:
            assert row.area_um2 >= 0.08


def test_generate_dataset_layout_and_round_trip(tmp_path):
    out = tmp_path / "syn"
    path = generate_dataset(out, n=5, size=192, seed=4, pixel_size_nm=10.0)
    meta = json.loads(path.read_text())
    assert meta["counts"] == {"train": 3, "val": 1, "test": 1}
    assert meta["pixel_size_nm"] == 10.0
    assert meta["splits"]["train"]["slices"] == [0, 1, 2] and meta["splits"]["test"]["slices"] == [4]
    table = pd.read_csv(out / "objects.csv")
    assert meta["objects"]["total"] == len(table)
    for split in ("train", "val", "test"):
        for i, seed in zip(meta["splits"][split]["slices"], meta["splits"][split]["seeds"]):
            assert seed == slice_seed(4, i)
            image, instances, objects = generate_slice(192, seed=seed, pixel_size_nm=10.0)
            label = tifffile.imread(out / split / "y" / f"seg{i:04d}.tif")
            assert label.dtype == np.uint16
            np.testing.assert_array_equal(label, instances)  # exact, lossless
            with tifffile.TiffFile(out / split / "y" / f"seg{i:04d}.tif") as tif:
                assert tif.pages[0].compression == 8  # zlib
            np.testing.assert_array_equal(read_image_file(out / split / "x" / f"im{i:04d}.png"), image)
            csv = pd.read_csv(out / split / "objects" / f"obj{i:04d}.csv")
            np.testing.assert_array_equal(csv["id"], objects["id"])
            assert list(csv["shape_class"]) == list(objects["shape_class"])
            assert list(table.loc[table["slice"] == i, "split"].unique()) == [split]


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n", "3", "--size", "128", "--seed", "1", "--pixel-size", "10"]
    synthetic.main(args)
    assert len(list((out / "train" / "x").glob("im*.png"))) == 1  # 3 slices: 1/1/1
    assert synthetic.main(args) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    synthetic.main(args + ["--overwrite", "--appearance", '{"contrast": 0.5}'])
    assert json.loads((out / "dataset.json").read_text())["generator"]["appearance"]["contrast"] == 0.5


def test_compare_figure_writes_png(tmp_path):
    from data_prep import compare_figure

    real = tmp_path / "real.png"
    image, _, _ = generate_slice(160, seed=9, n_objects=5)
    cv2.imwrite(str(real), image)
    out = tmp_path / "docs" / "fig.png"
    compare_figure.main(["--real", str(real), "--out", str(out), "--crop", "128"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    # An existing figure is kept without --overwrite; bad values get one line, not a traceback.
    for argv in (["--out", str(out)], ["--out", str(tmp_path / "fig")], ["--out", str(out), "--crop", "400"]):
        assert compare_figure.main(["--real", str(real), *argv]) == 2
    for argv in (["--pixel-size", "0"], ["--crop", "0"]):
        with pytest.raises(SystemExit):  # argparse: usage and one line
            compare_figure.main(["--real", str(real), "--out", str(out), *argv])
    assert out.read_bytes() == before and not (tmp_path / "fig").exists()
    compare_figure.main(["--real", str(real), "--out", str(out), "--crop", "96", "--overwrite"])
    assert out.read_bytes() != before and sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]
