"""Volumes (Z, Y, X) from TIFF, slice folders, HDF5 and (OME-)Zarr, their voxel size, and writing them."""
from __future__ import annotations

import logging

import cv2
import h5py
import numpy as np
import pytest
import tifffile

try:  # optional: not a declared dependency
    import zarr
except ImportError:
    zarr = None

from xmdl_tf import volume_io
from xmdl_tf.io import DataError
from xmdl_tf.volume_io import (
    Volume,
    check_same_grid,
    iter_slabs,
    open_volume,
    resolve_voxel_size,
    write_volume_tiff,
)

SHAPE = (5, 32, 40)
LOGGER = "xmdl_tf.volume_io"


@pytest.fixture
def vol() -> np.ndarray:
    """uint16 (5, 32, 40); every slice differs from the others."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 60000, SHAPE, dtype=np.uint16)


@pytest.fixture
def vol8(vol) -> np.ndarray:
    return (vol >> 8).astype(np.uint8)


def assert_voxel(volume: Volume, expected) -> None:
    assert volume.voxel_size_nm is not None, volume.voxel_note
    np.testing.assert_allclose(volume.voxel_size_nm, expected, rtol=1e-5)


# ----------------------------------------------------------------------------
# TIFF


def test_plain_multipage_tiff(tmp_path, vol):
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, vol)
    v = open_volume(p)
    assert (v.shape, v.dtype, len(v), v.name) == (SHAPE, np.dtype(np.uint16), 5, "stack")
    assert v.voxel_size_nm is None
    np.testing.assert_array_equal(v.read(), vol)
    np.testing.assert_array_equal(v.slab(1, 3), vol[1:3])
    np.testing.assert_array_equal(v.slab(4, 5), vol[4:5])


def test_imagej_tiff_with_spacing(tmp_path, vol):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, vol, imagej=True, resolution=(1 / 0.004, 1 / 0.005),
                     metadata={"axes": "ZYX", "spacing": 0.03, "unit": "um"})
    v = open_volume(p)
    assert v.shape == SHAPE
    assert_voxel(v, (30.0, 5.0, 4.0))
    np.testing.assert_array_equal(v.slab(2, 4), vol[2:4])


@pytest.mark.parametrize("unit, factor", [("nm", 1.0), ("µm", 1e-3), (None, 1e-3)])
def test_ome_tiff_physical_size(tmp_path, vol, unit, factor):
    meta = {"axes": "ZYX", "PhysicalSizeX": 4 * factor, "PhysicalSizeY": 5 * factor, "PhysicalSizeZ": 30 * factor}
    if unit is not None:  # without a unit, OME means µm
        meta.update({f"PhysicalSize{a}Unit": unit for a in "XYZ"})
    p = tmp_path / "img.ome.tif"
    tifffile.imwrite(p, vol, ome=True, metadata=meta)
    v = open_volume(p)
    assert v.name == "img"
    assert_voxel(v, (30.0, 5.0, 4.0))
    np.testing.assert_array_equal(v.slab(0, 2), vol[:2])


def test_tiff_with_only_xy_resolution_gives_no_voxel_size_but_says_what_it_found(tmp_path, vol):
    p = tmp_path / "xy.tif"
    tifffile.imwrite(p, vol, resolution=(1e7 / 4.0, 1e7 / 5.0), resolutionunit="CENTIMETER")
    v = open_volume(p)
    assert v.voxel_size_nm is None
    assert "only part" in v.voxel_note and "5 x 4" in v.voxel_note


def test_tiff_slab_reads_pages_not_the_whole_file(tmp_path, vol, monkeypatch):
    p = tmp_path / "stack.tif"
    tifffile.imwrite(p, vol, imagej=True, metadata={"axes": "ZYX"})
    v = open_volume(p)

    def whole(*_):
        raise AssertionError("read the whole series")

    monkeypatch.setattr(volume_io, "_whole_series", whole)
    np.testing.assert_array_equal(v.slab(3, 5), vol[3:5])


def test_tiff_planes_sharing_one_page_are_read(tmp_path, vol):
    # Three gray planes stored as the samples of one page (planar, not RGB).
    p = tmp_path / "three.tif"
    tifffile.imwrite(p, vol[:3], photometric="minisblack", planarconfig="separate")
    v = open_volume(p)
    assert v.shape == (3, *SHAPE[1:])
    np.testing.assert_array_equal(v.slab(1, 3), vol[1:3])


@pytest.mark.parametrize("how", ["imagej", "shaped", "axes"])
def test_one_slice_tiff_is_a_volume(tmp_path, vol, how):
    p = tmp_path / "one.tif"
    kwargs = {"imagej": {"imagej": True}, "shaped": {}, "axes": {"metadata": {"axes": "ZYX"}}}[how]
    tifffile.imwrite(p, vol[:1], **kwargs)
    v = open_volume(p)
    assert v.shape == (1, *SHAPE[1:])
    np.testing.assert_array_equal(v.read(), vol[:1])


def test_rgb_tiff_stack_is_converted_to_gray(tmp_path, vol8):
    gray_rgb = np.repeat(vol8[..., None], 3, axis=-1)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, gray_rgb, photometric="rgb")
    v = open_volume(p)
    assert v.shape == SHAPE
    np.testing.assert_array_equal(v.slab(1, 4), vol8[1:4])

    colour = gray_rgb.copy()
    colour[..., 0] = 255 - colour[..., 0]
    tifffile.imwrite(p, colour, photometric="rgb")
    with pytest.warns(UserWarning, match="grayscale"):
        assert open_volume(p).slab(0, 2).shape == (2, *SHAPE[1:])


def test_multichannel_tiff_is_refused(tmp_path, vol):
    p = tmp_path / "zc.tif"
    tifffile.imwrite(p, np.stack([vol[:2]] * 3, axis=1), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(DataError, match=r"zc\.tif.*Z=2, C=3.*not one \(Z, Y, X\) stack"):
        open_volume(p)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_2d_image_is_refused(tmp_path, vol8, ext):
    p = tmp_path / f"plane{ext}"
    if ext == ".png":
        cv2.imwrite(str(p), vol8[0])
    else:
        tifffile.imwrite(p, vol8[0])
    with pytest.raises(DataError, match=r"plane\.(png|tif) is a single 2-D image \(32 x 40\); a volume needs a stack"):
        open_volume(p)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tif: not found"):
        open_volume(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(DataError, match=r"bad\.tif: not a readable TIFF"):
        open_volume(bad)


# ----------------------------------------------------------------------------
# Folder of slices


def write_slices(folder, vol, numbers, ext=".png"):
    folder.mkdir(exist_ok=True)
    for z, n in enumerate(numbers):
        cv2.imwrite(str(folder / f"slice_{n}{ext}"), vol[z])


def test_folder_sorted_by_number(tmp_path, vol8):
    # Written in the order 2, 10, 1: the volume must be 1, 2, 10 (numeric, not by name).
    folder = tmp_path / "slices"
    write_slices(folder, vol8[:3], [2, 10, 1])
    with pytest.warns(UserWarning, match="not evenly spaced .slice_2.png is followed by slice_10.png"):
        v = open_volume(folder)  # slices 3-9 missing: read as adjacent, and the user is told
    assert (v.shape, v.dtype, v.name) == ((3, *SHAPE[1:]), np.dtype(np.uint8), "slices")
    np.testing.assert_array_equal(v.read(), vol8[[2, 0, 1]])
    np.testing.assert_array_equal(v.slab(2, 3), vol8[1:2])
    assert v.voxel_size_nm is None


def test_folder_reads_only_the_slab_files(tmp_path, vol8):
    folder = tmp_path / "slices"
    write_slices(folder, vol8, range(5))
    v = open_volume(folder)
    (folder / "slice_4.png").write_bytes(b"corrupt")  # after opening: only a read of z = 4 may notice
    np.testing.assert_array_equal(v.slab(0, 4), vol8[:4])
    with pytest.raises(DataError, match=r"slice_4\.png"):
        v.slab(3, 5)


def test_folder_of_16bit_tiffs_with_partial_metadata(tmp_path, vol):
    folder = tmp_path / "tifs"
    folder.mkdir()
    for z in range(5):
        tifffile.imwrite(folder / f"im{z:04d}.tif", vol[z], imagej=True, resolution=(250.0, 250.0),
                         metadata={"unit": "um"})
    v = open_volume(folder)
    np.testing.assert_array_equal(v.read(), vol)
    assert v.voxel_size_nm is None
    assert "only part" in v.voxel_note and "im0000.tif" in v.voxel_note


def test_folder_with_one_slice_is_a_volume(tmp_path, vol8):
    folder = tmp_path / "one"
    write_slices(folder, vol8[:1], [7])
    v = open_volume(folder)
    assert v.shape == (1, *SHAPE[1:])
    np.testing.assert_array_equal(v.read(), vol8[:1])


def test_folder_odd_shape_or_dtype_names_the_file(tmp_path, vol, vol8):
    folder = tmp_path / "odd"
    write_slices(folder, vol8[:3], [1, 2, 3])
    cv2.imwrite(str(folder / "slice_4.png"), vol8[3, :, :30])
    with pytest.raises(DataError, match=r"slice_4\.png: slice is 32 x 30 uint8 but slice_1\.png is 32 x 40"):
        open_volume(folder)
    cv2.imwrite(str(folder / "slice_4.png"), vol[3])  # right shape, 16-bit
    with pytest.raises(DataError, match=r"slice_4\.png: slice is 32 x 40 uint16"):
        open_volume(folder)


def test_folder_errors(tmp_path, vol8):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: empty folder"):
        open_volume(empty)
    folder = tmp_path / "names"
    write_slices(folder, vol8[:2], [1, 2])
    cv2.imwrite(str(folder / "overview.png"), vol8[2])
    with pytest.raises(DataError, match=r"overview\.png: no number in the name"):
        open_volume(folder)


# ----------------------------------------------------------------------------
# HDF5


def test_hdf5_element_size_um(tmp_path, vol):
    p = tmp_path / "vol.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("raw", data=vol, chunks=(1, 32, 40)).attrs["element_size_um"] = [0.03, 0.005, 0.004]
    v = open_volume(p)
    assert (v.shape, v.name) == (SHAPE, "vol")
    assert_voxel(v, (30.0, 5.0, 4.0))
    np.testing.assert_array_equal(v.slab(1, 4), vol[1:4])


@pytest.mark.parametrize("sep", [":/", "/"])
def test_hdf5_named_dataset_with_resolution_in_nm(tmp_path, vol, vol8, sep):
    p = tmp_path / "cremi.hdf5"
    with h5py.File(p, "w") as f:
        f.create_dataset("volumes/raw", data=vol8).attrs["resolution"] = [40.0, 4.0, 4.0]
        f.create_dataset("volumes/labels/ids", data=vol.astype(np.uint64))
    v = open_volume(f"{p}{sep}volumes/raw")
    assert v.name == "cremi_raw"
    assert_voxel(v, (40.0, 4.0, 4.0))
    np.testing.assert_array_equal(v.read(), vol8)
    labels = open_volume(f"{p}:/volumes/labels/ids", kind="label")
    np.testing.assert_array_equal(labels.label_slab(0, 2), vol[:2])

    with pytest.raises(DataError, match=r"2 3-D datasets.*/volumes/labels/ids \(5, 32, 40\) uint64, /volumes/raw"):
        open_volume(p)
    with pytest.raises(DataError, match=r"no dataset /volumes/rawx; datasets: .*/volumes/raw"):
        open_volume(f"{p}:/volumes/rawx")


@pytest.mark.parametrize("shape, expected", [((1, 32, 40), (1, 32, 40)), ((1, 5, 32, 40), (5, 32, 40)),
                                             ((5, 1, 32, 40), (5, 32, 40)), ((5, 32, 40, 1), (5, 32, 40))])
def test_hdf5_singleton_axes_are_squeezed(tmp_path, shape, expected):
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    p = tmp_path / "s.h5"
    with h5py.File(p, "w") as f:
        f["x"] = data
    v = open_volume(f"{p}:/x")
    assert v.shape == expected
    np.testing.assert_array_equal(v.read(), data.reshape(expected))


def test_hdf5_errors(tmp_path, vol):
    p = tmp_path / "bad.h5"
    with h5py.File(p, "w") as f:
        f["x4"] = np.zeros((2, 3, 32, 40), np.uint8)
        f["plane"] = vol[0]
        f["rgb"] = np.stack([vol[0]] * 3, -1)  # (32, 40, 3): one colour image, not 32 slices 3 px wide
    with pytest.raises(DataError, match=r"bad\.h5:/rgb is a single 2-D RGB image \(32 x 40 x 3\); a volume needs"):
        open_volume(f"{p}:/rgb")
    with pytest.raises(DataError, match=r"bad\.h5:/x4: 4-D data \(2, 3, 32, 40\)"):
        open_volume(f"{p}:/x4")
    with pytest.raises(DataError, match=r"bad\.h5:/plane is a single 2-D image \(32 x 40\)"):
        open_volume(f"{p}:/plane")
    with pytest.raises(DataError, match=r"no 3-D dataset.*/plane \(32, 40\).*/x4"):
        open_volume(p)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"junk\.h5: not a readable HDF5 file"):
        open_volume(junk)


# ----------------------------------------------------------------------------
# Zarr

needs_zarr = pytest.mark.skipif(zarr is None, reason="zarr is not installed")


def write_ome_zarr(path, data, version: str, unit: str, scale):
    """A two-level OME-Zarr (c, z, y, x) image with c = 1, full resolution first."""
    fmt = 2 if version == "0.4" else 3
    g = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    a0 = g.create_array("s0", shape=(1, *data.shape), dtype=data.dtype, chunks=(1, 1, *data.shape[1:]))
    a0[:] = data[None]
    half = data[:, ::2, ::2]
    a1 = g.create_array("s1", shape=(1, *half.shape), dtype=data.dtype)
    a1[:] = half[None]
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": unit} for a in "zyx"]
    ms = {"version": version, "axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, *scale]}]},
        {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, scale[0], 2 * scale[1], 2 * scale[2]]}]},
    ]}
    if fmt == 2:
        g.attrs["multiscales"] = [ms]
    else:
        g.attrs["ome"] = {"version": version, "multiscales": [ms]}


@needs_zarr
@pytest.mark.parametrize("version, unit, scale", [("0.4", "micrometer", (0.03, 0.005, 0.004)),
                                                  ("0.5", "nanometer", (30.0, 5.0, 4.0))])
def test_ome_zarr(tmp_path, vol, version, unit, scale):
    p = tmp_path / "img.ome.zarr"
    write_ome_zarr(p, vol, version, unit, scale)
    v = open_volume(p)
    assert (v.shape, v.name) == (SHAPE, "img")
    assert_voxel(v, (30.0, 5.0, 4.0))
    np.testing.assert_array_equal(v.slab(2, 5), vol[2:5])
    # The full-resolution array named directly keeps its scale from the parent's multiscales.
    v0 = open_volume(f"{p}/s0")
    assert v0.shape == SHAPE
    assert_voxel(v0, (30.0, 5.0, 4.0))


@needs_zarr
def test_ome_zarr_without_units_has_no_voxel_size(tmp_path, vol):
    p = tmp_path / "nounit.zarr"
    write_ome_zarr(p, vol, "0.4", "micrometer", (0.03, 0.005, 0.004))
    g = zarr.open_group(str(p), mode="r+")
    ms = g.attrs["multiscales"]
    for ax in ms[0]["axes"]:
        ax.pop("unit", None)
    g.attrs["multiscales"] = ms
    assert open_volume(p).voxel_size_nm is None


@needs_zarr
def test_plain_zarr_array_and_group(tmp_path, vol8):
    p = tmp_path / "plain.zarr"
    a = zarr.open_array(str(p), mode="w", shape=SHAPE, dtype="uint8", chunks=(2, 32, 40))
    a[:] = vol8
    v = open_volume(p)
    assert (v.shape, v.dtype, v.voxel_size_nm) == (SHAPE, np.dtype(np.uint8), None)
    np.testing.assert_array_equal(v.slab(1, 2), vol8[1:2])

    g = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    arr = g.create_array("raw", shape=SHAPE, dtype="uint8")
    arr[:] = vol8
    arr.attrs["voxel_size"] = [30, 5, 4]
    v = open_volume(tmp_path / "group.zarr")
    assert_voxel(v, (30.0, 5.0, 4.0))
    np.testing.assert_array_equal(v.read(), vol8)


@needs_zarr
def test_zarr_errors(tmp_path):
    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(DataError, match=r"empty\.zarr: Zarr group without arrays"):
        open_volume(tmp_path / "empty.zarr")
    g = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    g.create_array("a", shape=SHAPE, dtype="uint8")
    g.create_array("b", shape=SHAPE, dtype="uint8")
    with pytest.raises(DataError, match=r"2 3-D arrays.*/a \(5, 32, 40\).*/b"):
        open_volume(tmp_path / "two.zarr")
    with pytest.raises(DataError, match=r"no array or group /c; arrays: .*/a"):
        open_volume(f"{tmp_path / 'two.zarr'}/c")


# ----------------------------------------------------------------------------
# Voxel size precedence


def h5_volume(tmp_path, data, element_size_um=None) -> Volume:
    p = tmp_path / "v.h5"
    with h5py.File(p, "w") as f:
        ds = f.create_dataset("raw", data=data)
        if element_size_um is not None:
            ds.attrs["element_size_um"] = element_size_um
    return open_volume(p)


def test_voxel_size_precedence(tmp_path, vol, caplog):
    meta = h5_volume(tmp_path, vol, [0.03, 0.005, 0.004])
    assert resolve_voxel_size(meta, None) == pytest.approx((30, 5, 4))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_voxel_size(meta, [30.1, 5.01, 4.0]) == (30.1, 5.01, 4.0)  # within 1%: silent
        assert not caplog.records
        assert resolve_voxel_size(meta, [40, 4, 4]) == (40.0, 4.0, 4.0)  # the flag wins, with a warning
    assert "overrides" in caplog.text and "30 x 5 x 4" in caplog.text

    none = h5_volume(tmp_path, vol)
    assert resolve_voxel_size(none, None) is None
    assert resolve_voxel_size(none, ("40", "4", "4")) == (40.0, 4.0, 4.0)


@pytest.mark.parametrize("given", [[4, 4], [40, 4, 4, 4], [40, -4, 4], [40, 0, 4], ["a", 4, 4], [float("nan"), 4, 4]])
def test_bad_voxel_size_flag(tmp_path, vol, given):
    with pytest.raises(DataError, match="--voxel-size"):
        resolve_voxel_size(h5_volume(tmp_path, vol), given)


def test_implausible_metadata_is_ignored(tmp_path, vol):
    v = h5_volume(tmp_path, vol, [30.0, 5.0, 4.0])  # nm written where µm belong: 30 µm slices
    assert v.voxel_size_nm is None
    assert "outside" in v.voxel_note and "30000" in v.voxel_note


# ----------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.uint32])
def test_write_volume_tiff_round_trip(tmp_path, vol, dtype):
    data = (vol.astype(np.uint32) * 70000 if dtype == np.uint32 else vol).astype(dtype)
    p = tmp_path / "out.tif"
    write_volume_tiff(p, data, (30.0, 5.0, 4.5))
    v = open_volume(p)
    assert (v.shape, v.dtype) == (SHAPE, np.dtype(dtype))
    np.testing.assert_array_equal(v.read(), data)
    assert_voxel(v, (30.0, 5.0, 4.5))
    with tifffile.TiffFile(p) as tif:  # Fiji reads the ImageJ flavour natively
        assert tif.is_imagej == (dtype != np.uint32)
    assert [f.name for f in tmp_path.iterdir()] == ["out.tif"]  # no temporary left


def test_write_bigtiff_falls_back_to_ome(tmp_path, vol):
    p = tmp_path / "big.tif"
    write_volume_tiff(p, vol, (30.0, 5.0, 4.0), bigtiff=True)
    with tifffile.TiffFile(p) as tif:
        assert tif.is_bigtiff and tif.is_ome and not tif.is_imagej
    v = open_volume(p)
    np.testing.assert_array_equal(v.read(), vol)
    assert_voxel(v, (30.0, 5.0, 4.0))


def test_write_without_voxel_size_and_one_slice(tmp_path, vol):
    p = tmp_path / "one.tif"
    write_volume_tiff(p, vol[:1])
    v = open_volume(p)
    assert v.shape == (1, *SHAPE[1:]) and v.voxel_size_nm is None


def test_write_is_atomic(tmp_path, vol, monkeypatch):
    p = tmp_path / "out.tif"
    write_volume_tiff(p, vol)
    before = p.read_bytes()

    def broken(path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(volume_io.tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_volume_tiff(p, vol[::-1])
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["out.tif"]


# ----------------------------------------------------------------------------
# Images, labels, grids


def test_float_volume_uses_one_map_for_all_slabs(tmp_path):
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = 0.5
    data[4] = 1.0
    v = h5_volume(tmp_path, data)
    first = v.image_slab(0, 1)
    assert first.dtype == np.uint16
    # Volume range 0..1: 0.5 maps to mid-range, as it would not with a per-slab map (-> 65535).
    assert first[0, 0, 0] == 32768 and first[0, 0, 1] == 0
    assert (v.image_slab(4, 5) == 65535).all()


def test_image_slab_dtypes(tmp_path, vol, vol8):
    np.testing.assert_array_equal(h5_volume(tmp_path, vol8).image_slab(0, 5), vol8)
    ints = h5_volume(tmp_path, vol.astype(np.float64))  # integral floats in 0..65535 are cast, not rescaled
    np.testing.assert_array_equal(ints.image_slab(1, 3), vol[1:3])
    mask = h5_volume(tmp_path, vol > 30000).image_slab(0, 2)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}


def test_constant_volume_but_not_constant_slice(tmp_path, vol8):
    with pytest.raises(DataError, match="constant volume"):
        h5_volume(tmp_path, np.full(SHAPE, 7, np.uint8)).image_slab(0, 2)
    with pytest.raises(DataError, match="constant volume"):
        h5_volume(tmp_path, np.full(SHAPE, 0.25, np.float32)).image_slab(0, 2)
    data = vol8.copy()
    data[0] = 0
    assert (h5_volume(tmp_path, data).image_slab(0, 1) == 0).all()


def test_label_slab(tmp_path, vol):
    ids = (vol % 7).astype(np.float32)
    v = h5_volume(tmp_path, ids)
    out = v.label_slab(0, 5)
    assert out.dtype == np.uint32
    np.testing.assert_array_equal(out, ids)
    ids[3, 1, 1] = 0.5
    with pytest.raises(DataError, match=r"slices 2\.\.3\): label has non-integer or negative"):
        h5_volume(tmp_path, ids).label_slab(2, 4)
    neg = (vol % 7).astype(np.int16)
    neg[0, 0, 0] = -1
    with pytest.raises(DataError, match="negative"):
        h5_volume(tmp_path, neg).label_slab(0, 1)


def test_label_ids_beyond_uint32_are_not_wrapped(tmp_path, vol):
    # int64 instance ids (e.g. from a 64-bit agglomeration) above 2**32 - 1: a cast to uint32
    # would wrap 2**32 + 2 onto 2, silently merging two objects.
    ids = np.zeros(vol.shape, np.int64)
    ids[:, :4, :4] = 2
    ids[:, 10:14, 10:14] = 2**32 + 2
    out = h5_volume(tmp_path, ids).label_slab(0, len(ids))
    assert len(np.unique(out)) == 3
    np.testing.assert_array_equal(out, ids)
    assert h5_volume(tmp_path, ids.astype(np.float64)).label_slab(0, 2).max() == 2**32 + 2
    assert h5_volume(tmp_path, ids % 7).label_slab(0, 2).dtype == np.uint32  # small ids stay uint32


def test_check_same_grid(tmp_path, vol):
    image = open_volume(tifffile.imwrite(tmp_path / "i.tif", vol) or tmp_path / "i.tif")
    label = open_volume(tifffile.imwrite(tmp_path / "l.tif", vol[:, :, :30]) or tmp_path / "l.tif", kind="label")
    with pytest.raises(DataError, match=r"label stack .*l\.tif is \(5, 32, 30\) but image stack .*i\.tif is \(5, 32, 40\)"):
        check_same_grid(image, label)
    check_same_grid(image, open_volume(tmp_path / "i.tif", kind="label"))


def test_iter_slabs_and_bounds(tmp_path, vol):
    assert list(iter_slabs(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(iter_slabs(3, 5)) == [(0, 3)]
    with pytest.raises(ValueError):
        list(iter_slabs(3, 0))
    v = h5_volume(tmp_path, vol)
    with pytest.raises(IndexError):
        v.slab(4, 6)


def test_slab_region_reads_the_same_voxels_in_every_format(tmp_path):
    # (y, x) regions of a slab: HDF5 and Zarr read only the region, TIFF crops; all agree.
    import h5py

    rng = np.random.default_rng(3)
    vol = rng.integers(0, 255, (6, 40, 50), dtype=np.uint8)
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, vol)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = vol
    yx = (slice(5, 31), slice(12, 50))
    for spec in (tif, f"{tmp_path / 'v.h5'}:/raw"):
        v = open_volume(spec)
        np.testing.assert_array_equal(v.slab(1, 4, yx), vol[1:4, 5:31, 12:50])
        np.testing.assert_array_equal(v.image_slab(2, 6, yx), vol[2:6, 5:31, 12:50])


def test_n5_dataset_read_as_zyx_with_its_resolution(tmp_path):
    # N5 as the Java tools write it: dimensions listed x, y, z; resolution in x, y, z order.
    ts = pytest.importorskip("tensorstore")
    vol = np.random.default_rng(0).integers(0, 255, (5, 12, 20), dtype=np.uint8)  # (z, y, x)
    ds = tmp_path / "c.n5" / "em" / "raw"
    a = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(ds)},
                 "metadata": {"dimensions": [20, 12, 5], "blockSize": [8, 8, 2], "dataType": "uint8",
                              "compression": {"type": "gzip"}}, "create": True}).result()
    a.T[...] = vol  # stored as (x, y, z)
    import json as _json

    attrs = _json.loads((ds / "attributes.json").read_text())
    attrs["resolution"] = [4.0, 4.0, 30.0]
    (ds / "attributes.json").write_text(_json.dumps(attrs))
    (tmp_path / "c.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
    v = open_volume(f"{tmp_path / 'c.n5'}/em/raw")
    assert v.shape == (5, 12, 20) and v.voxel_size_nm == (30.0, 4.0, 4.0)
    np.testing.assert_array_equal(v.read(), vol)
    np.testing.assert_array_equal(v.slab(1, 3, (slice(2, 9), slice(5, 17))), vol[1:3, 2:9, 5:17])
    with pytest.raises(DataError, match="em/raw"):
        open_volume(tmp_path / "c.n5")  # a container: the error lists its datasets


def test_a_tiff_of_several_series_is_refused_not_truncated(tmp_path, vol8):
    # Two stacks written one after the other, or a page of another size: tifffile sees several
    # series; the first alone would silently drop the rest.
    with tifffile.TiffWriter(tmp_path / "two.tif") as w:
        w.write(vol8[:3])
        w.write(vol8[3:6])
    with pytest.raises(DataError, match="two.tif: holds 2 image series"):
        open_volume(tmp_path / "two.tif")
    with tifffile.TiffWriter(tmp_path / "odd.tif") as w:
        for z in range(4):
            w.write(vol8[z] if z != 2 else vol8[z][:-4])
    with pytest.raises(DataError, match="odd.tif: holds .* image series"):
        open_volume(tmp_path / "odd.tif")


def test_a_three_slice_stack_tifffile_stores_as_planar_samples_is_three_slices(tmp_path):
    """tifffile.imwrite stores a (3, Y, X) array as planar RGB samples: the 2-D readers take it as
    three slices (`io.stack_depth`), so --volume and the napari reader must too (they refused it
    as "a single 2-D image"); contiguous RGB (Y, X, 3) stays one colour image."""
    from xmdl_tf.io import read_image, stack_depth

    arr = np.random.default_rng(0).integers(0, 255, (3, 40, 48), np.uint8)
    tifffile.imwrite(tmp_path / "s3.tif", arr)
    vol = open_volume(tmp_path / "s3.tif")
    assert stack_depth(tmp_path / "s3.tif") == 3 and vol.shape == (3, 40, 48)
    np.testing.assert_array_equal(vol.read(), arr)
    np.testing.assert_array_equal(read_image(tmp_path / "s3.tif", page=1), arr[1])
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(arr, 0, -1), photometric="rgb")
    with pytest.raises(DataError, match=r"single 2-D image \(40 x 48\)"):
        open_volume(tmp_path / "rgb.tif")


def test_a_signed_volume_is_shifted_by_its_own_minimum_in_every_slab(tmp_path, vol):
    """int16 with negative values: one shift for the whole volume, so slabs (and the chunks of a
    slice) are mapped alike; the slices keep their grey values up to that offset."""
    data = (vol.astype(np.int32) // 4 - 9000).astype(np.int16)
    tifffile.imwrite(tmp_path / "signed.tif", data, photometric="minisblack")
    v = open_volume(tmp_path / "signed.tif")
    whole = np.concatenate([v.image_slab(z, z + 1) for z in range(len(v))])
    assert whole.dtype == np.uint16
    np.testing.assert_array_equal(whole, data.astype(np.int64) - int(data.min()))



@pytest.mark.parametrize("kind", ["bool", "int16", "int32_wide", "uint32", "float_integral", "float_unit"])
def test_a_slice_reads_the_same_as_a_file_and_as_a_one_slice_volume(tmp_path, kind):
    """One dtype rule (`io.to_em_dtype`) for slices and stacks: a (1, Y, X) volume's slab equals the
    2-D read of that plane, whatever its dtype; the napari layers use the same function."""
    from xmdl_tf.io import read_image

    base = np.random.default_rng(1).integers(0, 200, (24, 32))
    plane = {"bool": base > 100, "int16": (base - 150).astype(np.int16),
             "int32_wide": (base * 1000 - 50000).astype(np.int32), "uint32": (base * 300).astype(np.uint32),
             "float_integral": base.astype(np.float32), "float_unit": (base / 199.0).astype(np.float32)}[kind]
    tifffile.imwrite(tmp_path / "a.tif", plane)
    flat = read_image(tmp_path / "a.tif")
    assert flat.dtype in (np.uint8, np.uint16)
    np.testing.assert_array_equal(h5_volume(tmp_path, plane[None]).image_slab(0, 1)[0], flat)


def test_n5_container_listing_skips_a_broken_attributes_file(tmp_path):
    # Naming the container instead of a dataset lists its datasets; one unreadable attributes.json
    # elsewhere in it used to end in a JSONDecodeError traceback instead of that one line.
    pytest.importorskip("tensorstore")
    root = tmp_path / "c.n5"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "attributes.json").write_text('{"n5": "2.0.0"}')
    (root / "a" / "attributes.json").write_text('{"dimensions": [8, 8, 4], "blockSize": [8, 8, 4], '
                                                '"dataType": "uint8", "compression": {"type": "raw"}}')
    (root / "b" / "attributes.json").write_text("{broken")
    with pytest.raises(DataError, match=r"an N5 container, not a dataset; .*\(datasets: a\)"):
        open_volume(root)


def test_voxel_size_argument_names_itself():
    """--voxel-size 0.045 0.005 0.005 (micrometres): the error says voxel size, not pixel size."""
    import argparse

    from xmdl_tf import cli

    assert cli.voxel_size("45") == 45.0
    with pytest.raises(argparse.ArgumentTypeError, match=r"^voxel size 0.005 nm is outside .* nm per voxel side"):
        cli.voxel_size("0.005")
