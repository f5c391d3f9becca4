"""The Python API as a notebook user calls it: NumPy (and array-like) inputs of every plausible kind.

`read_image` maps any file's dtype and layout onto a (H, W) uint8/uint16 slice (`io.to_em_dtype`);
an array handed straight to `predict_slice`, `explain_slice`, `analyze_image` or `analyze_volume`
must be taken by the same rules, not rounded and clipped (a 0..1 float slice became a binary image,
negative int16 values became 0), and anything else must fail with one clear exception.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from conftest import blob_image
from xmdl_tf.io import DataError, as_em_slice, as_em_volume


@pytest.fixture(scope="module")
def predictor(untrained_model):
    """The suite's untrained tiny model (deterministic, which is all these tests need), loaded once."""
    from xmdl_tf.predict import load_model

    return load_model(untrained_model)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    img = blob_image(64, seed=3)[0]
    assert img.min() > 0 and img.max() < 255  # so that a linear map of it is not the identity
    return img


NO_TTA = {"inference": {"tta": False, "zoom_search": "off", "auto_zoom": False}}


# ----------------------------------------------------------------------------
# Converting arrays (no model)


def test_as_em_slice_takes_arrays_as_files_are_read(image):
    assert as_em_slice(image) is image  # uint8 (H, W): as it is, no copy
    for arr in (image[..., None], image[None], np.repeat(image[..., None], 3, -1), image.tolist()):
        np.testing.assert_array_equal(as_em_slice(arr), image)
    shifted = as_em_slice(image.astype(np.int16) - 200)  # signed: shifted by its minimum, not clipped at 0
    np.testing.assert_array_equal(shifted.astype(np.int64), image.astype(np.int64) - int(image.min()))
    unit = as_em_slice(image.astype(np.float32) / 255)  # 0..1: mapped linearly onto 0..65535
    assert unit.dtype == np.uint16 and unit.min() == 0 and unit.max() == 65535
    assert np.corrcoef(unit.ravel(), image.ravel())[0, 1] > 0.9999
    assert as_em_slice(image > 128).dtype == np.uint8


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 64, 64), np.uint8), "analyze_volume"),
    (np.full((64, 64), np.nan, np.float32), "no finite"),
    (np.zeros((0, 64), np.uint8), "empty"),
    (np.array([["a", "b"], ["c", "d"]]), "dtype"),
])
def test_as_em_slice_refuses_with_one_clear_error(bad, message):
    with pytest.raises(DataError, match=message):
        as_em_slice(bad, "my slice")


def test_as_em_volume(image):
    vol = np.stack([image, image[::-1]])
    assert as_em_volume(vol) is vol
    np.testing.assert_array_equal(as_em_volume(vol[..., None]), vol)
    one_map = as_em_volume(vol.astype(np.float64) / 255)  # one grey-value map for the whole volume
    assert one_map.dtype == np.uint16 and np.corrcoef(one_map.ravel(), vol.ravel())[0, 1] > 0.9999
    with pytest.raises(DataError, match="analyze_image"):
        as_em_volume(image)
    with pytest.raises(DataError, match="colour image"):
        as_em_volume(np.repeat(image[..., None], 3, -1))


# ----------------------------------------------------------------------------
# Predicting arrays


def test_predict_slice_reads_arrays_as_files(predictor, image):
    ref = predictor.predict_slice(image)
    # Float slices already normalised to 0..1 were rounded to 0/1 (a binary image) before.
    np.testing.assert_allclose(predictor.predict_slice(image.astype(np.float32) / 255), ref, atol=2e-3)
    np.testing.assert_allclose(predictor.predict_slice(image.astype(np.float64) * 257), ref, atol=2e-3)
    # Signed slices with negative grey values were clipped at 0 before.
    np.testing.assert_array_equal(predictor.predict_slice(image.astype(np.int16) - 200), ref)
    # Layouts a reader returns: (H, W, 1), (1, H, W), grey RGB(A); were errors from deep inside.
    for arr in (image[..., None], image[None], np.repeat(image[..., None], 3, -1),
                np.concatenate([np.repeat(image[..., None], 3, -1), np.full((*image.shape, 1), 255, np.uint8)], -1)):
        np.testing.assert_array_equal(predictor.predict_slice(arr), ref)
    # Views and memory layouts give the same as a contiguous copy.
    np.testing.assert_array_equal(predictor.predict_slice(np.asfortranarray(image)), ref)
    np.testing.assert_array_equal(predictor.predict_slice(image.T), predictor.predict_slice(image.T.copy()))
    prob, cam = predictor.explain_slice(image.astype(np.float32) / 255)
    ref_prob, ref_cam = predictor.explain_slice(image)
    np.testing.assert_allclose(prob, ref_prob, atol=2e-3)


def test_predict_slice_refuses_clearly(predictor, image):
    with pytest.raises(DataError, match="NaN"):
        predictor.predict_slice(np.where(image > 100, np.nan, image.astype(np.float32)))
    with pytest.raises(DataError, match="2-D"):
        predictor.predict_slice(np.stack([image, image]))
    for bad in (-5.0, 0, float("nan"), "5"):  # -5 said "would resample by x-1 (more than x16)"; 0 was "unknown"
        with pytest.raises(ValueError, match="pixel_size_nm must be a positive number"):
            predictor.predict_slice(image, pixel_size_nm=bad)
    with pytest.raises(ValueError, match="region"):
        predictor.explain_slice(image, region=np.ones((10, 10), bool))


def test_analyze_image_takes_arrays_as_files(predictor, image):
    from xmdl_tf.analyze import Settings, analyze_image

    s = Settings(**NO_TTA)
    before = image.copy()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ref = analyze_image(predictor, image, "s", s, pixel_size_nm=5.0)
        again = analyze_image(predictor, image, "s", s, pixel_size_nm=5.0)
        signed = analyze_image(predictor, image.astype(np.int16) - 200, "s", s, pixel_size_nm=5.0)
        chan = analyze_image(predictor, image[..., None], "s", s, pixel_size_nm=5.0)
        unit = analyze_image(predictor, image.astype(np.float32) / 255, "s", s, pixel_size_nm=5.0)
    assert out.getvalue() == ""  # a library prints nothing
    np.testing.assert_array_equal(image, before)  # the input is left alone
    np.testing.assert_array_equal(again.probability, ref.probability)
    assert again.table.equals(ref.table)
    np.testing.assert_array_equal(signed.probability, ref.probability)
    np.testing.assert_array_equal(signed.instances, ref.instances)
    np.testing.assert_array_equal(chan.probability, ref.probability)  # was "192 x 256 px: narrower than 32 px"
    assert chan.image.shape == image.shape
    np.testing.assert_allclose(unit.probability, ref.probability, atol=2e-3)
    assert unit.image.dtype == np.uint16  # mean_intensity in the mapped grey values, as the README says
    with pytest.raises(DataError, match="analyze_volume"):
        analyze_image(predictor, np.stack([image, image]), "s", s)
    with pytest.raises(ValueError, match="pixel_size_nm must be a positive number"):
        analyze_image(predictor, image, "s", s, pixel_size_nm=-5.0)


def test_analyze_volume_takes_arrays_as_files(predictor, image, tmp_path):
    from xmdl_tf.volume import VolumeSettings, analyze_volume

    vol = np.stack([image, image[:, ::-1], image[::-1]])
    s = VolumeSettings(**NO_TTA, figure=False)
    ref = analyze_volume(predictor, vol, "v", s, voxel_size_nm=(5, 5, 5))
    signed = analyze_volume(predictor, vol.astype(np.int16) - 200, "v", s, voxel_size_nm=(5, 5, 5))
    np.testing.assert_array_equal(signed.probability, ref.probability)  # negative values were clipped at 0
    unit = analyze_volume(predictor, vol.astype(np.float32) / 255, "v", s, voxel_size_nm=(5, 5, 5))
    np.testing.assert_allclose(unit.probability, ref.probability, atol=2e-3)  # was a binary volume
    chan = analyze_volume(predictor, vol[..., None], "v", s, voxel_size_nm=(5, 5, 5))
    np.testing.assert_array_equal(chan.probability, ref.probability)
    np.save(tmp_path / "v.npy", vol)
    mapped = analyze_volume(predictor, np.load(tmp_path / "v.npy", mmap_mode="r"), "v", s, voxel_size_nm=(5, 5, 5))
    np.testing.assert_array_equal(mapped.probability, ref.probability)
    da = pytest.importorskip("dask.array")
    lazy = analyze_volume(predictor, da.from_array(vol, chunks=(1, 32, 32)), "v", s, voxel_size_nm=(5, 5, 5))
    np.testing.assert_array_equal(lazy.probability, ref.probability)  # was "Cannot call len() ... unknown chunk"


def test_analyze_volume_refuses_clearly(predictor, image):
    from xmdl_tf.volume import VolumeSettings, analyze_volume

    vol = np.stack([image, image])
    s = VolumeSettings(**NO_TTA, figure=False)
    with pytest.raises(DataError, match="3-D"):  # was an IndexError
        analyze_volume(predictor, image, "v", s)
    for bad in ((5, 5), (5, -5, -5)):  # were an IndexError / "would resample by x-1"
        with pytest.raises(ValueError, match="voxel_size_nm must be three positive numbers"):
            analyze_volume(predictor, vol, "v", s, voxel_size_nm=bad)


def test_predict_slice_refuses_a_zero_zoom_or_tile(predictor, image):
    with pytest.raises(ValueError, match="zoom must be a positive number"):  # predicted a 1 x 1 image, silently
        predictor.predict_slice(image, zoom=0)
    with pytest.raises(ValueError, match="tile must be a positive number"):  # was a ZeroDivisionError
        predictor.predict_slice(image, tile=0)


def test_empty_masks_are_refused_clearly():
    from xmdl_tf.instances import mask_to_instances
    from xmdl_tf.morphometry import measure

    with pytest.raises(ValueError, match="empty"):  # was an OpenCV assertion
        mask_to_instances(np.zeros((0, 0), bool))
    with pytest.raises(ValueError, match="empty"):  # was "zero-size array to reduction operation maximum"
        measure(np.zeros((0, 0), np.uint16))
    labels = np.zeros((8, 8), np.uint16)
    labels[2:5, 2:6] = 1
    with pytest.raises(ValueError, match="pixel_size_nm must be a positive number"):  # was a TypeError about '>'
        measure(labels, pixel_size_nm="4.6")
    assert measure(labels, pixel_size_nm=np.float64(5.0))["area_nm2"].tolist() == [300.0]


def test_load_model_without_a_path_is_the_commands_default(monkeypatch, tmp_path):
    """load_model() loads what every command uses without --model ($XMDL_MODEL, else the built-in)."""
    from xmdl_tf.predict import load_model
    from xmdl_tf.tiling import tile_starts

    monkeypatch.setenv("XMDL_MODEL", "xmdl_ref_f8")
    assert load_model().config.model.base_filters == 8
    monkeypatch.setenv("XMDL_MODEL", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="XMDL_MODEL=.*no such model"):
        load_model()
    with pytest.raises(ValueError, match="overlap -8 must be 0 or more"):
        tile_starts(300, 128, -8)


def test_predict_slice_padding_needs_its_counts_and_the_image_shape(predictor):
    """padding= is a piece's share of its slice's padding (with the slice's counts=): without them, or
    of another shape, it is one clear error, not ignored or a NumPy traceback."""
    from xmdl_tf.sampling import grey_counts

    img = blob_image(64)[0]
    with pytest.raises(ValueError, match="given with the slice's counts="):
        predictor.predict_slice(img, padding=np.zeros(img.shape, bool))
    with pytest.raises(ValueError, match=r"padding of shape \(3, 3\) differs"):
        predictor.predict_slice(img, counts=grey_counts(img), padding=np.zeros((3, 3), bool))
