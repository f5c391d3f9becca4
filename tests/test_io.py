import warnings

import cv2
import numpy as np
import pytest
import tifffile

from xmdl_tf.io import DataError, find_pairs, folder_pairs, read_image, read_label, read_pair, split_pairs, stack_pairs, check_pairs, read_pixel_size_nm

from conftest import blob_image


def test_split_layout_pairs_and_reads(blob_dataset):
    pairs = split_pairs(blob_dataset, "train")
    assert [p.image.name for p in pairs] == [f"im{i:04d}.png" for i in range(4)]
    assert [p.label.name for p in pairs] == [f"seg{i:04d}.tif" for i in range(4)]
    img, lbl = read_pair(pairs[0])
    assert img.dtype == np.uint8 and img.shape == (128, 128)
    assert set(np.unique(lbl)) <= {0, 1}
    assert find_pairs(blob_dataset, "val") == split_pairs(blob_dataset, "val")
    assert find_pairs(blob_dataset / "test") == split_pairs(blob_dataset, "test")


def test_split_layout_errors(blob_dataset, tmp_path):
    with pytest.raises(DataError, match="nope: data folder not found"):
        split_pairs(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="split 'holdout' not found"):
        find_pairs(blob_dataset, "holdout")
    (blob_dataset / "train" / "y" / "seg0003.tif").unlink()
    with pytest.raises(DataError, match="4 images but .* 3 labels; no label named or numbered like im0003.png"):
        split_pairs(blob_dataset, "train")
    # numbers in names must agree
    (blob_dataset / "val" / "y" / "seg0005.tif").rename(blob_dataset / "val" / "y" / "seg0009.tif")
    with pytest.raises(DataError, match="numbers differ"):
        split_pairs(blob_dataset, "val")
    empty = tmp_path / "empty" / "train" / "x"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        split_pairs(tmp_path / "empty", "train")


def test_split_layout_pairs_by_name_before_sorted_order(tmp_path):
    """Names without numbers: sorted order would pair sample.png with sample_b_mask.tif ('.' sorts
    before '_' among images, 'b' before 'm' among labels); the names say otherwise."""
    x, y = tmp_path / "train" / "x", tmp_path / "train" / "y"
    x.mkdir(parents=True)
    y.mkdir(parents=True)
    for name in ("sample", "sample_b"):
        img, msk = blob_image(32)
        cv2.imwrite(str(x / f"{name}.png"), img)
        tifffile.imwrite(y / f"{name}_mask.tif", msk)
    assert [(p.image.stem, p.label.stem) for p in split_pairs(tmp_path)] == [("sample", "sample_mask"),
                                                                           ("sample_b", "sample_b_mask")]
    # One label named after an image that sorted order would give another: refused, not guessed.
    (y / "sample_mask.tif").rename(y / "zz.tif")
    with pytest.raises(DataError, match="sample_b.png is paired with zz.tif by sorted order, but "
                                        "sample_b_mask.tif is named after it"):
        split_pairs(tmp_path)
    (y / "zz.tif").rename(y / "sample_mask.tif")
    # Two images of one name: which one is the slice?
    cv2.imwrite(str(x / "sample.tif"), blob_image(32)[0])
    with pytest.raises(DataError, match="sample.png and sample.tif share the name sample"):
        split_pairs(tmp_path)


def test_folder_pairs_by_stem(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    for name in ("b", "a"):
        img, msk = blob_image(64)
        cv2.imwrite(str(tmp_path / "img" / f"{name}.png"), img)
        tifffile.imwrite(tmp_path / "lbl" / f"{name}_mask.tif", msk * 255)
    pairs = folder_pairs(tmp_path / "img", tmp_path / "lbl")
    assert [(p.image.stem, p.label.stem) for p in pairs] == [("a", "a_mask"), ("b", "b_mask")]
    _, lbl = read_pair(pairs[0])
    assert set(np.unique(lbl)) <= {0, 255}  # 0/255 masks kept; foreground is > 0
    globbed = folder_pairs(str(tmp_path / "img" / "*.png"), str(tmp_path / "lbl" / "*.tif"))
    assert globbed == pairs
    (tmp_path / "lbl" / "b_mask.tif").rename(tmp_path / "lbl" / "c_mask.tif")
    with pytest.raises(DataError, match="no label with a matching name or number for 1 image.*b.png"):
        folder_pairs(tmp_path / "img", tmp_path / "lbl")
    # BiaPy names (im0007 <-> seg0007) pair by their number, as analyze --labels pairs them.
    for d in ("img", "lbl"):
        for f in (tmp_path / d).iterdir():
            f.unlink()
    for z in (7, 12):
        img, msk = blob_image(32, seed=z)
        cv2.imwrite(str(tmp_path / "img" / f"im{z:04d}.png"), img)
        tifffile.imwrite(tmp_path / "lbl" / f"seg{z:04d}.tif", msk)
    assert [(p.image.stem, p.label.stem) for p in folder_pairs(tmp_path / "img", tmp_path / "lbl")] == [
        ("im0007", "seg0007"), ("im0012", "seg0012")]
    cv2.imwrite(str(tmp_path / "img" / "other0007.png"), blob_image(32)[0])
    with pytest.raises(DataError, match="both match the label"):
        folder_pairs(tmp_path / "img", tmp_path / "lbl")
    with pytest.raises(DataError, match="no files match"):
        folder_pairs(str(tmp_path / "img" / "*.tif"), tmp_path / "lbl")


def test_stack_pairs(tmp_path):
    imgs = np.stack([blob_image(64, seed=s)[0] for s in range(3)])
    msks = np.stack([blob_image(64, seed=s)[1] for s in range(3)]).astype(np.uint16) * 7  # instance-like ids
    tifffile.imwrite(tmp_path / "stack.tif", imgs)
    tifffile.imwrite(tmp_path / "labels.tif", msks)
    pairs = find_pairs(tmp_path / "stack.tif", labels=tmp_path / "labels.tif")
    assert len(pairs) == 3 and pairs[2].page == 2 and pairs[2].name == "stack_z0002"
    img, lbl = read_pair(pairs[2])
    np.testing.assert_array_equal(img, imgs[2])
    np.testing.assert_array_equal(lbl, msks[2])
    tifffile.imwrite(tmp_path / "short.tif", msks[:2])
    with pytest.raises(DataError, match="3 slices but .*short.tif has 2"):
        stack_pairs(tmp_path / "stack.tif", tmp_path / "short.tif")
    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((3, 64, 80), np.uint8))
    with pytest.raises(DataError, match="wide.tif slices are"):
        stack_pairs(tmp_path / "stack.tif", tmp_path / "wide.tif")


def test_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png.*not a readable image"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    const = tmp_path / "const.png"
    cv2.imwrite(str(const), np.full((32, 32), 9, np.uint8))
    with pytest.raises(DataError, match="const.png: constant image"):
        read_image(const)
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((1, 1), np.uint8))
    with pytest.raises(DataError, match="one.tif: constant image"):  # not a misleading "shape ()"
        read_image(tmp_path / "one.tif")
    nan = np.ones((8, 8), np.float32)
    nan[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(DataError, match="nan.tif: float image with NaN"):
        read_image(tmp_path / "nan.tif")


def test_float_images_in_0_1_are_read_as_the_same_picture(tmp_path):
    from xmdl_tf.sampling import normalize_np

    img = blob_image(64)[0]
    tifffile.imwrite(tmp_path / "float.tif", img.astype(np.float32) / 255.0)
    got = read_image(tmp_path / "float.tif")
    assert got.dtype == np.uint16 and got.min() == 0 and got.max() == 65535
    # The model sees (nearly) the same normalised image as from the 8-bit original.
    np.testing.assert_allclose(normalize_np(got), normalize_np(img), atol=2e-3)
    # Saved as RGB floats in 0..1 too: made grey before any rounding (not a "constant" 0/1 picture).
    tifffile.imwrite(tmp_path / "rgbf.tif", np.stack([img.astype(np.float32) / 255.0] * 3, -1), photometric="rgb")
    np.testing.assert_allclose(normalize_np(read_image(tmp_path / "rgbf.tif")), normalize_np(img), atol=2e-3)


def test_signed_and_wide_integer_images_are_read_as_the_same_picture(tmp_path):
    """int16 EM with negative grey values (SerialEM's MRC) is shifted, a range wider than 16 bits
    mapped linearly: the normalised image the model sees is that of the original."""
    from xmdl_tf.sampling import normalize_np

    img = blob_image(64)[0]
    tifffile.imwrite(tmp_path / "i16.tif", img.astype(np.int16) * 100 - 12000)
    got = read_image(tmp_path / "i16.tif")
    assert got.dtype == np.uint16 and got.min() == 0
    np.testing.assert_array_equal(got, (img.astype(np.int64) - img.min()) * 100)
    np.testing.assert_allclose(normalize_np(got), normalize_np(img), atol=1e-6)
    tifffile.imwrite(tmp_path / "i32.tif", img.astype(np.int32) * 1000 - 50000)  # a range of 255,000
    np.testing.assert_allclose(normalize_np(read_image(tmp_path / "i32.tif")), normalize_np(img), atol=2e-3)


def test_multipage_tiffs_in_the_split_layout_give_every_page(tmp_path):
    from xmdl_tf.io import find_pairs, read_pair

    root = tmp_path / "d"
    (root / "train" / "x").mkdir(parents=True)
    (root / "train" / "y").mkdir(parents=True)
    stack = np.stack([blob_image(48, seed=z) for z in range(3)])  # (3, 2, 48, 48): images, masks
    tifffile.imwrite(root / "train" / "x" / "vol.tif", stack[:, 0])
    tifffile.imwrite(root / "train" / "y" / "vol.tif", stack[:, 1])
    pairs = find_pairs(root, "train")
    assert [p.page for p in pairs] == [0, 1, 2]  # not page 0 only
    for z, p in enumerate(pairs):
        image, label = read_pair(p)
        np.testing.assert_array_equal(image, stack[z, 0])
        np.testing.assert_array_equal(label, stack[z, 1])
    tifffile.imwrite(root / "train" / "y" / "vol.tif", stack[:2, 1])
    with pytest.raises(DataError, match="vol.tif has 3 slices but its label .*vol.tif has 2"):
        find_pairs(root, "train")


def test_shape_mismatch_named(tmp_path, blob_dataset):
    tifffile.imwrite(blob_dataset / "train" / "y" / "seg0001.tif", np.zeros((100, 128), np.uint8))
    pairs = split_pairs(blob_dataset, "train")
    with pytest.raises(DataError, match="im0001.png is .*seg0001.tif is"):
        read_pair(pairs[1])
    with pytest.raises(DataError, match="seg0001.tif"):
        check_pairs(pairs)


def test_16bit_and_rgb(tmp_path):
    img16 = (blob_image(64)[0].astype(np.uint16) * 200)
    tifffile.imwrite(tmp_path / "a.tif", img16)
    assert read_image(tmp_path / "a.tif").dtype == np.uint16
    rgb = np.stack([blob_image(64)[0], blob_image(64, seed=1)[0], blob_image(64)[0]], -1)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    with pytest.warns(UserWarning, match="RGB image converted to grayscale"):
        gray = read_image(tmp_path / "rgb.png")
    assert gray.ndim == 2 and gray.dtype == np.uint8
    # RGBA: the colour channels give the grey value, alpha none (BGRA turned round would be ARGB).
    r, g, b = (blob_image(64, seed=k)[0] for k in (2, 3, 4))
    expected = np.round(0.299 * r + 0.587 * g + 0.114 * b.astype(np.float32)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.stack([b, g, r, np.full_like(r, 255)], -1))  # OpenCV: BGRA
    with pytest.warns(UserWarning, match="RGB image converted to grayscale"):
        assert np.abs(read_image(tmp_path / "rgba.png").astype(int) - expected).max() <= 1
    grey = blob_image(64)[0]
    cv2.imwrite(str(tmp_path / "grey_rgba.png"), np.stack([grey, grey, grey, np.full_like(grey, 255)], -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal colour channels: no conversion warning
        assert np.array_equal(read_image(tmp_path / "grey_rgba.png"), grey)


def test_lossy_label_is_refused(tmp_path):
    # 0/1 mitochondria with 255 unlabelled: as JPEG no threshold can tell 1 from 0, so the
    # unlabelled part would be read as the foreground.
    msk = blob_image(64)[1].astype(np.uint8)
    msk[:, :32] = 255
    cv2.imwrite(str(tmp_path / "m.jpg"), msk)
    with pytest.raises(DataError, match=r"m\.jpg: labels must be lossless.*PNG or TIFF"):
        read_label(tmp_path / "m.jpg")


def test_pixel_size_from_imagej_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "ij.tif", blob_image(32)[0], imagej=True, resolution=(1 / 0.0046, 1 / 0.0046),
                     metadata={"unit": "um"})
    assert read_pixel_size_nm(tmp_path / "ij.tif") == pytest.approx(4.6, rel=1e-4)
    tifffile.imwrite(tmp_path / "plain.tif", blob_image(32)[0])
    assert read_pixel_size_nm(tmp_path / "plain.tif") is None


def test_pixel_size_from_ome_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "a.ome.tif", blob_image(32)[0], ome=True,
                     metadata={"PhysicalSizeX": 6.5, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 6.5,
                               "PhysicalSizeYUnit": "nm"})
    assert read_pixel_size_nm(tmp_path / "a.ome.tif") == pytest.approx(6.5)
    tifffile.imwrite(tmp_path / "b.ome.tif", blob_image(32)[0], ome=True, metadata={"PhysicalSizeX": 0.008})
    assert read_pixel_size_nm(tmp_path / "b.ome.tif") == pytest.approx(8.0)  # OME's default unit is um


@pytest.mark.parametrize("kind", ["imagej", "plain", "zlib"])
def test_a_truncated_tiff_stack_is_refused_not_read_short(tmp_path, kind):
    """tifffile guesses a shorter stack from a cut-off file (a 6-slice ImageJ stack opens as one
    2-D image); every reader refuses it by name instead, whatever the root logger's level."""
    import logging

    from xmdl_tf.io import stack_depth
    from xmdl_tf.volume_io import open_volume

    stack = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
    kwargs = {"imagej": {"imagej": True}, "plain": {}, "zlib": {"compression": "zlib"}}[kind]
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, stack, **kwargs)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    log = logging.getLogger("tifffile")
    before = (log.level, log.propagate, list(log.handlers))
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.CRITICAL)
    try:
        for read in (lambda: stack_depth(cut), lambda: read_image(cut, page=0), lambda: open_volume(str(cut)),
                     lambda: stack_pairs(cut, cut)):
            with pytest.raises(DataError, match=r"cut\.tif: damaged TIFF"):
                read()
    finally:
        logging.getLogger().setLevel(root_level)
    assert (log.level, log.propagate, list(log.handlers)) == before  # tifffile's logger left as found
    assert stack_depth(whole) == 6 and open_volume(str(whole)).shape == (6, 32, 32)


def test_colour_labels_keep_every_object(tmp_path):
    """Colour masks: one label per colour on black (dark blue must not vanish as grey 0, equal-luminance
    colours must not merge); a mask drawn only in alpha is its alpha; grey RGB is read as it is."""
    lab = np.zeros((32, 32, 3), np.uint8)
    lab[2:8, 2:8] = (0, 0, 3)  # dark blue: luminance 0.3 -> 0
    lab[10:16, 10:16] = (255, 0, 0)
    lab[20:26, 20:26] = (0, 0, 255)
    lab[20:26, 2:8] = (255, 0, 0)  # a second red object: the same label as the first
    cv2.imwrite(str(tmp_path / "c.png"), lab[..., ::-1])  # OpenCV writes BGR
    with pytest.warns(UserWarning, match="colour label read as 3 label"):
        ids = read_label(tmp_path / "c.png")
    assert ids[0, 0] == 0 and len(np.unique(ids[2:8, 2:8])) == 1 and ids[2, 2] > 0
    assert len({int(ids[3, 3]), int(ids[12, 12]), int(ids[22, 22])}) == 3 and ids[12, 12] == ids[22, 4]
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[5:15, 5:15, 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    with pytest.warns(UserWarning, match="alpha channel only"):
        assert (read_label(tmp_path / "a.png") > 0).sum() == 100
    grey = np.zeros((32, 32, 3), np.uint8)
    grey[4:9, 4:9] = 1
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (read_label(tmp_path / "g.png") == 1).sum() == 25


def test_pixel_size_units_and_non_square_pixels(tmp_path):
    img = blob_image(32)[0]
    for x, y, unit, nm in ((46, 46, "Å", 4.6), (4600, 4600, "pm", 4.6), (4.6, 4.6, "nm", 4.6), (1, 1, "furlong", None)):
        tifffile.imwrite(tmp_path / "o.ome.tif", img, ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": x, "PhysicalSizeXUnit": unit,
                                   "PhysicalSizeY": y, "PhysicalSizeYUnit": unit})
        got = read_pixel_size_nm(tmp_path / "o.ome.tif")
        assert got == (pytest.approx(nm) if nm else None), (unit, got)
    # ImageJ calibration of 4.6 x 9.2 nm pixels: x is used, and the user is told the areas are off.
    tifffile.imwrite(tmp_path / "aniso.tif", img, imagej=True, resolution=(1 / 0.0046, 1 / 0.0092),
                     metadata={"unit": "um"})
    with pytest.warns(UserWarning, match=r"not square \(4.6 nm wide, 9.2 nm high\)"):
        assert read_pixel_size_nm(tmp_path / "aniso.tif") == pytest.approx(4.6)


def test_reading_one_slice_of_a_stack_warns(tmp_path):
    """read_image on a multi-page TIFF gives its first slice; the others must not go unnoticed."""
    import warnings

    stack = np.stack([blob_image(32, seed=s)[0] for s in range(3)])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    with pytest.warns(UserWarning, match=r"stack\.tif: a stack of 3 slices; reading its first only"):
        first = read_image(tmp_path / "stack.tif")
    np.testing.assert_array_equal(first, stack[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "stack.tif", page=2), stack[2])
        tifffile.imwrite(tmp_path / "one.tif", stack[1])
        np.testing.assert_array_equal(read_image(tmp_path / "one.tif"), stack[1])
