"""Converters: each real format written small by the test, converted, read back exactly."""

import json
import re
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import tifffile

from data_prep import _common as c
from data_prep import generic, lucchi, mitoem

H, W = 48, 64


def _images(n: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    top = 255 if dtype == np.uint8 else 4000
    return np.random.default_rng(seed).integers(0, top, (n, H, W)).astype(dtype)


def _instances(n: int, seed: int = 1, max_id: int = 300) -> np.ndarray:
    """Blocky instance labels with ids up to ``max_id`` (uint16 needed)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, H, W), np.uint16)
    for z in range(n):
        for k in range(4):
            y, x = rng.integers(0, H - 10), rng.integers(0, W - 10)
            labels[z, y:y + 10, x:x + 10] = rng.integers(1, max_id)
    return labels


def _read_split(out: Path, split: str) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    xs = sorted((out / split / "x").iterdir())
    ys = sorted((out / split / "y").iterdir())
    assert [p.stem[2:] for p in xs] == [p.stem[3:] for p in ys]
    return ([int(p.stem[2:]) for p in xs], [c.read_image_file(p) for p in xs],
            [tifffile.imread(p) for p in ys])


def _assert_zlib(path: Path) -> None:
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 8


# ---------------------------------------------------------------------------
# Shared helpers


def test_split_counts_and_contiguous_assignment():
    assert c.split_counts(20, (0.7, 0.15, 0.15)) == [14, 3, 3]
    assert c.split_counts(5, (0.7, 0.15, 0.15)) == [3, 1, 1]
    assert c.split_counts(10, (1, 0, 0)) == [10, 0, 0]
    splits = c.assign_splits(10, (0.6, 0.2, 0.2))
    assert splits == {"train": [0, 1, 2, 3, 4, 5], "val": [6, 7], "test": [8, 9]}
    shuffled = c.assign_splits(10, (0.6, 0.2, 0.2), shuffle=True, seed=3)
    assert sorted(sum(shuffled.values(), [])) == list(range(10))
    assert shuffled == c.assign_splits(10, (0.6, 0.2, 0.2), shuffle=True, seed=3)
    assert shuffled != splits


def test_resampling_labels_nearest_neighbour_keeps_ids():
    label = np.zeros((40, 40), np.uint32)
    label[4:20, 4:20] = 70000
    label[20:36, 20:36] = 3
    half = c.resample_label(label, 0.5)
    assert half.shape == (20, 20) and half.dtype == np.uint32
    assert set(np.unique(half)) == {0, 3, 70000}
    np.testing.assert_array_equal(c.resample_label(half, 2.0)[::2, ::2], half)
    image = np.full((40, 40), 100, np.uint8)
    image[:, :20] = 200
    binned = c.resample_image(image, 0.5)
    assert binned.dtype == np.uint8 and binned.shape == (20, 20)
    assert set(np.unique(binned)) == {100, 200}  # area binning of whole 2x2 blocks
    with pytest.raises(ValueError, match="pixel-size-in"):
        c.scale_factor(None, 8.0)


def test_output_folder_refuses_non_empty_and_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(out)):
        with c.output_folder(out, overwrite=False):
            pass
    (out / "train" / "x").mkdir(parents=True)
    (out / "train" / "x" / "im0001.png").write_bytes(b"stale")
    with pytest.raises(RuntimeError):
        with c.output_folder(out, overwrite=True) as stage:
            (stage / "train" / "x" / "im0002.png").write_bytes(b"new")
            raise RuntimeError("conversion failed half-way")
    assert (out / "train" / "x" / "im0001.png").read_bytes() == b"stale"  # failed: nothing replaced
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train"]
    with c.output_folder(out, overwrite=True) as stage:
        (stage / "train" / "x" / "im0002.png").write_bytes(b"new")
    assert not (out / "train" / "x" / "im0001.png").exists() and (out / "train" / "x" / "im0002.png").exists()
    assert (out / "notes.txt").read_text() == "keep me"  # only the layout's own items go
    assert not [p for p in out.iterdir() if p.name.startswith(".xmdl")]


def test_overwrite_with_inputs_inside_out_or_a_corrupt_input_loses_nothing(tmp_path, capsys):
    """The issue's reproduction: `generic --images D/train/x --labels D/train/y --out D --overwrite`."""
    from conftest import write_split

    from data_prep.generic import main as generic_main

    d = tmp_path / "D"
    write_split(d, "train", 6, size=64)
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    # A corrupt label among the inputs: the conversion fails, D is as it was.
    bad = d / "train" / "y" / "seg0003.tif"
    good = bad.read_bytes()
    bad.write_bytes(b"not a tiff")
    argv = ["--images", str(d / "train" / "x"), "--labels", str(d / "train" / "y"), "--out", str(d), "--overwrite"]
    assert generic_main(argv) == 2
    err = capsys.readouterr().err
    assert "seg0003.tif" in err and "Traceback" not in err
    bad.write_bytes(good)
    assert {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    bad.write_bytes(b"not a tiff")
    fresh = tmp_path / "fresh"
    assert generic_main([*argv[:4], "--out", str(fresh)]) == 2
    assert not fresh.exists()  # nothing created by a failed conversion
    bad.write_bytes(good)
    # Good inputs inside --out: read whole before anything is replaced.
    assert generic_main([*argv, "--splits", "0.5,0.5,0"]) == 0
    meta = json.loads((d / "dataset.json").read_text())
    assert meta["counts"] == {"train": 3, "val": 3, "test": 0} and meta["name"] == "D"
    for i in range(6):
        split = "train" if i < 3 else "val"
        np.testing.assert_array_equal(cv2.imread(str(d / split / "x" / f"im{i:04d}.png"), cv2.IMREAD_UNCHANGED),
                                      cv2.imdecode(np.frombuffer(before[Path("train/x") / f"im{i:04d}.png"], np.uint8),
                                                   cv2.IMREAD_UNCHANGED))


def test_unsupported_and_missing_inputs_name_the_file(tmp_path):
    bad = tmp_path / "stack.xyz"
    bad.write_text("?")
    with pytest.raises(ValueError, match="stack.xyz"):
        c.open_stack(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        c.open_stack(tmp_path / "nowhere.tif")
    jpg = tmp_path / "seg0000.jpg"
    cv2.imwrite(str(jpg), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="seg0000.jpg"):
        c.read_image_file(jpg, label=True)  # labels are never read from a lossy format
    # An RGBA slice: grey from the colour channels only (BGRA turned round whole would be ARGB).
    rng = np.random.default_rng(0)
    r, g, b = (rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(3))
    cv2.imwrite(str(tmp_path / "im0000.png"), np.stack([b, g, r, np.full_like(r, 255)], -1))
    want = cv2.cvtColor(np.stack([r, g, b], -1), cv2.COLOR_RGB2GRAY)
    assert np.array_equal(c.read_image_file(tmp_path / "im0000.png"), want)


# ---------------------------------------------------------------------------
# Lucchi


def _write_lucchi(src: Path, n_train: int = 10, n_test: int = 4) -> dict[str, np.ndarray]:
    src.mkdir(parents=True, exist_ok=True)
    data = {"training": _images(n_train, 1), "testing": _images(n_test, 2)}
    for name, n in (("training", n_train), ("testing", n_test)):
        masks = (np.random.default_rng(n).random((n, H, W)) > 0.8).astype(np.uint8) * 255
        data[f"{name}_groundtruth"] = masks
    for name, array in data.items():
        tifffile.imwrite(src / f"{name}.tif", array)  # multi-page, one page per slice
    return data


def test_lucchi_round_trip_and_val_fraction(tmp_path):
    data = _write_lucchi(tmp_path / "src")
    out = tmp_path / "lucchi"
    lucchi.main(["--src", str(tmp_path / "src"), "--out", str(out), "--val-fraction", "0.2"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 8, "val": 2, "test": 4}
    assert meta["splits"]["val"]["slices"] == [8, 9]  # a z block at the end of training
    assert meta["pixel_size_nm"] == 5.0 and meta["labels"]["kind"] == "binary"
    assert any(p.endswith("training_groundtruth.tif") for p in meta["source_files"])
    for split, stack in (("train", "training"), ("val", "training"), ("test", "testing")):
        index, images, labels = _read_split(out, split)
        for z, image, label in zip(index, images, labels):
            np.testing.assert_array_equal(image, data[stack][z])
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, data[f"{stack}_groundtruth"][z] // 255)
        _assert_zlib(next((out / split / "y").iterdir()))


def test_lucchi_errors_name_the_file(tmp_path):
    src = tmp_path / "src"
    _write_lucchi(src)
    (src / "testing_groundtruth.tif").unlink()
    with pytest.raises(FileNotFoundError, match="testing_groundtruth.tif"):
        lucchi.convert_lucchi(src, tmp_path / "a")
    tifffile.imwrite(src / "testing_groundtruth.tif", np.zeros((3, H, W), np.uint8))
    with pytest.raises(ValueError, match="testing_groundtruth.tif"):
        lucchi.convert_lucchi(src, tmp_path / "b")  # 3 label slices for 4 images
    tifffile.imwrite(src / "testing_groundtruth.tif", np.full((4, H, W), 7, np.uint8))
    with pytest.raises(ValueError, match="testing_groundtruth.tif"):
        lucchi.convert_lucchi(src, tmp_path / "c")  # not a 0/255 mask
    tifffile.imwrite(src / "testing_groundtruth.tif", np.zeros((4, H, W + 1), np.uint8))
    with pytest.raises(ValueError, match="shape mismatch.*testing_groundtruth.tif"):
        lucchi.convert_lucchi(src, tmp_path / "d")
    assert not (tmp_path / "d").exists()  # a failed run leaves no half-written layout, nor an empty folder


def test_lucchi_binning_to_a_pixel_size(tmp_path):
    data = _write_lucchi(tmp_path / "src", n_train=4, n_test=2)
    out = tmp_path / "binned"
    lucchi.main(["--src", str(tmp_path / "src"), "--out", str(out), "--pixel-size-out", "10"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["pixel_size_nm"] == 10.0 and meta["source_pixel_size_nm"] == 5.0
    _, images, labels = _read_split(out, "test")
    assert images[0].shape == labels[0].shape == (H // 2, W // 2)
    np.testing.assert_array_equal(labels[0], data["testing_groundtruth"][0][1::2, 1::2] // 255)  # centre samples


# ---------------------------------------------------------------------------
# MitoEM


def _write_mitoem_release(root: Path, n: int = 12, val_start: int = 8, test_start: int = 10):
    """im/imNNNN.png, mito-train-v2/segNNNN.tif, mito-val-v2/segNNNN.tif (as released)."""
    images, labels = _images(n, 3), _instances(n)
    (root / "im").mkdir(parents=True)
    (root / "mito-train-v2").mkdir()
    (root / "mito-val-v2").mkdir()
    for z in range(n):
        cv2.imwrite(str(root / "im" / f"im{z:04d}.png"), images[z])
        if z < test_start:
            folder = "mito-train-v2" if z < val_start else "mito-val-v2"
            tifffile.imwrite(root / folder / f"seg{z:04d}.tif", labels[z])
    return images, labels


def test_mitoem_release_tiff_folders(tmp_path):
    images, labels = _write_mitoem_release(tmp_path / "EM30-H")
    out = tmp_path / "out"
    mitoem.main(["release", "--images", str(tmp_path / "EM30-H" / "im"),
                 "--train-labels", str(tmp_path / "EM30-H" / "mito-train-v2"),
                 "--val-labels", str(tmp_path / "EM30-H" / "mito-val-v2"), "--out", str(out)])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 8, "val": 2, "test": 0}
    assert meta["pixel_size_nm"] == 8.0 and meta["labels"]["kind"] == "instance"
    for split in ("train", "val"):
        index, got_images, got_labels = _read_split(out, split)
        assert index == meta["splits"][split]["slices"]
        for z, image, label in zip(index, got_images, got_labels):
            np.testing.assert_array_equal(image, images[z])
            assert label.dtype == np.uint16
            np.testing.assert_array_equal(label, labels[z])  # ids exactly as released


def test_mitoem_release_hdf5_volumes(tmp_path, capsys):
    images, labels = _write_mitoem_release(tmp_path / "EM30-R")
    with h5py.File(tmp_path / "mito_train_instance.h5", "w") as f:
        f.create_dataset("main", data=labels[:8].astype(np.uint32), compression="gzip")
    with h5py.File(tmp_path / "mito_val_instance.h5", "w") as f:
        f.create_dataset("main", data=labels[8:10].astype(np.uint32))
    with h5py.File(tmp_path / "mito_test_instance.h5", "w") as f:
        f.create_dataset("dataset_1", data=labels[10:12].astype(np.uint32))
        f.create_dataset("extra", data=np.zeros(3))
    out = tmp_path / "out"
    common = ["release", "--images", str(tmp_path / "EM30-R" / "im"),
              "--train-labels", str(tmp_path / "mito_train_instance.h5"),
              "--val-labels", str(tmp_path / "mito_val_instance.h5"), "--val-z0", "8",
              "--test-labels", str(tmp_path / "mito_test_instance.h5"), "--test-z0", "10",
              "--out", str(out), "--z-step", "2"]
    assert mitoem.main(common) == 2  # two datasets: the key must be chosen
    assert re.search("mito_test_instance.h5.*--h5-key", capsys.readouterr().err)
    assert mitoem.main(common + ["--h5-key", "dataset_1"]) == 2
    assert "mito_train_instance.h5 has no dataset 'dataset_1'" in capsys.readouterr().err
    test_only = tmp_path / "test_only.h5"
    with h5py.File(test_only, "w") as f:
        f.create_dataset("dataset_1", data=labels[10:12].astype(np.uint32))
    common[common.index(str(tmp_path / "mito_test_instance.h5"))] = str(test_only)
    mitoem.main(common)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["splits"]["train"]["slices"] == [0, 2, 4, 6]
    assert meta["splits"]["val"]["slices"] == [8]
    assert meta["splits"]["test"]["slices"] == [10]
    for split in ("train", "val", "test"):
        index, got_images, got_labels = _read_split(out, split)
        for z, image, label in zip(index, got_images, got_labels):
            np.testing.assert_array_equal(image, images[z])
            assert label.dtype == np.uint32
            np.testing.assert_array_equal(label, labels[z])


def test_mitoem_release_missing_image_names_it(tmp_path):
    _write_mitoem_release(tmp_path / "EM30-H")
    (tmp_path / "EM30-H" / "im" / "im0003.png").unlink()
    with pytest.raises(FileNotFoundError, match="im0003.png"):
        mitoem.convert_release(tmp_path / "EM30-H" / "im", tmp_path / "out",
                               train_labels=tmp_path / "EM30-H" / "mito-train-v2")


def _write_biapy(src: Path, splits=("train", "val", "test"), n: int = 3) -> dict:
    written = {}
    for k, split in enumerate(splits):
        (src / split / "x").mkdir(parents=True)
        (src / split / "y").mkdir(parents=True)
        images, labels = _images(n, 10 + k), _instances(n, 20 + k)
        for i in range(n):
            z = 100 * k + i
            tifffile.imwrite(src / split / "x" / f"im{z:04d}.tif", images[i])
            tifffile.imwrite(src / split / "y" / f"im{z:04d}.tif", labels[i], compression="zlib")
            written[(split, z)] = (images[i], labels[i])
    return written


@pytest.mark.parametrize("link", [False, True])
def test_mitoem_biapy_layout_checked_and_copied(tmp_path, link):
    written = _write_biapy(tmp_path / "MitoEM-H")
    out = tmp_path / "out"
    mitoem.main(["biapy", "--src", str(tmp_path / "MitoEM-H"), "--out", str(out)] + (["--link"] if link else []))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 3, "val": 3, "test": 3} and meta["linked"] is link
    for (split, z), (image, label) in written.items():
        x, y = out / split / "x" / f"im{z:04d}.tif", out / split / "y" / f"seg{z:04d}.tif"
        assert x.is_symlink() is link and y.is_symlink() is link
        np.testing.assert_array_equal(tifffile.imread(x), image)
        np.testing.assert_array_equal(tifffile.imread(y), label)
        assert y.read_bytes() == (tmp_path / "MitoEM-H" / split / "y" / f"im{z:04d}.tif").read_bytes()


def test_mitoem_biapy_val_carved_and_errors(tmp_path):
    _write_biapy(tmp_path / "A", splits=("train",), n=10)
    grey_as_rgb = tmp_path / "A" / "train" / "x" / "im0003.tif"  # (H, W, 3): an (H, W) slice, as training reads it
    tifffile.imwrite(grey_as_rgb, np.repeat(tifffile.imread(grey_as_rgb)[..., None], 3, axis=-1))
    mitoem.convert_biapy(tmp_path / "A", tmp_path / "outA", val_fraction=0.2)
    meta = json.loads((tmp_path / "outA" / "dataset.json").read_text())
    assert meta["counts"] == {"train": 8, "val": 2, "test": 0} and meta["val_from_train"]
    assert (tmp_path / "outA" / "train" / "x" / "im0003.tif").read_bytes() == grey_as_rgb.read_bytes()
    assert meta["splits"]["val"]["slices"] == [8, 9]

    _write_biapy(tmp_path / "B", splits=("train", "test"))
    bad = tmp_path / "B" / "test" / "y" / "im0101.tif"
    tifffile.imwrite(bad, np.zeros((H + 2, W), np.uint16))
    with pytest.raises(ValueError, match="shape mismatch.*im0101.tif"):
        mitoem.convert_biapy(tmp_path / "B", tmp_path / "outB")
    tifffile.imwrite(bad, np.zeros((H, W), np.float32))
    with pytest.raises(ValueError, match="im0101.tif.*integer"):
        mitoem.convert_biapy(tmp_path / "B", tmp_path / "outB")
    bad.unlink()
    with pytest.raises(ValueError, match="test/x has 3 slices but .*test/y has 2"):
        mitoem.convert_biapy(tmp_path / "B", tmp_path / "outB")
    with pytest.raises(FileNotFoundError, match="train"):
        mitoem.convert_biapy(tmp_path / "nothing", tmp_path / "outC")
    # A set with no test split gets no empty test/ folder (it would read as a test split).
    assert not (tmp_path / "outA" / "test").exists() and (tmp_path / "outA" / "val" / "x").is_dir()
    # --link into the folder being replaced would leave links to themselves: refused, nothing touched.
    before = sorted(p.name for p in (tmp_path / "outA" / "train" / "x").iterdir())
    with pytest.raises(ValueError, match="--link.*overlap"):
        mitoem.convert_biapy(tmp_path / "outA", tmp_path / "outA", link=True, overwrite=True)
    after = tmp_path / "outA" / "train" / "x"
    assert sorted(p.name for p in after.iterdir()) == before and not any(p.is_symlink() for p in after.iterdir())


def test_mitoem_release_refuses_a_slice_in_two_splits(tmp_path):
    _, labels = _write_mitoem_release(tmp_path / "EM30-H")  # train labels z 0-7
    with h5py.File(tmp_path / "val.h5", "w") as f:  # a val volume placed at z 5 by mistake
        f.create_dataset("main", data=labels[8:10].astype(np.uint32))
    with pytest.raises(ValueError, match="slice 5 is labelled for both train and val"):
        mitoem.convert_release(tmp_path / "EM30-H" / "im", tmp_path / "out",
                               train_labels=tmp_path / "EM30-H" / "mito-train-v2",
                               val_labels=tmp_path / "val.h5", z0={"val": 5})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Generic


def test_generic_png_folders_with_numbers(tmp_path):
    images, labels = _images(10, 5), _instances(10, 6)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for z in range(10):
        cv2.imwrite(str(tmp_path / "img" / f"slice_{z}.png"), images[z])  # unpadded numbers: natural order
        cv2.imwrite(str(tmp_path / "lab" / f"mask{z:03d}.png"), labels[z])  # 16-bit PNG ids
    out = tmp_path / "out"
    generic.main(["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--out", str(out),
                  "--splits", "0.6,0.2,0.2", "--pixel-size-in", "4"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"train": 6, "val": 2, "test": 2}
    assert meta["splits"]["test"]["slices"] == [8, 9] and meta["pixel_size_nm"] == 4.0
    assert meta["labels"]["kind"] == "instance"
    for split in ("train", "val", "test"):
        for z, image, label in zip(*_read_split(out, split)):
            np.testing.assert_array_equal(image, images[z])
            np.testing.assert_array_equal(label, labels[z])


def test_generic_stacks_binary_uint16_images_and_shuffle(tmp_path):
    images = _images(8, 7, dtype=np.uint16)
    masks = (np.random.default_rng(8).random((8, H, W)) > 0.7).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "stack.tif", images)
    np.save(tmp_path / "masks.npy", masks)
    out = tmp_path / "out"
    generic.main(["--images", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "masks.npy"),
                  "--out", str(out), "--shuffle", "--seed", "1"])
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"]["kind"] == "binary" and meta["shuffled"] and meta["seed"] == 1
    slices = sum((meta["splits"][s]["slices"] for s in c.SPLITS), [])
    assert sorted(slices) == list(range(8)) and slices != list(range(8))
    for split in c.SPLITS:
        for z, image, label in zip(*_read_split(out, split)):
            assert image.dtype == np.uint16  # 16-bit PNG, lossless
            np.testing.assert_array_equal(image, images[z])
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, masks[z] // 255)


def test_generic_errors_and_overwrite(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", _images(4))
    tifffile.imwrite(tmp_path / "lab.tif", _instances(3))
    with pytest.raises(ValueError, match="lab.tif.*3"):
        generic.convert_generic(tmp_path / "img.tif", tmp_path / "lab.tif", tmp_path / "o")
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((4, H, W + 4), np.uint8))
    with pytest.raises(ValueError, match="shape mismatch: image img.tif\\[0\\].*lab.tif\\[0\\]"):
        generic.convert_generic(tmp_path / "img.tif", tmp_path / "lab.tif", tmp_path / "o")
    tifffile.imwrite(tmp_path / "lab.tif", np.full((4, H, W), 0.5, np.float32))
    with pytest.raises(ValueError, match="lab.tif\\[0\\].*non-integer"):
        generic.convert_generic(tmp_path / "img.tif", tmp_path / "lab.tif", tmp_path / "o")
    (tmp_path / "img.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="unsupported format '.gif' for .*img.gif"):
        generic.convert_generic(tmp_path / "img.gif", tmp_path / "lab.tif", tmp_path / "o")
    # A blank slice or one with NaN pixels is refused here, not when a training run meets it.
    tifffile.imwrite(tmp_path / "lab.tif", _instances(4))
    blank = _images(4)
    blank[2] = 0
    tifffile.imwrite(tmp_path / "blank.tif", blank)
    with pytest.raises(ValueError, match=r"blank.tif\[2\]: constant image"):
        generic.convert_generic(tmp_path / "blank.tif", tmp_path / "lab.tif", tmp_path / "o")
    nan = _images(4).astype(np.float32)
    nan[1, 3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(ValueError, match=r"nan.tif\[1\]: 1 NaN"):
        generic.convert_generic(tmp_path / "nan.tif", tmp_path / "lab.tif", tmp_path / "o")
    assert not (tmp_path / "o").exists()

    tifffile.imwrite(tmp_path / "lab.tif", _instances(4))
    out = tmp_path / "ok"
    generic.convert_generic(tmp_path / "img.tif", tmp_path / "lab.tif", out)
    before = (out / "dataset.json").read_text()
    assert generic.main(["--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
                         "--out", str(out)]) == 2
    assert (out / "dataset.json").read_text() == before  # nothing was touched
    generic.main(["--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"),
                  "--out", str(out), "--overwrite", "--crop", "8", "8", "32", "40"])
    _, images, labels = _read_split(out, "train")
    assert images[0].shape == labels[0].shape == (32, 40)


def test_clis_have_help(capsys):
    for module in (lucchi, generic, mitoem):
        with pytest.raises(SystemExit) as exc:
            module.main(["--help"])
        assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "training_groundtruth.tif" in text and "mito-train-v2" in text and "--shuffle" in text


# ---------------------------------------------------------------------------
# Inputs a biologist may well have: each converts right or fails with one line naming the file


def test_a_swap_killed_half_way_is_finished_by_the_next_conversion(tmp_path):
    """The old data set is replaced item by item; a kill between two items must not leave new
    dataset.json beside old split folders: the next conversion into OUT completes the swap."""
    out = tmp_path / "out"
    for split in ("train", "val", "test"):
        (out / split / "x").mkdir(parents=True)
        (out / split / "x" / "old.png").write_bytes(b"old")
    (out / "dataset.json").write_text("old")
    stage = out / f"{c.STAGING_PREFIX}999"
    (stage / "train" / "x").mkdir(parents=True)
    (stage / "train" / "x" / "new.png").write_bytes(b"new")
    (stage / "dataset.json").write_text("new")
    (stage / c.COMPLETE).write_text(json.dumps(["dataset.json", "train"]))
    # Killed after dataset.json was swapped in: the old one aside, train, val and test still old.
    trash = out / f"{c.REPLACED_PREFIX}999"
    trash.mkdir()
    (out / "dataset.json").rename(trash / "dataset.json")
    (stage / "dataset.json").rename(out / "dataset.json")
    c._recover(out)
    assert (out / "dataset.json").read_text() == "new"
    assert [p.name for p in (out / "train" / "x").iterdir()] == ["new.png"]
    assert not (out / "val").exists() and not (out / "test").exists()  # the new data set has none
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train"]
    # A staging folder the conversion never finished is only deleted.
    (out / f"{c.STAGING_PREFIX}5" / "train").mkdir(parents=True)
    c._recover(out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train"]


def test_a_failed_first_conversion_leaves_no_folder_or_lock_behind(tmp_path, capsys):
    images = _images(3)
    images[1] = 7  # a blank slice, found only when the conversion reads it
    np.save(tmp_path / "im.npy", images)
    np.save(tmp_path / "lab.npy", _instances(3))
    out = tmp_path / "new" / "deep" / "out"
    assert generic.main(["--images", str(tmp_path / "im.npy"), "--labels", str(tmp_path / "lab.npy"),
                         "--out", str(out)]) == 2
    assert "im.npy[1]: constant image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.npy", "lab.npy"]


@pytest.mark.parametrize("case", ["crop hides a size mismatch", "empty stack", "truncated npy", "nan fractions",
                                  "colour label", "ids beyond uint32", "truncated tiff stack", "jpeg label"])
def test_generic_refuses_with_one_line(tmp_path, capsys, case):
    im, lab = tmp_path / "im.tif", tmp_path / "lab.tif"
    tifffile.imwrite(im, _images(2))
    tifffile.imwrite(lab, _instances(2))
    extra = []
    if case == "crop hides a size mismatch":
        tifffile.imwrite(lab, np.pad(_instances(2), ((0, 0), (0, 8), (0, 8))))
        extra, want = ["--crop", "0", "0", "16", "16"], "shape mismatch: image im.tif[0] is (48, 64)"
    elif case == "empty stack":
        np.save(tmp_path / "im.npy", np.zeros((0, H, W), np.uint8))
        im, want = tmp_path / "im.npy", "im.npy: holds no slice"
    elif case == "truncated npy":
        np.save(tmp_path / "im.npy", _images(2))
        (tmp_path / "im.npy").write_bytes((tmp_path / "im.npy").read_bytes()[:300])
        im, want = tmp_path / "im.npy", "im.npy: not a readable .npy array"
    elif case == "nan fractions":
        extra, want = ["--splits", "nan,0.5,0.5"], "fractions must be finite"
    elif case == "colour label":
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[:8, :8] = (255, 0, 0)
        rgb[20:30, 20:30] = (0, 0, 255)
        tifffile.imwrite(lab, rgb, photometric="rgb")
        tifffile.imwrite(im, _images(1)[0])
        want = "lab.tif[0] has 3 colour channels; expected one channel of ids"
    elif case == "ids beyond uint32":
        tifffile.imwrite(lab, _instances(2).astype(np.uint64) << np.uint64(40))
        want = "lab.tif: instance id"
    elif case == "jpeg label":  # one JPEG among PNG labels: named, not silently left out of the count
        (tmp_path / "x").mkdir()
        (tmp_path / "y").mkdir()
        for z, (image, ids) in enumerate(zip(_images(3), _instances(3))):
            cv2.imwrite(str(tmp_path / "x" / f"im{z:04d}.png"), image)
            cv2.imwrite(str(tmp_path / "y" / f"seg{z:04d}.{'jpg' if z == 1 else 'png'}"), (ids > 0).astype(np.uint8))
        im, lab, want = tmp_path / "x", tmp_path / "y", "seg0001.jpg: labels must be lossless"
    else:
        tifffile.imwrite(im, _images(6), compression="zlib")
        im.write_bytes(im.read_bytes()[:len(im.read_bytes()) * 6 // 10])
        tifffile.imwrite(lab, _instances(6))
        want = "im.tif: damaged TIFF"
    try:
        rc = generic.main(["--images", str(im), "--labels", str(lab), "--out", str(tmp_path / "o"), *extra])
    except SystemExit as stop:  # argparse's own refusal: usage, then one line
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert want in err[-1] and (len(err) == 1 or "usage" in err[0]), err
    assert not (tmp_path / "o").exists()


def test_generic_reads_colour_stacks_palette_labels_and_mixed_masks_as_training_does(tmp_path):
    from xmdl_tf.io import read_image

    # An RGB image stack (Z, H, W, 3) is three grey slices, as the loader reads it.
    rgb = np.stack([np.stack([im] * 3, -1) for im in _images(3)])
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    masks = (_instances(3) > 0).astype(np.uint8)
    tifffile.imwrite(tmp_path / "masks.tif", masks)
    generic.main(["--images", str(tmp_path / "rgb.tif"), "--labels", str(tmp_path / "masks.tif"),
                  "--out", str(tmp_path / "a"), "--splits", "1,1,1"])
    for split, z in (("train", 0), ("val", 1), ("test", 2)):
        np.testing.assert_array_equal(read_image(tmp_path / "a" / split / "x" / f"im{z:04d}.png"),
                                      read_image(tmp_path / "rgb.tif", page=z))
    # Masks saved some 0/1 and some 0/255, and a palette PNG of ids; macOS "._" files are no slices.
    from PIL import Image

    for name in ("im", "lab", "pal"):
        (tmp_path / name).mkdir()
    for z, image in enumerate(_images(4)):
        cv2.imwrite(str(tmp_path / "im" / f"im{z:04d}.png"), image)
        cv2.imwrite(str(tmp_path / "lab" / f"seg{z:04d}.png"), masks[z % 3] * (1 if z < 2 else 255))
        pal = Image.fromarray(_instances(4)[z].astype(np.uint8) % 7, mode="P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
        pal.save(tmp_path / "pal" / f"seg{z:04d}.png")
    (tmp_path / "im" / "._im0000.png").write_bytes(b"\0\5\26\7 resource fork")
    generic.main(["--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lab"), "--out", str(tmp_path / "b")])
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta["labels"]["kind"] == "binary" and sum(meta["counts"].values()) == 4
    generic.main(["--images", str(tmp_path / "im"), "--labels", str(tmp_path / "pal"), "--out", str(tmp_path / "p"),
                  "--splits", "1,0,0"])
    for z in range(4):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "p" / "train" / "y" / f"seg{z:04d}.tif"),
                                      _instances(4)[z].astype(np.uint8) % 7)


def test_mitoem_release_refuses_a_copied_label_and_a_lone_label_file(tmp_path, capsys):
    _write_mitoem_release(tmp_path / "EM30-H")
    train = tmp_path / "EM30-H" / "mito-train-v2"
    argv = ["release", "--images", str(tmp_path / "EM30-H" / "im"), "--out", str(tmp_path / "o")]
    shutil.copy(train / "seg0002.tif", train / "seg0002 copy.tif")  # a Finder copy would shift every z
    assert mitoem.main([*argv, "--train-labels", str(train)]) == 2
    assert "seg0002 copy.tif and seg0002.tif both carry slice number 2" in capsys.readouterr().err
    assert mitoem.main([*argv, "--train-labels", str(train / "seg0005.tif")]) == 2
    assert "not a single file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mitoem_biapy_checks_what_training_reads_and_keeps_a_train_split(tmp_path, capsys):
    src = tmp_path / "src"
    _write_biapy(src)
    first = sorted((src / "train" / "x").iterdir())[0]
    kept = first.read_bytes()
    first.write_bytes(kept[:60])  # a truncated download
    assert mitoem.main(["biapy", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert f"{first}: not a readable TIFF" in capsys.readouterr().err
    first.write_bytes(kept)
    shutil.rmtree(src / "val")
    assert mitoem.main(["biapy", "--src", str(src), "--out", str(tmp_path / "o"), "--val-fraction", "1"]) == 2
    assert "would leave no training slice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_object_per_slice_stays_instance_ids_and_harmless_tiff_metadata_is_read(tmp_path):
    labels = np.zeros((3, H, W), np.uint16)
    for z, obj in enumerate((3, 7, 9)):  # one object per slice: ids, not a mask
        labels[z, 5:15, 5:15] = obj
    images = _images(3)
    # A description with a non-ASCII byte: tifffile warns, the pixels are fine.
    tifffile.imwrite(tmp_path / "im.tif", images, description=b"acquired with \x81 scope")
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    generic.main(["--images", str(tmp_path / "im.tif"), "--labels", str(tmp_path / "lab.tif"),
                  "--out", str(tmp_path / "o"), "--splits", "1,0,0"])
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["labels"]["kind"] == "instance"
    for z in range(3):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "o" / "train" / "y" / f"seg{z:04d}.tif"), labels[z])
