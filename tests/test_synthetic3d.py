"""The 3-D synthetic EM generator: determinism, labels vs classes, placement,
class recovery by the 3-D morphometry, and its command line."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from data_prep import synthetic3d
from data_prep.synthetic3d import generate_volume, touching_pairs
from xmdl_tf.morphometry3d import SHAPE_CLASSES_3D, classify3d, measure3d

ISO = ((56, 160, 160), (10.0, 10.0, 10.0))
ANISO = ((20, 160, 160), (30.0, 10.0, 10.0))
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def volumes():
    """Three seeds at each sampling, 10 objects each (every class twice), 30% touching."""
    return {
        (name, seed): generate_volume(shape, seed, spacing, n_objects=10, touching_fraction=0.3)
        for name, (shape, spacing) in (("iso", ISO), ("aniso", ANISO))
        for seed in SEEDS
    }


def test_types_shapes_and_determinism():
    shape, spacing = (24, 96, 96), (20.0, 10.0, 10.0)
    vol = generate_volume(shape, seed=7, voxel_size_nm=spacing, n_objects=4)
    assert vol["image"].dtype == np.uint8 and vol["image"].shape == shape
    assert vol["instances"].dtype == np.uint16 and vol["instances"].shape == shape
    assert vol["voxel_size_nm"] == spacing
    again = generate_volume(shape, seed=7, voxel_size_nm=spacing, n_objects=4)
    np.testing.assert_array_equal(vol["image"], again["image"])
    np.testing.assert_array_equal(vol["instances"], again["instances"])
    assert vol["classes"] == again["classes"]
    other = generate_volume(shape, seed=8, voxel_size_nm=spacing, n_objects=4)
    assert not np.array_equal(vol["instances"], other["instances"])


def test_appearance_changes_grey_values_only():
    shape, spacing = (16, 96, 96), (30.0, 10.0, 10.0)
    plain = generate_volume(shape, 3, spacing, n_objects=3)
    shifted = generate_volume(shape, 3, spacing, n_objects=3, appearance={"contrast": 0.6, "brightness": 30})
    np.testing.assert_array_equal(plain["instances"], shifted["instances"])
    assert shifted["image"].std() < plain["image"].std()
    assert shifted["image"].mean() > plain["image"].mean() + 15


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (4, 64, 64)},
        {"shape": (16, 64)},
        {"voxel_size_nm": (10.0, 0.0, 10.0)},
        {"touching_fraction": 1.5},
        {"classes": ("round",)},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_volume(**{"shape": (16, 64, 64), **kwargs})


def test_ids_classes_and_placement(volumes):
    seen = set()
    for (name, seed), vol in volumes.items():
        instances = vol["instances"]
        ids = np.unique(instances[instances > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(vol["classes"]) + 1))
        assert sorted(vol["classes"]) == ids.tolist()
        assert set(vol["classes"].values()) <= set(SHAPE_CLASSES_3D)
        seen |= set(vol["classes"].values())
        assert len(ids) >= 7, f"{name} seed {seed}: only {len(ids)} of 10 objects placed"
        # Every object lies inside: no voxel on any face of the volume.
        faces = [instances[0], instances[-1], instances[:, 0], instances[:, -1], instances[:, :, 0],
                 instances[:, :, -1]]
        assert not any(f.any() for f in faces)
        # Touching objects share a voxel face and keep their own ids.
        pairs = touching_pairs(instances)
        assert pairs and all(a != b for a, b in pairs)
        # Mitochondria are darker than the cytoplasm around them.
        image = vol["image"]
        assert image[instances > 0].mean() < image[instances == 0].mean() - 20
    assert seen == set(SHAPE_CLASSES_3D)


def test_no_touching_when_not_asked():
    vol = generate_volume(*ISO[:1], seed=5, voxel_size_nm=ISO[1], n_objects=8, touching_fraction=0.0)
    assert touching_pairs(vol["instances"]) == set()


@pytest.mark.parametrize("name", ["iso", "aniso"])
def test_class_recovery(volumes, name):
    """classify3d(measure3d(...)) gives the drawn class for >= 90% of objects."""
    hits = total = 0
    for seed in SEEDS:
        vol = volumes[(name, seed)]
        table = measure3d(vol["instances"], vol["voxel_size_nm"], image=vol["image"])
        assert not table["touches_border"].any()
        predicted = classify3d(table)
        truth = table["id"].map(vol["classes"])
        hits += int((predicted == truth).sum())
        total += len(table)
    assert total >= 3 * 7
    assert hits / total >= 0.9, f"{name}: {hits}/{total} objects recovered"


def test_touching_pairs_on_a_hand_made_volume():
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[1, 1, 1], labels[1, 1, 2] = 1, 2  # face
    labels[2, 2, 2] = 3  # only an edge/corner with 2 and 1: not a face
    labels[3, 2, 2] = 3
    assert touching_pairs(labels) == {(1, 2)}


def test_cli_writes_readable_files_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "vol"
    args = ["--out", str(out), "--shape", "24", "96", "96", "--voxel-size", "30", "10", "10", "--seed", "1",
            "--n-objects", "3"]
    assert synthetic3d.main(args) == 0
    with tifffile.TiffFile(out / "instances.tif") as tif:
        assert tif.is_imagej
        instances = tif.asarray()
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.03)
        assert tif.imagej_metadata["unit"] == "um"
        x_res = tif.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(100.0)  # pixels per um at 10 nm
    image = tifffile.imread(out / "image.tif")
    assert image.shape == instances.shape == (24, 96, 96) and image.dtype == np.uint8
    assert instances.dtype == np.uint16
    table = pd.read_csv(out / "classes.csv")
    assert list(table.columns) == ["id", "shape_class", "touching"]
    np.testing.assert_array_equal(table["id"], np.unique(instances[instances > 0]))
    expected = generate_volume((24, 96, 96), 1, (30.0, 10.0, 10.0), n_objects=3)
    np.testing.assert_array_equal(instances, expected["instances"])

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert synthetic3d.main(args[:2] + ["--seed", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_coarse_voxels_are_refused_quickly(tmp_path, capsys):
    # 1,000 nm voxels: the density of about 3 per um^3 alone asked for millions of objects smaller
    # than a voxel, and the command never ended; such voxels cannot draw a mitochondrion at all.
    with pytest.raises(ValueError, match="too coarse to draw mitochondria"):
        generate_volume((16, 64, 64), 0, (1000.0, 1000.0, 1000.0))
    assert synthetic3d.main(["--out", str(tmp_path / "a"), "--voxel-size", "1000", "1000", "1000"]) == 2
    assert "too coarse" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a unit mistake (um typed as nm) or a negative count
        synthetic3d.main(["--out", str(tmp_path / "a"), "--voxel-size", "0.03", "0.01", "0.01"])
    with pytest.raises(SystemExit):
        synthetic3d.main(["--out", str(tmp_path / "a"), "--n-objects", "-1"])
    assert not (tmp_path / "a").exists()
